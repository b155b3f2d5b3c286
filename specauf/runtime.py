"""Process setup shared by every stage: threads, seeds, device, logging, progress bars."""
from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from specauf.errors import UserError

log = logging.getLogger("specauf")


class StageFormatter(logging.Formatter):
    """`[stage] message`; a warning or worse names its level (`[stage] WARNING: message`), so it
    stands out of a long log and `grep WARNING` finds it."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[{self.stage}] {level}{record.getMessage()}"


def setup_logging(stage: str) -> logging.Logger:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StageFormatter(stage))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # transformers and deepspeed are chatty at INFO; their warnings still show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: it read those variables too early
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars would bury a one-line error
    return log


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("base.device: 'cuda' but no CUDA device is visible (set base.device: auto or cpu)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """x86 AVX512-BF16 / AMX-BF16 or Arm BF16 in /proc/cpuinfo (not Linux: assume not)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve train.precision `auto`: bf16 where the hardware computes it natively."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def setup(base, stage: str) -> torch.device:
    """Apply `base` params: thread count, seeds, device; return the device."""
    setup_logging(stage)
    if base.torch_threads:
        torch.set_num_threads(base.torch_threads)
    seed_everything(base.seed)
    if os.environ.get("SPECAUF_DETERMINISTIC") == "1":
        # GPU kernels (cuBLAS split-K, atomics in attention backward) are not bit-exact run to run
        # by default; this trades speed for exactness, or fails naming an op that cannot comply.
        # cuBLAS reads its workspace setting when CUDA starts: before any model is loaded.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    device = pick_device(base.device)
    log.info("device %s, %d torch threads, seed %d", device, torch.get_num_threads(), base.seed)
    return device


NON_TTY_INTERVAL = 60.0  # seconds between progress lines when stderr is a log file, not a terminal


class _LogBar(tqdm):
    """A bar for a log file: a new postfix (loss, shard) waits for the next line instead of forcing one."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable=None, *, total=None, desc: str, unit: str = "it"):
    """A tqdm bar with a rate. On a terminal it redraws in place; into a log (DVC's, CI's) it writes
    one plain line per minute instead of a redraw every 2 s (which made one 67 KB log line of a
    stage); SPECAUF_NO_PROGRESS silences it."""
    tty = sys.stderr.isatty()
    return (tqdm if tty else _LogBar)(iterable, total=total, desc=desc, unit=unit, unit_scale=unit == "tok", dynamic_ncols=tty,
                mininterval=2.0 if tty else NON_TTY_INTERVAL, maxinterval=NON_TTY_INTERVAL * 2,
                bar_format=None if tty else "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]\n",
                disable=bool(os.environ.get("SPECAUF_NO_PROGRESS")))
