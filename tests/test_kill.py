"""Kill anywhere: SIGKILL a long stage mid-run, rerun it, get exactly the uninterrupted result.

Each stage runs as a subprocess with the command dvc.yaml gives it, in a copy of a built smoke
workspace whose outputs were first deleted (as `dvc repro` deletes them before a rerun). Two
kinds of kill: right after the first shard/checkpoint lands in data/.work/<stage> (so it hits
mid-run, with finished work to keep), and at a seeded random delay after the stage's start-up
log line. After every kill the output either does not exist or is complete; the final rerun's
bytes equal the uninterrupted run's (timings aside), with every prompt id exactly once.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from tests.conftest import copy_workspace

STARTED = "device "  # the line runtime.setup logs once imports and params are done


def stage_command(ws: Path, name: str, item: str | None = None) -> tuple[list[str], list[str]]:
    """(argv, output paths) of a stage exactly as the workspace's dvc.yaml declares it."""
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"][name]
    spec = {k: v for k, v in spec.items() if k != "matrix"}
    text = yaml.safe_dump(spec)
    if item is not None:  # a matrix instance (`auf-0`): its paths hold the item as ${key}
        text = text.replace("${key}", item)
    spec = yaml.safe_load(text)
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics", "plots") for o in spec.get(key, [])]
    argv = shlex.split(spec["cmd"])
    assert argv[0] == "python", spec["cmd"]
    # DVC tells a matrix instance which one it is through DVC_STAGE (`env` execs: one pid to kill)
    prefix = ["env", f"DVC_STAGE={name}@{item}"] if item is not None else []
    return [*prefix, sys.executable, *argv[1:]], outs


