"""The draft vocabulary: the target ids a drafter scores (train.draft_vocab_size).

About half a CPU training step is the 49k-way lm_head; the few thousand ids most frequent among
the training responses' labels cover almost every label (the coverage is logged and recorded). A
label outside the vocabulary can never be guessed, so a block's supervision ends there. The saved
drafter holds the vocabulary as `d2t` (draft id -> target id); docs/method.md, section 3.
"""
from __future__ import annotations

import torch

from specauf.data.dataset import LabelsDataset


class DraftVocab:
    """d2t (draft id -> target id, sorted) and its inverse t2d (target id -> draft id, -1 outside)."""

    def __init__(self, d2t: torch.Tensor, target_vocab_size: int):
        self.d2t = d2t
        self.t2d = torch.full((target_vocab_size,), -1, dtype=torch.long)
        self.t2d[d2t] = torch.arange(len(d2t))

    @classmethod
    def build(cls, dataset: LabelsDataset, rows: list[int], size: int, target_vocab_size: int) -> "DraftVocab | None":
        """The `size` most frequent label ids in the training responses (ties by id); None (the
        full vocabulary) when size is 0 or covers the target's vocabulary anyway."""
        if not size or size >= target_vocab_size:
            return None
        counts = torch.zeros(target_vocab_size, dtype=torch.long)
        for i in rows:
            item = dataset[i]
            counts += torch.bincount(item["acceptance_ids"][item["response_start"]:], minlength=target_vocab_size)
        order = sorted(range(target_vocab_size), key=lambda t: (-int(counts[t]), t))[:size]
        return cls(torch.tensor(sorted(order), dtype=torch.long), target_vocab_size)

    def coverage(self, dataset: LabelsDataset, rows: list[int]) -> float:
        """Fraction of the response labels of `rows` inside the vocabulary."""
        hit = total = 0
        for i in rows:
            item = dataset[i]
            labels = item["acceptance_ids"][item["response_start"]:]
            hit += int((self.t2d[labels] >= 0).sum())
            total += len(labels)
        return hit / max(total, 1)

    def restrict_labels(self, labels: torch.Tensor, validity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target-id labels (N, K) as draft ids; a block's validity ends at its first label outside."""
        draft = self.t2d[labels]
        inside = (draft >= 0).long().cummin(dim=1).values.bool()
        return draft.clamp(min=0), validity & inside

    def restrict_soft(self, soft_ids: torch.Tensor, soft_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's top-k (ids, probs) kept inside the vocabulary, renormalised."""
        return renormalise(self.t2d[soft_ids], soft_probs)


def renormalise(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows with ids < 0 (outside a vocabulary) dropped and the rest summing to 1."""
    kept = torch.where(ids >= 0, probs, 0.0)
    return ids.clamp(min=0), kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)
