"""DeepSpeed glue: config from params, engine setup on CPU or GPU, pickle-free checkpoints.

One code path for a single CPU process (no launcher: the rank environment is filled in so
DeepSpeed does not go looking for MPI) and for `deepspeed`/`torchrun` launches on several
processes or GPUs.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch

from specauf.config import TrainParams

log = logging.getLogger("specauf")


def deepspeed_config(p: TrainParams) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.micro_batch_size * p.grad_accum * world,
        "gradient_clipping": p.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.precision == "bf16"},
        # torch_adam: DeepSpeed's FusedAdam would JIT-compile a kernel (minutes) on first use.
        "optimizer": {"type": "AdamW", "params": {"lr": p.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                   "weight_decay": p.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": p.steps, "warmup_num_steps": p.warmup_steps, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": p.min_lr_ratio}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rank_env() -> None:
    """Single process without a launcher: pretend to be rank 0 of 1 (no MPI discovery)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def init_engine(model: torch.nn.Module, config: dict, device: torch.device):
    ensure_rank_env()
    import deepspeed

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


def save_checkpoint(engine, directory: Path, step: int) -> None:
    engine.save_checkpoint(str(directory), tag=f"step{step}", client_state={"step": step})


def load_checkpoint(engine, directory: Path) -> int:
    """Resume from the latest checkpoint; return the step to continue from (0 = fresh)."""
    if not (directory / "latest").is_file():
        return 0
    tag = (directory / "latest").read_text().strip()
    if not (directory / tag).is_dir():
        raise FileNotFoundError(f"{directory / 'latest'} names checkpoint {tag!r}, which is missing; "
                                f"delete {directory} to train from scratch")
    _, client = engine.load_checkpoint(str(directory), tag=tag)
    if client is None:
        raise FileNotFoundError(f"{directory / tag}: checkpoint could not be loaded")
    return int(client["step"])
