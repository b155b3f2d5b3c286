"""Reading the labels stage's shards for training: memory-mapped, zero-copy where Arrow allows."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from specauf.artifacts import read_manifest, read_table, verify_shards
from specauf.data.labels import FEATURE_DTYPES


def _values(column: pa.ChunkedArray, row: int) -> np.ndarray:
    """A row's list values as a numpy view into the memory-mapped buffer (no copy)."""
    chunk_index, offset = 0, row
    while offset >= len(column.chunks[chunk_index]):
        offset -= len(column.chunks[chunk_index])
        chunk_index += 1
    arr = column.chunks[chunk_index]
    start, end = arr.offsets[offset].as_py(), arr.offsets[offset + 1].as_py()
    return arr.values.slice(start, end - start)


class LabelsDataset(torch.utils.data.Dataset):
    """One item per labelled sequence: token ids, loss mask, acceptance_ids (+ top-k) and,
    in offline mode, the context features as a (S, n*H) tensor viewing the mapped shard."""

    def __init__(self, directory: str | Path, verify: bool = True, rows: list[int] | None = None):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, kind="labels")
        if verify:
            verify_shards(self.dir, self.manifest)
        self.tables = [read_table(self.dir / s["file"]) for s in self.manifest["shards"]]
        self.index = [(t, r) for t, table in enumerate(self.tables) for r in range(table.num_rows)]
        if rows is not None:
            self.index = [self.index[i] for i in rows]
        self.offline = self.manifest["features"] == "offline"
        self.feature_dtype = FEATURE_DTYPES[self.manifest["feature_dtype"]][0] if self.offline else None
        self.width = self.manifest["hidden_size"] * len(self.manifest["layer_ids"])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        t, r = self.index[i]
        table = self.tables[t]
        input_ids = torch.from_numpy(_values(table.column("input_ids"), r).to_numpy(zero_copy_only=True).astype(np.int64))
        start = table.column("response_start")[r].as_py()
        acceptance = torch.from_numpy(_values(table.column("acceptance_ids"), r).to_numpy(zero_copy_only=True).astype(np.int64))
        # acceptance_ids[p] = what greedy verification accepts at position p (the shard's column,
        # response positions); prompt positions keep their own token.
        acceptance_ids = input_ids.clone()
        acceptance_ids[start:] = acceptance
        item = {
            "prompt_id": table.column("prompt_id")[r].as_py(),
            "input_ids": input_ids, "response_start": start, "acceptance_ids": acceptance_ids,
            "loss_mask": torch.arange(len(input_ids)) >= start,
        }
        if "topk_ids" in table.column_names:
            k = self.manifest["top_k"]
            item["topk_ids"] = torch.from_numpy(_values(table.column("topk_ids"), r).flatten().to_numpy().reshape(-1, k).copy())
            item["topk_probs"] = torch.from_numpy(_values(table.column("topk_probs"), r).flatten().to_numpy().reshape(-1, k).copy())
        if self.offline:
            flat = _values(table.column("features"), r).flatten().to_numpy(zero_copy_only=True).reshape(-1, self.width)
            with warnings.catch_warnings():  # a read-only view of the mmap: training never writes to it
                warnings.simplefilter("ignore", UserWarning)
                feats = torch.from_numpy(flat)
            item["features"] = feats.view(torch.bfloat16) if self.feature_dtype == torch.bfloat16 else feats
        return item
