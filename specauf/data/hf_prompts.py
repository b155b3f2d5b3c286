"""Prompt source `hf`: prompts from any Hugging Face dataset, on the hub or on disk, read through
`datasets` in the layouts the field's chat data uses (ShareGPT's `conversations` of `from`/`value`,
OpenAI-style `messages` of `role`/`content`, a plain text column), or in any other one the params
spell out. Rows come out as every source's: `{"prompt_id", "source", "turns"}`.

Local data is loaded with a throwaway cache folder: `datasets` caches by file names and times, not
by content, and writes cache files beside a `save_to_disk` folder it maps; neither may decide what
a rebuild reads, and a user's folder is never written. Hub data uses the user's HF cache (what an
offline rerun reads).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from specauf.config_data import HfDataset
from specauf.data.prompt_sources import PromptsError

log = logging.getLogger("specauf")

RECOGNISED_COLUMNS = ("conversations", "messages", "prompt")  # tried in this order when hf.column is unset
TURN_KEYS = (("role", "content"), ("from", "value"))  # a turn's (speaker, text) keys, when not given
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes at a folder's top
BATCH_ROWS = 1024


def where(hf: HfDataset) -> str:
    """The dataset as error lines name it."""
    if hf.dataset is not None:
        return f"dataset {hf.dataset!r}" + (f" ({hf.subset})" if hf.subset else "") + (f" at {hf.revision}" if hf.revision else "")
    return f"dataset {hf.path}"


def local_format(hf: HfDataset) -> tuple[str, list[str]]:
    """(format, data files) of hf.path; `saved` has no file list."""
    path = Path(hf.path)
    if not path.exists():
        raise PromptsError(f"{where(hf)}: not found")
    if path.is_dir() and (hf.format == "saved" or (hf.format == "auto" and any((path / m).is_file() for m in SAVED_MARKERS))):
        return "saved", []
    if hf.format == "saved":
        raise PromptsError(f"{where(hf)}: not a save_to_disk folder (no {' or '.join(SAVED_MARKERS)})")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS
                                                  and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise PromptsError(f"{where(hf)}: no data files ({', '.join(FILE_FORMATS)}) in this folder")
    formats = {FILE_FORMATS.get(f.suffix) for f in files}
    if hf.format != "auto":
        return hf.format, [str(f) for f in files]
    if None in formats or len(formats) > 1:
        raise PromptsError(f"{where(hf)}: cannot tell the format from the extension(s) "
                           f"{', '.join(sorted({f.suffix or '(none)' for f in files}))}; set hf.format")
    return formats.pop(), [str(f) for f in files]


def load_split(hf: HfDataset, cache_dir: str):
    """The split as a `datasets.Dataset`, or one line saying why it cannot be read."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its error logs would add lines to the one we raise
    fmt = "the hub's format"
    try:
        if hf.dataset is not None:
            return datasets.load_dataset(hf.dataset, name=hf.subset, revision=hf.revision, split=hf.split)
        fmt, files = local_format(hf)
        if fmt != "saved":
            return datasets.load_dataset(fmt, data_files={hf.split: files}, split=hf.split, cache_dir=cache_dir)
        loaded = datasets.load_from_disk(hf.path, keep_in_memory=True)  # nothing written beside it
    except (ConnectionError, TimeoutError) as e:
        raise PromptsError(f"{where(hf)}: needs a network, and none answers ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}); copy it to this machine and set hf.path") from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        raise PromptsError(f"{where(hf)}: {str(e).splitlines()[0][:200]}") from None
    except (pa.ArrowInvalid, datasets.exceptions.DatasetGenerationError) as e:  # a file its reader cannot parse
        cause = e.__cause__ or e
        raise PromptsError(f"{where(hf)}, split {hf.split!r}: cannot be read as {fmt} "
                           f"({type(cause).__name__}: {str(cause).splitlines()[0][:160]})") from None
    except ValueError as e:  # an unknown split or subset
        raise PromptsError(f"{where(hf)}, split {hf.split!r}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if hf.split not in loaded:
            raise PromptsError(f"{where(hf)}: no split {hf.split!r} (has: {', '.join(loaded)})")
        return loaded[hf.split]
    if loaded.split is not None and str(loaded.split) != hf.split:
        raise PromptsError(f"{where(hf)}: holds split {str(loaded.split)!r}, not {hf.split!r}")
    return loaded


def _column(hf: HfDataset, names: list[str]) -> str:
    if hf.column is not None:
        if hf.column not in names:
            raise PromptsError(f"{where(hf)}, split {hf.split!r}: no column {hf.column!r} (has: {', '.join(names)})")
        return hf.column
    for name in RECOGNISED_COLUMNS:
        if name in names:
            return name
    raise PromptsError(f"{where(hf)}, split {hf.split!r}: layout not recognised: no column "
                       f"{', '.join(RECOGNISED_COLUMNS)} (has: {', '.join(names)}); set hf.column")


def user_turns(value, hf: HfDataset, row: str) -> list[str] | None:
    """The prompt of one row: its text, or its conversation's first user turn (hf.user_turns
    `all`: every user turn, in order). None: the conversation is a continuation that starts
    with another speaker."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PromptsError(f"{row}: layout not recognised: the prompt column holds {type(value).__name__}, "
                           "not a text or a list of turns")
    if not value:
        raise PromptsError(f"{row}: empty conversation")
    keys = [(hf.role_key, hf.content_key)] if hf.role_key else TURN_KEYS
    found: list[str] = []
    for turn in value:
        pair = next(((r, c) for r, c in keys if isinstance(turn, dict) and r in turn and c in turn), None)
        if pair is None:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            want = " or ".join(f"{r}/{c}" for r, c in keys)
            raise PromptsError(f"{row}: layout not recognised: a turn has {got}, not {want} (set hf.role_key and hf.content_key)")
        role, text = turn[pair[0]], turn[pair[1]]
        if role == "system":
            continue
        if role not in hf.user_roles:
            if not found:
                return None
            continue
        if not isinstance(text, str):
            raise PromptsError(f"{row}: a user turn's {pair[1]!r} is {type(text).__name__}, not text")
        found.append(text.strip())
        if hf.user_turns == "first":
            break
    if not found:
        raise PromptsError(f"{row}: the conversation holds system turns only")
    return found


def hf_prompts(hf: HfDataset, stats: dict | None = None) -> Iterator[dict]:
    """One prompt per kept row: the text, or the user turns, stripped (an empty one is yielded
    too: the prompts stage counts it under prompts.min_chars)."""
    stats = stats if stats is not None else {}
    with tempfile.TemporaryDirectory(prefix="specauf-hf-") as cache_dir:
        ds = load_split(hf, cache_dir)
        names = list(ds.column_names)
        column = _column(hf, names)
        missing = [c for c in [hf.id_column, *hf.where] if c is not None and c not in names]
        if missing:
            raise PromptsError(f"{where(hf)}, split {hf.split!r}: no column {missing[0]!r} (has: {', '.join(names)})")
        wanted = list(dict.fromkeys(c for c in [column, hf.id_column, *hf.where] if c is not None))
        keep = {c: set(v) for c, v in hf.where.items()}
        stats.update(rows=len(ds), kept=0, filtered=0, continuations=0, column=column)
        seen: dict[str, int] = {}
        for start, batch in zip(range(0, len(ds), BATCH_ROWS), ds.select_columns(wanted).iter(batch_size=BATCH_ROWS)):
            for j in range(len(batch[column])):
                index = start + j
                row = f"{where(hf)}, split {hf.split!r}, row {index}"
                for c, values in keep.items():
                    if not isinstance(batch[c][j], (str, int, bool, float, type(None))):
                        raise PromptsError(f"{row}: hf.where column {c!r} holds {type(batch[c][j]).__name__}, "
                                           "not a single value to compare")
                if any(batch[c][j] not in values for c, values in keep.items()):
                    stats["filtered"] += 1
                    continue
                if hf.id_column is None:
                    pid = f"{hf.split}/{index}"
                elif batch[hf.id_column][j] is None:
                    raise PromptsError(f"{row}: no id in column {hf.id_column!r}")
                else:
                    pid = str(batch[hf.id_column][j])
                if pid in seen:
                    raise PromptsError(f"{row}: id {pid!r} repeats row {seen[pid]} (column {hf.id_column!r}); "
                                       "name a unique id column, or leave hf.id_column unset for row numbers")
                seen[pid] = index
                value = batch[column][j]
                if value is None:
                    raise PromptsError(f"{row}: empty {column!r}")
                turns = user_turns(value, hf, row)
                if turns is None:
                    stats["continuations"] += 1
                    continue
                stats["kept"] += 1
                yield {"prompt_id": pid, "source": "hf", "turns": [t.strip() for t in turns]}
    log.info("%s, split %r: %d rows, %d kept from column %r, %d filtered out by hf.where, %d conversations "
             "skipped for not starting with the user", where(hf), hf.split, stats["rows"], stats["kept"], column,
             stats["filtered"], stats["continuations"])
