"""Every table the pipeline writes, as a Hugging Face `datasets.Dataset`, for analysis with the
tools users know (`filter`, `map`, `to_pandas`, `with_format("torch")`).

    from specauf.artifact_datasets import load_artifact
    rollouts = load_artifact("data/rollouts")    # Dataset: the shards in order, one row per answer
    prompts = load_artifact("data/prompts")      # DatasetDict: train and each evaluation set

Our shards are Arrow IPC files, which `Dataset.from_file` (Arrow streams) cannot open; they are
memory-mapped here, checked against their manifest, and handed to `datasets` as in-memory tables
over the mapping: nothing is copied, and `map`/`filter` keep their results in memory instead of
writing cache files beside the shards, where they would change a DVC output.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from specauf.artifacts import (MANIFEST, ArtifactError, hash_obj, iter_shards, read_manifest, read_table, sha256_file,
                               verify_shards)


def _dataset(table: pa.Table, fingerprint: str):
    """fingerprint: our files' sha256s, which name the content; without one, `datasets` hashes
    the whole table to make its own (it read and copied 1.3 GB of eval labels that way)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table), fingerprint=fingerprint)


def load_artifact(path: str | Path, verify: bool = True):
    """A `Dataset` for a sharded artifact (rollouts, labels, eval answers and eval labels: its
    shards in order) or for one `.arrow` file; a `DatasetDict` of the sets for `data/prompts`.
    verify: check every file's size and sha256 against the manifest first (labels: a few seconds
    per GB)."""
    from datasets import DatasetDict

    path = Path(path)
    if path.is_file():
        return _dataset(read_table(path), sha256_file(path))
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not a spec-auf artifact folder or .arrow file")
    manifest = read_manifest(path)
    if manifest.get("kind") == "prompts":
        return DatasetDict({name: _dataset(read_table(path / entry["file"], entry, verify=verify), entry["sha256"])
                            for name, entry in manifest["files"].items()})
    if "shards" not in manifest:
        raise ArtifactError(f"{path / MANIFEST}: a {manifest.get('kind')!r} artifact holds no table "
                            "(tables: prompts, rollouts, labels, eval_rollouts, eval_labels)")
    if verify:
        verify_shards(path, manifest)
    shards = list(iter_shards(path, manifest, verify=False))
    if not shards:
        raise ArtifactError(f"{path / MANIFEST}: lists no shards")
    fingerprint = hash_obj([s["sha256"] for s in manifest["shards"]])
    return _dataset(pa.concat_tables(shards), fingerprint)  # chunks over the mappings: no copy
