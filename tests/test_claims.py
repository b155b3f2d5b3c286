"""The claims (specauf/report/claims.py): each judged from the paired interval of its difference (holds,
reversed, not significant; equivalence inside +-0.05), point comparisons said to be such, and
not measured when a variant or a number is missing."""
import pytest

from specauf.report.claims import (FAILS, HOLDS, MET, NOT_MET, NOT_SIGNIFICANT, REVERSED, UNMEASURED, claim_auf_beats_decay,
                            claim_auf_decay_matches_auf, claim_decay_more_accurate, goals, train_metric)
from specauf.report.run import load_inputs
from tests.test_report import VARIANTS, _eval, _taus, _train, _write, failing, holding  # noqa: F401 (fixtures)


def test_claims_hold(holding):
    data = load_inputs(holding / "eval", holding / "train", VARIANTS)
    c1 = claim_auf_beats_decay(data)
    assert c1["status"] == HOLDS and len(c1["held"]) == 6 and not c1["failed"] and not c1["missing"]  # 2 sets + overall, B 2 and 4
    assert all(r["lo"] == pytest.approx(r["diff"]) for r in c1["held"])  # identical prompts: a zero-width interval
    c2 = claim_decay_more_accurate(data)
    assert (c2["status"], c2["decay"], c2["auf"]) == (HOLDS, 0.42, 0.38)
    c3 = claim_auf_decay_matches_auf(data)
    assert c3["status"] == HOLDS and [round(r["diff"], 6) for r in c3["rows"]] == [0.03, 0.03]
    g = goals(data)
    assert g["best"] == {"variant": "auf", "block_size": 4, "speedup": 2.4}
    assert g["over_plain"] == MET and g["over_peer"] == MET and g["ratio"] == pytest.approx(2.4 / 1.5)


def test_claims_do_not_hold(failing):
    data = load_inputs(failing / "eval", failing / "train", VARIANTS)
    c1 = claim_auf_beats_decay(data)
    assert c1["status"] == REVERSED
    assert [(r["set"], r["block_size"]) for r in c1["failed"]] == [("humaneval", 4)]
    # pooled over sets, prompts differ: the overall B=4 interval is wide enough to include 0
    assert len(c1["held"]) == 4 and [(r["set"], r["block_size"]) for r in c1["open"]] == [("overall", 4)]
    assert c1["open"][0]["lo"] < 0 < c1["open"][0]["hi"]
    assert claim_decay_more_accurate(data)["status"] == FAILS
    c3 = claim_auf_decay_matches_auf(data)
    assert c3["status"] == FAILS and c3["rows"][0]["diff"] == pytest.approx(0.2)
    g = goals(data)
    assert g["over_plain"] == NOT_MET and g["over_peer"] == NOT_MET
    assert g["best"]["speedup"] == 1.4 and g["ratio"] == pytest.approx(1.4 / 1.2)


def test_claims_not_measured_without_variants(holding):
    data = load_inputs(holding / "eval", holding / "train", ["decay", "auf"])
    assert claim_auf_decay_matches_auf(data)["status"] == UNMEASURED
    only = load_inputs(holding / "eval", holding / "train", ["auf"])
    assert claim_auf_beats_decay(only)["status"] == UNMEASURED
    assert claim_decay_more_accurate(only)["status"] == UNMEASURED


def test_accuracy_claim_needs_every_seed_to_agree():
    """Claim 2 has no prompt interval (a few held-out sequences): two seeds that disagree make it
    noise, even where the mean favours decay; seeds that agree decide it; seeds pair by number."""
    def grouped(decay, auf, seeds=(0, 1)):
        return {v: {"trains": [_train(a, 1.2) for a in accs], "seeds": list(seeds)} for v, accs in (("decay", decay), ("auf", auf))}
    noisy = claim_decay_more_accurate(grouped([0.236, 0.225], [0.276, 0.177]))
    assert noisy["status"] == NOT_SIGNIFICANT and noisy["decay"] == pytest.approx(0.2305) and noisy["seeds"] == [0, 1]
    assert "decay ahead in 1: seed 0 0.236 vs 0.276, seed 1 0.225 vs 0.177" in noisy["detail"]
    assert claim_decay_more_accurate(grouped([0.3, 0.3], [0.2, 0.29]))["status"] == HOLDS
    assert claim_decay_more_accurate(grouped([0.2, 0.2], [0.3, 0.21]))["status"] == FAILS
    one = claim_decay_more_accurate(grouped([0.3], [0.2], seeds=[0]))
    assert one["status"] == HOLDS and "one seed: a point comparison" in one["detail"]
    unpaired = {"decay": {"trains": [_train(0.3, 1.2)], "seeds": [0]}, "auf": {"trains": [_train(0.2, 1.2)], "seeds": [1]}}
    assert claim_decay_more_accurate(unpaired)["status"] == UNMEASURED


