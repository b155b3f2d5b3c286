"""Calibrated matmul kernels for the target's linear layers at decode-time row counts.

On a CPU, a speculative verify pass multiplies every weight by only a handful of rows (the block),
and torch's `F.linear` hands that to MKL's GEMM, which on some CPUs (MKL on AMD, for one) runs a
2-8 row product at well under the speed of its one-row GEMV: the verify of a 4-token block cost
1.5x a plain decoding step on the development machine, while the weights it reads are the same.
The same product computed another way, e.g. as W @ x^T (a tall-skinny GEMM), can cost about one
step. Which way is fastest depends on the weight's shape, the row count and the CPU, so nothing
is hard-coded: `calibrate` times every candidate on the model's own weights, per (shape, rows),
cold (cycling through all the layers of that shape, as a forward pass does), and `install`
routes each nn.Linear to the winner for its row count. Row counts not calibrated (prefill) keep
`F.linear`.

Every kernel computes the same product to float rounding (tests hold them to F.linear within
1e-5 relative), not bit for bit. Greedy exactness (speculative == plain decoding) is unaffected
in kind: plain (1 row) and verify (b rows) passes already ran different MKL kernels. The plan is
recorded in the eval metrics; `eval.linear_kernels: stock` turns it off.
"""
from __future__ import annotations

import logging
import time
import types
from collections import defaultdict

import torch
import torch.nn.functional as F

from specauf.errors import UserError

log = logging.getLogger("specauf")


def _linear(x, weight, weight_t, bias):
    return F.linear(x, weight, bias)


def _weight_major(x, weight, weight_t, bias):
    """W @ x^T: the weight is the GEMM's tall left operand, the rows its few columns. The result
    is made contiguous: a transposed view would push attention off its fused kernel."""
    y = (weight @ x.reshape(-1, x.shape[-1]).T).T.contiguous()
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def _pretransposed(x, weight, weight_t, bias):
    """x @ W^T with W^T stored contiguous (a copy made at install time)."""
    y = x @ weight_t
    return y if bias is None else y + bias


def _onednn(x, weight, weight_t, bias):
    """oneDNN's fp32 linear (vendor-neutral AVX-512 kernels), on the dense weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


KERNELS = {"linear": _linear, "weight_major": _weight_major, "pretransposed": _pretransposed, "onednn": _onednn}
"""name -> fn(x, weight, weight_t, bias). `linear` is torch's own F.linear (the stock path)."""


def available_kernels() -> list[str]:
    names = ["linear", "weight_major", "pretransposed"]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        names.append("onednn")
    return names


def _linears(model) -> dict[tuple[int, int], list[torch.nn.Linear]]:
    """fp32 CPU nn.Linear modules of `model` grouped by weight shape (out, in)."""
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and w.device.type == "cpu" and w.dtype == torch.float32:
            groups[tuple(w.shape)].append(module)
    return groups


