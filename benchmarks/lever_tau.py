"""Training levers judged by replay tau: each lever against today's default, 2 seeds, paired CIs.

Trains each run with the real train stage (`stages/train.py`, the default params plus the run's
`train.*` overrides, one process at `--threads`), then replays it on every eval prompt of the
default pipeline's `data/eval_labels` (specauf.evaluate.replay, the eval stage's own tau) and compares it
with its baseline, the default params' drafter of the same loss variant and seed: tau(lever) -
tau(baseline) with the two-level bootstrap interval over seeds and prompts (specauf.evidence),
pooled and per eval set, at each `--block-size`. A baseline the default pipeline has
trained (`data/drafters/<variant>-<seed>`, a seed of the default's train.seeds) is reused, not retrained.
A run may train on data of its own (DATA: `prompts.train` and `rollouts.*` overrides): the real
prompts, rollouts and labels stages build it once, timed, under `--out`/data-<name>/, with the
workspace's fp32 target, so its labels are exact for the verifier that is evaluated.

    python benchmarks/lever_tau.py --runs auf,auf_muon,auf_block_norm --seeds 0,1

Everything it writes goes under `--out` (default benchmarks/.cache/lever_tau/): per run and seed
the drafter, its train metrics and replay rows; `table.b<B>.json` and `.md` the comparison at block
size B (`table.b<B>.vs-<run>.*` with `--against <run>`: every run against that one, e.g. the
losses on one backbone).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MUON_STEPS = 900
# run name -> (loss variant, train.* overrides); a run with no overrides is its variant's baseline
RUNS = {
    "auf": ("auf", {}),
    "dpace": ("dpace", {}),
    # a Muon step costs 1.76x an AdamW step in benchmarks/train.py (bf16, at 4x the default's tokens
    # per step): 1600 / 1.76 steps, planned as the default's CPU minutes, took 1.7x them
    "auf_muon": ("auf", {"optimizer": "muon", "steps": MUON_STEPS}),
    # measured in the runs themselves, at the default's 64 blocks per step: 0.84 s per Muon step vs
    # 0.31 per AdamW step (2.7x; two runs side by side), so the default's minutes hold 1600 / 2.7 steps
    "auf_muon_equal_minutes": ("auf", {"optimizer": "muon", "steps": 590}),
    # 0.3 anchors per response token: about the default's 32 per sequence at its mean 115-token answer
    "auf_anchors_per_token": ("auf", {"anchors_per_token": 0.3}),
    "auf_block_norm": ("auf", {"loss_normalization": "block"}),
    "dpace_block_norm": ("dpace", {"loss_normalization": "block"}),
    "auf_combined": ("auf", {"optimizer": "muon", "steps": MUON_STEPS, "anchors_per_token": 0.3,
                             "loss_normalization": "block"}),
    # the Domino backbone (train.domino, docs/method.md 2b) against DFlash under each loss, same steps
    "decay": ("decay", {}),
    "decay_domino": ("decay", {"domino": {}}),
    "dpace_domino": ("dpace", {"domino": {}}),
    "auf_domino_base": ("auf", {"domino": {"auf_support": "base"}}),  # speculators' "B-AUF+D"
    "auf_domino_final": ("auf", {"domino": {"auf_support": "final"}}),
    # a Domino step costs 1.21x a DFlash step (benchmarks/peer_trainers.py --throughput): the default's
    # CPU minutes hold 1600 / 1.21 Domino steps
    "auf_domino_base_equal_minutes": ("auf", {"domino": {"auf_support": "base"}, "steps": 1320}),
}


# training data of a run (run name -> data name) other than the workspace's data/labels; each data
# setting = (prompts.train[*] overrides, rollouts.* overrides), built by the real stages
BF16_EQUAL_MINUTES_PROMPTS = 690  # 500 * 1.38: bf16 rollouts' tokens/s over fp32's (benchmarks/rollouts.py)
DATA = {
    "bf16_rollouts": ({}, {"precision": "bf16"}),  # the default's 500 prompts, answered in bf16
    "bf16_rollouts_equal_minutes": ({"count": BF16_EQUAL_MINUTES_PROMPTS}, {"precision": "bf16"}),
}
RUN_DATA = {
    "auf_bf16_rollouts": "bf16_rollouts",
    "auf_bf16_rollouts_equal_minutes": "bf16_rollouts_equal_minutes",
    "dpace_bf16_rollouts_equal_minutes": "bf16_rollouts_equal_minutes",
}
RUNS.update({name: (name.split("_")[0], {}) for name in RUN_DATA})
BUILDING = {data: threading.Lock() for data in DATA}


def baseline_of(name: str) -> str:
    variant, _ = RUNS[name]
    return next(n for n, (v, o) in RUNS.items() if v == variant and not o and n not in RUN_DATA)


def data_params(base: dict, data: str, threads: int) -> dict:
    """The default params with the data setting's overrides (every training prompt source's count)."""
    prompts_over, rollouts_over = DATA[data]
    params = json.loads(json.dumps(base))
    params["base"]["torch_threads"] = threads
    for source in params["prompts"]["train"]:
        source.update(prompts_over)
    params["rollouts"].update(rollouts_over)
    return params


def build_data(data: str, base: dict, out: Path, threads: int, workspace: Path) -> Path:
    """The data setting's labels folder, built once by the prompts (when its prompts differ from the
    workspace's), rollouts and labels stages; each stage's minutes go to data_time.json."""
    data_dir = out / f"data-{data}"
    with BUILDING[data]:  # two runs on one data setting wait for one build
        if not (data_dir / "data_time.json").is_file():
            _build(data, data_dir, base, threads, workspace)
    return data_dir / "labels"


def describe(name: str) -> str:
    """A run's changes from the default params, as the table shows them."""
    changes = [f"{k}={v}" for k, v in RUNS[name][1].items()]
    if name in RUN_DATA:
        prompts_over, rollouts_over = DATA[RUN_DATA[name]]
        changes += [f"rollouts.{k}={v}" for k, v in rollouts_over.items()]
        changes += [f"prompts.train {k}={v}" for k, v in prompts_over.items()]
    return ", ".join(changes) or "(default params)"


