"""Every table the pipeline writes opens as a `datasets.Dataset`: the same rows our own loaders
read, no copy, nothing written into the DVC output, damage refused."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from specauf.artifact_datasets import load_artifact
from specauf.artifacts import ArtifactError, hash_obj, iter_shards, read_manifest
from specauf.data.prompts import load_prompt_set
from specauf.data.rollouts import load_rollouts
from tests.stage_runner import built_workspace, snapshot


@pytest.fixture(scope="module")
def ws(tiny_target, tmp_path_factory):
    return built_workspace(tmp_path_factory.mktemp("as-datasets"), tiny_target[0])


def test_prompts_open_as_a_dataset_dict_of_their_sets(ws):
    sets = load_artifact(ws / "data/prompts")
    assert sorted(sets) == ["chat", "train"]
    for name in sets:
        assert sets[name].to_list() == load_prompt_set(ws / "data/prompts", name)


@pytest.mark.parametrize("artifact", ["rollouts", "eval_rollouts"])
def test_rollouts_and_eval_answers_round_trip(ws, artifact):
    d = load_artifact(ws / "data" / artifact)
    _, shards = load_rollouts(ws / "data" / artifact)
    assert d.to_list() == pa.concat_tables(shards).to_pylist()
    assert d.num_rows == read_manifest(ws / "data" / artifact)["rows"] > 0
    assert len(read_manifest(ws / "data/rollouts")["shards"]) > 1  # training answers span several shards


def test_labels_round_trip_without_a_copy_or_a_cache_file(ws):
    before = snapshot(ws / "data/labels")
    manifest = read_manifest(ws / "data/labels")
    allocated = pa.total_allocated_bytes()
    d = load_artifact(ws / "data/labels")
    assert pa.total_allocated_bytes() - allocated < 1024  # the shards stay memory-mapped
    assert d._fingerprint == hash_obj([s["sha256"] for s in manifest["shards"]])  # datasets did not hash the table
    table = pa.concat_tables(iter_shards(ws / "data/labels", manifest))
    ours, numpy_rows = table.drop_columns(["features"]).to_pylist(), d.with_format("numpy")
    assert d.remove_columns(["features"]).to_list() == ours
    for i in range(len(ours)):  # features: float16 in the shards, float32 through the numpy format
        feats = np.asarray(table.column("features")[i].as_py(), dtype=np.float16)
        np.testing.assert_array_equal(numpy_rows[i]["features"], feats.astype(np.float32))
    longer = d.map(lambda r: {"tokens": len(r["input_ids"])}).filter(lambda r: r["tokens"] > 0)
    assert len(longer) == len(d) and not d.cache_files and not longer.cache_files
    assert snapshot(ws / "data/labels") == before  # no cache file beside the shards


def test_one_file_and_damaged_or_foreign_folders(ws, tmp_path):
    one = load_artifact(ws / "data/rollouts/shard-00000.arrow")
    assert one.to_list() == load_artifact(ws / "data/rollouts").to_list()[: one.num_rows]
    with pytest.raises(ArtifactError, match="no manifest.json; not a spec-auf artifact"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="'drafter' artifact holds no table"):
        load_artifact(ws / "data/drafters/auf")
    damaged = tmp_path / "rollouts"
    import shutil

    shutil.copytree(ws / "data/rollouts", damaged)
    shard = damaged / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="shard-00001.arrow: checksum mismatch"):
        load_artifact(damaged)
