"""Sharing a built pipeline: push to a DVC remote, clone elsewhere, pull; nothing to rebuild."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from tests.conftest import copy_workspace, dvc, git_commit_all

ARTIFACTS = ("data", "metrics", "plots", "reports")


def artifact_hashes(ws: Path) -> dict[str, str]:
    """sha256 of every artifact file (DVC-cached outputs, metrics, plots, report) by path."""
    found = {}
    for top in ARTIFACTS:
        for f in sorted((ws / top).rglob("*")):
            if f.is_file() and ".work" not in f.parts:
                found[str(f.relative_to(ws))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def test_push_clone_pull_gives_the_same_artifacts_and_nothing_to_rerun(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    remote = tmp_path / "remote"
    dvc(ws, "remote", "add", "-d", "store", str(remote))
    dvc(ws, "push")
    git_commit_all(ws, "add the store remote")
    assert any(remote.rglob("*")), "push wrote nothing to the remote"

    clone = tmp_path / "elsewhere" / "spec-auf"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    assert not (clone / "data/labels").exists()  # git carries only pointers (dvc.lock)
    dvc(clone, "pull")

    # only the `inputs` stage, which re-hashes inputs from outside the workspace, is always run
    assert json.loads(dvc(clone, "status", "--json").stdout) == {"inputs": ["always changed"]}
    repro = dvc(clone, "repro").stdout
    assert re.findall(r"Running stage '([^']+)'", repro) == ["inputs"], repro
    original, pulled = artifact_hashes(built_smoke), artifact_hashes(clone)
    assert any(k.startswith("data/labels/") for k in original) and any(k.startswith("metrics/eval/") for k in original)
    assert pulled == original
