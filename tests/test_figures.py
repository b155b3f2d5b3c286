"""The report's figures: overlay rows behind dvc.yaml's top-level plots, and the offline PNG."""
from __future__ import annotations

import pytest

from specauf import evidence
from specauf.report.figures import overlay_rows, plot_acceptance, tau_interval
from specauf.report.run import load_inputs
from tests.test_report import PNG_SIGNATURE, _eval, _train, _write


def _rows(set_names, emitted_by_prompt, cycles=10):
    """Per-prompt replay rows at B=4 with the given emitted tokens per prompt."""
    return [{"set": name, "prompt_id": f"{name}/{i}", "b2": {"emitted": 12, "cycles": cycles},
             "b4": {"emitted": e, "cycles": cycles}}
            for name in set_names for i, e in enumerate(emitted_by_prompt)]


def _curve(root, run, name, column, values):
    path = root / "train" / run / "plots" / "metrics" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\t" + column + "\n" + "".join(f"{s}\t{v}\n" for s, v in values))


@pytest.fixture
def metrics(tmp_path):
    taus = {n: {2: 1.2, 4: 1.3} for n in ("overall", "humaneval", "mt-bench")}
    for variant, emitted in (("decay", [11, 12, 13, 14]), ("auf", [13, 14, 15, 20])):
        _write(tmp_path, variant, _eval(taus, 0.9), _train(0.2, 1.4), rows=_rows(("humaneval", "mt-bench"), emitted))
        _curve(tmp_path, f"{variant}-0", "loss.tsv", "loss", [(0, 5.0), (10, 4.0)])
    _curve(tmp_path, "auf-0", "heldout/acceptance_length.tsv", "acceptance_length", [(10, 1.4)])
    return tmp_path


def test_tau_rows_are_ratios_of_sums_with_the_bootstrap_interval(metrics):
    data = load_inputs(metrics / "eval", metrics / "train", ["decay", "auf"])
    rows = overlay_rows(data, metrics / "train", resamples=200)
    tau = {(r["variant"], r["set"]): r for r in rows["tau"]}
    assert sorted(tau) == sorted((v, s) for v in ("decay", "auf") for s in ("humaneval", "mt-bench", "overall"))
    # tau = emitted over cycles, summed over the set's prompts (not a mean of per-prompt ratios)
    assert tau["auf", "humaneval"]["tau"] == pytest.approx((13 + 14 + 15 + 20) / 40)
    assert tau["decay", "overall"]["tau"] == pytest.approx(2 * (11 + 12 + 13 + 14) / 80)
    assert all(r["block_size"] == 4 and r["lo"] <= r["tau"] <= r["hi"] for r in rows["tau"])
    wide = tau["auf", "humaneval"]
    assert wide["hi"] - wide["lo"] > 0.05  # the prompts differ, so the interval has width
    ci = tau_interval(data["auf"], 4, "humaneval", 200)
    auf = [r for r in data["auf"]["prompts"] if r["set"] == "humaneval"]
    assert ci == evidence.ratio_ci(*evidence.paired_rows(auf, auf, "b4")[:2], resamples=200)
    assert (wide["lo"], wide["hi"]) == (ci["lo"], ci["hi"])
    assert tau_interval(data["auf"], 8, None, 200) is None  # a block size nobody replayed


def test_acceptance_and_training_curves_are_labelled_by_run(metrics):
    rows = overlay_rows(load_inputs(metrics / "eval", metrics / "train", ["decay", "auf"]), metrics / "train", 100)
    acc = [r for r in rows["acceptance"] if r["run"] == "auf"]
    assert [(r["position"], r["acceptance"]) for r in acc] == [(1, 0.8), (2, 0.6), (3, 0.4)]
    assert {r["run"] for r in rows["loss"]} == {"decay", "auf"}
    assert [(r["step"], r["value"]) for r in rows["loss"] if r["run"] == "decay"] == [(0, 5.0), (10, 4.0)]
    assert rows["heldout_acceptance_length"] == [{"run": "auf", "step": 10, "value": 1.4}]  # decay logged none


def test_with_two_seeds_runs_are_named_and_tau_pools_them(metrics):
    taus = {n: {2: 1.2, 4: 1.3} for n in ("overall", "humaneval", "mt-bench")}
    for variant in ("decay", "auf"):
        _write(metrics, variant, _eval(taus, 0.9), _train(0.2, 1.4), seed=1,
               rows=_rows(("humaneval", "mt-bench"), [16, 16, 16, 16]))
    rows = overlay_rows(load_inputs(metrics / "eval", metrics / "train", ["decay", "auf"], [0, 1]), metrics / "train", 100)
    assert {r["run"] for r in rows["acceptance"]} == {"decay-0", "decay-1", "auf-0", "auf-1"}
    assert {r["run"] for r in rows["loss"]} == {"decay-0", "auf-0"}  # seed 1 logged no curves here
    pooled = next(r for r in rows["tau"] if (r["variant"], r["set"]) == ("auf", "humaneval"))
    assert pooled["tau"] == pytest.approx((13 + 14 + 15 + 20 + 4 * 16) / 80)


def test_png_is_written_from_the_same_rows(metrics):
    data = load_inputs(metrics / "eval", metrics / "train", ["decay", "auf"])
    png = plot_acceptance(data, overlay_rows(data, metrics / "train", 100)["tau"])
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
