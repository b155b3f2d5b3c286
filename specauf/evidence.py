"""Confidence intervals for tau and its differences: a paired cluster bootstrap over prompts, and
over training seeds when there are several.

Why prompts are the unit: the cycles of one prompt are not independent (an easy answer is easy
throughout), so resampling cycles would make intervals far too narrow. Each resample draws the
prompts with replacement (the same draw for every variant: the comparison is paired) and
recomputes tau as a ratio of sums, emitted tokens over cycles, exactly as the point estimate.
With S > 1 training seeds the data are an S x P table (seed s of every variant is paired) and each
resample also draws S seeds with replacement (two levels: seeds, then the same prompts within
each), so the interval carries the seed-to-seed spread as well as the prompts'.
A claim "A beats B" holds only when the 95% interval of tau(A) - tau(B) excludes 0 in the
claimed direction; "reversed" when it excludes 0 the other way; otherwise it is not significant.
"""
from __future__ import annotations

import os

import numpy as np

from specauf.config import EvalParams
from specauf.errors import UserError

RESAMPLES = EvalParams.model_fields["bootstrap_resamples"].default  # eval.bootstrap_resamples' default
SEED = 0           # the resampling seed (fixed: the same inputs give the same interval)
LEVEL = 0.95
EQUIVALENCE_MARGIN = 0.05  # "about equal": the interval of the difference inside +-0.05 tau
HOLDS, REVERSED, NOT_SIGNIFICANT = "holds", "reversed", "not significant"
EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
# A bootstrap over a handful of prompts resamples the same few values: one prompt gives a
# zero-width "95% interval". Below this many prompts an interval is still shown, but judges nothing.
MIN_PROMPTS = 10
TOO_FEW = "too few prompts"


def _table(x) -> np.ndarray:
    """Per-prompt values as a seeds x prompts table (a flat list is one seed)."""
    return np.atleast_2d(np.asarray(x, float))


