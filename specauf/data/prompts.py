"""Prompt sets: the training prompts and the named evaluation sets, disjoint by construction.

Every source (specauf/data/prompt_sources.py) is a generator of rows `{"prompt_id", "source", "turns"}`.
The builder takes prompts from each source in a fixed order that depends only on the seed and the
prompt ids (never on file order), filters them by length, drops duplicates within a set, and
removes from training every prompt whose text equals any evaluation turn: a drafter evaluated on
prompts it was trained on would report a speed-up nobody gets.

Each use of one source takes the *next* prompts in that source's order, so ShareGPT prompts held
out for the `alpaca-like` evaluation set can never be drawn again for training.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from specauf.data.hf_prompts import hf_prompts
from specauf.data.hf_prompts import where as hf_where
from specauf.data.prompt_sources import (PromptsError, gsm8k_like_prompts, gsm8k_like_seed, humaneval_prompts,
                                    jsonl_prompts, mtbench_prompts, sharegpt_prompts)
from specauf.artifacts import (MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, read_manifest,
                               read_table, write_json, write_table)
from specauf.config import PromptSource, PromptsParams

log = logging.getLogger("specauf")

SCHEMA = pa.schema([("prompt_id", pa.string()), ("source", pa.string()), ("turns", pa.list_(pa.string()))])
TRAIN = "train"


def normalise(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the identity used for dedup and train/eval overlap."""
    return " ".join(text.split()).casefold()


def rank(seed: int, prompt_id: str) -> str:
    """Sort key of a prompt: a hash of seed and id, so file order and edits elsewhere never move it."""
    return hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()


# --- building the sets ---------------------------------------------------------------------

class _Stream:
    """One source's prompts in take order, shared by every set that uses the same source.

    File sources are ranked by `rank(seed, id)` (all read once: ShareGPT's 17.7k records decode in
    ~0.5 s, so no index is worth caching); generated gsm8k-like problems are already random and
    come in index order. Rows are read lazily, on the first take.
    """

    def __init__(self, src: PromptSource, seed: int, set_name: str, index: int, stats: dict):
        self.src, self.seed, self.set_name, self.index, self.stats = src, seed, set_name, index, stats
        self._it: Iterator[dict] | None = None

    def _rows(self) -> Iterator[dict]:
        s = self.src
        if s.source == "gsm8k_like":
            # Generous headroom for the (rare) duplicate or out-of-length problem.
            return gsm8k_like_prompts(gsm8k_like_seed(self.seed, self.set_name, self.index), 2 * s.count + 64)
        if s.source == "sharegpt":
            info: dict = {}
            rows = list(sharegpt_prompts(info=info))
            self.stats["sharegpt"] = info
        elif s.source == "mtbench":
            rows = list(mtbench_prompts(s.turns))
        elif s.source == "humaneval":
            rows = list(humaneval_prompts())
        elif s.source == "hf":  # its counts are logged, not kept: a manifest changed by an edit the sets never saw would rerun every later stage
            rows = list(hf_prompts(s.hf))
        else:
            rows = list(jsonl_prompts(s.path, s.text_field, s.id_field))
        return iter(sorted(rows, key=lambda r: rank(self.seed, r["prompt_id"])))

    def next(self) -> dict | None:
        if self._it is None:
            self._it = self._rows()
        return next(self._it, None)


def _stream_key(src: PromptSource, set_name: str, index: int) -> tuple:
    if src.source == "gsm8k_like":
        return (src.source, set_name, index)
    if src.source == "jsonl":
        return (src.source, str(Path(src.path).resolve()), src.text_field, src.id_field)
    if src.source == "hf":  # the same rows in the same take order: one stream, so sets never share a prompt
        hf = src.hf.model_dump()
        if hf["path"] is not None:
            hf["path"] = str(Path(hf["path"]).resolve())
        return (src.source, json.dumps(hf, sort_keys=True))
    return (src.source, src.turns if src.source == "mtbench" else 1)


def _fill_set(set_name: str, label: str, sources: list[PromptSource], params: PromptsParams, seed: int,
              streams: dict, stats: dict, banned: frozenset[str] = frozenset()) -> list[dict]:
    """Take up to `count` prompts per source, in take order, that pass length, dedup and overlap."""
    st = stats["sets"][set_name] = {"dropped_length": 0, "dropped_dedup": 0, "dropped_overlap": 0, "short": {}}
    rows, texts, ids = [], set(), {}
    for i, src in enumerate(sources):
        if src.count == 0:
            continue
        key = _stream_key(src, set_name, i)
        if key not in streams:
            streams[key] = _Stream(src, seed, set_name, i, stats)
        stream, got = streams[key], 0
        dropped = dict.fromkeys(("empty", "short", "long", "repeated", "overlap"), 0)  # this source's, for its error
        while got < src.count and (row := stream.next()) is not None:
            chars = len(row["turns"][0])
            if not params.min_chars <= chars <= params.max_chars:
                st["dropped_length"] += 1
                dropped["empty" if chars == 0 else "short" if chars < params.min_chars else "long"] += 1
                continue
            norm = tuple(normalise(t) for t in row["turns"])
            if norm in texts:
                st["dropped_dedup"] += 1
                dropped["repeated"] += 1
                continue
            if any(t in banned for t in norm):
                st["dropped_overlap"] += 1
                dropped["overlap"] += 1
                continue
            if row["prompt_id"] in ids:
                raise PromptsError(f"{label}[{i}]: prompt id {row['prompt_id']!r} already taken from "
                                   f"{label}[{ids[row['prompt_id']]}] (list each source once per set)")
            texts.add(norm)
            ids[row["prompt_id"]] = i
            rows.append(row)
            got += 1
        if got == 0:  # name the file, and say what became of every prompt it had
            where = f" ({src.path})" if src.source == "jsonl" else f" ({hf_where(src.hf)})" if src.source == "hf" else ""
            reasons = {"empty": "empty", "short": f"shorter than prompts.min_chars ({params.min_chars})",
                       "long": f"longer than prompts.max_chars ({params.max_chars})",
                       "repeated": "repeating an earlier prompt", "overlap": "dropped for equalling an evaluation prompt"}
            why = ", ".join(f"{n} {reasons[k]}" for k, n in dropped.items() if n)
            raise PromptsError(f"{label}[{i}]: source {src.source!r}{where} produced no prompts "
                               + (f"({why})" if why else "(it holds none)"))
        if got < src.count:
            log.warning("%s[%d]: source %r ran out: %d of %d prompts", label, i, src.source, got, src.count)
            st["short"][f"{i}"] = got
    rows.sort(key=lambda r: rank(seed, r["prompt_id"]))
    return rows


