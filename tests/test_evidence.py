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
    as_lists = lambda cols: tuple(c.tolist() for c in cols)
    assert as_lists(evidence.paired_rows(a, b, "b2")) == ([[3, 7]], [[2, 5]], [[2, 6]], [[2, 5]])
    assert as_lists(evidence.paired_rows(a, b, "b2", "t")) == ([[7]], [[5]], [[6]], [[5]])
    assert all(c.size == 0 for c in evidence.paired_rows(a, b, "b4"))


def test_paired_rows_pair_seeds_and_keep_prompts_every_seed_has():
    row = lambda seed, pid, e: {"seed": seed, "set": "s", "prompt_id": pid, "b2": {"emitted": e, "cycles": 2}}
    a = [row(0, "1", 3), row(0, "2", 4), row(1, "1", 5), row(1, "2", 6), row(2, "1", 9)]
    b = [row(1, "2", 16), row(1, "1", 15), row(0, "1", 13), row(0, "2", 14)]  # seed 2 only in a
    num_a, den_a, num_b, _ = evidence.paired_rows(a, b, "b2")
    assert num_a.tolist() == [[3, 4], [5, 6]] and num_b.tolist() == [[13, 14], [15, 16]]  # rows = seeds 0, 1
    assert den_a.shape == (2, 2)
    a.remove(row(1, "2", 6))  # prompt 2 missing from one seed: dropped from every seed
    assert evidence.paired_rows(a, b, "b2")[0].tolist() == [[3], [5]]


def test_two_level_interval_equals_a_hand_loop_over_seeds_then_prompts():
    rng = np.random.default_rng(5)
    cycles = rng.integers(20, 60, (3, 25)).astype(float)
    a = cycles * rng.uniform(1.2, 1.8, (3, 25))
    b = a - cycles * rng.normal(0.05, 0.1, (3, 25))
    draw = np.random.default_rng(evidence.SEED)
    prompts = draw.integers(0, 25, size=(300, 25))
    seeds = draw.integers(0, 3, size=(300, 3))
    by_hand = []
    for ps, ss in zip(prompts, seeds):
        tot = lambda x: sum(x[s, p] for s in ss for p in ps)
        by_hand.append(tot(a) / tot(cycles) - tot(b) / tot(cycles))
    d = evidence.paired_diff_ci(a, cycles, b, cycles, resamples=300)
    lo, hi = np.quantile(by_hand, [0.025, 0.975])
    assert (d["lo"], d["hi"]) == (pytest.approx(lo), pytest.approx(hi)) and (d["seeds"], d["prompts"]) == (3, 25)


def test_one_seed_table_gives_the_flat_interval_and_seed_spread_widens_it():
    a, ca, b, cb = _rows()
    flat, table = evidence.paired_diff_ci(a, ca, b, cb), evidence.paired_diff_ci([a], [ca], [b], [cb])
    assert (flat["lo"], flat["hi"]) == (pytest.approx(table["lo"]), pytest.approx(table["hi"]))
    # three seeds: A beats B by 0.2 under two of them and loses by 0.2 under the third. Each seed's
    # own interval excludes 0; resampling seeds must not.
    cycles = np.full((3, 40), 50.0)
    base = np.random.default_rng(2).uniform(1.1, 2.5, (3, 40)) * cycles
    shift = np.array([[0.2], [0.2], [-0.2]]) * cycles
    for s in range(3):
        assert evidence.verdict(evidence.paired_diff_ci(base[s] + shift[s], cycles[s], base[s], cycles[s])) != evidence.NOT_SIGNIFICANT
    pooled = evidence.paired_diff_ci(base + shift, cycles, base, cycles)
    assert evidence.verdict(pooled) == evidence.NOT_SIGNIFICANT and pooled["lo"] < 0 < pooled["hi"]


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
    two = rows + [{**r, "seed": 1} for r in same]  # a second seed at 2x: the interval spans both seeds
    ci2 = evidence.speedup_ci(two, "b4")
    assert ci2["seeds"] == 2 and ci2["prompts"] == 30 and ci2["lo"] < ci["hi"] and ci2["hi"] > 1.9


def test_a_resample_count_beyond_memory_is_one_line_not_an_allocation():
    """eval.bootstrap_resamples: 1e12 once tried to allocate 21.8 TiB: the params cap it, and a
    count within the cap that would not fit in half the free memory is refused by name."""
    from specauf.errors import UserError
    from specauf.params_file import parse_params

    with pytest.raises(UserError, match=r"eval\.bootstrap_resamples: Input should be less than or equal to 1000000"):
        parse_params({"eval": {"bootstrap_resamples": 10**12}})
    a, ca, b, cb = _rows(n=500)
    with pytest.raises(UserError, match=r"^eval\.bootstrap_resamples: 900000000 resamples over 501 prompts and seeds need "
                                        r"about [0-9.]+ GiB, more than half of the [0-9.]+ GiB free; lower it"):
        evidence.paired_diff_ci(a, ca, b, cb, resamples=900_000_000)
