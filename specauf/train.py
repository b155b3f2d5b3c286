"""Stage `train`: the masked block drafter trained with DeepSpeed under one loss variant.

Every variant sees identical data, anchors and steps: the sequence order and the anchors of
step s are pure functions of (seed, s), so variants differ only in their loss, and a resumed run
continues exactly where the killed one stopped (data position and RNG need no saved state).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from specauf.artifacts import (MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, check_replaceable, claim_work_dir,
                               hash_obj, write_json)
from specauf.errors import UserError
from specauf.blocks import build_blocks, collate_blocks, sample_anchors
from specauf.config import NOT_PROVENANCE, TrainParams
from specauf.dataset import LabelsDataset
from specauf.drafter import BlockDrafter, DrafterConfig
from specauf.target_access import context_features_from_hidden_states, init_from_target
from specauf.distributed import deepspeed_config, init_engine, load_checkpoint, restore_master_weights, save_checkpoint
from specauf.losses import compute_loss, default_gamma
from specauf.runtime import pick_precision, progress

log = logging.getLogger("specauf")
# Stored features vs recomputed ones (check_features): float16/bfloat16 storage rounds to ~0.4%;
# neighbouring layers of a real target differ by tens of percent.
FEATURE_TOLERANCE = 0.02


class Diverged(UserError):
    """The loss or gradient norm went non-finite: nothing is written."""


def check_finite(step: int, loss: torch.Tensor, grad_norm, params: TrainParams) -> None:
    bad = "loss" if not torch.isfinite(loss).all() else \
        "gradient norm" if grad_norm is not None and not math.isfinite(float(grad_norm)) else None
    if bad:
        raise Diverged(f"train: the {bad} is {float(loss.detach()) if bad == 'loss' else float(grad_norm)} at step {step + 1}: "
                       f"training diverged, no drafter written; lower train.lr (now {params.lr:g})"
                       + ("" if params.grad_clip else " or set train.grad_clip > 0"))


def split_heldout(dataset: LabelsDataset, fraction: float, seed: int,
                  max_seq_len: int | None = None) -> tuple[list[int], list[int]]:
    """Deterministic by prompt id, so every variant holds out the same rollouts. Sequences whose
    response starts at or past max_seq_len offer no anchor and are left out of both (a batch
    of only such rows would have nothing to learn from)."""
    train, held, no_anchor = [], [], 0
    for i, (t, r) in enumerate(dataset.index):
        table = dataset.tables[t]
        if max_seq_len is not None:
            length = len(table.column("input_ids")[r])
            if table.column("response_start")[r].as_py() >= min(length, max_seq_len):
                no_anchor += 1
                continue
        pid = table.column("prompt_id")[r].as_py()
        u = int(hashlib.sha256(f"{seed}:heldout:{pid}".encode()).hexdigest()[:8], 16) / 16**8
        (held if u < fraction else train).append(i)
    if no_anchor:
        log.info("left out %d sequences whose response starts at or past train.max_seq_len (%d)", no_anchor, max_seq_len)
    if not train and not held:
        raise UserError(f"train.max_seq_len: {max_seq_len} tokens cut off every response ({no_anchor} sequences "
                        "have their response start at or past it): raise it")
    if not train:
        raise UserError(f"train.heldout_fraction: {fraction} leaves no training sequences"
                        + (f" ({no_anchor} more have no response within train.max_seq_len)" if no_anchor else ""))
    return train, held


def build_draft_vocab(dataset: LabelsDataset, rows: list[int], size: int, vocab_size: int) -> torch.Tensor | None:
    """The `size` most frequent label ids in the training responses (ties by id), sorted by id."""
    if not size or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in rows:
        item = dataset[i]
        counts += torch.bincount(item["label_ids"][item["response_start"]:], minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))[:size]
    return torch.tensor(sorted(order), dtype=torch.long)


def coverage(dataset: LabelsDataset, rows: list[int], d2t: torch.Tensor | None) -> float:
    if d2t is None:
        return 1.0
    member = torch.zeros(int(d2t.max()) + 1 if len(d2t) else 1, dtype=torch.bool)
    member[d2t] = True
    hit = total = 0
    for i in rows:
        item = dataset[i]
        labels = item["label_ids"][item["response_start"]:]
        hit += int(member[labels.clamp(max=len(member) - 1)].logical_and(labels < len(member)).sum())
        total += len(labels)
    return hit / max(total, 1)


class Trainer:
    def __init__(self, params: TrainParams, variant: str, target, target_manifest: dict, dataset: LabelsDataset,
                 seed: int, device: torch.device, draft_vocab_size: int):
        self.p, self.variant, self.target, self.ds, self.seed, self.device = params, variant, target, dataset, seed, device
        if params.distill_weight and not dataset.manifest.get("top_k"):
            raise UserError(f"train.distill_weight = {params.distill_weight} needs the target's top-k distribution, "
                             f"which {dataset.dir} does not hold: set labels.top_k > 0")
        self.embed = target.get_input_embeddings().weight.detach()
        self.lm_head = target.get_output_embeddings().weight.detach()
        self.online = dataset.manifest["features"] == "online"
        self.train_rows, self.heldout_rows = split_heldout(dataset, params.heldout_fraction, seed, params.max_seq_len)
        d2t = build_draft_vocab(dataset, self.train_rows, draft_vocab_size, self.lm_head.shape[0])
        config = DrafterConfig.from_target_config(
            target.config, num_layers=params.num_layers, block_size=params.block_size,
            mask_token_id=target_manifest["mask_token_id"], target_layer_ids=dataset.manifest["layer_ids"],
            context_layer_norm=params.context_layer_norm, context_feature_scale=params.context_feature_scale,
            draft_vocab_size=0 if d2t is None else len(d2t))
        torch.manual_seed(seed)
        self.drafter = BlockDrafter(config)
        if d2t is not None:
            self.drafter.d2t.copy_(d2t)
        self.copied = init_from_target(self.drafter, target) if params.init_from_target else []
        if params.context_feature_scale:
            self.drafter.feature_scale.copy_(self.feature_scale())
        # the lm_head rows the drafter scores, gathered once, per compute dtype
        self.draft_head = {torch.float32: self.drafter.draft_head(self.lm_head).float().to(device)}
        # target id -> draft id (-1 outside the draft vocabulary)
        self.t2d = None
        if d2t is not None:
            self.t2d = torch.full((self.lm_head.shape[0],), -1, dtype=torch.long)
            self.t2d[d2t] = torch.arange(len(d2t))
        self.draft_coverage = coverage(dataset, self.train_rows, d2t)
        self.gamma = params.gamma or default_gamma(params.block_size)

    @torch.no_grad()
    def check_features(self, max_tokens: int = 64) -> None:
        """Recompute the context features of the first training sequence from the target and the
        manifest's layer_ids and compare them with the stored ones: a manifest edited by hand (or
        features from another layer rule) would otherwise train a drafter whose config names
        other layers than the features it learnt from. Adjacent layers differ by far more than
        the storage rounding, so a wrong id shows as a large relative difference."""
        if self.online:
            return
        item = self.ds[self.train_rows[0]]
        S = min(len(item["input_ids"]), max_tokens)
        out = self.target(input_ids=item["input_ids"][:S][None].to(self.device), output_hidden_states=True, use_cache=False)
        ids = self.ds.manifest["layer_ids"]
        fresh = context_features_from_hidden_states(out.hidden_states, ids)[0].float().cpu()
        stored = item["features"][:S].float()
        H = stored.shape[1] // len(ids)
        for n, layer in enumerate(ids):
            a, b = fresh[:, n * H:(n + 1) * H], stored[:, n * H:(n + 1) * H]
            rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
            if not rel < FEATURE_TOLERANCE:
                raise ArtifactError(f"{self.ds.dir / MANIFEST}: layer_ids {ids} do not describe the stored features "
                                    f"(layer {layer}: relative difference {rel:.3g} from the target's own); "
                                    "the manifest was edited or the features come from elsewhere: rerun `dvc repro labels`")

    @torch.no_grad()
    def feature_scale(self, max_rows: int = 64) -> torch.Tensor:
        """1 / RMS of every conditioned feature dim over the first training sequences (fixed
        rows, so the scale is deterministic and the same on every rank)."""
        total, count = None, 0
        for i in self.train_rows[:max_rows]:
            item = self.ds[i]
            S = min(len(item["input_ids"]), self.p.max_seq_len)
            if self.online:
                ids = item["input_ids"][:S][None].to(self.device)
                out = self.target(input_ids=ids, output_hidden_states=True, use_cache=False)
                feats = context_features_from_hidden_states(out.hidden_states, self.drafter.target_layer_ids)[0]
            else:
                feats = item["features"][:S]
            sq = self.drafter.condition_features(feats.float().cpu()[None], scale=False)[0].pow(2).sum(0)
            total = sq if total is None else total + sq
            count += S
        return torch.rsqrt(total / max(count, 1) + 1e-6)

    def loss_name(self, step: int) -> str:
        if self.variant == "decay_then_auf":
            return "decay" if step < int(self.p.curriculum_switch * self.p.steps) else "auf"
        return self.variant

    def step_rows(self, step: int, rank: int, world: int) -> list[int]:
        """The sequences of one micro batch: an epoch-wise permutation seeded by (seed, epoch)."""
        per_step = self.p.micro_batch_size * world
        n = len(self.train_rows)
        start = step * per_step + rank * self.p.micro_batch_size
        rows = []
        for j in range(start, start + self.p.micro_batch_size):
            epoch, k = divmod(j, n)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            rows.append(self.train_rows[int(torch.randperm(n, generator=g)[k])])
        return rows

    def make_batch(self, rows: list[int], anchor_seed: int | None, num_anchors: int) -> dict:
        """Blocks of several sequences, collated for one drafter forward."""
        items = []
        label_key = "label_ids" if self.p.label_source == "acceptance" else "input_ids"
        for j, i in enumerate(rows):
            item = self.ds[i]
            S = min(len(item["input_ids"]), self.p.max_seq_len)
            start = item["response_start"]
            g = torch.Generator().manual_seed(anchor_seed * 1009 + j) if anchor_seed is not None else None
            anchors = sample_anchors(start, S, self.p.block_size, num_anchors, g)
            if len(anchors) == 0:
                continue
            labels_src = item[label_key][:S].clone()
            block = build_blocks(item["input_ids"][:S], start, S, anchors, self.p.block_size,
                                 self.drafter.mask_token_id, label_ids=labels_src)
            block.update(anchors=anchors, context_len=S)
            if self.p.distill_weight:  # top-k rows are per response position: row p - start
                rows_k = item["topk_ids"].shape[0]
                at = (anchors[:, None] + torch.arange(1, self.p.block_size) - start).clamp(0, rows_k - 1)
                block["soft_ids"], block["soft_probs"] = item["topk_ids"][at].long(), item["topk_probs"][at].float()
            if self.online:
                block["input_ids_full"] = item["input_ids"][:S]
            else:
                block["context_features"] = item["features"][:S].float()
            items.append(block)
        if not items:
            return {}
        batch = collate_blocks(items, self.p.block_size, self.drafter.mask_token_id)
        if self.online:
            batch["context_features"] = self.online_features([it["input_ids_full"] for it in items], batch)
        if self.t2d is not None:  # a label outside the draft vocabulary can never be guessed: the block ends there
            draft_labels = self.t2d[batch["labels"]]
            inside = (draft_labels >= 0).long().cummin(dim=1).values.bool()
            batch["validity"] = batch["validity"] & inside
            batch["labels"] = draft_labels.clamp(min=0)
        if "soft_ids" in batch:  # keep the top-k mass inside the draft vocabulary, renormalised
            ids = batch["soft_ids"] if self.t2d is None else self.t2d[batch["soft_ids"]]
            probs = torch.where(ids >= 0, batch["soft_probs"], 0.0)
            batch["soft_ids"] = ids.clamp(min=0)
            batch["soft_probs"] = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        return batch

    @torch.no_grad()
    def online_features(self, seqs: list[torch.Tensor], batch: dict) -> torch.Tensor:
        C = batch["context_position_ids"].shape[1]
        ids = torch.zeros((len(seqs), C), dtype=torch.long)
        mask = torch.zeros((len(seqs), C), dtype=torch.long)
        for n, s in enumerate(seqs):
            ids[n, : len(s)], mask[n, : len(s)] = s, 1
        out = self.target(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          output_hidden_states=True, use_cache=False)
        return context_features_from_hidden_states(out.hidden_states, self.drafter.target_layer_ids).float()

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = next(model.parameters()).dtype
        dev = self.device
        embeds = self.embed[batch["block_input_ids"].to(self.embed.device)].to(dev, dtype)
        hidden = model(embeds, batch["context_features"].to(dev, dtype), batch["block_position_ids"].to(dev),
                       batch["context_position_ids"].to(dev), batch["attention_mask"].to(dev))
        N = hidden.shape[0]
        B = self.p.block_size
        hidden = hidden.view(N, -1, B, hidden.shape[-1])[:, :, 1:].reshape(-1, B - 1, hidden.shape[-1])
        if dtype not in self.draft_head:  # bf16 training scores in bf16 as well (the CE stays fp32)
            self.draft_head[dtype] = self.draft_head[torch.float32].to(dtype)
        logits = self.drafter.draft_logits(hidden, self.draft_head[dtype]).float()
        return logits, batch["labels"].to(dev), batch["validity"].to(dev)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out diagnostics on every anchor of the held-out rollouts (a fixed set)."""
        rows = self.heldout_rows or self.train_rows[: max(1, len(self.train_rows) // 20)]
        acc = acc_n = acc_len = blocks = support = 0.0
        for b in range(0, len(rows), self.p.micro_batch_size):
            # a fixed anchor draw per held-out batch: the same blocks at every evaluation
            batch = self.make_batch(rows[b: b + self.p.micro_batch_size], 10**6 + b, 2 * self.p.anchors_per_seq)
            if not batch:
                continue
            logits, labels, validity = self.forward(model, batch)
            _, d = compute_loss("full", logits, labels, validity)
            has = validity.any(1)
            n_valid = float(d["num_valid"])
            acc += float(d["token_accuracy"]) * n_valid
            acc_n += n_valid
            acc_len += float((d["acceptance_lengths"] * has).sum())
            support += float(d["auf_support_len"]) * float(has.sum())
            blocks += float(has.sum())
        return {"heldout/token_accuracy": acc / max(acc_n, 1), "heldout/acceptance_length": acc_len / max(blocks, 1),
                "heldout/auf_support_len": support / max(blocks, 1), "heldout/blocks": blocks}


def train_variant(params: TrainParams, variant: str, *, target, target_manifest: dict, labels_dir, out_dir, work_dir,
                  metrics_dir, seed: int, device: torch.device, manifest_extra: dict) -> dict:
    from dvclive import Live

    params = params.model_copy(update={"precision": pick_precision(params.precision, device)})
    check_replaceable(out_dir, "drafter")  # before an hour of compute, not after
    check_replaceable(metrics_dir, "train-metrics")
    dataset = LabelsDataset(labels_dir)
    t = Trainer(params, variant, target, target_manifest, dataset, seed, device, params.draft_vocab_size)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log.info("read %s: %d sequences (%d train, %d held out), %s features, layers %s", labels_dir, len(dataset),
             len(t.train_rows), len(t.heldout_rows), dataset.manifest["features"], dataset.manifest["layer_ids"])
    log.info("variant %s: block %d, %d drafter layers (%s), draft vocab %s (label coverage %.2f%%), gamma %.2f, %s",
             variant, params.block_size, params.num_layers, "init from target" if t.copied else "random init",
             len(t.drafter.d2t) if params.draft_vocab_size and hasattr(t.drafter, "d2t") else "full",
             100 * t.draft_coverage, t.gamma, params.precision)
    t.check_features()
    work_dir = Path(work_dir)
    own = {k: v for k, v in params.model_dump().items() if k not in NOT_PROVENANCE["train"]}  # not the other runs
    key = hash_obj({"params": own, "variant": variant, "seed": seed, "world": world, **manifest_extra})
    ds_config = deepspeed_config(params)
    if rank == 0:  # one process owns the work dir; the others first touch it after init_engine syncs them
        claim_work_dir(work_dir, key)
        write_json(work_dir / "ds_config.json", ds_config)
    engine = init_engine(t.drafter, ds_config, device)
    start_step = load_checkpoint(engine, work_dir / "checkpoints")
    if start_step:
        log.info("resumed from checkpoint at step %d of %d", start_step, params.steps)
    # DVCLive logs into the work dir and each checkpoint keeps a copy of the log, so a resume
    # continues the history as of its checkpoint: no rows lost (DVC deletes metrics_dir before
    # a rerun) or doubled (rows logged after the checkpoint by the killed run). Published whole.
    live_dir = work_dir / "live"
    if rank == 0:
        shutil.rmtree(live_dir, ignore_errors=True)
        snapshot = work_dir / "checkpoints" / f"step{start_step}" / "live"
        if start_step and snapshot.is_dir():
            shutil.copytree(snapshot, live_dir)
    live = Live(dir=str(live_dir), resume=bool(start_step), save_dvc_exp=False, dvcyaml=None,
                report=None) if rank == 0 else None
    tokens, t0 = 0, time.perf_counter()
    with progress(total=params.steps, desc=f"train {variant} seed {seed}", unit="step") as bar:
        bar.update(start_step)
        for step in range(start_step, params.steps):
            name = t.loss_name(step)
            for micro in range(params.grad_accum):
                sub = step * params.grad_accum + micro
                batch = t.make_batch(t.step_rows(sub, rank, world), seed * 7919 + sub * world + rank, params.anchors_per_seq)
                logits, labels, validity = t.forward(engine, batch)
                soft = (batch["soft_ids"].to(device), batch["soft_probs"].to(device)) if "soft_ids" in batch else None
                loss, diag = compute_loss(name, logits, labels, validity, gamma=t.gamma,
                                          temperature=params.soft_auf_temperature, soft=soft,
                                          distill_weight=params.distill_weight, dpace_alpha=params.dpace_alpha)
                check_finite(step, loss, None, params)
                engine.backward(loss)
                engine.step()
                tokens += int(validity.sum())
            check_finite(step, loss, engine.get_global_grad_norm(), params)
            bar.update(1)
            done = step + 1
            if live is not None and (done % params.log_every == 0 or done == params.steps):
                elapsed = time.perf_counter() - t0
                metrics = {"loss": loss.item(), "train/token_accuracy": float(diag["token_accuracy"]),
                           "train/auf_support_len": float(diag["auf_support_len"]),
                           "train/acceptance_length": float(diag["acceptance_length"]),
                           "lr": engine.get_lr()[0], "tokens_per_second": tokens / elapsed}
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train/token_accuracy']:.3f}",
                                tau=f"{metrics['train/acceptance_length']:.2f}")
                if done % params.eval_every == 0 or done == params.steps:
                    engine.eval()
                    metrics.update(t.evaluate(engine))
                    engine.train()
                live.step = done  # before logging: log_metric records the current step
                for k, v in metrics.items():
                    live.log_metric(k, v)
                live.next_step()
            if done % params.checkpoint_every == 0 and done < params.steps:
                save_checkpoint(engine, work_dir / "checkpoints", done, snapshot=live_dir if rank == 0 else None)
    engine.eval()
    restore_master_weights(engine)  # the final figures describe the saved (fp32) drafter
    final = t.evaluate(engine)
    if rank != 0:
        return final
    live.summary.update({k: v for k, v in final.items()})
    live.end()
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "drafter", "variant": variant, "seed": seed,
        "loss_schedule": "decay then auf" if variant == "decay_then_auf" else variant,
        "block_size": params.block_size, "gamma": t.gamma, "steps": params.steps, "world_size": world,
        "init_from_target": bool(t.copied), "precision": params.precision, "draft_vocab_size": params.draft_vocab_size,
        "distill_weight": params.distill_weight, "draft_label_coverage": t.draft_coverage, "heldout": final,
        "train_sequences": len(t.train_rows), "heldout_sequences": len(t.heldout_rows),
        "mask_token_id": t.drafter.mask_token_id, "target_layer_ids": t.drafter.target_layer_ids,
        **manifest_extra,
    }
    with atomic_dir(out_dir, "drafter") as tmp:
        t.drafter.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "ds_config.json", ds_config)
        write_json(tmp / MANIFEST, manifest)
    with atomic_dir(metrics_dir, "train-metrics") as tmp:
        shutil.copytree(live_dir, tmp, dirs_exist_ok=True)
        write_json(tmp / MANIFEST, {"schema_version": SCHEMA_VERSION, "kind": "train-metrics", "variant": variant,
                                    "seed": seed})
    shutil.rmtree(work_dir, ignore_errors=True)  # last: a kill before this resumes, never retrains
    log.info("wrote %s: held-out token accuracy %.3f, acceptance length %.3f (offline tau estimate)", out_dir,
             final["heldout/token_accuracy"], final["heldout/acceptance_length"])
    return manifest
