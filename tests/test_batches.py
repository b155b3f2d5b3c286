"""The data side of training: rows and anchors as pure functions of (seed, step, rank, world)."""
from __future__ import annotations

import pytest
import torch

from specauf.config import TrainParams
from specauf.data.dataset import LabelsDataset
from specauf.train.batches import TrainData, split_heldout
from tests.test_train import BASE, data  # noqa: F401  (the labels fixture of the training tests)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(tiny_model, labels_dir, **over) -> TrainData:
    model, _, manifest = tiny_model
    return TrainData(TrainParams(**{**BASE, **over}), LabelsDataset(labels_dir), 0, manifest["mask_token_id"],
                     model.get_output_embeddings().weight.shape[0], model, torch.device("cpu"))


def test_every_row_once_per_epoch_and_ranks_never_share_one(tiny_model, data):
    one = _data(tiny_model, data["offline"], micro_batch_size=1)
    n = len(one.train_rows)
    assert sorted(r for s in range(n) for r in one.rows_at(s, 0, 1)) == sorted(one.train_rows)
    r0 = [r for s in range(n // 2) for r in one.rows_at(s, 0, 2)]
    r1 = [r for s in range(n // 2) for r in one.rows_at(s, 1, 2)]
    assert len(set(r0 + r1)) == 2 * (n // 2)
    assert one.rows_at(3, 0, 1) == _data(tiny_model, data["offline"], micro_batch_size=1).rows_at(3, 0, 1)


def test_a_batch_is_typed_and_its_blocks_are_the_sequences(tiny_model, data):
    d = _data(tiny_model, data["offline"])
    batch = d.train_batch(0, 0, 1)
    N, B = d.params.micro_batch_size, d.params.block_size
    A = batch.block_input_ids.shape[1] // B
    assert batch.block_input_ids.shape == batch.block_position_ids.shape == (N, A * B)
    assert batch.labels.shape == batch.validity.shape == (N * A, B - 1) and batch.validity.dtype == torch.bool
    assert batch.soft_ids is None and batch.soft_probs is None  # no distillation
    ids = batch.block_input_ids.view(N, A, B)
    assert (ids[:, :, 1:] == d.mask_token_id).all()  # [anchor, MASK x B-1]
    # each valid label is the acceptance label at its block position
    rows = d.rows_at(0, 0, 1)
    pos = batch.block_position_ids.view(N * A, B)[:, 1:]
    for n, row in enumerate(rows):
        acc = d.ds[row]["acceptance_ids"]
        blk = slice(n * A, (n + 1) * A)
        v = batch.validity[blk]
        assert torch.equal(batch.labels[blk][v], acc[pos[blk][v]])
    # held-out batches are the same draw every time, with twice the anchors
    first, again = list(d.heldout_batches()), list(d.heldout_batches())
    assert len(first) > 0 and all(torch.equal(a.labels, b.labels) for a, b in zip(first, again))


def test_derived_seeds_are_the_published_streams():
    """The seed streams drafters were trained with: changing one changes every drafter's bytes."""
    from specauf.train.batches import derive_seed

    assert derive_seed(3, "epoch_order", 2) == 3 * 1_000_003 + 2
    assert derive_seed(3, "micro_batch", 5) == 3 * 7919 + 5
    assert derive_seed(7, "sequence_anchors", 1) == 7 * 1009 + 1
    assert derive_seed(3, "heldout_batch", 4) == derive_seed(9, "heldout_batch", 4) == 10**6 + 4
    with pytest.raises(KeyError):
        derive_seed(0, "dropout", 0)


def test_rows_without_an_anchor_within_max_seq_len_are_left_out(data):
    """A response starting at or past max_seq_len offers no anchor: such rows never reach a batch."""
    ds = LabelsDataset(data["offline"])
    starts = [ds[i]["response_start"] for i in range(len(ds))]
    cut = sorted(starts)[len(starts) // 2]  # about half the prompts end at or past the cut
    train_rows, held = split_heldout(ds, 0.25, 0, max_seq_len=cut)
    kept = sorted(train_rows + held)
    assert kept == [i for i, s in enumerate(starts) if s < min(len(ds[i]["input_ids"]), cut)]
    assert 0 < len(kept) < len(ds)
    all_train, all_held = split_heldout(ds, 0.25, 0)
    assert set(train_rows) <= set(all_train) and set(held) <= set(all_held)  # same split, fewer rows


def test_anchors_per_token_follow_each_responses_length_and_coverage_is_counted(tiny_model, data):
    """train.anchors_per_token: a sequence's anchor count is round(density x response tokens), so
    coverage rises with the density; the batch's coverage is the brute-force count of response
    positions some block supervises."""
    fixed = _data(tiny_model, data["offline"], micro_batch_size=1, anchors_per_seq=2)
    dense = _data(tiny_model, data["offline"], micro_batch_size=1, anchors_per_seq=2, anchors_per_token=0.5)
    B = fixed.params.block_size
    for step in range(4):
        row = fixed.rows_at(step, 0, 1)[0]
        item = fixed.ds[row]
        start, S = int(item["response_start"]), min(len(item["input_ids"]), fixed.params.max_seq_len)
        for d, want in ((fixed, 2), (dense, max(1, round(0.5 * (S - start))))):
            batch = d.train_batch(step, 0, 1)
            A = batch.block_input_ids.shape[1] // B
            assert A == min(want, S - max(start - 1, 0) - 1)  # capped by the candidates there are
            anchors = batch.block_position_ids.view(A, B)[:, 0].tolist()
            brute = {p for a in anchors for p in range(a + 1, a + B) if start <= p < S}
            assert batch.coverage == pytest.approx(len(brute) / (S - start))
        assert dense.train_batch(step, 0, 1).coverage >= fixed.train_batch(step, 0, 1).coverage
    # the held-out blocks do not move with the density: diagnostics stay comparable
    hf, hd = next(fixed.heldout_batches()), next(dense.heldout_batches())
    assert torch.equal(hf.block_input_ids, hd.block_input_ids)
