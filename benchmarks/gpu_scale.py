"""The whole pipeline at a larger scale in one prepared run, on a machine without DVC.

Runs every stage of `dvc.yaml` in its DAG order with exactly the command DVC would run
(`python stages/<name>.py`, one per train.variants x train.seeds item with DVC_STAGE=`<stage>@<item>` set as DVC
sets it) plus `--params`, from a
params file made of a preset and `--set key.path=value` overrides (YAML values). Stage wall times
go to `<out>/stage_times.json`; metrics, report and the params used are copied to `--out`.
`--parallel train,export` runs the runs of those stages side by side (on a GPU a small drafter
leaves most of the device idle); eval runs one at a time unless named there too, since it times
decoding (side by side, its tau is unchanged and its speedups are not measurements). Metrics, report
and stage times are copied to `--out` after every stage, so a run cut short keeps what it finished.

    python benchmarks/gpu_scale.py --preset presets/gpu.yaml --set target.source=gguf \\
        --set train.steps=1200 --out /tmp/gpu-run
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def set_key(params: dict, path: str, value: str) -> None:
    *parents, leaf = path.split(".")
    node = params
    for key in parents:
        if key not in node or not isinstance(node[key], dict):
            raise SystemExit(f"error: --set {path}: no section {key!r} in the preset")
        node = node[key]
    node[leaf] = yaml.safe_load(value)


def stage_commands(params: dict, workspace: Path) -> list[tuple[str, list[tuple[dict, list[str]]]]]:
    """[(stage, [(env, argv) per item])] in dvc.yaml order, as DVC would run them."""
    stages = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    out = []
    for name, spec in stages.items():
        argv = shlex.split(spec["cmd"])
        if argv[0] == "python":
            argv[0] = sys.executable
        # a matrix stage runs once per (variant, seed), named as DVC names it (`train@auf-0`)
        items = [f"{v}-{s}" for v in params["train"]["variants"] for s in params["train"].get("seeds", [0])] \
            if "matrix" in spec else [None]
        out.append((name, [({"DVC_STAGE": name if item is None else f"{name}@{item}"}, argv) for item in items]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="presets/gpu.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True, help="folder for metrics, report, params and stage times")
    ap.add_argument("--parallel", default="train,export", help="stages whose variants run side by side")
    ap.add_argument("--skip", default="", help="stages not to run (comma-separated)")
    ap.add_argument("--only", default="", help="run only these stages (comma-separated)")
    ap.add_argument("--workspace", default=str(ROOT), help="pipeline folder holding dvc.yaml (default: this repo)")
    args = ap.parse_args()
    workspace = Path(args.workspace).resolve()
    sys.path.insert(0, str(ROOT))
    from specauf.params_file import full_params

    params = full_params(args.preset)  # a preset spells what it changes: every key, as a stage reads them
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(params, key, value)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    parallel, skip = set(args.parallel.split(",")), set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    times: dict[str, float] = {}
    for name, argvs in stage_commands(params, workspace):
        if name in skip or (only and name not in only) or name == "inputs":  # no DVC here: nothing reads the input hashes
            continue
        t0 = time.perf_counter()
        print(f"== stage {name}: {len(argvs)} command(s)", flush=True)
        batches = [argvs] if name in parallel else [[a] for a in argvs]
        for batch in batches:
            procs = [subprocess.Popen([*a, "--params", str(params_file)], cwd=workspace, env={**os.environ, **env})
                     for env, a in batch]
            codes = [p.wait() for p in procs]
            if any(codes):
                times[name] = round(time.perf_counter() - t0, 1)
                (out / "stage_times.json").write_text(json.dumps(times, indent=1))
                raise SystemExit(f"error: stage {name} failed (exit codes {codes})")
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"== stage {name}: {times[name]} s", flush=True)
        (out / "stage_times.json").write_text(json.dumps(times, indent=1))
        collect(workspace, out)


def collect(workspace: Path, out: Path) -> None:
    """Copy what the report reads (and the report) to `out`: the report can be rebuilt from it."""
    for rel in ("reports/report.md", "metrics", "data/target/manifest.json"):
        src = workspace / rel
        if src.is_dir():
            shutil.copytree(src, out / rel, dirs_exist_ok=True)
        elif src.is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / rel)


if __name__ == "__main__":
    main()