def test_train_metric_flat_or_nested():
    assert train_metric(_train(0.5, 1.2), "heldout/token_accuracy") == 0.5
    assert train_metric(_train(0.5, 1.2, nested=True), "heldout/acceptance_length") == 1.2
    assert train_metric({"heldout": {}}, "heldout/token_accuracy") is None


def test_dpace_claim_and_an_inconclusive_equivalence(holding):
    """Claim 4 (auf vs dpace) is judged like claim 1; an interval straddling +-0.05 is inconclusive."""
    import numpy as np

    from specauf.report.claims import INCONCLUSIVE, claim_auf_beats_dpace

    _write(holding, "dpace", _eval(_taus(1.80), speedup=2.0), _train(0.40, 1.6))
    data = load_inputs(holding / "eval", holding / "train", ["decay", "auf", "auf_decay", "dpace"])
    c4 = claim_auf_beats_dpace(data)
    assert c4["status"] == REVERSED and len(c4["failed"]) == 6  # auf 1.70 < dpace 1.80 on every prompt
    # auf_decay: prompts scattered around auf + 0.03, so the interval crosses +0.05
    rng = np.random.default_rng(0)
    for r in data["auf_decay"]["prompts"]:
        for k in ("b2", "b4"):
            r[k]["emitted"] = (data["auf"]["prompts"][0][k]["emitted"] / 10 + 0.03 + float(rng.normal(0, 0.2))) * 10
    c3 = claim_auf_decay_matches_auf(data)
    assert c3["status"] == INCONCLUSIVE, c3["detail"]
    assert NOT_SIGNIFICANT == "not significant"
    from specauf.report.run import render_markdown

    text = render_markdown(data)
    assert "| | tau decay | tau auf | auf - decay | tau dpace | auf - dpace |" in text.replace("|  |", "| |")
    assert "| this run: overall, inference B=4 | 1.600 | 1.800 | +0.200 | 1.900 | -0.100 |" in text
    assert "| paper: DFlash | 2.40 | 2.61 | +0.21 | – | – |" in text


def test_an_interval_over_too_few_prompts_judges_nothing(tmp_path):
    """Eval sets of one prompt give a zero-width '95% interval': once reported as a claim that
    holds. Below evidence.MIN_PROMPTS prompts the claim says so instead, and the report too."""
    from specauf import evidence
    from specauf.report.claims import TOO_FEW
    from specauf.report.run import write_report
    from tests.test_report import _prompt_rows

    m = tmp_path / "metrics"
    for variant, base in (("decay", 1.5), ("auf", 1.7), ("auf_decay", 1.72)):
        ev = _eval(_taus(base), speedup=1.5)
        _write(m, variant, ev, _train(0.4, 1.5), rows=_prompt_rows(ev, per_set=1))
    data = load_inputs(m / "eval", m / "train", VARIANTS)
    c1 = claim_auf_beats_decay(data)
    assert c1["status"] == TOO_FEW and not c1["held"] and all(r["lo"] == r["hi"] for r in c1["rows"])
    assert f"6 on fewer than {evidence.MIN_PROMPTS} prompts (judged nothing)" in c1["detail"]
    assert claim_auf_decay_matches_auf(data)["status"] == TOO_FEW
    write_report(m / "eval", m / "train", VARIANTS, tmp_path / "reports")
    assert "1. **auf tau > decay tau on every eval set: too few prompts.**" in (tmp_path / "reports/report.md").read_text()
    enough = evidence.paired_diff_ci([2.0] * 10, [1.0] * 10, [1.0] * 10, [1.0] * 10, resamples=100)
    assert evidence.verdict(enough) == evidence.HOLDS and evidence.verdict({**enough, "prompts": 9}) == TOO_FEW