def _build(data: str, data_dir: Path, base: dict, threads: int, workspace: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    params_file = data_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(data_params(base, data, threads), sort_keys=False))
    prompts = data_dir / "prompts" if DATA[data][0] else workspace / "data/prompts"
    stages = ([("prompts", ["--out", str(prompts)])] if DATA[data][0] else []) + [
        ("rollouts", ["--prompts", str(prompts), "--target", str(workspace / "data/target"),
                      "--out", str(data_dir / "rollouts"), "--work", str(data_dir / "work/rollouts")]),
        ("labels", ["--rollouts", str(data_dir / "rollouts"), "--target", str(workspace / "data/target"),
                    "--out", str(data_dir / "labels"), "--work", str(data_dir / "work/labels")])]
    minutes = {stage: run_stage(stage, params_file, args, data_dir / f"{stage}.log", workspace) for stage, args in stages}
    (data_dir / "data_time.json").write_text(json.dumps(minutes))


def run_stage(stage: str, params_file: Path, args: list[str], log_file: Path, workspace: Path) -> float:
    """Run stages/<stage>.py in the workspace with these params, its output to log_file; its minutes."""
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params", str(params_file), *args],
                       cwd=workspace, check=True, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return round((time.perf_counter() - t0) / 60, 2)


def params_for(base: dict, name: str, seed: int, threads: int) -> dict:
    variant, overrides = RUNS[name]
    params = json.loads(json.dumps(base))
    params["train"].update(overrides, variants=[variant], seeds=[seed], torch_threads=threads)
    return params


