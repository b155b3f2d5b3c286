"""Inputs from outside the workspace, made visible to DVC.

DVC reruns a stage when a dependency's bytes change, but a user's JSONL prompt file, a local
target folder (`target.path`), the GGUF inside an installed package or `eval.assistant_model`
live outside the repository, and dvc.yaml cannot list a path a param names. The `inputs` stage
(always run, a few seconds: no model is loaded) hashes each of them into
`data/inputs/<stage>.json`, which the consuming stage lists as a dependency: an edited input
changes that file and reruns exactly its consumers; an unchanged one leaves it byte-identical
and nothing downstream reruns. Hashes are cached by (size, mtime, inode), as DVC does, so a
16 GB target folder is read once, not at every `dvc repro`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from specauf.artifacts import SCHEMA_VERSION, sha256_file, write_json
from specauf.config import Params
from specauf.errors import UserError

log = logging.getLogger("specauf")
CONSUMERS = ("target", "prompts", "eval")


def external_inputs(params: Params) -> dict[str, list[tuple[str, Path]]]:
    """(param key, path) of every input outside the workspace, by the stage that reads it."""
    from specauf.target.gguf_source import chunk_paths, gguf_path

    out: dict[str, list[tuple[str, Path]]] = {c: [] for c in CONSUMERS}
    t = params.target
    if t.source == "local":
        out["target"].append(("target.path", Path(t.path)))
    elif t.source == "gguf" and t.gguf_chunks:
        out["target"] += [(f"target.gguf_chunks[{i}]", path) for i, path in enumerate(chunk_paths(t))]
    elif t.source == "gguf":
        out["target"].append(("target.gguf_file", gguf_path(t)))
    sources = [(f"prompts.train[{i}]", s) for i, s in enumerate(params.prompts.train)]
    sources += [(f"prompts.eval.{name}[{i}]", s) for name, ss in params.prompts.eval.items() for i, s in enumerate(ss)]
    out["prompts"] += [(f"{key}.path", Path(s.path)) for key, s in sources if s.source == "jsonl"]
    if params.eval.assistant_model:
        out["eval"].append(("eval.assistant_model", Path(params.eval.assistant_model)))
    return out


class HashCache:
    """sha256 of files, reused while a file's size, mtime and inode stay the same."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = str(file.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        digest = sha256_file(file)
        self.entries[key] = [stamp, digest]
        return digest

    def save(self) -> None:
        write_json(self.path, self.entries)


def describe(key: str, path: Path, cache: HashCache) -> dict:
    """Content hash of a file, or of a folder's files (relative names and contents). The path
    itself is left out: it is in params already, and a venv or checkout at another place must
    not change the record (a fresh clone would rebuild the target)."""
    if path.is_file():
        return {"param": key, "files": 1, "sha256": cache.sha256(path)}
    if not path.is_dir():
        raise UserError(f"{key}: {path} does not exist")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + cache.sha256(f).encode())
    return {"param": key, "files": len(files), "sha256": h.hexdigest()}


def write_inputs(params: Params, out_dir: str | Path, cache_file: str | Path) -> dict[str, list[dict]]:
    cache = HashCache(Path(cache_file))
    described = {}
    for stage, found in external_inputs(params).items():
        described[stage] = [describe(key, path, cache) for key, path in found]
        # no versions, times or paths here: the file must keep its bytes while its inputs do
        write_json(Path(out_dir) / f"{stage}.json", {"schema_version": SCHEMA_VERSION, "kind": "inputs",
                                                     "stage": stage, "inputs": described[stage]})
        for (key, path), r in zip(found, described[stage]):
            log.info("%s reads %s = %s (%d files, sha256 %s)", stage, key, path, r["files"], r["sha256"][:12])
    os.makedirs(Path(cache_file).parent, exist_ok=True)
    cache.save()
    return described
