"""Labels stage: exact features and labels, agreement counts, boundary checks, resume, online mode."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specauf.data import labels as labels_mod
from specauf.artifacts import ArtifactError, read_manifest
from specauf.config import LabelsParams, RolloutsParams
from specauf.data.dataset import LabelsDataset
from specauf.data.labels import run_labels
from specauf.data.rollouts import run_rollouts
from specauf.target.run import check_fingerprint
from tests.conftest import prompt_rows


def make_rollouts(model, tok, manifest, out, temperature=0.0, n=9):
    params = RolloutsParams(max_new_tokens=10, batch_size=4, shard_size=4, temperature=temperature)
    run_rollouts(model, tok, prompt_rows(n), params, out_dir=out, work_dir=out.parent / f"{out.name}-work", seed=0,
                 stop_ids=manifest["stop_token_ids"], manifest_extra={"target_fingerprint": manifest["fingerprint"]})
    return out


@pytest.fixture(scope="module")
def greedy_rollouts(tiny_model, tmp_path_factory):
    model, tok, manifest = tiny_model
    return make_rollouts(model, tok, manifest, tmp_path_factory.mktemp("r") / "rollouts")


def label(model, rollouts, out, **kw):
    params = LabelsParams(**{"num_feature_layers": 2, "batch_size": 3, **kw})
    return run_labels(model, rollouts, params, out_dir=out, work_dir=out.parent / f"{out.name}-work", pad_id=0,
                      manifest_extra={"target_fingerprint": "x"})


def test_features_and_labels_exact(tiny_model, greedy_rollouts, tmp_path):
    model, tok, _ = tiny_model
    m = label(model, greedy_rollouts, tmp_path / "labels", batch_size=1, layer_ids=[0, 2], top_k=3)
    assert m["layer_ids"] == [0, 2] and m["feature_bytes_per_token"] == 2 * 64 * 2
    ds = LabelsDataset(tmp_path / "labels")
    assert len(ds) == 9
    for item in ds:
        ids = item["input_ids"]
        with torch.no_grad():
            out = model(input_ids=ids[None], output_hidden_states=True)
        want = torch.cat([out.hidden_states[1][0], out.hidden_states[3][0]], -1).half()
        assert torch.equal(item["features"], want)  # same dtype rounding, bit for bit
        start = item["response_start"]
        argmax = out.logits[0, start - 1:-1].argmax(-1)
        assert torch.equal(item["acceptance_ids"][start:], argmax)
        assert item["loss_mask"].sum() == len(ids) - start and not item["loss_mask"][:start].any()
        probs = torch.softmax(out.logits[0, start - 1:-1], -1)
        assert torch.equal(item["topk_ids"][:, 0].long(), argmax)
        assert torch.allclose(item["topk_probs"][:, 0], probs.max(-1).values, atol=1e-6)
    assert m["label_agreement"] == {"agree": m["response_tokens"], "total": m["response_tokens"], "rate": 1.0,
                                    "greedy_rollouts": True}


def test_batched_features_match_unbatched(tiny_model, greedy_rollouts, tmp_path):
    model, _, _ = tiny_model
    label(model, greedy_rollouts, tmp_path / "one", batch_size=1)
    label(model, greedy_rollouts, tmp_path / "many", batch_size=4)
    a, b = LabelsDataset(tmp_path / "one"), LabelsDataset(tmp_path / "many")
    for x, y in zip(a, b):
        assert torch.equal(x["acceptance_ids"], y["acceptance_ids"])
        assert torch.allclose(x["features"].float(), y["features"].float(), atol=2e-2, rtol=1e-2)


def test_sampled_rollouts_report_true_disagreement(tiny_model, tmp_path):
    model, tok, manifest = tiny_model
    rollouts = make_rollouts(model, tok, manifest, tmp_path / "sampled", temperature=1.5)
    m = label(model, rollouts, tmp_path / "labels")
    ds = LabelsDataset(tmp_path / "labels")
    agree = sum(int((it["acceptance_ids"][it["response_start"]:] == it["input_ids"][it["response_start"]:]).sum()) for it in ds)
    assert m["label_agreement"]["agree"] == agree < m["label_agreement"]["total"]
    assert m["label_agreement"]["greedy_rollouts"] is False


def test_online_mode_writes_no_features(tiny_model, greedy_rollouts, tmp_path):
    model, _, _ = tiny_model
    m = label(model, greedy_rollouts, tmp_path / "labels", features="online")
    assert m["features"] == "online" and m["feature_bytes_total"] == 0
    ds = LabelsDataset(tmp_path / "labels")
    assert "features" not in ds[0] and "features" not in ds.tables[0].column_names


def test_resume_after_kill_gives_identical_bytes(tiny_model, greedy_rollouts, tmp_path, monkeypatch):
    model, _, _ = tiny_model
    label(model, greedy_rollouts, tmp_path / "clean")
    real = labels_mod.label_shard
    calls = []

    def dies(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(labels_mod, "label_shard", dies)
    with pytest.raises(KeyboardInterrupt):
        label(model, greedy_rollouts, tmp_path / "killed")
    monkeypatch.setattr(labels_mod, "label_shard", real)
    label(model, greedy_rollouts, tmp_path / "killed")
    read = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.arrow"))}
    assert read(tmp_path / "killed") == read(tmp_path / "clean") and len(read(tmp_path / "clean")) == 3


def test_truncated_or_corrupted_rollout_shard_fails_clearly(tiny_model, greedy_rollouts, tmp_path):
    import shutil

    model, _, _ = tiny_model
    for damage in ("truncate", "flip"):
        bad = tmp_path / damage
        shutil.copytree(greedy_rollouts, bad)
        shard = bad / "shard-00001.arrow"
        data = bytearray(shard.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="shard-00001.arrow: .*(truncated|corrupted)"):
            label(model, bad, tmp_path / f"labels-{damage}")
        assert not (tmp_path / f"labels-{damage}").exists()


def test_manifest_disagreeing_with_shards(tiny_model, greedy_rollouts, tmp_path):
    import shutil

    model, _, _ = tiny_model
    bad = tmp_path / "extra"
    shutil.copytree(greedy_rollouts, bad)
    shutil.copy(bad / "shard-00000.arrow", bad / "shard-00009.arrow")
    with pytest.raises(ArtifactError, match="shard-00009.arrow is not in the manifest"):
        label(model, bad, tmp_path / "labels")


def test_fingerprint_mismatch_message(greedy_rollouts, tiny_target):
    m = read_manifest(greedy_rollouts, kind="rollouts")
    check_fingerprint(m["target_fingerprint"], tiny_target[1], "rollouts")
    with pytest.raises(ArtifactError, match="the target changed"):
        check_fingerprint("0" * 64, tiny_target[1], "rollouts in data/rollouts")


def test_layer_beyond_depth(tiny_model, greedy_rollouts, tmp_path):
    model, _, _ = tiny_model
    with pytest.raises(ValueError, match=r"labels.layer_ids: layer 7 is beyond the target's depth \(4 layers"):
        label(model, greedy_rollouts, tmp_path / "labels", layer_ids=[1, 7])
