"""Inputs from outside the workspace, made visible to DVC.

DVC reruns a stage when a dependency's bytes change, but a user's JSONL prompt file, a local
target folder (`target.path`), the GGUF inside an installed package or `eval.assistant_model`
live outside the repository, and dvc.yaml cannot list a path a param names. A prompt source on
the Hugging Face hub is recorded as the commit its revision names (asked of the hub when the
revision is a branch or tag). The `inputs` stage
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
import re
from pathlib import Path

from specauf.artifacts import SCHEMA_VERSION, sha256_file, write_json
from specauf.config import Params
from specauf.config_data import HfDataset, PromptSource
from specauf.errors import UserError

log = logging.getLogger("specauf")
CONSUMERS = ("target", "prompts", "eval")
COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_TIMEOUT_S = 10.0


def keyed_sources(params: Params) -> list[tuple[str, PromptSource]]:
    """Every prompt source with its param key (`prompts.train[0]`, `prompts.eval.<name>[i]`)."""
    return ([(f"prompts.train[{i}]", s) for i, s in enumerate(params.prompts.train)]
            + [(f"prompts.eval.{name}[{i}]", s) for name, ss in params.prompts.eval.items() for i, s in enumerate(ss)])


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
    sources = keyed_sources(params)
    out["prompts"] += [(f"{key}.path", Path(s.path)) for key, s in sources if s.source == "jsonl"]
    out["prompts"] += [(f"{key}.hf.path", Path(s.hf.path)) for key, s in sources if s.source == "hf" and s.hf.path]
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


def hub_datasets(params: Params) -> list[tuple[str, HfDataset]]:
    """(param key, source) of every prompt source on the Hugging Face hub."""
    return [(f"{key}.hf.dataset", s.hf) for key, s in keyed_sources(params) if s.source == "hf" and s.hf.dataset]


def describe_hub(key: str, hf: HfDataset) -> dict:
    """A hub dataset as the commit its revision names now: a commit sha is its own record (no
    network needed); a branch or tag is asked of the hub, so a new commit there reruns `prompts`."""
    record = {"param": key, "dataset": hf.dataset, "subset": hf.subset}
    if hf.revision is not None and COMMIT.fullmatch(hf.revision):
        return {**record, "commit": hf.revision}
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError  # the hub client's transport and HTTP errors

    try:
        info = HfApi().dataset_info(hf.dataset, revision=hf.revision, timeout=HUB_TIMEOUT_S)
    except (HTTPError, OSError, ValueError) as e:  # offline, unreachable, a bad id or revision: named
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{key}: cannot resolve {hf.dataset!r} at revision {hf.revision or 'main'!r} on the hub "
                        f"({reason}); pin hf.revision to a commit sha (with the dataset in the local HF cache) "
                        "or copy the data here and set hf.path") from None
    return {**record, "commit": info.sha}


def write_inputs(params: Params, out_dir: str | Path, cache_file: str | Path) -> dict[str, list[dict]]:
    cache = HashCache(Path(cache_file))
    described = {}
    hub = hub_datasets(params)
    for stage, found in external_inputs(params).items():
        described[stage] = [describe(key, path, cache) for key, path in found]
        if stage == "prompts":
            described[stage] += [describe_hub(key, hf) for key, hf in hub]
        # no versions, times or paths here: the file must keep its bytes while its inputs do
        write_json(Path(out_dir) / f"{stage}.json", {"schema_version": SCHEMA_VERSION, "kind": "inputs",
                                                     "stage": stage, "inputs": described[stage]})
        for (key, path), r in zip(found, described[stage]):
            log.info("%s reads %s = %s (%d files, sha256 %s)", stage, key, path, r["files"], r["sha256"][:12])
        for r in described[stage][len(found):]:
            log.info("%s reads %s = %s at commit %s", stage, r["param"], r["dataset"], r["commit"])
    os.makedirs(Path(cache_file).parent, exist_ok=True)
    cache.save()
    return described
