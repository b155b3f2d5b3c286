"""`specauf verify`: say what DVC leaves quiet. Three failures DVC itself reports with exit 0 or
not at all: `dvc push` from a cache holding a damaged file (a warning; the remote lacks it), a
`dvc repro` on a full disk (an output recorded in dvc.lock but missing from the cache), and a
truncated `.dvc/tmp/rwlock` (every later DVC command refuses, naming nothing to do). Each is
checked here against dvc.lock, by content, and named with its fix.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from specauf.errors import UserError


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _object(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def locked_outputs(repo) -> list[tuple[str, str, str]]:
    """(stage, output path, md5) of every cached output (not `cache: false`) dvc.lock records."""
    return [(stage.addressing, out.def_path, out.hash_info.value) for stage in repo.index.stages for out in stage.outs
            if out.use_cache and out.hash_info and out.hash_info.value]


def output_objects(repo) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(stage, file path, md5)] of every locked output's files, their .dir listings included;
    [problems with a listing missing or damaged in the cache])."""
    objects, problems, cache = [], [], Path(repo.cache.local.path)
    for stage, path, md5 in locked_outputs(repo):
        objects.append((stage, path, md5))
        if md5.endswith(".dir"):
            listing = _object(cache, md5)
            try:
                entries = json.loads(listing.read_text())
            except (OSError, ValueError):
                problems.append(f"{path} (stage {stage}): its listing {listing} is missing or damaged in the cache; "
                                f"rebuild it with `dvc repro -f {stage}` (or `dvc pull` it)")
                continue
            objects += [(stage, f"{path}/{e['relpath']}", e["md5"]) for e in entries]
    return objects, problems


def cache_problems(repo) -> list[str]:
    """Every locked output whose cache copy is missing or holds other bytes, one line each."""
    objects, problems = output_objects(repo)
    cache = Path(repo.cache.local.path)
    for stage, rel, want in objects:
        obj = _object(cache, want)
        if want.endswith(".dir"):
            continue  # read above
        if not obj.is_file():
            problems.append(f"{rel} (stage {stage}): not in the cache (a full disk during `dvc repro`?); "
                            f"rebuild it with `dvc repro -f {stage}`, or `dvc commit {stage}` if the workspace copy is intact")
        elif _md5(obj) != want:
            problems.append(f"{rel} (stage {stage}): the cache copy {obj} is damaged (its bytes hash to {_md5(obj)}, "
                            f"not {want}); delete that file and rebuild with `dvc repro -f {stage}` before any `dvc push`")
    return problems


def rwlock_problem(root: Path) -> str | None:
    lock = root / ".dvc" / "tmp" / "rwlock"
    if not lock.exists():
        return None
    try:
        json.loads(lock.read_text() or "{}")
        return None
    except (OSError, ValueError):
        return (f"{lock} is damaged, and every DVC command will refuse to run; when no dvc command is running, "
                f"delete it (`rm {lock}`)")


def remote_problems(repo, remote: str | None) -> list[str]:
    """Every object of every locked output the remote lacks, asked object by object: `dvc status
    --cloud` trusts its record of a folder pushed whole and misses a file gone from it since."""
    try:
        odb = repo.cloud.get_remote_odb(remote)
    except Exception as e:  # DVC raises its own types for an unknown or unconfigured remote
        raise UserError(f"--remote: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    objects, _ = output_objects(repo)
    return [f"{rel} (stage {stage}): not on the remote; push again (`dvc push`) and read its warnings"
            for stage, rel, oid in objects if not odb.fs.exists(odb.oid_to_path(oid))]


def verify(root: Path, remote: str | bool = False) -> list[str]:
    """Every problem found, one line each (empty: the workspace's DVC state is what dvc.lock says)."""
    problems = [p for p in [rwlock_problem(root)] if p]
    if problems:
        return problems  # DVC itself cannot run until it is fixed
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        problems += cache_problems(repo)
        if remote is not False and not problems:
            problems += remote_problems(repo, remote if isinstance(remote, str) else None)
    return problems
