"""What an engine that ignores the draft vocabulary gets: each trained drafter replayed as evaluated
(scoring only its `d2t` ids, what vLLM and llama.cpp run) and with `d2t` ignored (the same weights
scoring the full target vocabulary with the target's lm_head, what SGLang and the z-lab reference
run), tau on every eval prompt with the paired 95% interval of the difference over prompts.

    .venv/bin/python benchmarks/draft_vocab.py --drafter data/drafters/decay-0 --drafter data/drafters/auf-0
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import print_header, setup_threads


def full_vocab_twin(path):
    """The drafter at `path` as an engine without draft-vocabulary support builds it: same weights, no d2t."""
    from safetensors.torch import load_file

    from specauf.train.drafter import BlockDrafter, DrafterConfig

    config = DrafterConfig.from_pretrained(path)
    config.draft_vocab_size = 0
    twin = BlockDrafter(config).eval()
    state = {k: v for k, v in load_file(f"{path}/model.safetensors").items() if k != "d2t"}
    twin.load_state_dict(state, strict=True)
    return twin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drafter", action="append", required=True, help="trained drafter folder (repeatable)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    setup_threads(1)
    from specauf import evidence
    from specauf.train.drafter import BlockDrafter
    from specauf.params_file import load_params
    from specauf.data.prompts import load_eval_prompts
    from specauf.evaluate.replay import replay_drafter
    from specauf.target.run import load_target

    params = load_params(args.params)
    target, _, manifest = load_target("data/target")
    stops = manifest["stop_token_ids"]
    sets = load_eval_prompts("data/prompts", params.eval.sets)
    every = {r["prompt_id"]: name for name, rows in sets.items() for r in rows}
    sizes = params.eval.speculative_block_sizes
    M, layout = params.eval.replay_max_new_tokens, params.eval.block_layout
    print_header("draft vocabulary: as evaluated (d2t) vs ignored (full vocabulary, same weights), tau by replay")
    print(f"{len(every)} eval prompts, {M} tokens of greedy answer, block sizes {sizes}, layout {layout}", flush=True)
    result = {"prompts": len(every), "max_new_tokens": M, "layout": layout, "drafters": {}}
    for path in args.drafter:
        drafter = BlockDrafter.from_pretrained(path).eval()
        if not drafter.config.draft_vocab_size:
            print(f"{path}: no draft vocabulary, nothing to compare")
            continue
        rows, seconds = {}, {}
        for name, model in (("evaluated", drafter), ("ignored", full_vocab_twin(path))):
            t0 = time.perf_counter()
            rows[name] = replay_drafter(model, target, "data/eval_labels", every, sizes, layout, M, stops, desc=name)
            seconds[name] = time.perf_counter() - t0
        out = {"draft_vocab_size": drafter.config.draft_vocab_size, "replay_seconds": seconds, "sizes": {}}
        for b in sizes:
            key = f"b{b}"
            cols = evidence.paired_rows(rows["evaluated"], rows["ignored"], key)
            d = evidence.paired_diff_ci(*cols)
            tau = lambda num, den: float(np.sum(num) / np.sum(den))  # noqa: E731
            out["sizes"][key] = {"evaluated": tau(cols[0], cols[1]), "ignored": tau(cols[2], cols[3]),
                                 "ignored_minus_evaluated": {"value": -d["value"], "lo": -d["hi"], "hi": -d["lo"]},
                                 "verdict": evidence.verdict(d)}
        result["drafters"][path] = out
        print(f"\n{path} (draft vocabulary {out['draft_vocab_size']}): replay {seconds['evaluated']:.0f} s as evaluated, "
              f"{seconds['ignored']:.0f} s with d2t ignored")
        print("| B | tau as evaluated | tau d2t ignored | ignored - evaluated [95% interval] |\n|---|---|---|---|")
        for key, s in out["sizes"].items():
            d = s["ignored_minus_evaluated"]
            print(f"| {key[1:]} | {s['evaluated']:.3f} | {s['ignored']:.3f} | {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