def train(name: str, seed: int, base: dict, out: Path, threads: int, workspace: Path) -> dict:
    """The run's drafter folder, trained by the train stage unless the default pipeline has it."""
    variant, _ = RUNS[name]
    run_dir = out / f"{name}-{seed}"
    default = workspace / "data" / "drafters" / f"{variant}-{seed}"
    if baseline_of(name) == name and seed in base["train"]["seeds"] and (default / "model.safetensors").is_file():
        return {"drafter": default, "minutes": None, "reused": True}  # the pipeline's train@<variant>-<seed>
    if (run_dir / "drafter" / "model.safetensors").is_file():
        return {"drafter": run_dir / "drafter", "minutes": json.loads((run_dir / "train_time.json").read_text())["minutes"],
                "reused": False}
    labels = build_data(RUN_DATA[name], base, out, threads, workspace) if name in RUN_DATA else workspace / "data/labels"
    run_dir.mkdir(parents=True, exist_ok=True)
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_for(base, name, seed, threads), sort_keys=False))
    minutes = run_stage("train", params_file, ["--variant", variant, "--seed", str(seed), "--labels", str(labels),
                                               "--target", str(workspace / "data/target"), "--out", str(run_dir / "drafter"),
                                               "--work", str(run_dir / "work"), "--metrics", str(run_dir / "metrics")],
                        run_dir / "train.log", workspace)
    (run_dir / "train_time.json").write_text(json.dumps({"minutes": minutes}))
    return {"drafter": run_dir / "drafter", "minutes": minutes, "reused": False}


LOADING = threading.Lock()  # transformers' from_pretrained is not thread-safe (its meta-device init)


def replay(drafter_dir: Path, rows_file: Path, params, seed: int, target, answers, every: dict) -> list[dict]:
    """Replay rows of one drafter (cached in rows_file). `target` (model, manifest), the eval answers
    (opened and checksum-verified once) and `every` ({prompt_id: set}) are shared by every replay:
    it reads only the target's embeddings and lm_head and the answers' read-only mapped shards."""
    import torch

    from specauf.artifacts import loading, read_manifest
    from specauf.train.drafter import BlockDrafter
    from specauf.evaluate.replay import replay_drafter
    from specauf.target.run import check_fingerprint

    if rows_file.is_file():
        return json.loads(rows_file.read_text())
    target, manifest = target
    check_fingerprint(read_manifest(drafter_dir, kind="drafter")["target_fingerprint"], manifest, f"the drafter in {drafter_dir}")
    with LOADING, loading(drafter_dir):
        drafter = BlockDrafter.from_pretrained(drafter_dir).eval()
    with torch.no_grad():
        rows = replay_drafter(drafter, target, answers, every,
                              params.eval.speculative_block_sizes, params.eval.block_layout,
                              params.eval.replay_max_new_tokens, manifest["stop_token_ids"])
    rows = [{**r, "seed": seed} for r in rows]
    rows_file.write_text(json.dumps(rows))
    return rows


def compare(rows: dict, names: list[str], key: str, resamples: int, against: str | None = None) -> list[dict]:
    from specauf.evidence import paired_diff_ci, paired_rows, ratio_ci, verdict

    table = []
    for name in names:
        mine = [r for rs in rows[name].values() for r in rs]
        tau = ratio_ci(*paired_rows(mine, mine, key)[:2], resamples=resamples)
        entry = {"run": name, "variant": RUNS[name][0], "overrides": RUNS[name][1], "seeds": sorted(rows[name]),
                 "tau": tau}
        base = against or baseline_of(name)
        if base != name:
            theirs = [r for rs in rows[base].values() for r in rs]
            sets = sorted({r["set"] for r in mine})
            entry["baseline"] = base
            entry["diff"] = {s or "all": paired_diff_ci(*paired_rows(mine, theirs, key, s), resamples=resamples)
                             for s in [None, *sets]}
            entry["verdict"] = {s: verdict(d) for s, d in entry["diff"].items()}
        table.append(entry)
    return table


