"""Stage `train`: the masked block drafter trained with DeepSpeed under one loss variant.

Read top to bottom: `train_variant` is setup, resume, the steps (train_step, log_step, a
checkpoint every train.checkpoint_every), finish. The data side (which sequences and anchors a
step sees) is specauf/train/batches.py, a pure function of (seed, step), so variants differ only in
their loss and a resumed run continues exactly where the killed one stopped.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specauf.artifacts import (MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, check_replaceable, claim_work_dir,
                               hash_obj, write_json)
from specauf.errors import UserError
from specauf.config import CURRICULA, TrainParams, provenance
from specauf.data.dataset import LabelsDataset
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.target.access import context_features_from_hidden_states, init_from_target
from specauf.train.batches import Batch, TrainData
from specauf.train.distributed import deepspeed_config, init_engine, load_checkpoint, restore_master_weights, save_checkpoint
from specauf.train.domino import domino_config, teacher_forced_logits
from specauf.train.losses import LossOptions, base_weight, compute_loss, domino_loss
from specauf.runtime import pick_precision, progress

log = logging.getLogger("specauf")
# Stored features vs recomputed ones (check_features): float16/bfloat16 storage rounds to ~0.4%;
# neighbouring layers of a real target differ by tens of percent.
FEATURE_TOLERANCE = 0.02


class Diverged(UserError):
    """The loss or gradient norm went non-finite: nothing is written."""


def check_finite(step: int, loss: torch.Tensor, grad_norm, params: TrainParams, batch=None) -> None:
    """A non-finite loss is the labels' fault when the batch's own numbers already were (the lr's
    otherwise): say which, so nobody lowers train.lr over a damaged labels shard."""
    bad = "loss" if not torch.isfinite(loss).all() else \
        "gradient norm" if grad_norm is not None and not math.isfinite(float(grad_norm)) else None
    if bad == "loss" and batch is not None:
        for name in ("context_features", "soft_probs", "soft_mass"):
            value = getattr(batch, name)
            if value is not None and not torch.isfinite(value).all():
                raise UserError(f"train: the loss is {float(loss.detach())} at step {step + 1} because the labels' {name} "
                                "hold NaN or inf: the labels are damaged, not train.lr; rebuild them with "
                                "`dvc repro -f labels` (no drafter written)")
    if bad:
        raise Diverged(f"train: the {bad} is {float(loss.detach()) if bad == 'loss' else float(grad_norm)} at step {step + 1}: "
                       f"training diverged, no drafter written; lower train.lr (now {params.lr:g})"
                       + ("" if params.grad_clip else " or set train.grad_clip > 0"))


class DrafterRun:
    """The model side of one training run (the loop is train_variant's): the drafter on the frozen
    target's embeddings and lm_head, its forward on a Batch, the loss schedule with the run's
    LossOptions, and the held-out evaluation."""

    def __init__(self, params: TrainParams, variant: str, target, target_manifest: dict, data: TrainData,
                 seed: int, device: torch.device):
        self.params, self.variant, self.target, self.data, self.seed, self.device = params, variant, target, data, seed, device
        if params.distill_weight and not data.ds.manifest.get("top_k"):
            raise UserError(f"train.distill_weight = {params.distill_weight} needs the target's top-k distribution, "
                             f"which {data.ds.dir} does not hold: set labels.top_k > 0")
        if params.soft_auf_acceptance == "tv" and variant == "soft_auf":
            if not data.ds.manifest.get("top_k"):
                raise UserError(f"train.soft_auf_acceptance 'tv' needs the target's top-k distribution, which "
                                f"{data.ds.dir} does not hold: set labels.top_k > 0")
            t = data.ds.manifest.get("verify_temperature")
            if t != params.soft_auf_temperature:
                raise UserError(f"train.soft_auf_acceptance 'tv': the stored top-k is at labels.verify_temperature {t}, "
                                f"train.soft_auf_temperature is {params.soft_auf_temperature}; set them equal")
        # the target's own embedding module: Gemma's scales its rows by sqrt(hidden), and the
        # drafter must see block tokens exactly as the target and the decoder embed them
        self.embed = target.get_input_embeddings()
        lm_head = target.get_output_embeddings().weight.detach()
        config = DrafterConfig.from_target_config(
            target.config, num_layers=params.num_layers, block_size=params.block_size,
            mask_token_id=target_manifest["mask_token_id"], target_layer_ids=data.layer_ids,
            draft_vocab_size=0 if data.vocab is None else len(data.vocab.d2t))
        if params.domino is not None:
            config.dflash_config.update(domino_config(config.hidden_size, params.domino.gru_dim, params.domino.emb_dim))
        torch.manual_seed(seed)
        self.drafter = BlockDrafter(config)
        if data.vocab is not None:
            self.drafter.d2t.copy_(data.vocab.d2t)
        self.copied = init_from_target(self.drafter, target) if params.init_from_target else []
        # the lm_head rows the drafter scores, gathered once, per compute dtype
        self.draft_head = {torch.float32: self.drafter.draft_head(lm_head).float().to(device)}
        self.loss_options = LossOptions.from_params(params)

    @torch.no_grad()
    def check_features(self, max_tokens: int = 64) -> None:
        """Recompute the context features of the first training sequence from the target and the
        manifest's layer_ids and compare them with the stored ones: a manifest edited by hand (or
        features from another layer rule) would otherwise train a drafter whose config names
        other layers than the features it learnt from. Adjacent layers differ by far more than
        the storage rounding, so a wrong id shows as a large relative difference."""
        if self.data.online:
            return
        item = self.data.ds[self.data.train_rows[0]]
        S = min(len(item["input_ids"]), max_tokens)
        out = self.target(input_ids=item["input_ids"][:S][None].to(self.device), output_hidden_states=True, use_cache=False)
        ids = self.data.layer_ids
        fresh = context_features_from_hidden_states(out.hidden_states, ids)[0].float().cpu()
        stored = item["features"][:S].float()
        H = stored.shape[1] // len(ids)
        for n, layer in enumerate(ids):
            a, b = fresh[:, n * H:(n + 1) * H], stored[:, n * H:(n + 1) * H]
            rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
            if not rel < FEATURE_TOLERANCE:
                raise ArtifactError(f"{self.data.ds.dir / MANIFEST}: layer_ids {ids} do not describe the stored features "
                                    f"(layer {layer}: relative difference {rel:.3g} from the target's own); "
                                    "the manifest was edited or the features come from elsewhere: rerun `dvc repro labels`")

    def loss_name(self, step: int) -> str:
        if self.variant in CURRICULA:
            first, then = CURRICULA[self.variant]
            return first if step < int(self.params.curriculum_switch * self.params.steps) else then
        return self.variant

    def forward(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits over the draft vocabulary, labels, validity, base logits), each (N*A, B-1[, V]), on
        the device. Domino: logits are the final (corrected) ones, teacher-forced; base the
        backbone's; DFlash: base is None."""
        dtype = next(model.parameters()).dtype
        dev = self.device
        with torch.no_grad():
            embeds = self.embed(batch.block_input_ids.to(self.embed.weight.device)).to(dev, dtype)
        hidden = model(embeds, batch.context_features.to(dev, dtype), batch.block_position_ids.to(dev),
                       batch.context_position_ids.to(dev), batch.attention_mask.to(dev))
        N = hidden.shape[0]
        B = self.params.block_size
        hidden = hidden.view(N, -1, B, hidden.shape[-1])[:, :, 1:].reshape(-1, B - 1, hidden.shape[-1])
        if dtype not in self.draft_head:  # bf16 training scores in bf16 as well (the CE stays fp32)
            self.draft_head[dtype] = self.draft_head[torch.float32].to(dtype)
        logits = self.drafter.draft_logits(hidden, self.draft_head[dtype]).float()
        if self.params.domino is None:
            return logits, batch.labels.to(dev), batch.validity.to(dev), None
        anchors = batch.block_input_ids.view(N, -1, B)[:, :, 0].reshape(-1, 1)
        tokens = torch.cat([anchors, batch.label_token_ids[:, : B - 2]], dim=1)  # what verification commits
        with torch.no_grad():
            token_embeds = self.embed(tokens.to(self.embed.weight.device)).to(dev, dtype)
        final = teacher_forced_logits(self.drafter, hidden, logits, token_embeds).float()  # the engine's module
        return final, batch.labels.to(dev), batch.validity.to(dev), logits

    def loss(self, model, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        """The variant's loss at `step` (its schedule: loss_name) and the diagnostics."""
        logits, labels, validity, base = self.forward(model, batch)
        soft = target_topk = None
        if batch.soft_ids is not None:
            ids = batch.soft_ids.to(self.device)
            soft, target_topk = (ids, batch.soft_probs.to(self.device)), (ids, batch.soft_mass.to(self.device))
        if base is not None:
            return domino_loss(self.loss_name(step), base, logits, labels, validity, self.loss_options,
                               base_weight(step, self.params.steps), self.params.domino.auf_support, soft, target_topk)
        return compute_loss(self.loss_name(step), logits, labels, validity, self.loss_options, soft, target_topk)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out diagnostics on every anchor of the held-out rollouts (a fixed set)."""
        acc = acc_n = acc_len = blocks = support = 0.0
        for batch in self.data.heldout_batches():
            logits, labels, validity, _ = self.forward(model, batch)  # Domino: its final logits, teacher-forced
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


@dataclass
class Run:
    """What the steps of one training run share."""
    drafter_run: DrafterRun
    engine: object
    work_dir: Path
    live_dir: Path
    live: object  # DVCLive on rank 0, None elsewhere
    rank: int
    world: int
    ds_config: dict
    start_step: int = 0


def setup(params: TrainParams, variant: str, *, target, target_manifest: dict, labels_dir, out_dir, metrics_dir,
          work_dir, seed: int, device: torch.device, manifest_extra: dict) -> Run:
    """Data, drafter and DeepSpeed engine; the work dir claimed for this run's exact inputs."""
    check_replaceable(out_dir, "drafter")  # before an hour of compute, not after
    check_replaceable(metrics_dir, "train-metrics")
    dataset = LabelsDataset(labels_dir)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    data = TrainData(params, dataset, seed, target_manifest["mask_token_id"],
                     target.get_output_embeddings().weight.shape[0], target, device)
    t = DrafterRun(params, variant, target, target_manifest, data, seed, device)
    log.info("read %s: %d sequences (%d train, %d held out), %s features, layers %s", labels_dir, len(dataset),
             len(data.train_rows), len(data.heldout_rows), dataset.manifest["features"], data.layer_ids)
    log.info("variant %s: block %d, %d drafter layers (%s), draft vocab %s (label coverage %.2f%%), gamma %.2f, %s",
             variant, params.block_size, params.num_layers, "init from target" if t.copied else "random init",
             "full" if data.vocab is None else len(data.vocab.d2t), 100 * data.coverage, t.loss_options.gamma, params.precision)
    t.check_features()
    work_dir = Path(work_dir)
    own = provenance("train", params.model_dump())  # not the other runs
    key = hash_obj({"params": own, "variant": variant, "seed": seed, "world": world, **manifest_extra})
    ds_config = deepspeed_config(params)
    if rank == 0:  # one process owns the work dir; the others first touch it after init_engine syncs them
        claim_work_dir(work_dir, key)
        write_json(work_dir / "ds_config.json", ds_config)
    engine = init_engine(t.drafter, ds_config, device)
    return Run(t, engine, work_dir, work_dir / "live", None, rank, world, ds_config)


def resume(run: Run, params: TrainParams) -> None:
    """Continue from the latest checkpoint, metrics history included.

    DVCLive logs into the work dir and each checkpoint keeps a copy of the log, so a resume
    continues the history as of its checkpoint: no rows lost (DVC deletes metrics_dir before a
    rerun) or doubled (rows logged after the checkpoint by the killed run). Published whole."""
    from dvclive import Live

    run.start_step = load_checkpoint(run.engine, run.work_dir / "checkpoints")
    if run.start_step:
        log.info("resumed from checkpoint at step %d of %d", run.start_step, params.steps)
    if run.rank == 0:
        shutil.rmtree(run.live_dir, ignore_errors=True)
        snapshot = run.work_dir / "checkpoints" / f"step{run.start_step}" / "live"
        if run.start_step and snapshot.is_dir():
            shutil.copytree(snapshot, run.live_dir)
        run.live = Live(dir=str(run.live_dir), resume=bool(run.start_step), save_dvc_exp=False, dvcyaml=None, report=None)


def train_step(run: Run, params: TrainParams, step: int) -> tuple[torch.Tensor, dict, int]:
    """One optimizer step over train.grad_accum micro batches: (last loss, its diagnostics, tokens)."""
    tokens = 0
    for micro in range(params.grad_accum):
        batch = run.drafter_run.data.train_batch(step * params.grad_accum + micro, run.rank, run.world)
        loss, diag = run.drafter_run.loss(run.engine, batch, step)
        diag["coverage"] = batch.coverage  # response tokens supervised this step (train.anchors_per_token)
        check_finite(step, loss, None, params, batch)
        run.engine.backward(loss)
        run.engine.step()
        tokens += int(diag["num_valid"])
    check_finite(step, loss, run.engine.get_global_grad_norm(), params)
    return loss, diag, tokens


def log_step(run: Run, params: TrainParams, done: int, loss: torch.Tensor, diag: dict, tokens_per_second: float, bar) -> None:
    """Every train.log_every steps: the training figures, and every train.eval_every the held-out ones."""
    metrics = {"loss": loss.item(), "train/token_accuracy": float(diag["token_accuracy"]),
               "train/auf_support_len": float(diag["auf_support_len"]),
               "train/acceptance_length": float(diag["acceptance_length"]),
               "lr": run.engine.get_lr()[0], "tokens_per_second": tokens_per_second}
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train/token_accuracy']:.3f}",
                    tau=f"{metrics['train/acceptance_length']:.2f}", cov=f"{diag.get('coverage', 0.0):.2f}")
    if done % params.eval_every == 0 or done == params.steps:
        run.engine.eval()
        metrics.update(run.drafter_run.evaluate(run.engine))
        run.engine.train()
    run.live.step = done  # before logging: log_metric records the current step
    for k, v in metrics.items():
        run.live.log_metric(k, v)
    run.live.next_step()


