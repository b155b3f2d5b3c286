"""The paired cluster bootstrap: prompts are resampled whole, tau is a ratio of sums per resample."""
from __future__ import annotations

import numpy as np
import pytest

from specauf import evidence


def _rows(n=30, seed=1):
    rng = np.random.default_rng(seed)
    cycles = rng.integers(20, 60, n)
    emitted_a = cycles * rng.uniform(1.2, 1.8, n)
    emitted_b = emitted_a - cycles * rng.normal(0.05, 0.1, n)
    return emitted_a, cycles, emitted_b, cycles.copy()


def test_interval_equals_a_hand_loop_over_the_same_draws():
    a, ca, b, cb = _rows()
    idx = np.random.default_rng(evidence.SEED).integers(0, len(a), size=(evidence.RESAMPLES, len(a)))
    by_hand = []
    for draw in idx:
        ta = sum(a[i] for i in draw) / sum(ca[i] for i in draw)
        tb = sum(b[i] for i in draw) / sum(cb[i] for i in draw)
        by_hand.append(ta - tb)
    lo, hi = np.quantile(by_hand, [0.025, 0.975])
    d = evidence.paired_diff_ci(a, ca, b, cb)
    assert d["lo"] == pytest.approx(lo) and d["hi"] == pytest.approx(hi)
    assert d["value"] == pytest.approx(a.sum() / ca.sum() - b.sum() / cb.sum())  # ratio of sums, not mean of ratios
    one = evidence.ratio_ci(a, ca)
    assert one["lo"] < one["value"] < one["hi"] and one["prompts"] == 30


def test_pairing_removes_the_shared_prompt_difficulty():
    """Two variants that differ by a constant on every prompt: the paired interval is narrow even
    though each variant's own interval is wide (prompts differ a lot in difficulty)."""
    rng = np.random.default_rng(3)
    cycles = np.full(40, 50.0)
    base = rng.uniform(1.1, 2.5, 40) * cycles
    d = evidence.paired_diff_ci(base + 0.1 * cycles, cycles, base, cycles)
    own = evidence.ratio_ci(base, cycles)
    assert d["hi"] - d["lo"] < 1e-9 and own["hi"] - own["lo"] > 0.1
    assert evidence.verdict(d) == evidence.HOLDS


def test_verdicts():
    assert evidence.verdict({"lo": 0.01, "hi": 0.2}) == "holds"
    assert evidence.verdict({"lo": -0.2, "hi": -0.01}) == "reversed"
    assert evidence.verdict({"lo": -0.01, "hi": 0.2}) == "not significant"
    assert evidence.equivalence({"lo": -0.04, "hi": 0.03}) == "holds"
    assert evidence.equivalence({"lo": 0.06, "hi": 0.1}) == "does not hold"
    assert evidence.equivalence({"lo": 0.0, "hi": 0.08}) == "inconclusive"


def test_coverage_is_about_95_percent():
    """Simulated prompts with a known true difference: the interval covers it ~95% of the time."""
    rng = np.random.default_rng(7)
    covered = 0
    trials = 200
    for t in range(trials):
        cycles = rng.integers(20, 60, 40).astype(float)
        true_a, true_b = 1.6, 1.5
        a = cycles * (true_a + rng.normal(0, 0.3, 40))
        b = a - cycles * ((true_a - true_b) + rng.normal(0, 0.1, 40))
        d = evidence.paired_diff_ci(a, cycles, b, cycles, resamples=400, seed=t)
        covered += d["lo"] <= true_a - true_b <= d["hi"]
    assert 0.88 <= covered / trials <= 0.99, covered


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 100 resamples"):
        evidence.ratio_ci([1, 2], [1, 1], resamples=50)
    with pytest.raises(ValueError, match="same prompts"):
        evidence.paired_diff_ci([1, 2], [1, 1], [1], [1])


def test_paired_rows_match_prompts_by_set_and_id():
    a = [{"set": "s", "prompt_id": "1", "b2": {"emitted": 3, "cycles": 2}},
         {"set": "s", "prompt_id": "2", "b2": {"emitted": 5, "cycles": 4}},
         {"set": "t", "prompt_id": "1", "b2": {"emitted": 7, "cycles": 5}}]
    b = [{"set": "t", "prompt_id": "1", "b2": {"emitted": 6, "cycles": 5}},
         {"set": "s", "prompt_id": "1", "b2": {"emitted": 2, "cycles": 2}}]  # s/2 was not decoded by b
    assert evidence.paired_rows(a, b, "b2") == ([3, 7], [2, 5], [2, 6], [2, 5])
    assert evidence.paired_rows(a, b, "b2", "t") == ([7], [5], [6], [5])
    assert evidence.paired_rows(a, b, "b4") == ([], [], [], [])


def test_speedup_interval_is_a_ratio_of_ratios_over_prompts():
    rng = np.random.default_rng(3)
    rows = [{"set": "s", "prompt_id": str(i), "plain": {"tokens": 40, "time_s": float(t)},
             "b4": {"emitted": 40, "cycles": 20, "time_s": float(t) / s}}
            for i, (t, s) in enumerate(zip(rng.uniform(1, 3, 30), rng.uniform(1.1, 1.5, 30)))]
    ci = evidence.speedup_ci(rows, "b4")
    plain = sum(r["plain"]["time_s"] for r in rows) / 1200
    spec = sum(r["b4"]["time_s"] for r in rows) / 1200
    assert ci["value"] == pytest.approx(plain / spec) and ci["prompts"] == 30
    assert 1.1 < ci["lo"] < ci["value"] < ci["hi"] < 1.5
    same = [{**r, "b4": {**r["b4"], "time_s": r["plain"]["time_s"] / 2}} for r in rows]
    assert evidence.speedup_ci(same, "b4")["lo"] == pytest.approx(2.0)  # every prompt 2x: no spread
    assert evidence.speedup_ci(rows, "b8") is None
