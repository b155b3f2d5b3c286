"""`specauf verify`: what DVC leaves quiet, named with its fix (a damaged or missing cache copy,
an output a `dvc push` did not send, a truncated rwlock), in a copy of a built smoke workspace."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import copy_workspace, dvc


def verify(ws: Path, *args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([str(Path(sys.executable).parent / "specauf"), "verify", *args], cwd=ws,
                          capture_output=True, text=True)
    return proc.returncode, proc.stderr.strip().splitlines()


def cache_object(ws: Path, rel: str) -> Path:
    """The cache copy of a workspace file (its md5 names it)."""
    import hashlib

    md5 = hashlib.md5((ws / rel).read_bytes()).hexdigest()
    return ws / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def test_verify_names_what_dvc_leaves_quiet(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    assert verify(ws) == (0, [])

    # `dvc push` from a cache holding a damaged file: DVC warns and exits 0; verify refuses first
    obj = cache_object(ws, "data/target/config.json")
    good = obj.read_bytes()
    os.chmod(obj, 0o644)
    obj.write_bytes(good[:-2] + b"}}")
    code, err = verify(ws)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: data/target/config.json (stage target): the cache copy ") and \
        "is damaged" in err[0] and "rebuild with `dvc repro -f target` before any `dvc push`" in err[0], err
    obj.write_bytes(good)

    # a `dvc repro` on a full disk: the output is recorded but never reached the cache
    obj = cache_object(ws, "data/prompts/manifest.json")
    obj.unlink()
    code, err = verify(ws)
    assert code == 1 and err == ["error: data/prompts/manifest.json (stage prompts): not in the cache (a full disk during "
                                 "`dvc repro`?); rebuild it with `dvc repro -f prompts`, or `dvc commit prompts` if the "
                                 "workspace copy is intact"], err
    dvc(ws, "commit", "-f", "prompts")
    assert verify(ws) == (0, [])

    # an output the remote lacks after a push (what a quiet `dvc push` leaves)
    remote = tmp_path / "remote"
    dvc(ws, "remote", "add", "-d", "local", str(remote))
    dvc(ws, "push", "-q")
    assert verify(ws, "--remote")[0] == 0
    gone = next(p for p in remote.rglob("*") if p.is_file())
    gone.unlink()
    code, err = verify(ws, "--remote")
    assert code == 1 and err and all("not on the remote; push again" in e for e in err), err

    # a truncated rwlock blocks every DVC command: named, with the way out
    lock = ws / ".dvc/tmp/rwlock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text('{"read": {')
    code, err = verify(ws)
    assert code == 1 and err == [f"error: {lock} is damaged, and every DVC command will refuse to run; when no dvc command "
                                 f"is running, delete it (`rm {lock}`)"], err