def finish(run: Run, params: TrainParams, variant: str, seed: int, out_dir, metrics_dir, manifest_extra: dict) -> dict:
    """The final held-out figures of the saved (fp32) drafter; rank 0 publishes drafter and metrics."""
    run.engine.eval()
    restore_master_weights(run.engine)
    final = run.drafter_run.evaluate(run.engine)
    if run.rank != 0:
        return final
    t, data = run.drafter_run, run.drafter_run.data
    # the final (fp32) held-out figures replace the last logged ones under the same keys: one value each
    run.live.summary["heldout"] = {k.split("/", 1)[1]: v for k, v in final.items()}
    run.live.end()
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "drafter", "variant": variant, "seed": seed,
        "loss_schedule": "decay then auf" if variant == "decay_then_auf" else variant,
        "block_size": params.block_size, "gamma": t.loss_options.gamma, "steps": params.steps, "world_size": run.world,
        "init_from_target": bool(t.copied), "precision": params.precision, "draft_vocab_size": params.draft_vocab_size,
        "distill_weight": params.distill_weight, "draft_label_coverage": data.coverage, "heldout": final,
        "train_sequences": len(data.train_rows), "heldout_sequences": len(data.heldout_rows),
        "mask_token_id": t.drafter.mask_token_id, "target_layer_ids": t.drafter.target_layer_ids,
        **manifest_extra,
    }
    with atomic_dir(out_dir, "drafter") as tmp:
        t.drafter.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "ds_config.json", run.ds_config)
        write_json(tmp / MANIFEST, manifest)
    with atomic_dir(metrics_dir, "train-metrics") as tmp:
        shutil.copytree(run.live_dir, tmp, dirs_exist_ok=True)
        write_json(tmp / MANIFEST, {"schema_version": SCHEMA_VERSION, "kind": "train-metrics", "variant": variant,
                                    "seed": seed})
    shutil.rmtree(run.work_dir, ignore_errors=True)  # last: a kill before this resumes, never retrains
    log.info("wrote %s: held-out token accuracy %.3f, acceptance length %.3f (offline tau estimate)", out_dir,
             final["heldout/token_accuracy"], final["heldout/acceptance_length"])
    return manifest


