"""The Domino head (arXiv 2605.29707; docs/method.md): DFlash's blind spot is that every guess
of a block is made without knowing the guesses before it. Domino keeps the DFlash backbone and
its base logits b_k unchanged and adds, for every guess after the first `pure_draft_prefix_len`,
a correction from a GRU that has read the block's earlier tokens:

    s_k = GRU(embed(token_0), ..., embed(token_{k-1}))      token_0 = the anchor
    f_k = b_k + embed_proj([h_k ; s_k])                     embed_proj = Linear -> SiLU -> Linear

Training is teacher-forced: the GRU reads the tokens greedy verification commits (the labels).
Drafting is sequential: each guess is the argmax of f_k and is fed back for the next; up to the
first guess that misses its label, the fed-back tokens ARE the labels, so the decode-time logits
equal the teacher-forced ones there and AUF on the final logits has no exposure bias.

Tensor names and config keys are SpecForge's and SGLang's (`prefix_gru.weight_ih_l0`,
`prefix_gru.weight_hh_l0`, `embed_proj.0.weight`, `embed_proj.2.weight`; `dflash_config`'s
`projector_type: domino`, `gru_hidden_dim`, `emb_dim`, `pure_draft_prefix_len`, `shift_label`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

PROJECTOR = "domino"
PURE_DRAFT_PREFIX_LEN = 1  # the first guess is the backbone's own (the reference's default)


def head_sizes(hidden_size: int, gru_dim: int = 0, emb_dim: int = 0) -> tuple[int, int]:
    """(G, E): as given, else the reference's ratios to the hidden size (1024 and 256 at 4096),
    rounded up to a multiple of 8 (SmolLM2-135M's 576: 144 and 40)."""
    def scaled(n: int, divisor: int) -> int:
        return n or 8 * math.ceil(hidden_size / divisor / 8)
    return scaled(gru_dim, 4), scaled(emb_dim, 16)


def domino_config(hidden_size: int, gru_dim: int = 0, emb_dim: int = 0) -> dict:
    """The `dflash_config` entries of a Domino drafter."""
    G, E = head_sizes(hidden_size, gru_dim, emb_dim)
    return {"projector_type": PROJECTOR, "gru_hidden_dim": G, "emb_dim": E,
            "pure_draft_prefix_len": PURE_DRAFT_PREFIX_LEN, "shift_label": False}


def is_domino(config) -> bool:
    return (config.dflash_config or {}).get("projector_type") == PROJECTOR


def attach_head(drafter: nn.Module, config) -> None:
    """Give a BlockDrafter the head's modules under the reference's names (a DFlash config: none).
    The head scores the drafter's own vocabulary (the draft vocabulary when it has one)."""
    if not is_domino(config):
        return
    dc = config.dflash_config
    if dc.get("shift_label", False) or dc.get("pure_draft_prefix_len", PURE_DRAFT_PREFIX_LEN) != PURE_DRAFT_PREFIX_LEN:
        raise ValueError(f"a Domino drafter with shift_label {dc.get('shift_label')} and pure_draft_prefix_len "
                         f"{dc.get('pure_draft_prefix_len')}: only shift_label false and pure_draft_prefix_len "
                         f"{PURE_DRAFT_PREFIX_LEN} are supported")
    H, G, E = config.hidden_size, int(dc["gru_hidden_dim"]), int(dc["emb_dim"])
    V = config.draft_vocab_size or config.vocab_size
    drafter.prefix_gru = nn.GRU(input_size=H, hidden_size=G, num_layers=1, batch_first=True, bias=False)
    drafter.embed_proj = nn.Sequential(nn.Linear(H + G, E, bias=False), nn.SiLU(), nn.Linear(E, V, bias=False))


def teacher_forced_logits(drafter, hidden: torch.Tensor, base: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """Final logits (M, K, V) of M blocks' K guesses, the GRU reading the true tokens.

    hidden (M, K, H): the backbone's output at the guess positions; base (M, K, V) its logits;
    token_embeds (M, K, H): target embeddings of [anchor, label_1, ..., label_{K-1}], so the
    GRU's output after reading j + 1 of them is the state for guess j + 1."""
    states = drafter.prefix_gru(token_embeds.to(hidden.dtype))[0]
    p = PURE_DRAFT_PREFIX_LEN
    correction = drafter.embed_proj(torch.cat([hidden[:, p:], states[:, p:]], dim=-1))
    return torch.cat([base[:, :p], base[:, p:] + correction.to(base.dtype)], dim=1)


def chained_guesses(drafter, hidden: torch.Tensor, base: torch.Tensor, anchor_ids: torch.Tensor,
                    embed, d2t: torch.Tensor | None, pick=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(guesses (M, K) as target ids, final logits (M, K, V)) of M blocks drafted guess by guess:
    guess j is `pick` of its final logits, and the GRU reads it before guess j + 1.

    anchor_ids (M,): the anchors' target ids; embed: the target's embedding module (the GRU reads
    guesses as the target's tokens); d2t: the draft vocabulary's target ids (None: full vocabulary);
    pick: (M, V) final logits -> (M,) target ids, the argmax by default (greedy drafting); a
    sampling decoder draws there, so each later guess is conditioned on the token it drew."""
    def as_target(logits: torch.Tensor) -> torch.Tensor:
        best = logits.argmax(-1)
        return d2t[best] if d2t is not None else best

    pick = pick or as_target
    p = PURE_DRAFT_PREFIX_LEN
    logits = [base[:, j] for j in range(p)]
    guesses = [pick(lg) for lg in logits]
    tokens = torch.stack([anchor_ids, *guesses], dim=1)  # what the GRU reads before guess p: anchor, prefix guesses
    out, state = drafter.prefix_gru(embed(tokens).to(hidden.dtype))
    for j in range(p, base.shape[1]):
        if j > p:  # read the guess just made
            out, state = drafter.prefix_gru(embed(guesses[-1])[:, None].to(hidden.dtype), state)
        logits.append(base[:, j] + drafter.embed_proj(torch.cat([hidden[:, j], out[:, -1]], dim=-1)).to(base.dtype))
        guesses.append(pick(logits[-1]))
    return torch.stack(guesses, dim=1), torch.stack(logits, dim=1)
