"""The data side of training: which sequences and anchors step s sees, as a typed Batch.

Everything here is a pure function of (seed, step, rank, world): every variant sees identical
batches, so variants differ only in their loss, and a resumed run continues exactly where the
killed one stopped without saving any data position or RNG state. docs/method.md, sections 2-3.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from specauf.train.blocks import build_blocks, collate_blocks, sample_anchors
from specauf.config import TrainParams
from specauf.data.dataset import LabelsDataset
from specauf.train.draft_vocab import DraftVocab, renormalise
from specauf.errors import UserError
from specauf.target.access import context_features_from_hidden_states

log = logging.getLogger("specauf")

# One random stream per purpose, each seeded from the training seed (or a parent stream's seed)
# and an index: distinct multipliers keep the streams apart. The values are what the drafters
# published so far were trained with; changing one changes every drafter's bytes.
SEED_STREAMS = {
    "epoch_order": (1_000_003, 0),     # (train seed, epoch) -> permutation of the training rows
    "micro_batch": (7919, 0),          # (train seed, micro batch index * world + rank) -> its anchors
    "sequence_anchors": (1009, 0),     # (a micro batch's seed, sequence j in it) -> that sequence's anchors
    "heldout_batch": (0, 10**6),       # (-, held-out batch start) -> a fixed draw, the same at every evaluation
}


def derive_seed(seed: int, purpose: str, index: int) -> int:
    """The seed of stream `purpose` for `index`, derived from `seed` (SEED_STREAMS)."""
    multiplier, offset = SEED_STREAMS[purpose]
    return seed * multiplier + offset + index


@dataclass
class Batch:
    """One drafter forward's blocks (blocks.collate_blocks): N sequences x A anchors of B tokens.

    `labels` are what the loss supervises (the acceptance labels or the response tokens, per
    train.label_source), as draft-vocabulary ids; `validity` marks the supervised positions
    (monotone in each block); `soft_*` the target's top-k per label (distillation: renormalised
    inside the draft vocabulary; `soft_mass`: the same top-k probabilities as the target gave them,
    0 outside the draft vocabulary, for soft AUF's acceptance probability)."""
    block_input_ids: torch.Tensor       # (N, A*B) [anchor token, MASK x B-1] per block
    block_position_ids: torch.Tensor    # (N, A*B)
    context_features: torch.Tensor      # (N, C, n*H) the target's features of the context
    context_position_ids: torch.Tensor  # (N, C)
    attention_mask: torch.Tensor        # (N, 1, A*B, C + A*B)
    labels: torch.Tensor                # (N*A, B-1)
    validity: torch.Tensor              # (N*A, B-1) bool
    soft_ids: torch.Tensor | None = None    # (N*A, B-1, k)
    soft_probs: torch.Tensor | None = None  # (N*A, B-1, k)
    soft_mass: torch.Tensor | None = None   # (N*A, B-1, k)
    coverage: float | None = None           # response tokens some block supervises / response tokens
    label_token_ids: torch.Tensor | None = None  # (N*A, B-1) the labels as target ids (what Domino's GRU reads)


def split_heldout(dataset: LabelsDataset, fraction: float, seed: int,
                  max_seq_len: int | None = None) -> tuple[list[int], list[int]]:
    """Deterministic by prompt id, so every variant holds out the same rollouts. Sequences whose
    response starts at or past max_seq_len offer no anchor and are left out of both (a batch
    of only such rows would have nothing to learn from)."""
    train, held, no_anchor = [], [], 0
    for i, (t, r) in enumerate(dataset.index):
        table = dataset.tables[t]
        if max_seq_len is not None:
            length = len(table.column("input_ids")[r])
            if table.column("response_start")[r].as_py() >= min(length, max_seq_len):
                no_anchor += 1
                continue
        pid = table.column("prompt_id")[r].as_py()
        u = int(hashlib.sha256(f"{seed}:heldout:{pid}".encode()).hexdigest()[:8], 16) / 16**8
        (held if u < fraction else train).append(i)
    if no_anchor:
        log.info("left out %d sequences whose response starts at or past train.max_seq_len (%d)", no_anchor, max_seq_len)
    if not train and not held:
        raise UserError(f"train.max_seq_len: {max_seq_len} tokens cut off every response ({no_anchor} sequences "
                        "have their response start at or past it): raise it")
    if not train:
        raise UserError(f"train.heldout_fraction: {fraction} leaves no training sequences"
                        + (f" ({no_anchor} more have no response within train.max_seq_len)" if no_anchor else ""))
    return train, held


