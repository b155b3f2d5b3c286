"""Decode speed table: plain decoding vs our drafter(s) at several block sizes vs transformers
prompt lookup, batch 1, greedy, 1 torch thread.

Contenders, each run once per prompt per round, interleaved (round r: prompt 1: plain, drafter
b=.., ..., hf plain, hf prompt lookup; prompt 2: ...), --repeats rounds:

- plain: `specauf.evaluate.decode.speculative_generate` with block size 1 (the same engine, no drafter);
- <drafter> b=K: the same engine with `DrafterProposer` at inference block size K;
- hf plain / hf prompt lookup: `model.generate(do_sample=False)` without / with
  `prompt_lookup_num_tokens` (timed as in the eval stage: the first token is timed separately
  and subtracted, so every row excludes the prefill).

Per contender and prompt the median decode time over the rounds is taken; a row's time per
token = sum of those medians / tokens. Speedups are ratios of those to plain (ours) or to hf plain
(peers). tau = tokens per target forward (pooled). Greedy outputs are checked against plain.

    .venv/bin/python benchmarks/decode.py --drafter data/drafters/auf-0 --drafter data/drafters/decay-0
    .venv/bin/python benchmarks/decode.py --random-drafter      # plumbing check only: tau ~ 1
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import load_bench_target, median, print_header, print_table, rel, setup_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drafter", action="append", default=[], help="trained drafter folder (repeatable)")
    ap.add_argument("--random-drafter", action="store_true",
                    help="add a randomly initialised drafter (plumbing check; its numbers mean nothing)")
    ap.add_argument("--prompts", default="data/prompts", help="prompts stage output")
    ap.add_argument("--set", action="append", default=None, help="evaluation set (repeatable; default mt-bench)")
    ap.add_argument("--n", type=int, default=2, help="prompts per set (the first ones)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8], help="inference block sizes of our drafters")
    ap.add_argument("--prompt-lookup", type=int, default=10, help="prompt_lookup_num_tokens for the peer (0 = skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--linear-kernels", choices=["auto", "stock"], default="auto",
                    help="the target's linear kernels for every contender, as eval.linear_kernels (default auto)")
    ap.add_argument("--target", default=None)
    args = ap.parse_args()
    if not args.drafter and not args.random_drafter:
        ap.error("give --drafter DIR (repeatable) and/or --random-drafter")
    setup_threads(1)
    import torch
    from specauf.artifacts import read_manifest
    from specauf.config import EvalParams
    from specauf.evaluate.decode import DrafterProposer, speculative_generate
    from specauf.train.drafter import BlockDrafter, DrafterConfig
    from specauf.target.access import default_target_layer_ids
    from specauf.evaluate.run import _hf_generate_time, decode_row_counts
    from specauf.evaluate.linear_kernels import describe_plan, tune_linears
    from specauf.data.generation import encode_chat
    from specauf.data.prompts import load_prompt_set
    from specauf.target.run import check_fingerprint

    model, tok, manifest, tdir = load_bench_target(args.target)
    stops, pad = manifest["stop_token_ids"], manifest["pad_token_id"]
    drafters: dict[str, BlockDrafter] = {}
    described = []
    for d in args.drafter:
        dm = read_manifest(d, kind="drafter")
        if "target_fingerprint" in dm:
            check_fingerprint(dm["target_fingerprint"], manifest, f"the drafter in {d}")
        key = Path(d).name if Path(d).name not in drafters else rel(d)
        drafters[key] = BlockDrafter.from_pretrained(d).eval()
        described.append(f"{key} ({rel(d)}, trained block {drafters[key].block_size}, variant {dm.get('variant')})")
    if args.random_drafter:
        cfg = DrafterConfig.from_target_config(
            model.config, num_layers=1, block_size=max(args.block_sizes), mask_token_id=manifest["mask_token_id"],
            target_layer_ids=default_target_layer_ids(model.config.num_hidden_layers, 5))
        torch.manual_seed(0)
        drafters["random"] = BlockDrafter(cfg).eval()
        described.append("random (random init, 1 layer, 5 feature layers)")
    for name, dr in drafters.items():
        too_big = [b for b in args.block_sizes if b > dr.block_size]
        if too_big:
            raise SystemExit(f"--block-sizes {too_big} exceed drafter {name}'s trained block size {dr.block_size}")

    sets = args.set or ["mt-bench"]
    prompts = [(s, row["prompt_id"], encode_chat(tok, row["turns"][:1]))
               for s in sets for row in load_prompt_set(args.prompts, s)[: args.n]]
    print_header("Decode: plain vs drafter block sizes vs transformers prompt lookup")
    print(f"target {rel(tdir)} ({manifest['source']}); sets {sets}, {len(prompts)} prompts "
          f"({', '.join(str(len(p)) for *_, p in prompts)} tokens); max_new_tokens {args.max_new_tokens}, greedy, "
          f"block sizes {args.block_sizes}, prompt lookup {args.prompt_lookup}, {args.repeats} rounds; "
          f"drafters: {'; '.join(described)}\n",
          flush=True)

    decode = dict(max_new_tokens=args.max_new_tokens, stop_token_ids=stops)
    eval_params = EvalParams(max_new_tokens=args.max_new_tokens, block_sizes=args.block_sizes,
                             prompt_lookup_num_tokens=args.prompt_lookup, linear_kernels=args.linear_kernels)
    tuned = tune_linears(model, decode_row_counts(eval_params), args.linear_kernels)
    if tuned:
        print(f"linear kernels: auto, {describe_plan(tuned['plan'])}; "
              "at rows 1/2/4: " + "; ".join(f"{shape} " + "/".join(p[r] for r in (1, 2, 4) if r in p)
                                            for shape, p in tuned["plan"].items()) + "\n")
    else:
        print(f"linear kernels: {args.linear_kernels}\n")
    contenders = {"plain": lambda ids: speculative_generate(model, ids, block_size=1, **decode)}
    for name, dr in drafters.items():
        proposer = DrafterProposer(dr, model)
        for b in args.block_sizes:
            contenders[f"{name} b={b}"] = (lambda ids, proposer=proposer, b=b:
                                           speculative_generate(model, ids, proposer=proposer, block_size=b, **decode))
    contenders["hf plain"] = lambda ids: _hf_generate_time(model, ids, eval_params, stops, pad)
    if args.prompt_lookup:
        contenders["hf prompt lookup"] = lambda ids: _hf_generate_time(
            model, ids, eval_params, stops, pad, prompt_lookup_num_tokens=args.prompt_lookup)

    # times[name][prompt] = [decode seconds per round]; tokens/outputs from the first round
    times = {k: [[] for _ in prompts] for k in contenders}
    tokens = {k: [0] * len(prompts) for k in contenders}
    cycles = {k: [0] * len(prompts) for k in contenders}
    outputs = {k: [None] * len(prompts) for k in contenders}
    for r in range(args.repeats):
        for i, (_, _, ids) in enumerate(prompts):
            parts = []
            for name, fn in contenders.items():
                out = fn(ids)
                if isinstance(out, tuple):  # hf: (seconds, tokens after the first, all tokens)
                    secs, n_tok, toks = out
                    n_cyc = n_tok
                else:
                    secs, n_tok, toks, n_cyc = out.decode_time_s, out.decode_tokens, out.token_ids, out.num_cycles
                times[name][i].append(secs)
                if r == 0:
                    tokens[name][i], cycles[name][i], outputs[name][i] = n_tok, n_cyc, toks
                parts.append(f"{name} {secs:.2f}s")
            print(f"  round {r + 1}/{args.repeats} prompt {i + 1}/{len(prompts)}: " + ", ".join(parts), flush=True)

    def tpt(name):
        return sum(median(ts) for ts in times[name]) / max(1, sum(tokens[name]))

    plain_tpt, hf_tpt = tpt("plain"), tpt("hf plain")
    rows = []
    for name in contenders:
        t = tpt(name)
        hf = name.startswith("hf")
        tau = sum(tokens[name]) / max(1, sum(cycles[name])) if not hf else float("nan")
        same = sum(outputs[name][i] == outputs["plain"][i] for i in range(len(prompts)))
        rows.append([name, sum(tokens[name]), f"{1000 * t:.1f}", f"{1 / t:.2f}",
                     f"{tau:.2f}" if tau == tau else "-", f"{plain_tpt / t:.2f}x",
                     f"{hf_tpt / t:.2f}x" if hf else "-", f"{same}/{len(prompts)}"])
    print()
    print_table(["method", "decode tokens", "ms/token", "tokens/s", "tau", "speedup vs plain",
                 "speedup vs hf plain", "same output as plain"], rows)
    print("- times exclude the prefill; medians per prompt over the rounds, pooled over prompts")
    if "random" in drafters:
        print("- NOTE: includes a RANDOM drafter: a plumbing check, not a result")


if __name__ == "__main__":
    main()
