"""Training step speed: the DeepSpeed engine vs a plain torch AdamW loop, AUF vs decay loss, bf16 vs fp32.

Data: a small REAL labels directory (not random features): --n ShareGPT prompts answered by the
real target with `run_rollouts` (RolloutsParams defaults: greedy, <= 160 new tokens) and labelled
by `run_labels` (LabelsParams defaults: offline float16 features of 5 target layers). It is
built once (~1 min) and cached under benchmarks/.cache/train-labels.

A `DrafterRun` with the settings the recorded figures used (`BENCH_TRAIN`: 1 drafter layer initialised
from the target, block 8, draft vocabulary 8192, 64 anchors per sequence, micro batch 4, ZeRO 0;
fp32 but where named) makes the batches
exactly as the train stage does (`TrainData.train_batch`), before timing. Four identical
copies of the drafter then train side by side, one step each per round on the same batch:

- deepspeed/decay: `specauf.train.distributed.init_engine` + `deepspeed_config`, decay loss;
- plain/decay: torch.optim.AdamW (same lr, betas, eps, weight decay), clip_grad_norm_ and a
  warmup-cosine LambdaLR, decay loss;
- deepspeed/auf: as the first, AUF loss;
- deepspeed/decay/bf16: as the first with `precision: bf16` (fp32 masters, bf16 matmuls): what
  `precision: auto` picks on a CPU with native bf16 (AVX512-BF16/AMX);
- deepspeed/decay/bf16/muon: as the last with `optimizer: muon` (DeepSpeed's Muon on the 2-D
  weights: a Newton-Schulz orthogonalisation of each one per step), the cost that decides how many
  Muon steps fit in the default's CPU minutes.

A step = `DrafterRun.forward` + `compute_loss` + backward + optimizer step; tokens = valid block
positions (the stage's tokens_per_second). Interleaved over --rounds after one warmup round,
1 torch thread, medians. A loss-only check times `compute_loss` + backward on fixed logits of
one batch's shape for decay and auf (interleaved, --loss-repeats).

    .venv/bin/python benchmarks/train.py            # ~3-4 min on 2 cores (plus ~1 min once for the labels)
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math

from common import (CACHE, goal_line, interleave, load_bench_target, median, print_header, print_table, ratio,
                    rel, setup_threads, timed)


# Pinned, not the defaults: the figures in docs/benchmarks.md were measured with these.
BENCH_TRAIN = dict(precision="fp32", init_from_target=True, anchors_per_seq=64, micro_batch_size=4)


def build_labels(model, tok, manifest, n: int):
    """A cached labels dir from n real rollouts; returns its path."""
    from specauf.artifacts import hash_obj, read_json, sha256_file
    from specauf.config import LabelsParams, RolloutsParams
    from specauf.data.labels import run_labels
    from specauf.data.prompt_sources import sharegpt_prompts
    from specauf.data.rollouts import run_rollouts

    rp, lp = RolloutsParams(num_prompts=n, batch_size=16), LabelsParams()
    key = hash_obj({"target": manifest["fingerprint"], "n": n, "rollouts": rp.model_dump(), "labels": lp.model_dump()})
    labels_dir, rollouts_dir = CACHE / "train-labels", CACHE / "train-rollouts"
    if (labels_dir / "manifest.json").is_file() and read_json(labels_dir / "manifest.json").get("bench_key") == key:
        return labels_dir, "cached"
    print(f"building {rel(labels_dir)} from {n} real rollouts (once)...", flush=True)
    extra = {"target_fingerprint": manifest["fingerprint"], "bench_key": key}
    prompts = list(itertools.islice(sharegpt_prompts(), 8 * n))
    run_rollouts(model, tok, prompts, rp, out_dir=rollouts_dir, work_dir=CACHE / "work-rollouts", seed=0,
                 stop_ids=manifest["stop_token_ids"], manifest_extra=extra)
    run_labels(model, rollouts_dir, lp, out_dir=labels_dir, work_dir=CACHE / "work-labels",
               pad_id=manifest["pad_token_id"],
               manifest_extra={**extra, "rollouts_manifest_sha256": sha256_file(rollouts_dir / "manifest.json")})
    return labels_dir, "built now"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="rollouts in the labels dir")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each contender per round)")
    ap.add_argument("--batches", type=int, default=4, help="distinct micro batches, cycled over the rounds")
    ap.add_argument("--loss-repeats", type=int, default=15)
    ap.add_argument("--target", default=None)
    args = ap.parse_args()
    setup_threads(1)
    import torch
    from specauf.config import TrainParams
    from specauf.data.dataset import LabelsDataset
    from specauf.train.distributed import deepspeed_config, init_engine
    from specauf.train.losses import compute_loss
    from specauf.train.run import DrafterRun
    from specauf.train.batches import TrainData

    model, tok, manifest, tdir = load_bench_target(args.target)
    print_header("Training: DeepSpeed engine vs plain AdamW; AUF vs decay loss")
    labels_dir, how = build_labels(model, tok, manifest, args.n)
    ds = LabelsDataset(labels_dir)
    p = TrainParams(**BENCH_TRAIN)
    device = torch.device("cpu")
    data = TrainData(p, ds, 0, manifest["mask_token_id"], model.get_output_embeddings().weight.shape[0], model, device)
    t = DrafterRun(p, "decay", model, manifest, data, seed=0, device=device)
    batches = [data.train_batch(s, 0, 1) for s in range(args.batches)]
    make_s = median(timed(data.train_batch, s, 0, 1)[0] for s in range(args.batches))
    tokens = [int(b.validity.sum()) for b in batches]
    shapes = [tuple(b.block_input_ids.shape) + (b.context_features.shape[1],) for b in batches]
    print(f"labels {rel(labels_dir)} ({how}): {len(ds)} real sequences, {ds.manifest['tokens']} tokens, "
          f"features {ds.manifest['features']} {ds.manifest['feature_dtype']} layers {ds.manifest['layer_ids']}")
    print(f"TrainParams defaults: block {p.block_size}, {p.num_layers} layer(s), init_from_target {p.init_from_target}, "
          f"draft vocab {p.draft_vocab_size}, anchors {p.anchors_per_seq}, micro batch {p.micro_batch_size}, "
          f"max_seq_len {p.max_seq_len}, {p.precision}, ZeRO {p.zero_stage}")
    print(f"{len(batches)} micro batches (N, A*B, context) {shapes}, valid positions {tokens}; "
          f"{args.rounds} timed rounds after 1 warmup\n", flush=True)

    ds_config = deepspeed_config(p)
    base = t.drafter
    contenders, calls = {}, {}

    def next_batch(name):
        # every contender is called once per round, so all see the same batch in a round
        calls[name] = calls.get(name, -1) + 1
        return batches[calls[name] % len(batches)]

    def ds_step(engine, loss_name, name):
        def step():
            batch = next_batch(name)
            logits, labels, validity = t.forward(engine, batch)
            loss, _ = compute_loss(loss_name, logits, labels, validity, t.loss_options)
            engine.backward(loss)
            engine.step()
            return int(validity.sum())
        return step

    def plain_step(drafter, loss_name):
        opt = torch.optim.AdamW([q for q in drafter.parameters() if q.requires_grad], lr=p.lr, betas=(0.9, 0.95),
                                eps=1e-8, weight_decay=p.weight_decay)

        def lr_lambda(s):
            if s < p.warmup_steps:
                return s / max(1, p.warmup_steps)
            prog = (s - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
            return p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

        def step():
            batch = next_batch(f"plain/{loss_name}")
            logits, labels, validity = t.forward(drafter, batch)
            loss, _ = compute_loss(loss_name, logits, labels, validity, t.loss_options)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(drafter.parameters(), p.grad_clip)
            opt.step()
            sched.step()
            return int(validity.sum())
        return step

    eng_decay = init_engine(copy.deepcopy(base), ds_config, device)
    eng_auf = init_engine(copy.deepcopy(base), ds_config, device)
    plain = copy.deepcopy(base).to(device).train()
    contenders["deepspeed/decay"] = ds_step(eng_decay, "decay", "deepspeed/decay")
    contenders["plain/decay"] = plain_step(plain, "decay")
    contenders["deepspeed/auf"] = ds_step(eng_auf, "auf", "deepspeed/auf")
    eng_bf16 = init_engine(copy.deepcopy(base), deepspeed_config(p.model_copy(update={"precision": "bf16"})), device)
    contenders["deepspeed/decay/bf16"] = ds_step(eng_bf16, "decay", "deepspeed/decay/bf16")
    eng_muon = init_engine(copy.deepcopy(base), deepspeed_config(p.model_copy(update={"precision": "bf16",
                                                                                      "optimizer": "muon"})), device)
    contenders["deepspeed/decay/bf16/muon"] = ds_step(eng_muon, "decay", "deepspeed/decay/bf16/muon")

    names = list(contenders)
    runs = interleave(contenders, repeats=args.rounds, warmup=1)

    med = {n: median(s for s, _ in runs[n]) for n in names}
    print()
    print_table(["contender", "median step s", "valid tokens/s (median over steps)"], [
        [n, med[n], median(tok_ / s for s, tok_ in runs[n])] for n in names])
    print(f"- TrainData.train_batch (data prep, same for all, not in the step times): median {make_s:.3f} s per micro batch")
    ds_rel = ratio(med["plain/decay"], med["deepspeed/decay"])
    auf_slow = ratio(med["deepspeed/auf"], med["deepspeed/decay"]) - 1
    print(f"- DeepSpeed / plain throughput (ratio of median step times, same batches): {ds_rel:.3f}")
    print(f"- AUF vs decay step time (DeepSpeed, ratio of medians): {100 * auf_slow:+.2f}%")
    print(f"- bf16 / fp32 throughput (DeepSpeed, decay, ratio of median step times): "
          f"{ratio(med['deepspeed/decay'], med['deepspeed/decay/bf16']):.2f}x")
    print(f"- Muon / AdamW step time (DeepSpeed, decay, bf16, ratio of medians): "
          f"{ratio(med['deepspeed/decay/bf16/muon'], med['deepspeed/decay/bf16']):.2f}x")
    print(goal_line("deepspeed/plain", ds_rel, ">=", 0.9))
    print(goal_line("auf step slowdown", auf_slow, "<=", 0.05))

    # Loss alone: compute_loss + backward on fixed logits of the first batch's shape.
    with torch.no_grad():
        logits0, labels0, validity0 = t.forward(plain, batches[0])
    logits0 = logits0.detach()

    def loss_only(name):
        def run():
            x = logits0.clone().requires_grad_(True)
            loss, _ = compute_loss(name, x, labels0, validity0, t.loss_options)
            loss.backward()
        return run
    lruns = interleave({"decay": loss_only("decay"), "auf": loss_only("auf")}, repeats=args.loss_repeats,
                       warmup=1, log=None)
    ld, la = median(s for s, _ in lruns["decay"]), median(s for s, _ in lruns["auf"])
    print()
    print(f"loss only (compute_loss + backward on logits {tuple(logits0.shape)}, {args.loss_repeats} interleaved repeats):")
    print_table(["loss", "median ms"], [["decay", 1000 * ld], ["auf", 1000 * la]])
    print(f"- auf - decay: {1000 * (la - ld):+.1f} ms per step ({100 * (la / ld - 1):+.1f}% of the loss, "
          f"{100 * (la - ld) / med['deepspeed/decay']:+.2f}% of a decay step)")


if __name__ == "__main__":
    main()