def _draws(n_seeds: int, n_prompts: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(seed draws R x S, prompt draws R x P). The prompts are drawn first, so one seed's intervals
    do not depend on whether seeds could have been drawn."""
    if resamples < 100:
        raise ValueError(f"a bootstrap needs at least 100 resamples, got {resamples}")
    _check_memory(resamples, n_seeds + n_prompts)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, n_prompts, size=(resamples, n_prompts))
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds)) if n_seeds > 1 else np.zeros((resamples, 1), int)
    return seeds, prompts


def _check_memory(resamples: int, columns: int) -> None:
    """Refuse a resample count whose draws (int64) and gathered values (float64) would not fit in
    half of the memory free now, before numpy tries to allocate them."""
    need = resamples * columns * 8 * 3
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > free / 2:
        raise UserError(f"eval.bootstrap_resamples: {resamples} resamples over {columns} prompts and seeds need about "
                        f"{need / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free; lower it "
                        f"({RESAMPLES} keeps the interval's Monte Carlo error near 0.005 tau)")


def _resampled(x: np.ndarray, draws) -> np.ndarray:
    """Sum of an S x P table over each resample's drawn seeds and prompts: one value per resample."""
    seeds, prompts = draws
    return x[seeds[:, :, None], prompts[:, None, :]].sum(axis=(1, 2))


def _ratio(num: np.ndarray, den: np.ndarray, draws) -> np.ndarray:
    return _resampled(num, draws) / np.maximum(_resampled(den, draws), 1e-12)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def ratio_ci(num, den, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """tau = sum(num) / sum(den) over prompts (and seeds: rows of a 2-D table), with its bootstrap interval."""
    num, den = _table(num), _table(den)
    draws = _draws(*num.shape, resamples, seed)
    lo, hi = _interval(_ratio(num, den, draws))
    return {"value": float(num.sum() / den.sum()), "lo": lo, "hi": hi, "prompts": num.shape[1], "seeds": num.shape[0]}


def paired_diff_ci(num_a, den_a, num_b, den_b, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """tau(A) - tau(B) on the same prompts (column i of A and of B is the same prompt; row s the
    same training seed)."""
    num_a, den_a, num_b, den_b = (_table(x) for x in (num_a, den_a, num_b, den_b))
    if not (num_a.shape == den_a.shape == num_b.shape == den_b.shape):
        raise ValueError("paired rows must be the same prompts (and seeds)")
    draws = _draws(*num_a.shape, resamples, seed)
    lo, hi = _interval(_ratio(num_a, den_a, draws) - _ratio(num_b, den_b, draws))
    value = float(num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum())
    return {"value": value, "lo": lo, "hi": hi, "prompts": num_a.shape[1], "seeds": num_a.shape[0]}


def too_few(diff: dict) -> bool:
    """Whether an interval rests on fewer than MIN_PROMPTS prompts (a diff without a count is
    taken as judged by its caller)."""
    return diff.get("prompts", MIN_PROMPTS) < MIN_PROMPTS


def verdict(diff: dict) -> str:
    """Claim "A > B" judged from the interval of tau(A) - tau(B) (with its prompt count)."""
    if too_few(diff):
        return TOO_FEW
    return HOLDS if diff["lo"] > 0 else REVERSED if diff["hi"] < 0 else NOT_SIGNIFICANT


def equivalence(diff: dict, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Claim "A ~ B": the interval inside +-margin (holds), wholly outside it (does not), or neither."""
    if too_few(diff):
        return TOO_FEW
    if -margin <= diff["lo"] and diff["hi"] <= margin:
        return EQUIVALENT
    if diff["lo"] > margin or diff["hi"] < -margin:
        return NOT_EQUIVALENT
    return INCONCLUSIVE


def _by_seed(rows) -> dict:
    """{seed: {(set, prompt_id): row}}; a row without "seed" is seed 0."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("seed", 0), {})[(r["set"], r["prompt_id"])] = r
    return out


def _shared_prompts(indexes: list[dict]) -> list:
    """The prompts of the first index that every index has, in the first one's order."""
    return [p for p in (indexes[0] if indexes else {}) if all(p in idx for idx in indexes)]


def _field(indexes: dict, seeds: list, prompts: list, *path: str) -> np.ndarray:
    """A seeds x prompts array of one field (`row[path[0]][path[1]]`)."""
    return np.array([[float(indexes[s][p][path[0]][path[1]]) for p in prompts] for s in seeds],
                    float).reshape(len(seeds), len(prompts))


def paired_rows(rows_a: list[dict], rows_b: list[dict], key: str, set_name: str | None = None):
    """(num_a, den_a, num_b, den_b) of block size `key` ("b4"), each a seeds x prompts array, for the
    prompts every seed of both runs has, matched by (set, prompt_id) and paired by training seed
    (a row without "seed" is seed 0); `set_name` None pools every set."""
    keep = lambda rows: [r for r in rows if key in r and (set_name is None or r["set"] == set_name)]
    ia, ib = _by_seed(keep(rows_a)), _by_seed(keep(rows_b))
    seeds = sorted(set(ia) & set(ib))
    order = _shared_prompts([idx[s] for s in seeds for idx in (ia, ib)])
    return (_field(ia, seeds, order, key, "emitted"), _field(ia, seeds, order, key, "cycles"),
            _field(ib, seeds, order, key, "emitted"), _field(ib, seeds, order, key, "cycles"))


def speedup_ci(rows: list[dict], key: str, resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """Plain over speculative time per output token at block size `key` ("b4") on the decoded
    prompts (of every training seed: the rows' "seed"), each a ratio of sums, with its bootstrap
    interval over prompts (and seeds) (None: no rows)."""
    rows = [r for r in rows if key in r and "plain" in r]
    if not rows:
        return None
    by_seed = _by_seed(rows)
    seeds = sorted(by_seed)
    order = _shared_prompts([by_seed[s] for s in seeds])
    pt, pn, st, sn = (_field(by_seed, seeds, order, a, b)
                      for a, b in (("plain", "time_s"), ("plain", "tokens"), (key, "time_s"), (key, "emitted")))
    draws = _draws(len(seeds), len(order), resamples, seed)
    samples = _ratio(pt, pn, draws) / np.maximum(_ratio(st, sn, draws), 1e-12)
    lo, hi = _interval(samples)
    return {"value": float((pt.sum() / pn.sum()) / (st.sum() / sn.sum())), "lo": lo, "hi": hi,
            "prompts": len(order), "seeds": len(seeds)}
