"""Artifacts on disk: atomic writes, Arrow shards with checksums, manifests, resumable work dirs.

Every stage output follows one rule: nothing half-written is ever taken for a finished result.
Files are written under a temporary name and renamed when complete; a stage's manifest is
written last, so a directory without a valid manifest is never an input to the next stage.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from specauf.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
log = logging.getLogger("specauf")


class ArtifactError(UserError, RuntimeError):
    """A missing, corrupted or mismatched artifact; the message names the file at fault."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Library versions that can change artifact bytes; recorded in every manifest."""
    import numpy
    import torch
    import transformers

    from specauf import __version__

    return {
        "specauf": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "pyarrow": pa.__version__,
        "numpy": numpy.__version__, "platform": host_platform(),
    }


def host_platform() -> str:
    """OS, architecture and C library (e.g. `Linux-x86_64-glibc2.36`): what can change bytes.
    Not the kernel release, which `platform.platform()` includes: it changes with every host
    update and would make a rebuild on another machine differ in its manifests alone."""
    libc, version = platform.libc_ver()
    return "-".join(x for x in (platform.system(), platform.machine(), f"{libc}{version}" if libc else "") if x)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared artifacts unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # f.write's ENOSPC names no file; the one-line error names it
        raise
    _fsync_dir(path.parent)


def _finite(obj: Any) -> Any:
    """NaN/inf -> None: JSON has no NaN, and DVC's metrics reader rejects it."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (run the stage that produces it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


@contextmanager
def loading(path: str | Path) -> Iterator[None]:
    """A truncated, random-byte or unparsable model file met while loading `path` becomes one
    line naming it (the loaders raise OSError, ValueError or safetensors' own error)."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(f"{path}: cannot be loaded, a file is damaged or missing ({type(e).__name__}: {first}); "
                            "rebuild it with `dvc repro` (or `dvc checkout`)") from None


def check_replaceable(final: str | Path, kind: str, force: bool = False) -> None:
    """Refuse to replace `final` unless it is absent, empty, or an earlier output of the same kind
    (its manifest.json says so): a mistyped output path must never cost a user's folder."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir() or final.is_symlink():
        raise ArtifactError(f"{final}: exists and is not a directory; refusing to replace it")
    if not any(p.is_file() or p.is_symlink() for p in final.rglob("*")):
        return  # empty, or the bare folders DVC leaves after deleting the outputs inside them
    try:
        found = json.loads((final / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        found = None
    if found == kind:
        return
    if force:
        log.warning("%s: writing a %s output into a folder that is not one (--force)", final, kind)
        return
    what = f"a {found!r} output" if found else "not a spec-auf output (no manifest.json)"
    raise ArtifactError(f"{final}: is {what}, not an earlier {kind!r} output; refusing to replace it "
                        "(choose another path, or move its files away yourself)")


@contextmanager
def atomic_dir(final: str | Path, kind: str, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final` whole.

    `final` may only be absent, empty or an earlier output of the same `kind` (check_replaceable);
    the writer must put a manifest.json of that kind into the directory it is given.
    A killed writer leaves its `.<name>.*.tmp` (and maybe `.<name>.old`) behind; each output has
    one writer, so the next one removes them: a parent directory that is itself a stage's input
    (metrics/train for the report) must not keep a dead run's half-written copy.
    """
    final = Path(final)
    check_replaceable(final, kind, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*final.parent.glob(f".{glob.escape(final.name)}.*.tmp"), final.with_name(f".{final.name}.old")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- Arrow shards ---------------------------------------------------------------------------

def write_table(path: str | Path, table: pa.Table) -> dict:
    """Write an Arrow IPC file atomically; return its manifest entry (name, rows, bytes, sha256)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    write_bytes_atomic(path, data)
    return {"file": Path(path).name, "rows": table.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def read_table(path: str | Path, entry: dict | None = None, verify: bool = True) -> pa.Table:
    """Memory-map an Arrow IPC file (zero copy); with a manifest entry, check size and checksum first."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: shard missing")
    if entry is not None:
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced shard); "
                                + rebuild_hint(path.parent))
        if verify and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: checksum mismatch with its manifest (corrupted shard); " + rebuild_hint(path.parent))
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: unreadable Arrow file ({e})") from None


def rebuild_hint(directory: Path) -> str:
    """How to make a damaged output again. DVC still thinks it up to date (and `dvc checkout` may
    restore the same damaged bytes from its cache), so its stage must be forced."""
    stage = directory.name if directory.parent.name == "data" else None
    return (f"rebuild it with `dvc repro -f {stage}`" if stage else
            "rebuild it with `dvc repro -f` and the stage that wrote it")


def read_manifest(directory: str | Path, kind: str | None = None) -> dict:
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise ArtifactError(f"{directory / MANIFEST}: not a spec-auf manifest")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(f"{directory / MANIFEST}: schema version {manifest['schema_version']}, "
                            f"this spec-auf reads {SCHEMA_VERSION}; rebuild with `dvc repro`")
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{directory / MANIFEST}: is a {manifest.get('kind')!r} manifest, expected {kind!r}")
    return manifest


