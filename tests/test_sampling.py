"""Drafting and verification rules (specauf/sampling.py): the verify step is exact, and its samples
follow the target's distribution (a chi-square bound)."""
from __future__ import annotations

import math

import torch

from specauf.sampling import SamplingParams, acceptance_prob, residual, verify


def chi2_bound(df, z=3.09):
    """Upper 0.1% point of chi-square(df) (Wilson-Hilferty; within ~1% for df >= 2)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells expected < 5 times are pooled."""
    assert set(counts) <= {k for k, p in probs.items() if p > 0}, "sampled an impossible outcome"
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for k, p in probs.items():
        if n * p < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(k, 0), pooled_exp + n * p
        else:
            stat += (counts.get(k, 0) - n * p) ** 2 / (n * p)
            cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


def test_verify_step_is_exact():
    """Accept d ~ q with min(1, p/q), else resample from norm(max(0, p - q)): the emitted token is
    distributed exactly as p, for any q (disjoint supports, p == q, one-hot q)."""
    g = torch.Generator().manual_seed(0)
    V = 6
    qs = [torch.softmax(torch.randn(V, generator=g) * 2, -1),
          torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.0]),
          torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])]
    for _ in range(20):
        p = torch.softmax(torch.randn(V, generator=g) * 2, -1) * (torch.rand(V, generator=g) > 0.3)
        p = p / p.sum()
        for q in qs + [p.clone()]:
            d = torch.nonzero(q).flatten()
            a = acceptance_prob(p.expand(len(d), V), q.expand(len(d), V), d)
            emitted = sum(q[x] * (a[i] * torch.eye(V)[x] + (1 - a[i]) * residual(p, q))
                          for i, x in enumerate(d.tolist()))
            torch.testing.assert_close(emitted, p, atol=1e-6, rtol=0)


def test_verify_samples_follow_target():
    """`verify` itself, 10k draws: the first emitted token follows p_0, and the token after an
    accepted first guess follows p_1 (two-position block, mismatched q)."""
    V = 5
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.2] * 5])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.6, 0.0], [0.0, 0.5, 0.5, 0.0, 0.0]])
    sp = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    first, second, n = {}, {}, 10000
    for _ in range(n):
        guesses = torch.multinomial(q, 1, generator=g)[:, 0]
        n_acc, bonus, gl = verify(p.log(), guesses, q, sp, g)  # log p: softmax(log p) = p
        emitted = gl[:n_acc] + [bonus]
        first[emitted[0]] = first.get(emitted[0], 0) + 1
        if n_acc >= 1:
            second[emitted[1]] = second.get(emitted[1], 0) + 1
    for counts, row in ((first, p[0]), (second, p[1])):
        stat, df = chi2(counts, dict(enumerate(row.tolist())), sum(counts.values()))
        assert stat < chi2_bound(df), (stat, df, counts)
    assert sum(second.values()) > 1500
