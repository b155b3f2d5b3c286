"""The draft vocabulary: which ids, their coverage, and what happens to labels outside it."""
from __future__ import annotations

import torch

from specauf.data.dataset import LabelsDataset
from specauf.train.draft_vocab import DraftVocab, renormalise
from tests.test_train import data  # noqa: F401  (the labels fixture of the training tests)


def test_the_most_frequent_labels_sorted_by_id(data, tiny_model):
    ds = LabelsDataset(data["offline"])
    rows = list(range(len(ds)))
    V = tiny_model[0].get_output_embeddings().weight.shape[0]
    counts = torch.zeros(V, dtype=torch.long)
    for i in rows:
        counts += torch.bincount(ds[i]["acceptance_ids"][ds[i]["response_start"]:], minlength=V)
    vocab = DraftVocab.build(ds, rows, 6, V)
    want = sorted(sorted(range(V), key=lambda t: (-int(counts[t]), t))[:6])
    assert vocab.d2t.tolist() == want
    assert vocab.coverage(ds, rows) == int(counts[want].sum()) / int(counts.sum())
    assert DraftVocab.build(ds, rows, 0, V) is None and DraftVocab.build(ds, rows, V, V) is None


def test_a_label_outside_ends_its_block_and_the_rest_become_draft_ids():
    vocab = DraftVocab(torch.tensor([2, 5, 9]), 12)
    labels = torch.tensor([[5, 9, 2, 5], [5, 7, 2, 2]])
    validity = torch.tensor([[True, True, True, False], [True, True, True, True]])
    draft, valid = vocab.restrict_labels(labels, validity)
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False]]  # 7 is outside
    assert draft[valid].tolist() == [1, 2, 0, 1]
    assert vocab.d2t[draft[valid]].tolist() == labels[valid].tolist()


def test_top_k_mass_outside_is_dropped_and_renormalised():
    vocab = DraftVocab(torch.tensor([2, 5, 9]), 12)
    ids, probs = vocab.restrict_soft(torch.tensor([[[5, 7, 2]]]), torch.tensor([[[0.5, 0.3, 0.2]]]))
    assert ids.tolist() == [[[1, 0, 0]]]
    torch.testing.assert_close(probs, torch.tensor([[[0.5 / 0.7, 0.0, 0.2 / 0.7]]]))
    same, p = renormalise(torch.tensor([[3, 4]]), torch.tensor([[0.6, 0.2]]))
    assert same.tolist() == [[3, 4]] and torch.allclose(p, torch.tensor([[0.75, 0.25]]))
