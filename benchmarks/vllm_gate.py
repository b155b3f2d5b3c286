"""The served-equals-evaluated gate's margin on a real drafter: vLLM's tau for the right export and
for each of the field's silent export bugs (specauf.serve.vllm_gate.BROKEN), beside our replay of the
drafter as trained, on the first --per-set eval prompts of each set, all at once, one core.

    .venv/bin/python benchmarks/vllm_gate.py --run auf-0 --block-size 4    # ~4 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import ROOT, print_header, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="auf-0", help="a run of the workspace (data/drafters/RUN, data/export/RUN)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--per-set", type=int, default=4, help="eval prompts per set (the stage's vllm.batch_prompts_per_set)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    from specauf.params_file import load_params
    from specauf.serve.vllm_gate import check_broken_exports

    params = load_params(args.params)
    d = ROOT / "data"
    with tempfile.TemporaryDirectory() as scratch:
        got = check_broken_exports(d / "target", d / "drafters" / args.run, d / "export" / args.run, d / "prompts",
                                   d / "eval_rollouts", d / "eval_labels", args.block_size, args.per_set,
                                   params.eval.replay_max_new_tokens, params.vllm.tau_tolerance, Path(scratch))
    print_header(f"vLLM gate on {args.run} at B={args.block_size}: the right export and the broken ones")
    print(f"{got['prompts']} eval prompts, {got['max_new_tokens']} new tokens, all at once; tolerance {params.vllm.tau_tolerance}\n")
    rows = []
    for case, c in got["cases"].items():
        verdict = "passes" if c["passed"] else ("vLLM fails to serve it" if "tau" not in c else "gate fails")
        rows.append([case, c.get("tau", "–"), c.get("replay_tau", "–"), c.get("tau_difference", "–"),
                     len(c.get("outputs_differing_from_plain", [])) if "tau" in c else "–", verdict])
    print_table(["export", "vLLM tau", "replay tau", "difference", "outputs leaving plain greedy", "verdict"], rows)
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
