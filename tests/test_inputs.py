"""The inputs stage: content hashes of what lives outside the workspace, cached like DVC's."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from specauf.config import Params
from specauf.errors import UserError
from specauf.target.inputs import HashCache, describe, external_inputs, write_inputs


def _params(tmp_path, **target) -> Params:
    raw = json.loads(Params().model_dump_json())
    raw["target"] |= target
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello there"}\n')
    raw["prompts"]["train"] = [{"source": "jsonl", "path": str(prompts), "count": 1, "turns": 1,
                                "text_field": "prompt", "id_field": "id"}]
    return Params.model_validate(raw)


def test_each_consumer_gets_its_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    found = external_inputs(_params(tmp_path, source="local", path=str(model)))
    assert found["target"] == [("target.path", model)]
    assert found["prompts"] == [("prompts.train[0].path", tmp_path / "prompts.jsonl")]
    assert found["eval"] == []


def test_folder_hash_is_its_contents_not_its_place(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "config.json").write_text("{}")
    (a / "sub" / "w.bin").write_bytes(b"\0" * 10)
    (a / ".cache").mkdir()
    (a / ".cache" / "lock").write_text("x")  # dot folders are tooling, not the model
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    (b / ".cache" / "lock").write_text("something else")
    cache = HashCache(tmp_path / "hashes.json")
    one, two = describe("target.path", a, cache), describe("target.path", b, cache)
    assert one == two and one["files"] == 2
    (b / "sub" / "w.bin").write_bytes(b"\1" * 10)
    assert describe("target.path", b, cache)["sha256"] != one["sha256"]
    with pytest.raises(UserError, match=r"^target.path: .*missing does not exist$"):
        describe("target.path", tmp_path / "missing", cache)


def test_hash_cache_trusts_size_mtime_and_inode(tmp_path):
    f = tmp_path / "big.gguf"
    f.write_bytes(b"a" * 100)
    cache = HashCache(tmp_path / "hashes.json")
    first = cache.sha256(f)
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size; put the old mtime back: the cache cannot tell
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.sha256(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a touch is a change
    assert cache.sha256(f) != first
    cache.save()
    assert HashCache(tmp_path / "hashes.json").entries == cache.entries  # survives the process


def test_written_files_keep_their_bytes_while_inputs_do(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    params = _params(tmp_path, source="local", path=str(model))
    write_inputs(params, tmp_path / "out", tmp_path / "state" / "hashes.json")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert sorted(before) == ["eval.json", "prompts.json", "target.json"]
    record = json.loads(before["target.json"])
    assert record["stage"] == "target" and record["inputs"][0]["param"] == "target.path"
    assert str(tmp_path) not in before["target.json"].decode()  # no paths: a clone elsewhere keeps the bytes
    write_inputs(params, tmp_path / "out", tmp_path / "state" / "hashes.json")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "hello again"}\n')
    write_inputs(params, tmp_path / "out", tmp_path / "state" / "hashes.json")
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after["target.json"] == before["target.json"] and after["prompts.json"] != before["prompts.json"]