def markdown(table: list[dict], minutes: dict, key: str, against: str | None = None) -> str:
    from specauf.evidence import NOT_SIGNIFICANT

    sets = [s for s in next((e["diff"] for e in table if "diff" in e), {"all": 0}) if s != "all"]
    head = ["run", "overrides", f"tau {key} [95%]", "train min/seed", f"minus {against or 'baseline'}, all sets", *sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda d: f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    for e in table:
        over = describe(e["run"])
        t = e["tau"]
        cells = [e["run"], over, f"{t['value']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}]", minutes.get(e["run"], "")]
        cells += [fmt(e["diff"][s]) + ("" if e["verdict"][s] == NOT_SIGNIFICANT else f" ({e['verdict'][s]})")
                  for s in ["all", *sets]] if "diff" in e else ["baseline"] + [""] * len(sets)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="the default params (the baselines')")
    ap.add_argument("--workspace", default=str(ROOT), help="pipeline folder whose data/ holds target, prompts, labels, eval_labels")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / ".cache" / "lever_tau"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    ap.add_argument("--parallel", type=int, default=2, help="training runs side by side")
    ap.add_argument("--block-size", default="4", help="the block size(s) the tables compare at, comma-separated")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--against", default=None, help="compare every run with this run (default: each with its "
                                                     "variant's default-params baseline)")
    args = ap.parse_args()
    from specauf.params_file import full_params, load_params
    from specauf.runtime import setup_logging

    setup_logging("lever_tau")
    import torch

    torch.set_num_threads(1)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: --runs: unknown run {unknown[0]!r} (known: {', '.join(RUNS)})")
    if args.against and args.against not in RUNS:
        raise SystemExit(f"error: --against: unknown run {args.against!r} (known: {', '.join(RUNS)})")
    names += [b for b in dict.fromkeys([baseline_of(n) for n in names] + [args.against] * bool(args.against))
              if b not in names]
    seeds = [int(s) for s in args.seeds.split(",")]
    workspace, out = Path(args.workspace).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base, params = full_params(args.params), load_params(args.params)
    jobs = [(n, s) for n in names for s in seeds]
    from specauf.data.dataset import LabelsDataset
    from specauf.data.prompts import load_eval_prompts
    from specauf.target.run import load_target

    model, _, manifest = load_target(workspace / "data/target", "cpu")
    answers = LabelsDataset(workspace / "data/eval_labels")
    sets = load_eval_prompts(workspace / "data/prompts", params.eval.sets)
    every = {r["prompt_id"]: name for name, rows in sets.items() for r in rows}

    def job(j):  # a run's replay overlaps the next runs' training (torch ops run outside the GIL)
        t = train(*j, base, out, args.threads, workspace)
        return t, replay(t["drafter"], out / f"{j[0]}-{j[1]}.replay.json", params, j[1], (model, manifest), answers, every)

    with ThreadPoolExecutor(args.parallel) as pool:
        done = dict(zip(jobs, pool.map(job, jobs)))
    trained = {j: t for j, (t, _) in done.items()}
    rows = {n: {s: done[(n, s)][1] for s in seeds} for n in names}
    minutes = {n: "/".join("default" if trained[(n, s)]["reused"] else str(trained[(n, s)]["minutes"]) for s in seeds)
               for n in names}
    data_minutes = {d: json.loads((out / f"data-{d}" / "data_time.json").read_text())
                    for d in dict.fromkeys(RUN_DATA[n] for n in names if n in RUN_DATA)}
    for block_size in map(int, str(args.block_size).split(",")):
        table = compare(rows, names, f"b{block_size}", args.resamples, args.against)
        stem = f"table.b{block_size}" + (f".vs-{args.against}" if args.against else "")
        (out / f"{stem}.json").write_text(json.dumps({"block_size": block_size, "seeds": seeds, "minutes": minutes,
                                                    "data_minutes": data_minutes, "table": table}, indent=1))
        md = markdown(table, minutes, f"B={block_size}", args.against)
        (out / f"{stem}.md").write_text(md)
        print(md)

if __name__ == "__main__":
    main()
