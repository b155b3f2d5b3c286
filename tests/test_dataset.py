"""Reading the labels shards for training: row order, subsets, zero-copy views, checksums."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from specauf.artifacts import ArtifactError, read_manifest
from specauf.data.dataset import LabelsDataset, _values
from tests.test_labels import label, make_rollouts


def test_list_values_are_found_across_chunks():
    column = pa.chunked_array([pa.array([[1, 2], [3]], pa.list_(pa.int32())),
                               pa.array([[], [4, 5, 6]], pa.list_(pa.int32()))])
    assert [_values(column, r).to_pylist() for r in range(4)] == [[1, 2], [3], [], [4, 5, 6]]


@pytest.fixture(scope="module")
def labels_dir(tiny_model, tmp_path_factory):
    model, tok, manifest = tiny_model
    root = tmp_path_factory.mktemp("ds")
    rollouts = make_rollouts(model, tok, manifest, root / "rollouts")  # 9 answers, shards of 4
    label(model, rollouts, root / "labels", feature_dtype="bfloat16")
    return root / "labels"


def test_rows_follow_shard_order_and_subsets_pick_them(labels_dir):
    ds = LabelsDataset(labels_dir)
    manifest = read_manifest(labels_dir, kind="labels")
    assert len(manifest["shards"]) == 3 and len(ds) == 9
    ids = [ds[i]["prompt_id"] for i in range(len(ds))]
    assert LabelsDataset(labels_dir, rows=[8, 0, 4]).__getitem__(0)["prompt_id"] == ids[8]
    assert [LabelsDataset(labels_dir, rows=[8, 0, 4])[i]["prompt_id"] for i in range(3)] == [ids[8], ids[0], ids[4]]


def test_item_fields_say_what_verification_accepts(labels_dir):
    for item in LabelsDataset(labels_dir):
        start, ids, labels = item["response_start"], item["input_ids"], item["acceptance_ids"]
        assert torch.equal(labels[:start], ids[:start])  # prompt positions keep their own token
        assert torch.equal(item["loss_mask"], torch.arange(len(ids)) >= start)
        feats = item["features"]
        assert feats.dtype == torch.bfloat16 and feats.shape == (len(ids), 2 * 64)


def test_features_view_the_mapped_shard_without_a_copy(labels_dir):
    ds = LabelsDataset(labels_dir)
    feats = ds[1]["features"]
    values = _values(ds.tables[0].column("features"), 1).flatten()
    buf = values.buffers()[1]  # the shard's mapped bytes (bf16 stored as 16-bit words)
    begin = buf.address + values.offset * 2
    assert feats.data_ptr() == begin and feats.numel() == len(values)
    assert np.array_equal(feats.view(torch.int16).numpy().reshape(-1), values.to_numpy().view(np.int16))


def test_a_tampered_shard_fails_its_checksum_unless_told_not_to_verify(labels_dir, tmp_path):
    import shutil

    copy = tmp_path / "labels"
    shutil.copytree(labels_dir, copy)
    shard = copy / read_manifest(copy, kind="labels")["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=shard.name):
        LabelsDataset(copy)
    assert len(LabelsDataset(copy, verify=False)) == 9
