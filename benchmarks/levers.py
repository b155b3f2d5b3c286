"""Which training levers make a useful drafter on the embedded target within CPU minutes.

Runs the real train stage code (`specauf.train.train_variant`) on `data/labels` with the default
params plus one override per run, and prints held-out token accuracy and teacher-forced
acceptance length (the offline tau estimate) against wall time. 1 torch thread.

    python benchmarks/levers.py --steps 150 --runs default,random_init,no_ctx_norm
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from specauf.config import load_params
from specauf.runtime import setup_logging
from specauf.target import load_target
from specauf.train import train_variant

RUNS = {
    "default": {},
    "random_init": {"init_from_target": False},
    "no_ctx_norm": {"context_layer_norm": False},
    "full_vocab": {"draft_vocab_size": 0},
    "lr_3e-3": {"lr": 3e-3},
    "lr_3e-4": {"lr": 3e-4},
    "anchors_16": {"anchors_per_seq": 16},
    "anchors_128": {"anchors_per_seq": 128},
    "two_layers": {"num_layers": 2},
    "block_16": {"block_size": 16},
    "feature_scale": {"context_feature_scale": True},
    "feature_scale_lr_3e-3": {"context_feature_scale": True, "lr": 3e-3},
    "feature_scale_no_ctx_norm": {"context_feature_scale": True, "context_layer_norm": False},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--labels", default="data/labels")
    ap.add_argument("--target", default="data/target")
    ap.add_argument("--variant", default="decay")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--runs", default="default,random_init")
    ap.add_argument("--out", default="benchmarks/.cache/levers")
    args = ap.parse_args()
    setup_logging("levers")
    torch.set_num_threads(1)
    params = load_params(args.params)
    target, _, manifest = load_target(args.target)
    rows = []
    for name in args.runs.split(","):
        over = {"steps": args.steps, "eval_every": args.steps, "checkpoint_every": 10**6, **RUNS[name]}
        if "warmup_steps" not in RUNS[name]:
            over["warmup_steps"] = min(params.train.warmup_steps, args.steps // 10)
        p = params.train.model_copy(update=over)
        t0 = time.perf_counter()
        m = train_variant(p, args.variant, target=target, target_manifest=manifest, labels_dir=args.labels,
                          out_dir=Path(args.out) / name, work_dir=Path(args.out) / f"{name}.work",
                          metrics_dir=Path(args.out) / f"{name}.metrics", seed=params.base.seed,
                          device=torch.device("cpu"), manifest_extra={})
        minutes = (time.perf_counter() - t0) / 60
        h = m["heldout"]
        rows.append((name, json.dumps(RUNS[name]), args.steps, minutes, h["heldout/token_accuracy"], h["heldout/acceptance_length"]))
        print(f"| {name} | {json.dumps(RUNS[name])} | {args.steps} | {minutes:.1f} | {h['heldout/token_accuracy']:.3f} | {h['heldout/acceptance_length']:.3f} |", flush=True)
    print(f"\n{args.variant} loss, block {params.train.block_size} unless overridden, 1 thread")
    print("| run | override | steps | minutes | held-out token acc | held-out acceptance length |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | `{r[1]}` | {r[2]} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:.3f} |")


if __name__ == "__main__":
    main()
