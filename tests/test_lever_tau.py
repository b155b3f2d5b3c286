"""benchmarks/lever_tau.py's comparison: each lever against its variant's default-params baseline."""
from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("lever_tau", ROOT / "benchmarks" / "lever_tau.py")
lever_tau = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lever_tau)


def rows(emitted_cycles: dict, seed: int) -> list[dict]:
    return [{"set": s, "prompt_id": p, "seed": seed, "b4": {"emitted": e, "cycles": c}}
            for (s, p), (e, c) in emitted_cycles.items()]


def test_each_lever_is_paired_with_its_variants_baseline():
    assert lever_tau.baseline_of("dpace_block_norm") == "dpace"
    assert lever_tau.baseline_of("auf_combined") == lever_tau.baseline_of("auf") == "auf"
    params = lever_tau.params_for({"train": {"variants": ["decay", "dpace", "auf"], "seeds": [0], "steps": 1600}},
                                  "auf_muon", 1, threads=1)
    assert params["train"]["variants"] == ["auf"] and params["train"]["seeds"] == [1]
    assert params["train"]["optimizer"] == "muon" and params["train"]["steps"] == lever_tau.MUON_STEPS


def test_domino_runs_are_paired_with_dflash_under_the_same_loss():
    from specauf.config import TrainParams

    for name, baseline in (("decay_domino", "decay"), ("dpace_domino", "dpace"), ("auf_domino_base", "auf"),
                           ("auf_domino_final", "auf")):
        assert lever_tau.baseline_of(name) == baseline
        params = lever_tau.params_for({"train": {"variants": ["decay"], "seeds": [0]}}, name, 1, threads=1)
        assert TrainParams.model_validate(params["train"]).domino is not None  # what stages/train.py validates
    assert TrainParams.model_validate(lever_tau.params_for({"train": {}}, "auf_domino_final", 0, 1)["train"]
                                      ).domino.auf_support == "final"


def test_comparison_is_the_paired_tau_difference_pooled_and_per_set():
    base = {("a", "p1"): (10, 8), ("a", "p2"): (12, 10), ("b", "p3"): (9, 9)}
    lever = {("a", "p1"): (12, 8), ("a", "p2"): (14, 10), ("b", "p3"): (9, 9)}
    data = {"auf": {s: rows(base, s) for s in (0, 1)}, "auf_block_norm": {s: rows(lever, s) for s in (0, 1)}}
    table = lever_tau.compare(data, ["auf_block_norm", "auf"], "b4", resamples=200)
    entry = next(e for e in table if e["run"] == "auf_block_norm")
    assert entry["baseline"] == "auf" and entry["seeds"] == [0, 1]
    assert entry["diff"]["all"]["value"] == pytest.approx(35 / 27 - 31 / 27)
    assert entry["diff"]["a"]["value"] == pytest.approx(26 / 18 - 22 / 18)
    assert entry["diff"]["b"]["value"] == 0.0 and entry["verdict"]["b"] == "too few prompts"  # one prompt judges nothing
    assert entry["tau"]["value"] == pytest.approx(35 / 27) and entry["tau"]["seeds"] == 2
    md = lever_tau.markdown(table, {"auf_block_norm": "8.1/8.3", "auf": "default/8.0"}, "B=4")
    assert "| auf_block_norm | loss_normalization=block | 1.296 [" in md and "| auf | (default params) |" in md


def test_a_data_lever_trains_on_its_own_rollouts_and_is_compared_with_the_default_data():
    base = {"base": {"torch_threads": 1}, "prompts": {"train": [{"source": "sharegpt", "count": 500}]},
            "rollouts": {"precision": "fp32", "batch_size": 32}}
    params = lever_tau.data_params(base, "bf16_rollouts_equal_minutes", threads=1)
    assert params["prompts"]["train"] == [{"source": "sharegpt", "count": lever_tau.BF16_EQUAL_MINUTES_PROMPTS}]
    assert params["rollouts"] == {"precision": "bf16", "batch_size": 32} and base["rollouts"]["precision"] == "fp32"
    same_prompts = lever_tau.data_params(base, "bf16_rollouts", threads=1)
    assert same_prompts["prompts"] == base["prompts"] and same_prompts["rollouts"]["precision"] == "bf16"
    # the default data's run of the variant is the baseline, never another run on other data
    assert lever_tau.baseline_of("auf_bf16_rollouts_equal_minutes") == "auf"
    assert lever_tau.baseline_of("dpace_bf16_rollouts_equal_minutes") == "dpace"
    assert lever_tau.RUNS["auf_bf16_rollouts"] == ("auf", {})
    assert lever_tau.describe("auf_bf16_rollouts_equal_minutes") == "rollouts.precision=bf16, prompts.train count=690"
    assert lever_tau.describe("auf") == "(default params)"
