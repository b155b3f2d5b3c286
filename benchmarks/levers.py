"""Which training levers make a useful drafter on the embedded target within CPU minutes.

Runs the real train stage code (`specauf.train.run.train_variant`) on `data/labels` with the default
params plus one override per run, and prints held-out token accuracy and teacher-forced
acceptance length (the offline tau estimate) against wall time. 1 torch thread.

    python benchmarks/levers.py --steps 300 --runs default,vocab_4096,block_4_anchors_64

A run is a dict of `train.*` overrides, plus three keys that are not params:
- `variant`: the loss variant (default: --variant);
- `context_window` (a DIAGNOSTIC, not a pipeline option): each block sees only the features of
  the last W positions before its anchor instead of all of them, to test whether learning where
  to attend is what holds a drafter back;
- `init_final_norm`: start the drafter's final `norm` from the target's final norm (so its logits
  have the target's scale from step 0); "zero_residual" also zero-initialises every layer's
  o_proj and down_proj, so the drafter starts as the identity on its input embeddings.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from unittest import mock

import torch

import specauf.train.blocks
import specauf.train.run
from specauf.params_file import load_params
from specauf.runtime import setup_logging
from specauf.target.run import load_target
from specauf.train.run import train_variant

RUNS = {
    "default": {},
    "auf": {"variant": "auf"},
    "curriculum": {"variant": "decay_then_auf"},
    "init_from_target": {"init_from_target": True},
    "random_init": {"init_from_target": False},
    "init_final_norm": {"init_final_norm": "copy"},
    "init_final_norm_zero_residual": {"init_final_norm": "zero_residual"},
    "lr_3e-3": {"lr": 3e-3},
    "lr_3e-4": {"lr": 3e-4},
    "anchors_64_one_seq": {"anchors_per_seq": 64, "micro_batch_size": 1},
    "vocab_4096": {"draft_vocab_size": 4096},
    "full_vocab": {"draft_vocab_size": 0},
    "two_layers": {"num_layers": 2},
    "block_4_anchors_64": {"block_size": 4, "anchors_per_seq": 64},
    "block_4_anchors_64_auf": {"variant": "auf", "block_size": 4, "anchors_per_seq": 64},
    "block_16": {"block_size": 16},
    "context_window_1": {"context_window": 1},
    "context_window_8": {"context_window": 8},
    "bf16": {"precision": "bf16"},
    "bf16_auf": {"variant": "auf", "precision": "bf16"},
    "bf16_auf_4_seqs": {"variant": "auf", "precision": "bf16", "micro_batch_size": 4},
    "auf_anchors_64": {"variant": "auf", "anchors_per_seq": 64},
    "auf_lr_2e-3": {"variant": "auf", "lr": 2e-3},
    "auf_wd_0.1": {"variant": "auf", "weight_decay": 0.1},
    "auf_wd_0.3": {"variant": "auf", "weight_decay": 0.3},
    "decay_wd_0.1": {"variant": "decay", "weight_decay": 0.1},
    "auf_two_layers": {"variant": "auf", "num_layers": 2},
    # these need labels with the target's top-k (labels.top_k > 0): --labels/--params pointing at them
    "auf_distill_0.5": {"variant": "auf", "distill_weight": 0.5},
    "auf_distill_0.9": {"variant": "auf", "distill_weight": 0.9},
    "decay_distill_0.5": {"variant": "decay", "distill_weight": 0.5},
}
EXTRA = ("variant", "context_window", "init_final_norm")


def patches(run: dict) -> contextlib.ExitStack:
    """The run's non-param changes to the train code, undone when the run ends."""
    stack = contextlib.ExitStack()
    window, how = run.get("context_window"), run.get("init_final_norm")
    if window:  # hide context features more than `window` positions before each block's anchor
        full = specauf.train.blocks.block_attention_mask

        def windowed(anchors, block_size, context_len):
            mask = full(anchors, block_size, context_len)
            too_far = torch.arange(context_len)[None, :] < (anchors.long()[:, None] - window)
            mask[:, :context_len] &= ~too_far.repeat_interleave(block_size, dim=0)
            return mask

        stack.enter_context(mock.patch.object(specauf.train.blocks, "block_attention_mask", windowed))
    if how:
        if how not in ("copy", "zero_residual"):
            raise ValueError(f"init_final_norm: {how!r} (copy or zero_residual)")
        base_init = specauf.train.run.DrafterRun.__init__

        def init(self, *args, **kwargs):
            base_init(self, *args, **kwargs)
            with torch.no_grad():
                self.drafter.norm.weight.copy_(self.target.get_decoder().norm.weight)
                if how == "zero_residual":
                    for layer in self.drafter.layers:
                        layer.self_attn.o_proj.weight.zero_()
                        layer.mlp.down_proj.weight.zero_()

        stack.enter_context(mock.patch.object(specauf.train.run.DrafterRun, "__init__", init))
    return stack


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--labels", default="data/labels")
    ap.add_argument("--target", default="data/target")
    ap.add_argument("--variant", default="decay")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--evals", type=int, default=3, help="held-out evaluations per run (the last at the end)")
    ap.add_argument("--runs", default="default,auf")
    ap.add_argument("--out", default="benchmarks/.cache/levers")
    args = ap.parse_args()
    setup_logging("levers")
    torch.set_num_threads(1)
    params = load_params(args.params)
    target, _, manifest = load_target(args.target)
    rows = []
    for name in args.runs.split(","):
        if name not in RUNS:
            raise SystemExit(f"error: --runs: unknown run {name!r} (known: {', '.join(RUNS)})")
        run = RUNS[name]
        over = {"steps": args.steps, "eval_every": max(1, args.steps // args.evals), "checkpoint_every": 10**6,
                **{k: v for k, v in run.items() if k not in EXTRA}}
        if "warmup_steps" not in run:
            over["warmup_steps"] = min(params.train.warmup_steps, args.steps // 10)
        p = params.train.model_copy(update=over)
        variant = run.get("variant", args.variant)
        t0 = time.perf_counter()
        with patches(run):
            m = train_variant(p, variant, target=target, target_manifest=manifest, labels_dir=args.labels,
                              out_dir=Path(args.out) / name, work_dir=Path(args.out) / f"{name}.work",
                              metrics_dir=Path(args.out) / f"{name}.metrics", seed=params.base.seed,
                              device=torch.device("cpu"), manifest_extra={})
        minutes = (time.perf_counter() - t0) / 60
        h = m["heldout"]
        rows.append((name, json.dumps(run), variant, args.steps, minutes, h["heldout/token_accuracy"],
                     h["heldout/acceptance_length"]))
        print(f"| {name} | `{json.dumps(run)}` | {variant} | {args.steps} | {minutes:.1f} | "
              f"{h['heldout/token_accuracy']:.3f} | {h['heldout/acceptance_length']:.3f} |", flush=True)
    print(f"\n{args.labels}, block {params.train.block_size} unless overridden, 1 thread")
    print("| run | override | loss | steps | minutes | held-out token acc | held-out acceptance length |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | `{r[1]}` | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.3f} | {r[6]:.3f} |")


if __name__ == "__main__":
    main()