def verify_shards(directory: str | Path, manifest: dict) -> None:
    """Check every shard listed in the manifest exists with the recorded size and checksum,
    and that no unlisted shard sits beside them."""
    directory = Path(directory)
    listed = {s["file"] for s in manifest["shards"]}
    for s in manifest["shards"]:
        read_table(directory / s["file"], s, verify=True)
    extra = sorted(p.name for p in directory.glob("*.arrow") if p.name not in listed)
    if extra:
        raise ArtifactError(f"{directory}: shard {extra[0]} is not in the manifest (manifest disagrees with shards)")
    rows = sum(s["rows"] for s in manifest["shards"])
    if rows != manifest.get("rows", rows):
        raise ArtifactError(f"{directory / MANIFEST}: says {manifest['rows']} rows, its shards hold {rows}")


def iter_shards(directory: str | Path, manifest: dict, verify: bool = True) -> Iterator[pa.Table]:
    for s in manifest["shards"]:
        yield read_table(Path(directory) / s["file"], s, verify=verify)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


class ShardedWork:
    """Resumable shard-by-shard output of a long stage.

    Shards land in a work directory outside the DVC output (DVC deletes outputs before it reruns
    a stage), stamped with a key of everything that determines their bytes. A rerun with the same
    key keeps the finished shards and redoes only the rest; any other key starts afresh. When all
    shards are done, `finish` moves them into the output, manifest last.
    """

    def __init__(self, work_dir: str | Path, key: dict):
        self.dir = Path(work_dir)
        self.key = hash_obj(key)
        claim_work_dir(self.dir, self.key)

    @classmethod
    def join(cls, work_dir: str | Path) -> "ShardedWork":
        """Open a work dir another process (rank 0 of a sharded run) created, without re-keying it:
        only that one process may wipe a stale dir, or ranks would delete each other's shards."""
        self = cls.__new__(cls)
        self.dir = Path(work_dir)
        self.key = read_work_key(self.dir / "work.json")
        return self

    def done(self, index: int) -> dict | None:
        """The entry of a finished shard, or None. A shard without its entry file is unfinished."""
        entry_path = self.dir / f"{shard_name(index)}.json"
        shard = self.dir / shard_name(index)
        if not (entry_path.is_file() and shard.is_file()):
            return None
        try:
            entry = json.loads(entry_path.read_text())
            intact = shard.stat().st_size == entry["bytes"] and sha256_file(shard) == entry["sha256"]
        except (ValueError, KeyError, TypeError):
            intact = False  # a damaged entry file: the shard it describes cannot be trusted
        if not intact:  # by content, not size: a same-size change must never be published and cached
            log.warning("%s: changed since it was written (its entry or checksum disagree): making it again", shard)
            return None
        return entry

    def write(self, index: int, table: pa.Table, **extra) -> dict:
        entry = write_table(self.dir / shard_name(index), table) | extra
        write_json(self.dir / f"{shard_name(index)}.json", entry)
        return entry

    def finish(self, out_dir: str | Path, entries: list[dict], manifest: dict,
               extra_files: dict[str, bytes] | None = None) -> dict:
        with atomic_dir(out_dir, manifest["kind"]) as tmp:
            for e in entries:
                os.link(self.dir / e["file"], tmp / e["file"]) if _same_fs(self.dir, tmp) else \
                    shutil.copy2(self.dir / e["file"], tmp / e["file"])
            for name, data in (extra_files or {}).items():
                write_bytes_atomic(tmp / name, data)
            manifest = {"schema_version": SCHEMA_VERSION, **manifest, "shards": entries}
            write_json(tmp / MANIFEST, manifest)
        shutil.rmtree(self.dir, ignore_errors=True)
        return manifest


def claim_work_dir(work_dir: str | Path, key: str) -> bool:
    """Make `work_dir` the resumable scratch space of the work identified by `key`.

    Returns True when it holds that work already (resume). A work dir of other work (another
    key in its work.json) is wiped; a non-empty folder without a work.json was not made by the
    pipeline and is refused, never deleted."""
    work_dir = Path(work_dir)
    stamp = work_dir / "work.json"
    if work_dir.exists():
        if not stamp.is_file() and any(work_dir.iterdir()):
            raise ArtifactError(f"{work_dir}: holds files but no work.json, so the pipeline did not make it; "
                                "refusing to use or delete it (move it away)")
        old = read_work_key(stamp) if stamp.is_file() else None
        if old == key:
            return True
        if old is not None:
            log.info("work dir %s belongs to other inputs/params: starting afresh", work_dir)
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"key": key})
    return False


def read_work_key(stamp: Path) -> str:
    """The work key a work dir's work.json holds; a damaged one is named, and nothing is deleted
    (without its key there is no telling whose work the folder holds)."""
    try:
        key = json.loads(stamp.read_text()).get("key")
    except (ValueError, AttributeError, UnicodeDecodeError):
        key = None
    if not isinstance(key, str):
        raise ArtifactError(f"{stamp}: damaged (no work key in it); if {stamp.parent} is the pipeline's scratch "
                            f"folder, delete it and rerun: the stage starts that work afresh")
    return key


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def file_fingerprint(paths: list[Path]) -> str:
    """sha256 over the names and contents of files (a model's weights and config)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
