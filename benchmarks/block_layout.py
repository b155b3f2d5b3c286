"""Inference block layout, measured: with b < B, does the drafter guess better from the trained
B-token block (keeping its first b-1 guesses) or from a b-token block?

Replays every eval prompt (data/eval_labels: the target's greedy answers with their features) under
both layouts, for each trained drafter, and reports tau per layout with the paired 95% interval of
the difference over prompts (specauf/evidence.py), per inference block size, pooled over the sets.
Also times the replay against decoding the same prompts (greedy, one torch thread).

    .venv/bin/python benchmarks/block_layout.py --drafter data/drafters/decay-0 --drafter data/drafters/auf-0
"""
from __future__ import annotations

import argparse
import json

from common import median, print_header, setup_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drafter", action="append", required=True, help="trained drafter folder (repeatable)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--decode-prompts", type=int, default=4, help="prompts also decoded per layout, for the cost ratio")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    setup_threads(1)
    import time

    import torch

    from specauf import evidence
    from specauf.artifacts import read_manifest
    from specauf.evaluate.decode import DrafterProposer, speculative_generate
    from specauf.train.drafter import BlockDrafter
    from specauf.data.generation import encode_chat
    from specauf.params_file import load_params
    from specauf.data.prompts import load_eval_prompts
    from specauf.evaluate.replay import replay_drafter
    from specauf.target.run import load_target

    params = load_params(args.params)
    target, tok, manifest = load_target("data/target")
    stops = manifest["stop_token_ids"]
    sets = load_eval_prompts("data/prompts", params.eval.sets)
    every = {r["prompt_id"]: name for name, rows in sets.items() for r in rows}
    sizes = params.eval.speculative_block_sizes
    M = params.eval.replay_max_new_tokens
    print_header("block layout: trained B-token block vs b-token block, tau by replay")
    print(f"{len(every)} eval prompts, {M} tokens of greedy answer, block sizes {sizes}", flush=True)
    result = {"prompts": len(every), "max_new_tokens": M, "drafters": {}}
    for path in args.drafter:
        drafter = BlockDrafter.from_pretrained(path).eval()
        rows, seconds = {}, {}
        for layout in ("trained", "short"):
            t0 = time.perf_counter()
            rows[layout] = replay_drafter(drafter, target, "data/eval_labels", every, sizes, layout, M, stops)
            seconds[layout] = time.perf_counter() - t0
        out = {"replay_seconds": seconds, "sizes": {}}
        for b in sizes:
            key = f"b{b}"
            cols = evidence.paired_rows(rows["trained"], rows["short"], key)
            d = evidence.paired_diff_ci(*cols)
            out["sizes"][key] = {"trained": sum(cols[0]) / sum(cols[1]), "short": sum(cols[2]) / sum(cols[3]),
                                 "trained_minus_short": d, "verdict": evidence.verdict(d)}
        # cost: decoding the first prompts of the first set at the largest block size, vs their replay
        first = next(iter(sets.values()))[: args.decode_prompts]
        proposer = DrafterProposer(drafter, target, "trained")
        dec = []
        for r in first:
            ids = encode_chat(tok, r["turns"][:1])
            t0 = time.perf_counter()
            speculative_generate(target, ids, proposer=proposer, block_size=sizes[-1], max_new_tokens=M, stop_token_ids=stops)
            dec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        replay_drafter(drafter, target, "data/eval_labels", {r["prompt_id"]: "s" for r in first}, [sizes[-1]],
                       "trained", M, stops)
        rep = (time.perf_counter() - t0) / len(first)
        out["cost"] = {"decode_s_per_prompt": median(dec), "replay_s_per_prompt": rep, "block_size": sizes[-1],
                       "decode_over_replay": median(dec) / rep}
        result["drafters"][path] = out
        print(f"\n{path}: replay of {len(every)} prompts took {seconds['trained']:.0f} s (trained layout), "
              f"{seconds['short']:.0f} s (short)")
        print("| B | tau trained | tau short | trained - short [95% interval] | verdict |\n|---|---|---|---|---|")
        for key, s in out["sizes"].items():
            d = s["trained_minus_short"]
            print(f"| {key[1:]} | {s['trained']:.3f} | {s['short']:.3f} | {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] "
                  f"| {s['verdict']} |")
        c = out["cost"]
        print(f"cost at B={c['block_size']}: decoding {c['decode_s_per_prompt']:.2f} s/prompt, replay "
              f"{c['replay_s_per_prompt']:.3f} s/prompt ({c['decode_over_replay']:.0f}x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
