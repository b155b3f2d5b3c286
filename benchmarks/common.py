"""Shared helpers for the benchmarks: one torch thread, interleaved timing, the target, prompts,
markdown tables and a machine description.

Every benchmark measures the things it compares side by side in ONE process, interleaved
(A, B, A, B, ...) over repeats, and reports medians and the ratio of medians: on a 2-core machine
that may be running other work, interleaving spreads any load change over all contenders alike.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# Quiet libraries before they are imported anywhere.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("SPECAUF_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- threads

def setup_threads(n: int = 1) -> None:
    """Pin torch to n intra-op threads (benchmarks use 1: with another process busy on a 2-core
    machine, 2 threads can be many times slower than 1)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work has started): harmless
        pass


# ---------------------------------------------------------------- timing

def now() -> float:
    return time.perf_counter()


def timed(fn: Callable, *args, **kwargs):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def interleave(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
               log: Callable[[str], None] | None = print) -> dict[str, list[tuple[float, object]]]:
    """Call every contender once per round, in the given order (A, B, A, B, ...), `repeats` timed
    rounds after `warmup` untimed ones. Returns name -> [(seconds, result), ...] per timed round."""
    runs: dict[str, list[tuple[float, object]]] = {k: [] for k in contenders}
    for r in range(warmup + repeats):
        label = f"warmup {r + 1}/{warmup}" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        parts = []
        for name, fn in contenders.items():
            s, out = timed(fn)
            if r >= warmup:
                runs[name].append((s, out))
            parts.append(f"{name} {s:.2f}s")
        if log:
            log(f"  {label}: " + ", ".join(parts))
    return runs


def rel(path) -> str:
    """A path relative to the repository root when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ---------------------------------------------------------------- target and prompts

def target_dir(prefer: str | Path | None = None) -> Path:
    """data/target when the pipeline has built it (manifest present), else a cached copy under
    benchmarks/.cache/target, materialised once from the embedded GGUF (~20 s)."""
    if prefer is not None:
        return Path(prefer)
    data = ROOT / "data" / "target"
    if (data / "manifest.json").is_file():
        return data
    cached = CACHE / "target"
    if not (cached / "manifest.json").is_file():
        from specauf.config import TargetParams
        from specauf.target.run import materialize_target

        print(f"materialising the target into {cached} (once, ~20 s)", flush=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        materialize_target(TargetParams(), cached, seed=0, params_hash="bench")
    return cached


def load_bench_target(prefer: str | Path | None = None):
    """(model, tokenizer, manifest, directory) of the real target, fp32, eval mode, on CPU."""
    from specauf.target.run import load_target

    d = target_dir(prefer)
    model, tok, manifest = load_target(d, "cpu")
    return model, tok, manifest, d


def sharegpt_encoded(tokenizer, n: int, max_prompt_tokens: int, skip: int = 0) -> list[dict]:
    """The first n ShareGPT prompts (after `skip`) whose chat-templated first turn fits
    max_prompt_tokens, as {"prompt_id", "turns", "prompt_ids"}."""
    from specauf.data.generation import encode_chat
    from specauf.data.prompt_sources import sharegpt_prompts

    out, seen = [], 0
    for row in sharegpt_prompts():
        ids = encode_chat(tokenizer, row["turns"][:1])
        if len(ids) > max_prompt_tokens:
            continue
        seen += 1
        if seen <= skip:
            continue
        out.append({**row, "prompt_ids": ids})
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------- reporting

def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "n/a"
    from specauf.runtime import cpu_has_native_bf16

    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu, "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "load_avg_1_5_15": load,
    }


def command_line() -> str:
    """The command as run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *map(shlex.quote, sys.argv[1:])])


def print_header(title: str) -> None:
    m = machine_info()
    print(f"## {title}\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {m['date']}")
    print(f"- machine: {m['cpu']}, {m['cores']} cores, native bf16 {'yes' if m['native_bf16'] else 'no'}; "
          f"torch {m['torch']}, python {m['python']}")
    print(f"- torch threads: {m['torch_threads']}; load average at start (1/5/15 min): {m['load_avg_1_5_15']}")
    print(flush=True)


def print_table(headers: list[str], rows: list[list]) -> None:
    """A markdown table; floats printed with 3 significant decimals unless already strings."""
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print(flush=True)


def goal_line(name: str, value: float, op: str, threshold: float) -> str:
    ok = value >= threshold if op == ">=" else value <= threshold
    return f"- goal {name} {op} {threshold:g}: {value:.3f} -> {'MET' if ok else 'NOT MET'}"
