"""DeepSpeed glue: config from params, engine setup on CPU or GPU, pickle-free checkpoints.

One code path for a single CPU process (no launcher: the rank environment is filled in so
DeepSpeed does not go looking for MPI) and for `deepspeed`/`torchrun` launches on several
processes or GPUs.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from specauf.errors import UserError
from specauf.config import TrainParams
from specauf.launch import free_port

log = logging.getLogger("specauf")


def deepspeed_config(p: TrainParams) -> dict:
    if p.precision == "auto":
        raise ValueError("train.precision 'auto' must be resolved first (specauf.runtime.pick_precision)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.micro_batch_size * p.grad_accum * world,
        "gradient_clipping": p.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.precision == "bf16"},
        # torch_adam: DeepSpeed's FusedAdam would JIT-compile a kernel (minutes) on first use.
        "optimizer": ({"type": "AdamW", "params": {"lr": p.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                    "weight_decay": p.weight_decay, "torch_adam": True}}
                      if p.optimizer == "adamw" else
                      # DeepSpeed tags every 2-D parameter for Muon (all the drafter's matrices), the
                      # rest (norm weights) for its auxiliary AdamW
                      {"type": "Muon", "params": {"muon_lr": p.muon_lr, "adam_lr": p.lr, "momentum": 0.95,
                                                  "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": p.weight_decay,
                                                  "torch_adam": True}}),
        # DeepSpeed refuses warmup_num_steps 0 (and warms up at least 2 steps): "no warmup" is a
        # warmup that starts at the full rate.
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": p.steps, "warmup_num_steps": max(p.warmup_steps, 1), "warmup_type": "linear",
            "warmup_min_ratio": 0.0 if p.warmup_steps else 1.0, "cos_min_ratio": p.min_lr_ratio}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def restore_master_weights(engine) -> None:
    """Give a bf16 engine's module back its fp32 master weights, in place.

    A bf16 engine trains fp32 masters in the optimizer and hands the module their bf16
    roundings; saving the module as it is would throw away the masters' low bits (and make
    the drafter bf16 on machines where bf16 is slow).
    """
    if not engine.bfloat16_enabled():
        return
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # ZeRO 0: the unfused optimizer
        master = {id(p): m for g, mg in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g, mg)}
    else:  # ZeRO 1-3 optimizers map each param to its (gathered) fp32 partition
        from deepspeed.utils import safe_get_full_fp32_param

        master = {id(p): safe_get_full_fp32_param(p) for p in engine.module.parameters()}
    missing = [n for n, p in engine.module.named_parameters() if master.get(id(p)) is None]
    if missing:
        raise RuntimeError(f"no fp32 master weights for {missing[:3]} in {type(opt).__name__}")
    params = list(engine.module.parameters())
    engine.module.float()
    with torch.no_grad():
        for p, old in zip(engine.module.parameters(), params):
            p.copy_(master[id(old)])


def ensure_rank_env() -> None:
    """Single process without a launcher: pretend to be rank 0 of 1 (no MPI discovery)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


class _NotYetStarted(logging.Filter):
    """Drops DeepSpeed's "Attempting to get learning rate from scheduler before it has started":
    the engine reads the warmup schedule's lr once while it initialises, before any step, every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "scheduler before it has started" not in record.getMessage()


def init_engine(model: torch.nn.Module, config: dict, device: torch.device):
    ensure_rank_env()
    # Name the accelerator: left to detect it, DeepSpeed warns on every CPU start that it found none.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not any(isinstance(f, _NotYetStarted) for f in ds_logger.filters):
        ds_logger.addFilter(_NotYetStarted())

    # The shared-memory comm op JIT-builds for minutes on first use, and DeepSpeed only uses it
    # in inference_all_reduce (tensor-parallel inference), never for training's gradient
    # all-reduce: skip it for every world size.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   verbose=False)
    model.to(device)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


def _safe_checkpoint_engine(original):
    """DeepSpeed's torch checkpoint engine unpickles with weights_only=False; ours never does."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    if type(original) is not TorchCheckpointEngine:
        return original  # other engines (e.g. Nebula) keep their own loaders
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(original.__dict__)
    return safe


def save_checkpoint(engine, directory: Path, step: int, snapshot: Path | None = None) -> None:
    """Save checkpoint `step<step>`, copy `snapshot` (a directory, e.g. the metrics logged so far)
    into it, and only then point `latest` at it, atomically; older checkpoints are deleted after.

    DeepSpeed's own `latest` is rewritten in place (a kill mid-write leaves it empty) and would be
    written before the snapshot: a resume could then see a checkpoint without its metrics.
    """
    import shutil

    from specauf.artifacts import write_bytes_atomic

    tag = f"step{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step}, save_latest=False)
    if engine.global_rank != 0:
        return
    if snapshot is not None:
        shutil.rmtree(directory / tag / snapshot.name, ignore_errors=True)
        shutil.copytree(snapshot, directory / tag / snapshot.name)
    write_bytes_atomic(directory / "latest", tag.encode())
    for old in directory.glob("step*"):
        if old.name != tag and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, directory: Path) -> int:
    """Resume from the latest checkpoint; return the step to continue from (0 = fresh)."""
    if not (directory / "latest").is_file():
        return 0
    tag = (directory / "latest").read_text().strip()
    if not (directory / tag).is_dir():
        raise UserError(f"{directory / 'latest'} names checkpoint {tag!r}, which is missing; "
                                f"delete {directory} to train from scratch")
    try:
        _, client = engine.load_checkpoint(str(directory), tag=tag)
    except (AssertionError, RuntimeError, EOFError, KeyError, ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        # DeepSpeed asserts on a missing states file and torch fails deep in its zip reader on a
        # truncated one: either way the checkpoint is unusable, and the user needs its name.
        from specauf.artifacts import ArtifactError

        why = (str(e).splitlines() or ["incomplete checkpoint"])[0].split(". ")[0]
        held = ", ".join(sorted(p.name for p in (directory / tag).iterdir())) or "nothing"
        raise ArtifactError(f"{directory / tag}: checkpoint unreadable ({type(e).__name__}: {why}; it holds: {held}); "
                            f"delete {directory} to train from scratch") from None
    if client is None:
        raise UserError(f"{directory / tag}: checkpoint could not be loaded")
    return int(client["step"])
