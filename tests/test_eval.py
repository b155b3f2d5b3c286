"""Eval stage logic: metrics accounting, the exactness gate, peers side by side."""
from __future__ import annotations

import pytest
import torch

from specauf import decode
from specauf.config import EvalParams
from specauf.drafter import BlockDrafter, DrafterConfig
from specauf.evaluate import ExactnessError, check_exactness, evaluate_drafter, plot_rows
from tests.conftest import prompt_rows


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, tok, manifest = tiny_model
    torch.manual_seed(0)
    config = DrafterConfig.from_target_config(model.config, num_layers=1, block_size=4,
                                              mask_token_id=manifest["mask_token_id"], target_layer_ids=[1, 2])
    drafter = BlockDrafter(config).eval()
    sets = {"a": prompt_rows(2, seed=1), "b": prompt_rows(2, seed=2)}
    return model, tok, manifest, drafter, sets


def run(setup, **kw):
    model, tok, manifest, drafter, sets = setup
    params = EvalParams(**{"max_new_tokens": 12, "block_sizes": [2, 4], "prompt_lookup_num_tokens": 3, **kw})
    return evaluate_drafter(model, tok, drafter, sets, params, stop_ids=manifest["stop_token_ids"],
                            pad_id=manifest["pad_token_id"], seed=0)


def test_metrics_accounting_and_peers(setup):
    m = run(setup)
    assert m["exactness"] == {"checked": True, "mismatches": []}
    for key, b in (("b2", 2), ("b4", 4)):
        s = m["overall"][key]
        assert s["prompts"] == 4 and len(s["acceptance_per_position"]) == b - 1
        assert sum(s["length_histogram"]) == s["cycles"]
        assert sum(n * c for n, c in enumerate(s["length_histogram"])) == s["decode_tokens"]
        assert 1.0 <= s["tau"] <= b
        assert s["speedup"] == pytest.approx(m["overall"]["plain"]["time_per_output_token_s"] / s["time_per_output_token_s"])
        # per-set summaries pool into the overall one
        assert sum(m["sets"][n][key]["decode_tokens"] for n in ("a", "b")) == s["decode_tokens"]
    assert set(m["peers"]) == {"hf_plain", "hf_prompt_lookup"}
    assert m["peers"]["hf_plain"]["speedup_vs_hf_plain"] == 1.0
    assert m["machine"]["torch_threads"] == torch.get_num_threads()
    # every contender ran on one calibrated kernel plan, for rows 1..4 (our blocks), 1..4 (lookup 3 + 1)
    kernels = m["linear_kernels"]
    assert kernels["mode"] == "auto" and kernels["plan"]
    assert all(set(by_rows) == {1, 2, 3, 4} for by_rows in kernels["plan"].values())
    assert not any("_specauf_kernels" in mod.__dict__ for mod in setup[0].modules())  # target restored
    assert run(setup, linear_kernels="stock", prompt_lookup_num_tokens=0)["linear_kernels"] == {"mode": "stock", "plan": None}
    acceptance, emitted = plot_rows(m)
    assert {r["block_size"] for r in acceptance} == {"b2", "b4"} and emitted


def test_exactness_gate_catches_a_broken_cache(setup, monkeypatch):
    monkeypatch.setattr(decode, "crop_cache", lambda cache, length: None)  # inject the bug
    m = run(setup)
    assert m["exactness"]["mismatches"], "a target cache that is never cropped must change the output"
    with pytest.raises(ExactnessError) as err:
        check_exactness(m, gate=True)
    msg = str(err.value)
    assert "\n" not in msg and "exactness gate" in msg
    assert any(pid in msg for pid in ("a/p000", "a/p001", "b/p000", "b/p001"))
    check_exactness(m, gate=False)  # gate off: reported, not fatal