def _time_kernels(fns: dict, modules, weights_t, x, repeats: int) -> dict[str, float]:
    """Median seconds per kernel to apply it once per module (each layer's own weight, as a
    forward pass does), the kernels interleaved round by round so a change of machine load hits
    them all alike. The first round warms up and is dropped."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for m, wt in zip(modules, weights_t):
                fn(x, m.weight, wt, m.bias)
            times[name].append(time.perf_counter() - t0)
    return {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}


@torch.inference_mode()
def calibrate(model, rows: list[int], *, repeats: int = 7, margin: float = 0.05,
              kernels: list[str] | None = None) -> dict:
    """Time each kernel for every linear shape in `model` at each row count in `rows`.

    A kernel replaces F.linear only when it is faster by more than `margin` (a fraction of
    F.linear's time), so timing noise does not flip a plan between equal kernels.
    Returns {"plan": {"OUTxIN": {rows: kernel}}, "ms": {"OUTxIN": {rows: {kernel: ms}}}}.
    """
    names = kernels or available_kernels()
    unknown = [k for k in names if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown linear kernel {unknown[0]!r} (have: {', '.join(KERNELS)})")
    gen = torch.Generator().manual_seed(0)
    plan: dict[str, dict[int, str]] = {}
    ms: dict[str, dict[int, dict[str, float]]] = {}
    for (out_f, in_f), modules in _linears(model).items():
        key = f"{out_f}x{in_f}"
        weights_t = [m.weight.t().contiguous() for m in modules] if "pretransposed" in names else [None] * len(modules)
        plan[key], ms[key] = {}, {}
        for r in sorted(set(rows)):
            x = torch.randn(1, r, in_f, generator=gen)
            timing = _time_kernels({k: KERNELS[k] for k in names}, modules, weights_t, x, repeats)
            best = min(timing, key=timing.get)
            if timing[best] >= (1 - margin) * timing.get("linear", float("inf")):
                best = "linear"
            plan[key][r] = best
            ms[key][r] = {k: round(1000 * v, 4) for k, v in timing.items()}
        del weights_t
    return {"plan": plan, "ms": ms}


def _planned_forward(self, x):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel = self._specauf_kernels.get(rows)
    if kernel is None:
        return F.linear(x, self.weight, self.bias)
    return kernel(x, self.weight, self._specauf_weight_t, self.bias)


def install(model, plan: dict[str, dict[int, str]]) -> int:
    """Route each planned nn.Linear of `model` to its kernel per row count; return how many.

    Weights must not change while installed (`pretransposed` keeps a transposed copy).
    """
    count = 0
    for (out_f, in_f), modules in _linears(model).items():
        by_rows = {int(r): k for r, k in plan.get(f"{out_f}x{in_f}", {}).items() if k != "linear"}
        if not by_rows:
            continue
        for m in modules:
            m._specauf_kernels = {r: KERNELS[k] for r, k in by_rows.items()}
            m._specauf_weight_t = m.weight.detach().t().contiguous() if "pretransposed" in by_rows.values() else None
            m.forward = types.MethodType(_planned_forward, m)
            count += 1
    return count


def uninstall(model) -> None:
    for module in model.modules():
        if "_specauf_kernels" in module.__dict__:
            del module.forward, module._specauf_kernels, module._specauf_weight_t


def describe_plan(plan: dict[str, dict[int, str]]) -> str:
    """'N of M shape/row pairs off F.linear': how much of a calibrated plan reroutes anything."""
    kernels = [k for by_rows in plan.values() for k in by_rows.values()]
    return f"{sum(k != 'linear' for k in kernels)} of {len(kernels)} shape/row pairs off F.linear"


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none: no guard then)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tune_linears(model, rows: list[int], mode: str) -> dict | None:
    """Apply `eval.linear_kernels` to a decode-time target: calibrate and install on a CPU in
    mode `auto`, nothing otherwise (CUDA's small-row GEMMs are already about one pass).

    `pretransposed` keeps a second copy of each weight it serves; it is left out of the running
    when that copy would not fit twice over in the memory now available (a large target on a CPU).
    """
    if mode == "stock" or next(model.parameters()).device.type != "cpu":
        return None
    if mode != "auto":
        raise UserError(f"eval.linear_kernels: {mode!r} is not one of auto, stock")
    t0 = time.perf_counter()
    kernels = available_kernels()
    weight_bytes = sum(m.weight.nbytes for group in _linears(model).values() for m in group)
    free = available_memory_bytes()
    if free is not None and 2 * weight_bytes > free:
        kernels.remove("pretransposed")
        log.info("linear kernels: %.1f GB of linear weights, %.1f GB available: not calibrating `pretransposed` "
                 "(it stores a transposed copy)", weight_bytes / 1e9, free / 1e9)
    result = calibrate(model, rows, kernels=kernels)
    n = install(model, result["plan"])
    log.info("linear kernels calibrated in %.1f s for rows %d-%d: %s, %d layers rerouted (the plan is in the "
             "metrics)", time.perf_counter() - t0, min(rows), max(rows), describe_plan(result["plan"]), n)
    return result