def train_variant(params: TrainParams, variant: str, *, target, target_manifest: dict, labels_dir, out_dir, work_dir,
                  metrics_dir, seed: int, device: torch.device, manifest_extra: dict) -> dict:
    """Train one drafter: setup, resume, the steps (logging and checkpointing), finish."""
    params = params.model_copy(update={"precision": pick_precision(params.precision, device)})
    run = setup(params, variant, target=target, target_manifest=target_manifest, labels_dir=labels_dir, out_dir=out_dir,
                metrics_dir=metrics_dir, work_dir=work_dir, seed=seed, device=device, manifest_extra=manifest_extra)
    resume(run, params)
    tokens, t0 = 0, time.perf_counter()
    with progress(total=params.steps, desc=f"train {variant} seed {seed}", unit="step") as bar:
        bar.update(run.start_step)
        for step in range(run.start_step, params.steps):
            loss, diag, n = train_step(run, params, step)
            tokens += n
            bar.update(1)
            done = step + 1
            if run.live is not None and (done % params.log_every == 0 or done == params.steps):
                log_step(run, params, done, loss, diag, tokens / (time.perf_counter() - t0), bar)
            if done % params.checkpoint_every == 0 and done < params.steps:
                save_checkpoint(run.engine, run.work_dir / "checkpoints", done, snapshot=run.live_dir if run.rank == 0 else None)
    return finish(run, params, variant, seed, out_dir, metrics_dir, manifest_extra)
