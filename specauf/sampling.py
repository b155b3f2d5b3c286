"""Drafting and verification rules of speculative decoding (docs/method.md, section 1).

Pure tensor functions, no models: the engine in `decode.py` calls them once per cycle, and the
tests check them against exact probabilities. Token processing (temperature, top-k, top-p) is
`filter_logits` and its settings one `SamplingParams`, shared with the rollouts' generation loop,
so "the target's sampling distribution" means the same thing everywhere in the project.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Temperature, top-k and top-p applied to (..., V) logits; returns probabilities."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop_sorted = cum - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (top_p/top_k ignored); > 0 = sample from the filtered distribution."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> float32 probabilities after temperature, top-k, top-p."""
        return filter_logits(logits, self.temperature, self.top_p, self.top_k)


def draft(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None = None):
    """Turn a proposer's (n, V) logits into guesses (n,) and the distributions they came from.

    Each block position is drawn independently: the drafter gives all positions in one pass, so
    q_k does not depend on the other guesses. That is still a valid proposal for speculative
    sampling, since d_k is independent of the coin flips that decided positions < k.
    Greedy: argmax, and q is None (verification then only compares tokens).
    """
    if sp.greedy:
        return logits.argmax(-1), None
    q = sp.probs(logits)
    if q.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device), q
    return torch.multinomial(q, 1, generator=generator)[:, 0], q


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to resample after rejecting a draft drawn from q.

    If p <= q everywhere (p == q up to rounding) a rejection has probability ~0; fall back to p
    rather than divide by zero.
    """
    r = (p - q).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


def acceptance_prob(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """min(1, p(d)/q(d)) per row, for drafts d drawn from q (so q(d) > 0)."""
    pd = p.gather(-1, tokens[:, None])[:, 0]
    qd = q.gather(-1, tokens[:, None])[:, 0]
    return torch.clamp(pd / qd, max=1.0)


def verify(target_logits: torch.Tensor, guesses: torch.Tensor, q: torch.Tensor | None,
           sp: SamplingParams, generator: torch.Generator | None = None) -> tuple[int, int, list[int]]:
    """Check n guesses against the target's (n+1, V) logits for [anchor, g_1..g_n].

    Row j of the target logits is its distribution for the token after block position j, so
    guess g_k is judged by row k-1 and row n gives the token after an all-accepted block.
    Returns (n_accepted, bonus token, guesses as a list): the output continues with
    g_1..g_{n_accepted} then the bonus, which is the target's own token at the first mismatch
    (greedy: its argmax; sampling: a draw from the residual) or after the last guess.
    n = 0 is plain decoding: the bonus is the target's next token.
    """
    n = guesses.shape[0]
    if sp.greedy:
        best = target_logits.argmax(-1)
        n_acc = (guesses == best[:n]).long().cumprod(0).sum()
        bonus = best[n_acc]
    else:
        p = sp.probs(target_logits)
        if n:  # one uniform per position; accept d_k when u_k < min(1, p(d_k)/q(d_k))
            u = torch.rand(n, generator=generator, device=p.device)
            n_acc = (u < acceptance_prob(p[:n], q, guesses)).long().cumprod(0).sum()
            # Row j < n: where to resample after rejecting guess j+1; row n: all accepted.
            p = torch.cat([residual(p[:n], q), p[n:]])[n_acc]
        else:
            n_acc, p = torch.zeros((), dtype=torch.long, device=p.device), p[0]
        bonus = torch.multinomial(p, 1, generator=generator)[0]
    # Everything above stays on the device; this is the cycle's single host sync.
    vals = torch.cat([n_acc[None], bonus[None], guesses]).tolist()
    return vals[0], vals[1], vals[2:]
