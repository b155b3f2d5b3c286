"""Artifact I/O: canonical hashes, JSON that DVC can read, checksummed Arrow shards, manifests."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from specauf.artifacts import (MANIFEST, SCHEMA_VERSION, ArtifactError, file_fingerprint, hash_obj, read_json,
                               read_manifest, read_table, shard_name, verify_shards, write_json, write_table)
from specauf.errors import UserError


def test_hashes_ignore_key_order_and_name_contents():
    assert hash_obj({"a": 1, "b": [1, 2]}) == hash_obj({"b": [1, 2], "a": 1}) != hash_obj({"a": 1, "b": [2, 1]})


def test_json_has_no_nan_and_sorted_keys(tmp_path):
    write_json(tmp_path / "m.json", {"tau": float("nan"), "b": [float("inf"), 1.5], "a": {"x": -float("inf")}})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": {"x": None}, "b": [None, 1.5], "tau": None}
    assert text.index('"a"') < text.index('"b"') < text.index('"tau"') and text.endswith("}\n")


def test_unreadable_json_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"m.json: missing \(run the stage that produces it\)"):
        read_json(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"a": 1,\n')
    with pytest.raises(ArtifactError, match=r"m.json: not valid JSON \(.* at line 2\)"):
        read_json(tmp_path / "m.json")
    assert issubclass(ArtifactError, UserError)  # one line, exit 2, like bad params


def _shard_dir(tmp_path, rows_per_shard=(3, 2)):
    entries = [write_table(tmp_path / shard_name(i), pa.table({"x": list(range(n))}))
               for i, n in enumerate(rows_per_shard)]
    manifest = {"schema_version": SCHEMA_VERSION, "kind": "rollouts", "shards": entries, "rows": sum(rows_per_shard)}
    write_json(tmp_path / MANIFEST, manifest)
    return manifest


def test_shards_round_trip_and_every_kind_of_damage_names_the_shard(tmp_path):
    manifest = _shard_dir(tmp_path)
    verify_shards(tmp_path, manifest)
    first = tmp_path / shard_name(0)
    assert read_table(first, manifest["shards"][0]).column("x").to_pylist() == [0, 1, 2]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{first.name}: checksum mismatch"):
        verify_shards(tmp_path, manifest)
    first.write_bytes(bytes(data[:-8]))
    with pytest.raises(ArtifactError, match=f"{first.name}: {len(data) - 8} bytes, manifest says {len(data)}"):
        verify_shards(tmp_path, manifest)
    first.unlink()
    with pytest.raises(ArtifactError, match=f"{first.name}: shard missing"):
        verify_shards(tmp_path, manifest)


def test_an_unlisted_shard_or_a_wrong_row_count_is_refused(tmp_path):
    manifest = _shard_dir(tmp_path)
    write_table(tmp_path / shard_name(7), pa.table({"x": [9]}))
    with pytest.raises(ArtifactError, match="shard shard-00007.arrow is not in the manifest"):
        verify_shards(tmp_path, manifest)
    (tmp_path / shard_name(7)).unlink()
    with pytest.raises(ArtifactError, match="says 6 rows, its shards hold 5"):
        verify_shards(tmp_path, {**manifest, "rows": 6})


def test_manifests_are_checked_for_schema_and_kind(tmp_path):
    _shard_dir(tmp_path)
    assert read_manifest(tmp_path, kind="rollouts")["rows"] == 5
    with pytest.raises(ArtifactError, match="is a 'rollouts' manifest, expected 'labels'"):
        read_manifest(tmp_path, kind="labels")
    write_json(tmp_path / MANIFEST, {"schema_version": SCHEMA_VERSION - 1, "kind": "rollouts"})
    with pytest.raises(ArtifactError, match=f"schema version {SCHEMA_VERSION - 1}, this spec-auf reads {SCHEMA_VERSION}"):
        read_manifest(tmp_path)


def test_file_fingerprint_is_names_and_contents_in_any_order(tmp_path):
    a, b = tmp_path / "config.json", tmp_path / "model.safetensors"
    a.write_text("{}")
    b.write_bytes(b"weights")
    assert file_fingerprint([a, b]) == file_fingerprint([b, a])
    before = file_fingerprint([a, b])
    b.write_bytes(b"weightz")
    assert file_fingerprint([a, b]) != before


def test_a_resumed_shard_is_checked_by_content_and_a_damaged_entry_or_stamp_is_named(tmp_path):
    """After a kill: a finished shard changed in place (same size) or with a damaged entry file is
    made again, not kept; a damaged work.json is one line naming it, and nothing is deleted."""
    import pyarrow as pa
    import pytest

    from specauf.artifacts import ArtifactError, ShardedWork

    work = ShardedWork(tmp_path / "work", {"k": 1})
    table = pa.table({"x": list(range(100))})
    for i in range(3):
        work.write(i, table)
    assert all(work.done(i) for i in range(3))
    shard = tmp_path / "work" / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert work.done(0) is None  # same size, other bytes
    (tmp_path / "work" / "shard-00001.arrow.json").write_text('{"file": "shard-00001.arrow", "by')
    assert work.done(1) is None  # its entry is damaged
    assert work.done(2) is not None
    (tmp_path / "work" / "work.json").write_text('{"ke')
    before = sorted(p.name for p in (tmp_path / "work").iterdir())
    with pytest.raises(ArtifactError, match=r"work/work\.json: damaged \(no work key in it\); if .*/work is the "
                                            r"pipeline's scratch folder, delete it and rerun"):
        ShardedWork(tmp_path / "work", {"k": 1})
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == before
