"""Training blocks: anchors, block inputs/labels/validity, and the block attention mask.

Training runs many blocks of one sequence in a single drafter forward (docs/method.md, section 2):
the query stream is all blocks laid end to end, the key stream is [context features ; blocks],
and the mask below makes that one forward equal to running each block on its own with only the
context it would have at inference (target features of positions strictly before its anchor).
"""
from __future__ import annotations

import torch


def sample_anchors(response_start: int, seq_len: int, block_size: int, num_anchors: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted anchor positions a with a+1 >= response_start and a < seq_len-1.

    The first label (position a+1) must lie in the response; later labels of the block may run
    past the end of the sequence and are simply invalid (see `build_blocks`). Sampled without
    replacement; all candidates when there are at most num_anchors of them.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (an anchor and one guess), got {block_size}")
    lo, hi = max(response_start - 1, 0), seq_len - 1  # candidates: lo <= a < hi
    if hi <= lo:
        return torch.empty(0, dtype=torch.long)
    candidates = torch.arange(lo, hi)
    if len(candidates) > num_anchors:
        pick = torch.randperm(len(candidates), generator=generator)[:num_anchors]
        candidates = candidates[pick]
    return candidates.sort().values


def build_blocks(input_ids: torch.Tensor, response_start: int, seq_len: int, anchors: torch.Tensor,
                 block_size: int, mask_token_id: int, label_ids: torch.Tensor | None = None) -> dict:
    """Blocks of ONE sequence (input_ids 1-D, possibly padded past seq_len).

    Returns block_input_ids (A,B) = [token[a], MASK, ...]; labels (A,B-1) = label_ids[a+k];
    validity (A,B-1), True while a+k is inside the sequence and the response and False from the
    first failure of that on (monotone, as the losses assume); block_position_ids (A,B) = a+k.
    label_ids lets the caller supervise with what verification would accept at each position
    (the target's argmax) instead of the response token; it defaults to input_ids.
    """
    label_ids = input_ids if label_ids is None else label_ids
    anchors = anchors.long().to(input_ids.device)
    offsets = torch.arange(block_size, device=input_ids.device)
    positions = anchors[:, None] + offsets[None, :]  # (A,B)
    block_input_ids = torch.full(positions.shape, mask_token_id, dtype=torch.long, device=input_ids.device)
    block_input_ids[:, 0] = input_ids[anchors]

    label_pos = positions[:, 1:]
    in_range = label_pos < min(seq_len, len(label_ids))
    labels = torch.where(in_range, label_ids[label_pos.clamp(max=len(label_ids) - 1)], 0).long()
    valid = (label_pos < seq_len) & (label_pos >= response_start)
    validity = valid.long().cummin(dim=1).values.bool()  # once invalid, stays invalid
    return {"block_input_ids": block_input_ids, "labels": labels, "validity": validity,
            "block_position_ids": positions}


def block_attention_mask(anchors: torch.Tensor, block_size: int, context_len: int,
                         widths: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (A*B, context_len + A*B), True = attend.

    Block i's rows see context keys j < anchors[i] (the anchor's own target features do not
    exist yet at inference) and all B keys of its own block (bidirectional); never another block.
    With `widths` (A,), block i's keys past widths[i] are hidden too, which makes a B-slot block
    exactly a narrower one (the replay lays blocks of several widths side by side).
    """
    anchors = anchors.long()
    A, device = len(anchors), anchors.device
    ctx_visible = torch.arange(context_len, device=device)[None, :] < anchors[:, None]  # (A,C)
    block_of = torch.arange(A, device=device).repeat_interleave(block_size)  # (A*B,)
    own_block = block_of[:, None] == block_of[None, :]
    if widths is not None:
        slot = torch.arange(block_size, device=device).repeat(A)  # each key's slot in its block
        own_block = own_block & (slot < widths.long().to(device)[block_of])[None, :]
    return torch.cat([ctx_visible.repeat_interleave(block_size, dim=0), own_block], dim=1)


def collate_blocks(items: list[dict], block_size: int, mask_token_id: int) -> dict:
    """Batch several sequences' blocks for one drafter forward.

    Each item holds the `build_blocks` output plus "anchors" (A_i,) and "context_len" (C_i), and
    optionally "context_features" (C_i, n*H). Contexts are padded to C = max C_i and blocks to
    A = max A_i. Padding context keys are never visible; a padding block is all MASK at
    positions 0..B-1, sees only itself (so no softmax row is empty) and has no valid label.

    Returns block_input_ids (N, A*B), block_position_ids (N, A*B), context_position_ids (N, C),
    attention_mask (N, 1, A*B, C + A*B), labels and validity (N*A, B-1) in block order, and
    context_features (N, C, n*H) and soft_ids/soft_probs (N*A, B-1, k) when given.
    """
    N, B = len(items), block_size
    A = max(len(it["anchors"]) for it in items)
    C = max(int(it["context_len"]) for it in items)
    device = items[0]["block_input_ids"].device
    ids = torch.full((N, A, B), mask_token_id, dtype=torch.long, device=device)
    pos = torch.arange(B, device=device).repeat(N, A, 1)
    labels = torch.zeros((N, A, B - 1), dtype=torch.long, device=device)
    validity = torch.zeros((N, A, B - 1), dtype=torch.bool, device=device)
    mask = torch.zeros((N, A * B, C + A * B), dtype=torch.bool, device=device)
    for n, it in enumerate(items):
        a = len(it["anchors"])
        ids[n, :a], pos[n, :a] = it["block_input_ids"], it["block_position_ids"]
        labels[n, :a], validity[n, :a] = it["labels"], it["validity"]
        # padding blocks get "anchor" 0: no context visible, only their own block
        anchors = torch.zeros(A, dtype=torch.long, device=device)
        anchors[:a] = it["anchors"]
        anchors = anchors.clamp(max=int(it["context_len"]))
        mask[n] = block_attention_mask(anchors, B, C)
    out = {
        "block_input_ids": ids.view(N, A * B), "block_position_ids": pos.view(N, A * B),
        "context_position_ids": torch.arange(C, device=device).repeat(N, 1),
        "attention_mask": mask[:, None], "labels": labels.view(N * A, B - 1),
        "validity": validity.view(N * A, B - 1),
    }
    if all("soft_ids" in it for it in items):  # the target's top-k per label; padding blocks get p = 0
        k = items[0]["soft_ids"].shape[-1]
        soft_ids = torch.zeros((N, A, B - 1, k), dtype=torch.long, device=device)
        soft_probs = torch.zeros((N, A, B - 1, k), dtype=torch.float32, device=device)
        for n, it in enumerate(items):
            soft_ids[n, : len(it["anchors"])], soft_probs[n, : len(it["anchors"])] = it["soft_ids"], it["soft_probs"]
        out["soft_ids"], out["soft_probs"] = soft_ids.view(N * A, B - 1, k), soft_probs.view(N * A, B - 1, k)
    if all("context_features" in it for it in items):
        feats = items[0]["context_features"]
        padded = feats.new_zeros((N, C, feats.shape[-1]))
        for n, it in enumerate(items):
            padded[n, : it["context_features"].shape[0]] = it["context_features"]
        out["context_features"] = padded
    return out