def check_block_fits(dataset: LabelsDataset, rows: list[int], block_size: int, max_seq_len: int) -> None:
    """A block reaching past every training response supervises positions nothing ever fills:
    refuse it by name (it used to train without a word), and warn when most responses are shorter."""
    lengths = sorted(min(len(dataset.tables[t].column("input_ids")[r]), max_seq_len)
                     - dataset.tables[t].column("response_start")[r].as_py()
                     for t, r in (dataset.index[i] for i in rows))
    longest, guesses = lengths[-1], block_size - 1
    if guesses > longest:
        raise UserError(f"train.block_size: {block_size} guesses {guesses} tokens past an anchor, but the longest training "
                        f"response has {longest} (within train.max_seq_len): its last {guesses - longest} block positions "
                        "would never be supervised; lower train.block_size or make longer rollouts (rollouts.max_new_tokens)")
    short = sum(n < guesses for n in lengths)
    if short * 2 > len(lengths):
        log.warning("train.block_size %d: %d of %d training responses are shorter than its %d guesses; their blocks "
                    "supervise fewer positions", block_size, short, len(lengths), guesses)


class TrainData:
    """The training and held-out rows of a labels dataset and the batches built from them.

    Online mode (labels.features: online) runs the frozen target for the context features."""

    def __init__(self, params: TrainParams, dataset: LabelsDataset, seed: int, mask_token_id: int,
                 target_vocab_size: int, target=None, device: torch.device | None = None):
        self.params, self.ds, self.seed, self.mask_token_id = params, dataset, seed, mask_token_id
        self.online = dataset.manifest["features"] == "online"
        self.target, self.device = target, device
        self.layer_ids = dataset.manifest["layer_ids"]
        self.train_rows, self.heldout_rows = split_heldout(dataset, params.heldout_fraction, seed, params.max_seq_len)
        check_block_fits(dataset, self.train_rows, params.block_size, params.max_seq_len)
        self.vocab = DraftVocab.build(dataset, self.train_rows, params.draft_vocab_size, target_vocab_size)
        self.coverage = 1.0 if self.vocab is None else self.vocab.coverage(dataset, self.train_rows)

    def rows_at(self, micro_batch: int, rank: int, world: int) -> list[int]:
        """The sequences of one micro batch: an epoch-wise permutation of the training rows."""
        per_step = self.params.micro_batch_size * world
        n = len(self.train_rows)
        start = micro_batch * per_step + rank * self.params.micro_batch_size
        rows = []
        for j in range(start, start + self.params.micro_batch_size):
            epoch, k = divmod(j, n)
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch_order", epoch))
            rows.append(self.train_rows[int(torch.randperm(n, generator=g)[k])])
        return rows

    def train_batch(self, micro_batch: int, rank: int, world: int) -> Batch | None:
        """Micro batch `micro_batch` of rank `rank` (None when none of its sequences has an anchor)."""
        anchor_seed = derive_seed(self.seed, "micro_batch", micro_batch * world + rank)
        return self.batch(self.rows_at(micro_batch, rank, world), anchor_seed, self.params.anchors_per_seq,
                          anchors_per_token=self.params.anchors_per_token)

    def heldout_batches(self):
        """The fixed held-out blocks: twice the anchors per sequence, the same draw every time."""
        rows = self.heldout_rows or self.train_rows[: max(1, len(self.train_rows) // 20)]
        for b in range(0, len(rows), self.params.micro_batch_size):
            batch = self.batch(rows[b: b + self.params.micro_batch_size], derive_seed(0, "heldout_batch", b),
                               2 * self.params.anchors_per_seq)
            if batch is not None:
                yield batch

    def batch(self, rows: list[int], anchor_seed: int | None, num_anchors: int,
              anchors_per_token: float = 0.0) -> Batch | None:
        """Blocks of several sequences, collated for one drafter forward (anchor_seed None: torch's
        global generator, for tools that take every anchor anyway); `anchors_per_token` > 0 sets
        each sequence's anchor count from its response length instead of `num_anchors`."""
        items = []
        covered = response_tokens = 0
        label_key = "acceptance_ids" if self.params.label_source == "acceptance" else "input_ids"
        B = self.params.block_size
        for j, i in enumerate(rows):
            item = self.ds[i]
            S = min(len(item["input_ids"]), self.params.max_seq_len)
            start = item["response_start"]
            g = None if anchor_seed is None else torch.Generator().manual_seed(derive_seed(anchor_seed, "sequence_anchors", j))
            n = max(1, round(anchors_per_token * max(S - start, 0))) if anchors_per_token else num_anchors
            anchors = sample_anchors(start, S, B, n, g)
            if len(anchors) == 0:
                continue
            supervised = torch.zeros(S + B, dtype=torch.bool)
            for a in anchors.tolist():
                supervised[a + 1: a + B] = True
            covered += int(supervised[start:S].sum())
            response_tokens += S - start
            block = build_blocks(item["input_ids"][:S], start, S, anchors, B, self.mask_token_id,
                                 label_ids=item[label_key][:S].clone())
            block.update(anchors=anchors, context_len=S)
            if self.params.distill_weight or self.params.soft_auf_acceptance == "tv":  # top-k rows: row p - start
                at = (anchors[:, None] + torch.arange(1, B) - start).clamp(0, item["topk_ids"].shape[0] - 1)
                block["soft_ids"], block["soft_probs"] = item["topk_ids"][at].long(), item["topk_probs"][at].float()
            if self.online:
                block["input_ids_full"] = item["input_ids"][:S]
            else:
                block["context_features"] = item["features"][:S].float()
            items.append(block)
        if not items:
            return None
        out = collate_blocks(items, B, self.mask_token_id)
        if self.online:
            out["context_features"] = self.online_features([it["input_ids_full"] for it in items], out)
        batch = Batch(**out)
        batch.coverage = covered / max(response_tokens, 1)
        batch.label_token_ids = batch.labels
        if self.vocab is not None:  # a label outside the draft vocabulary can never be guessed: the block ends there
            batch.labels, batch.validity = self.vocab.restrict_labels(batch.labels, batch.validity)
        if batch.soft_ids is not None:  # keep the top-k mass inside the draft vocabulary, renormalised
            inside = batch.soft_ids if self.vocab is None else self.vocab.t2d[batch.soft_ids]
            batch.soft_mass = torch.where(inside >= 0, batch.soft_probs, 0.0)
            batch.soft_ids, batch.soft_probs = (renormalise(batch.soft_ids, batch.soft_probs) if self.vocab is None
                                                else self.vocab.restrict_soft(batch.soft_ids, batch.soft_probs))
        return batch

    @torch.no_grad()
    def online_features(self, seqs: list[torch.Tensor], collated: dict) -> torch.Tensor:
        C = collated["context_position_ids"].shape[1]
        ids = torch.zeros((len(seqs), C), dtype=torch.long)
        mask = torch.zeros((len(seqs), C), dtype=torch.long)
        for n, s in enumerate(seqs):
            ids[n, : len(s)], mask[n, : len(s)] = s, 1
        out = self.target(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          output_hidden_states=True, use_cache=False)
        return context_features_from_hidden_states(out.hidden_states, self.layer_ids).float()
