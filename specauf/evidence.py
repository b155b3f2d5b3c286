"""Confidence intervals for tau and its differences: a paired cluster bootstrap over prompts.

Why prompts are the unit: the cycles of one prompt are not independent (an easy answer is easy
throughout), so resampling cycles would make intervals far too narrow. Each resample draws the
prompts with replacement (the same draw for every variant: the comparison is paired) and
recomputes tau as a ratio of sums, emitted tokens over cycles, exactly as the point estimate.
A claim "A beats B" holds only when the 95% interval of tau(A) - tau(B) excludes 0 in the
claimed direction; "reversed" when it excludes 0 the other way; otherwise it is not significant.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 2000   # bootstrap draws; the percentile interval's Monte Carlo error is ~0.005 tau here
SEED = 0           # the resampling seed (fixed: the same inputs give the same interval)
LEVEL = 0.95
EQUIVALENCE_MARGIN = 0.05  # "about equal": the interval of the difference inside +-0.05 tau
HOLDS, REVERSED, NOT_SIGNIFICANT = "holds", "reversed", "not significant"
EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 100:
        raise ValueError(f"a bootstrap needs at least 100 resamples, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(samples: np.ndarray) -> tuple[float, float]:
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def ratio_ci(num, den, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """tau = sum(num) / sum(den) over prompts, with its bootstrap interval."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    idx = _draws(len(num), resamples, seed)
    lo, hi = _interval(num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12))
    return {"value": float(num.sum() / den.sum()), "lo": lo, "hi": hi, "prompts": len(num)}


def paired_diff_ci(num_a, den_a, num_b, den_b, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """tau(A) - tau(B) on the same prompts (row i of A and of B is the same prompt)."""
    num_a, den_a, num_b, den_b = (np.asarray(x, float) for x in (num_a, den_a, num_b, den_b))
    if not (len(num_a) == len(den_a) == len(num_b) == len(den_b)):
        raise ValueError("paired rows must be the same prompts")
    idx = _draws(len(num_a), resamples, seed)
    ratio = lambda n, d: n[idx].sum(1) / np.maximum(d[idx].sum(1), 1e-12)
    lo, hi = _interval(ratio(num_a, den_a) - ratio(num_b, den_b))
    value = float(num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum())
    return {"value": value, "lo": lo, "hi": hi, "prompts": len(num_a)}


def verdict(diff: dict) -> str:
    """Claim "A > B" judged from the interval of tau(A) - tau(B)."""
    return HOLDS if diff["lo"] > 0 else REVERSED if diff["hi"] < 0 else NOT_SIGNIFICANT


def equivalence(diff: dict, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Claim "A ~ B": the interval inside +-margin (holds), wholly outside it (does not), or neither."""
    if -margin <= diff["lo"] and diff["hi"] <= margin:
        return EQUIVALENT
    if diff["lo"] > margin or diff["hi"] < -margin:
        return NOT_EQUIVALENT
    return INCONCLUSIVE


def paired_rows(rows_a: list[dict], rows_b: list[dict], key: str, set_name: str | None = None):
    """(num_a, den_a, num_b, den_b) of block size `key` ("b4") for the prompts both runs decoded,
    matched by (set, prompt_id); `set_name` None pools every set."""
    index_b = {(r["set"], r["prompt_id"]): r for r in rows_b}
    out = ([], [], [], [])
    for r in rows_a:
        other = index_b.get((r["set"], r["prompt_id"]))
        if other is None or (set_name is not None and r["set"] != set_name) or key not in r or key not in other:
            continue
        for lst, v in zip(out, (r[key]["emitted"], r[key]["cycles"], other[key]["emitted"], other[key]["cycles"])):
            lst.append(v)
    return out


def speedup_ci(rows: list[dict], key: str, resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """Plain over speculative time per output token at block size `key` ("b4") on the decoded
    prompts, each a ratio of sums, with its bootstrap interval over prompts (None: no rows)."""
    rows = [r for r in rows if key in r and "plain" in r]
    if not rows:
        return None
    cols = [np.array([float(x) for x in col]) for col in zip(*(
        (r["plain"]["time_s"], r["plain"]["tokens"], r[key]["time_s"], r[key]["emitted"]) for r in rows))]
    pt, pn, st, sn = cols
    idx = _draws(len(rows), resamples, seed)
    per = lambda t, n, i: t[i].sum(-1) / np.maximum(n[i].sum(-1), 1e-12)
    samples = per(pt, pn, idx) / np.maximum(per(st, sn, idx), 1e-12)
    lo, hi = _interval(samples)
    return {"value": float((pt.sum() / pn.sum()) / (st.sum() / sn.sum())), "lo": lo, "hi": hi, "prompts": len(rows)}