def file_hashes(ws: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under the given outputs, by path relative to the workspace."""
    found = {}
    for rel in paths:
        p = ws / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            found[str(f.relative_to(ws))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


class Stage:
    """One run of a stage's command; `kill_when` SIGKILLs it when a condition first holds."""

    def __init__(self, ws: Path, argv: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECAUF_NO_PROGRESS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.started_at: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.started_at is None and STARTED in line:
                self.started_at = time.monotonic()

    def kill_when(self, condition, may_finish: bool = False, timeout: float = 300) -> None:
        """Poll every 10 ms; SIGKILL when condition() holds (or let it end, if it may)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if may_finish and self.proc.poll() is not None:
                self.wait()
                return
            assert self.proc.poll() is None, f"stage ended (rc {self.proc.returncode}) before the kill:\n{self.log()}"
            assert time.monotonic() < deadline, "kill condition never held"
            time.sleep(0.01)
        self.killed_at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self) -> int:
        self.proc.wait(timeout=600)
        self.reader.join(timeout=10)
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.lines[-40:])


def run_to_end(ws: Path, argv: list[str]) -> Stage:
    stage = Stage(ws, argv)
    assert stage.wait() == 0, stage.log()
    return stage


def remove_outputs(ws: Path, outs: list[str]) -> None:
    """What `dvc repro` does to a stage's outputs before running it."""
    import shutil

    for rel in outs:
        p = ws / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def prompt_ids(directory: Path) -> list[str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    ids = []
    for s in manifest["shards"]:
        ids += pa.ipc.open_file(pa.memory_map(str(directory / s["file"]))).read_all().column("prompt_id").to_pylist()
    return ids


def not_timing(key: str) -> bool:
    # the cost model is timings throughout (its best block size is chosen by speed)
    return not re.search(r"time|speedup|per_s|_over_|per_second|cost_model", key)


def without_timings(obj):
    """Eval/train metrics minus wall-clock figures (and `best`, which is chosen by speed)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not_timing(k) and k != "best"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def comparable(ws: Path, outs: list[str]) -> dict[str, object]:
    """Output files as compared with the uninterrupted run: bytes (sha256), except JSON metrics
    (compared without timings) and throughput logs (dropped)."""
    result = {}
    for rel, digest in file_hashes(ws, outs).items():
        if rel.endswith("tokens_per_second.tsv"):
            continue
        if rel.startswith("metrics/") and rel.endswith(".json"):
            result[rel] = without_timings(json.loads((ws / rel).read_text()))
        else:
            result[rel] = digest
    return result


def assert_whole_or_absent(ws: Path, reference: Path, outs: list[str]) -> None:
    """After a kill: each output is absent, or complete and equal to the uninterrupted one
    (a stage may die between writing two outputs; DVC then reruns it, as it failed)."""
    for rel in outs:
        if (ws / rel).exists():
            assert comparable(ws, [rel]) == comparable(reference, [rel]), f"{rel} is half-written"


SHARDED = {"rollouts": "data/.work/rollouts", "labels": "data/.work/labels"}


@pytest.mark.parametrize("name", ["rollouts", "labels"])
def test_sharded_stage_killed_twice_resumes_to_identical_bytes(name, built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    argv, outs = stage_command(ws, name)
    out, work = ws / outs[0], ws / SHARDED[name]
    expected = comparable(built_smoke, outs)
    ids = prompt_ids(built_smoke / outs[0])
    total_shards = len(json.loads((built_smoke / outs[0] / "manifest.json").read_text())["shards"])
    assert total_shards >= 4
    remove_outputs(ws, outs)

    # 1. killed as soon as its first shard is finished: mid-run, work kept, no output
    first = Stage(ws, argv)
    first.kill_when(lambda: any(work.glob("shard-*.arrow.json")))
    assert first.proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed stage left an output"
    finished = sorted(p.name for p in work.glob("shard-*.arrow.json"))
    assert 1 <= len(finished) < total_shards

    # what a kill mid-write could leave if writes were not atomic: the next shard truncated,
    # with an entry naming it; and a dead run's temporary output directory
    nxt = max(int(n[6:11]) for n in finished) + 1
    shard0 = (work / "shard-00000.arrow").read_bytes()
    (work / f"shard-{nxt:05d}.arrow").write_bytes(shard0[: len(shard0) // 2])
    (work / f"shard-{nxt:05d}.arrow.json").write_text((work / "shard-00000.arrow.json").read_text())
    dead = ws / "data" / f".{out.name}.dead.tmp"
    dead.mkdir()
    (dead / "manifest.json").write_text("{}")

    # 2. the resumed run, killed at a seeded random point after start-up (within the time the
    # first run took to load and finish a shard); should it finish first, it must be whole and right
    rng = random.Random(f"kill:{name}")
    second = Stage(ws, argv)
    delay = rng.uniform(0, first.killed_at - first.started_at)
    second.kill_when(lambda: second.started_at is not None and time.monotonic() - second.started_at >= delay,
                     may_finish=True)
    assert second.proc.returncode in (0, -signal.SIGKILL), second.log()
    assert_whole_or_absent(ws, built_smoke, outs)

    # 3. to the end: the uninterrupted bytes, every prompt once, no work dir or temporaries left
    third = run_to_end(ws, argv)
    assert comparable(ws, outs) == expected, third.log()
    got = prompt_ids(out)
    assert got == ids and len(set(got)) == len(got)
    assert not work.exists()
    assert not dead.exists(), "a dead run's temporary output survived the next run"
    assert not list((ws / "data").glob(f".{out.name}.*"))


def test_train_killed_after_a_checkpoint_resumes_to_identical_weights_and_losses(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    argv, outs = stage_command(ws, "train", "auf-0")
    expected = comparable(built_smoke, outs)
    ckpt = ws / "data/.work/train/auf-0/checkpoints"
    remove_outputs(ws, outs)

    first = Stage(ws, argv)
    first.kill_when(lambda: (ckpt / "latest").is_file())
    assert first.proc.returncode == -signal.SIGKILL
    for rel in outs:
        assert not (ws / rel).exists(), f"a killed train left {rel}"

    # the resume, killed again at a seeded random point after its start-up (within twice the
    # time the first run took to load and reach its first checkpoint)
    rng = random.Random("kill:train")
    second = Stage(ws, argv)
    delay = rng.uniform(0, 2 * (first.killed_at - first.started_at))
    second.kill_when(lambda: second.started_at is not None and time.monotonic() - second.started_at >= delay,
                     may_finish=True)
    assert second.proc.returncode in (0, -signal.SIGKILL), second.log()
    assert_whole_or_absent(ws, built_smoke, outs)

    third = run_to_end(ws, argv)
    if second.proc.returncode != 0:  # (a finished run leaves no checkpoint to resume from)
        assert "resumed from checkpoint at step" in "".join(third.lines), third.log()
    got = comparable(ws, outs)
    assert got == expected  # weights, config, manifest bytes; every logged loss and accuracy
    steps = [int(line.split("\t")[0]) for line in (ws / "metrics/train/auf-0/plots/metrics/loss.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps  # no step lost or logged twice
    assert not (ws / "data/.work/train/auf-0").exists()


def test_eval_killed_mid_run_leaves_no_metrics_and_reruns_to_the_same_figures(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    argv, outs = stage_command(ws, "eval", "auf-0")
    expected = comparable(built_smoke, outs)
    metrics = ws / outs[0]
    assert outs[0].endswith(".json")
    remove_outputs(ws, outs)

    # eval logs nothing while it decodes: time a whole run, then kill one at a seeded point of that
    timed = run_to_end(ws, argv)
    duration = time.monotonic() - timed.started_at
    assert comparable(ws, outs) == expected, timed.log()
    remove_outputs(ws, outs)

    rng = random.Random("kill:eval")
    killed = Stage(ws, argv)
    delay = rng.uniform(0.25, 0.95) * duration
    killed.kill_when(lambda: killed.started_at is not None and time.monotonic() - killed.started_at >= delay)
    assert killed.proc.returncode == -signal.SIGKILL
    assert not metrics.exists(), "a killed eval left its metrics (DVC would take the stage for done)"
    assert_whole_or_absent(ws, built_smoke, outs)

    again = run_to_end(ws, argv)
    assert comparable(ws, outs) == expected, again.log()