def check_disjoint(train_rows: list[dict], eval_sets: dict[str, list[dict]]) -> None:
    """Refuse a training row whose any turn equals any evaluation turn (normalised).

    The builder already removes such rows; this guard only fires if that code is broken.
    """
    owner = {}
    for name in sorted(eval_sets):
        for r in eval_sets[name]:
            for t in r["turns"]:
                owner.setdefault(normalise(t), (name, r["prompt_id"]))
    for r in train_rows:
        for t in r["turns"]:
            if normalise(t) in owner:
                name, eid = owner[normalise(t)]
                raise PromptsError(f"training prompt {r['prompt_id']!r} equals prompt {eid!r} "
                                   f"of evaluation set {name!r}")


def build_prompt_sets(params: PromptsParams, seed: int) -> tuple[list[dict], dict[str, list[dict]], dict]:
    """Build (train_rows, eval_sets, stats). Same params + seed -> same rows in the same order.

    Evaluation sets are filled first (by name), training last: training loses every prompt whose
    text equals an evaluation turn and backfills from the same source, so it keeps its count.
    """
    if TRAIN in params.eval:
        raise PromptsError(f"prompts.eval.{TRAIN}: the name {TRAIN!r} is reserved for the training set")
    stats: dict = {"sets": {}}
    streams: dict = {}
    eval_sets = {name: _fill_set(name, f"prompts.eval.{name}", params.eval[name], params, seed, streams, stats)
                 for name in sorted(params.eval)}
    banned = frozenset(normalise(t) for rows in eval_sets.values() for r in rows for t in r["turns"])
    train = _fill_set(TRAIN, "prompts.train", params.train, params, seed, streams, stats, banned)
    check_disjoint(train, eval_sets)
    for name, rows in [(TRAIN, train), *eval_sets.items()]:
        stats["sets"][name]["rows"] = len(rows)
    log.info("prompts: %d training prompts; evaluation sets %s", len(train),
             ", ".join(f"{n}={len(r)}" for n, r in eval_sets.items()))
    return train, eval_sets, stats


# --- on disk -------------------------------------------------------------------------------

def set_file(name: str) -> str:
    return "train.arrow" if name == TRAIN else f"eval-{name}.arrow"


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)


def source_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(collections.Counter(r["source"] for r in rows).items()))


def write_prompt_sets(out_dir: str | Path, train_rows: list[dict], eval_sets: dict[str, list[dict]],
                      manifest_extra: dict | None = None, stats: dict | None = None) -> dict:
    """Write train.arrow and eval-<name>.arrow, then manifest.json last, replacing out_dir whole."""
    sets = {TRAIN: train_rows, **{n: eval_sets[n] for n in sorted(eval_sets)}}
    with atomic_dir(out_dir, "prompts") as tmp:
        files = {name: write_table(tmp / set_file(name), to_table(rows)) for name, rows in sets.items()}
        manifest = {**(manifest_extra or {}), "schema_version": SCHEMA_VERSION, "kind": "prompts",
                    "files": files, "eval_sets": sorted(eval_sets),
                    "counts": {name: source_counts(rows) for name, rows in sets.items()},
                    "stats": stats or {}}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def load_prompt_set(directory: str | Path, name: str) -> list[dict]:
    """Rows of one set ("train" or an evaluation set name), checksum-verified against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory, kind="prompts")
    entry = manifest["files"].get(name)
    if entry is None:
        raise ArtifactError(f"{directory / MANIFEST}: no prompt set {name!r} "
                            f"(has: {', '.join(sorted(manifest['files']))})")
    return read_table(directory / entry["file"], entry).to_pylist()


def load_eval_prompts(directory: str | Path, names: list[str] | None) -> dict[str, list[dict]]:
    """The evaluation sets `names` (eval.sets; None = all) by name. A prompt id in two sets is
    refused: the replay and its intervals count each prompt once."""
    available = read_manifest(directory, kind="prompts")["eval_sets"]
    unknown = [n for n in names or [] if n not in available]
    if unknown:
        raise PromptsError(f"eval.sets: no evaluation set {unknown[0]!r} (have: {', '.join(sorted(available))})")
    sets, owner = {n: load_prompt_set(directory, n) for n in (names or sorted(available))}, {}
    for name, rows in sets.items():
        for r in rows:
            if owner.setdefault(r["prompt_id"], name) != name:
                raise PromptsError(f"prompts.eval: prompt {r['prompt_id']!r} is in both {owner[r['prompt_id']]!r} "
                                   f"and {name!r}; give each set its own prompts")
    return sets
