"""The eval stage's cost model: what one cycle costs against what it emits."""
from __future__ import annotations

import pytest
import torch

from specauf.evaluate.cost_model import measure_cycle_costs, predict_speedups
from specauf.evaluate.decode import DrafterProposer, speculative_generate
from specauf.train.drafter import BlockDrafter, DrafterConfig


def test_predicted_speedup_is_tau_times_plain_over_the_cycle():
    costs = {"t_plain_s": 0.010, "t_verify_s": {"1": 0.010, "2": 0.012, "4": 0.020},
             "t_draft_s": {"2": 0.002, "4": 0.004}}
    out = predict_speedups(costs, {2: 1.4, 4: 1.8}, {2: 0.95})
    assert out["block_sizes"]["2"] == {"tau": 1.4, "cycle_over_t_plain": pytest.approx(1.4),
                                       "predicted_speedup": pytest.approx(1.0), "measured_speedup": 0.95}
    assert out["block_sizes"]["4"]["predicted_speedup"] == pytest.approx(1.8 * 0.010 / 0.024)
    assert out["block_sizes"]["4"]["measured_speedup"] is None  # not decoded at that size
    assert out["best_predicted_block_size"] == 2 and out["t_plain_s"] == 0.010
    assert predict_speedups(costs, {}, {})["best_predicted_block_size"] is None


@pytest.fixture(scope="module")
def proposer(tiny_model):
    model, _, manifest = tiny_model
    torch.manual_seed(0)
    config = DrafterConfig.from_target_config(model.config, num_layers=1, block_size=4,
                                              mask_token_id=manifest["mask_token_id"], target_layer_ids=[1, 2])
    return model, DrafterProposer(BlockDrafter(config).eval(), model)


def test_measures_every_verify_width_and_leaves_decoding_exact(proposer, tiny_model):
    model, prop = proposer
    _, tok, manifest = tiny_model
    ids = tok("def add(a, b):")["input_ids"]
    costs = measure_cycle_costs(model, prop, ids, [2, 4], repeats=3)
    assert costs["context_tokens"] == len(ids) and costs["repeats"] == 3
    assert sorted(costs["t_verify_s"]) == ["1", "2", "3", "4"] and sorted(costs["t_draft_s"]) == ["2", "4"]
    assert all(t > 0 for t in [costs["t_plain_s"], *costs["t_verify_s"].values(), *costs["t_draft_s"].values()])
    assert costs["t_verify_over_t_plain"]["2"] == pytest.approx(costs["t_verify_s"]["2"] / costs["t_plain_s"])
    # measuring touches neither model: decoding afterwards with the same proposer is still greedy
    kw = dict(max_new_tokens=10, stop_token_ids=manifest["stop_token_ids"], temperature=0.0)
    plain = speculative_generate(model, ids, block_size=1, **kw)
    spec = speculative_generate(model, ids, proposer=prop, block_size=4, **kw)
    assert spec.token_ids == plain.token_ids
