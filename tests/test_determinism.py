"""Same params, two independent workspaces: byte-identical artifacts and identical training losses (CPU).

docs/pipeline.md ("Determinism") says what is bit-exact here and what is not on GPUs.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from tests.conftest import dvc

BYTE_EXACT = ("data/target", "data/prompts", "data/rollouts", "data/labels", "data/drafters/decay-0")
TIMINGS = ("tokens_per_second",)  # wall-clock throughput: the only logged figure allowed to differ


def hashes(ws: Path, top: str) -> dict[str, str]:
    return {str(f.relative_to(ws)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((ws / top).rglob("*")) if f.is_file()}


def train_log(ws: Path, variant: str) -> dict[str, str]:
    """Every DVCLive series of a training run (step and value per row), throughput aside."""
    plots = ws / "metrics/train" / variant / "plots/metrics"
    return {str(f.relative_to(plots)): f.read_text() for f in sorted(plots.rglob("*.tsv"))
            if f.stem not in TIMINGS}


def test_two_workspaces_same_params_same_bytes_and_losses(built_smoke, tmp_path, monkeypatch):
    # a git clone: the same code and params.yaml, another path, no data and no DVC cache, so
    # every stage really runs again (--force: not even DVC's run cache may restore an output)
    ws = tmp_path / "again"
    subprocess.run(["git", "clone", "-q", str(built_smoke), str(ws)], check=True)
    assert not (ws / "data/target").exists() and not (ws / ".dvc/cache").exists()
    # the GPU exactness switch (torch.use_deterministic_algorithms) changes no bit on CPU
    monkeypatch.setenv("SPECAUF_DETERMINISTIC", "1")
    out = dvc(ws, "repro", "--force", "train@decay-0").stdout
    for stage in ("target", "prompts", "rollouts", "labels", "train@decay-0"):
        assert f"Running stage '{stage}'" in out, out

    for top in BYTE_EXACT:  # every shard, manifest, weight file, tokenizer file
        first, second = hashes(built_smoke, top), hashes(ws, top)
        assert first and second == first, top
    for name in ("prompts", "rollouts", "labels"):  # manifests hold no timing, path or date
        manifest = (ws / "data" / name / "manifest.json").read_text()
        assert str(ws) not in manifest and str(built_smoke) not in manifest

    # DVC agrees: the same dependency and output hashes (train's metrics hold tokens_per_second)
    lock1, lock2 = (yaml.safe_load((w / "dvc.lock").read_text())["stages"] for w in (built_smoke, ws))
    for stage in ("target", "prompts", "rollouts", "labels", "train@decay-0"):
        data1, data2 = ([o for o in lock[stage]["outs"] if o["path"].startswith("data/")] for lock in (lock1, lock2))
        assert data1 and data2 == data1, stage
        assert lock2[stage]["deps"] == lock1[stage]["deps"] and lock2[stage]["params"] == lock1[stage]["params"], stage

    log1, log2 = train_log(built_smoke, "decay-0"), train_log(ws, "decay-0")
    assert "loss.tsv" in log1 and len(log1["loss.tsv"].splitlines()) > 2
    assert log2 == log1  # every logged loss, accuracy and lr, to the last bit of its decimal repr
    m1, m2 = (json.loads((w / "metrics/train/decay-0/metrics.json").read_text()) for w in (built_smoke, ws))
    for m in (m1, m2):
        for key in TIMINGS:
            m.pop(key)
    assert m2 == m1
