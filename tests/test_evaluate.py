"""Eval stage logic: metrics accounting, the exactness gate, peers side by side."""
from __future__ import annotations

import statistics

import pytest
import torch

from specauf.evaluate import decode
from specauf.config import EvalParams
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.errors import ExactnessError
from specauf.evaluate.run import check_exactness, evaluate_drafter, headline, without_headline
from specauf.config import LabelsParams, RolloutsParams
from specauf.data.labels import run_labels
from specauf.data.rollouts import run_rollouts
from tests.conftest import prompt_rows


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    model, tok, manifest = tiny_model
    torch.manual_seed(0)
    config = DrafterConfig.from_target_config(model.config, num_layers=1, block_size=4,
                                              mask_token_id=manifest["mask_token_id"], target_layer_ids=[1, 2])
    drafter = BlockDrafter(config).eval()
    sets = {"a": prompt_rows(3, seed=1), "b": prompt_rows(3, seed=2)}
    for name, rows in sets.items():  # ids unique across sets, as the prompts stage guarantees
        for r in rows:
            r["prompt_id"] = f"{name}/{r['prompt_id']}"
    root = tmp_path_factory.mktemp("eval-answers")
    answers = [r for rows in sets.values() for r in rows]
    run_rollouts(model, tok, answers, RolloutsParams(max_new_tokens=16, batch_size=4), out_dir=root / "r", work_dir=root / "rw",
                 seed=0, stop_ids=manifest["stop_token_ids"], manifest_extra={})
    run_labels(model, root / "r", LabelsParams(layer_ids=[1, 2], feature_dtype="float32"), out_dir=root / "l",
               work_dir=root / "lw", pad_id=0, manifest_extra={})
    return model, tok, manifest, drafter, sets, root / "l"


def run(setup, **kw):
    model, tok, manifest, drafter, sets, labels_dir = setup
    params = EvalParams(**{"max_new_tokens": 12, "replay_max_new_tokens": 16, "block_sizes": [2, 4],
                           "prompt_lookup_num_tokens": 3, "prompts_per_set": 2, **kw})
    return evaluate_drafter(model, tok, drafter, sets, params, stop_ids=manifest["stop_token_ids"],
                            pad_id=manifest["pad_token_id"], seed=0, labels_dir=labels_dir)


def test_metrics_accounting_and_peers(setup):
    m = run(setup)
    assert m["exactness"] == {"checked": True, "mismatches": []}
    for key, b in (("b2", 2), ("b4", 4)):
        s = m["overall"][key]
        assert s["prompts"] == 6 and len(s["acceptance_per_position"]) == b - 1  # replayed: every prompt
        assert s["decoded"]["prompts"] == 4  # decoded: prompts_per_set of each set
        assert sum(s["length_histogram"]) == s["cycles"]
        assert sum(n * c for n, c in enumerate(s["length_histogram"])) == s["decode_tokens"]
        assert 1.0 <= s["tau"] <= b and s["tau"] == s["decode_tokens"] / s["cycles"]
        assert s["speedup"] == pytest.approx(m["overall"]["plain"]["time_per_output_token_s"] / s["decoded"]["time_per_output_token_s"])
        # per-set summaries pool into the overall one
        assert sum(m["sets"][n][key]["decode_tokens"] for n in ("a", "b")) == s["decode_tokens"]
        # the replay of the decoded prompts is the decode, cycle for cycle
        assert m["replay_check"]["pooled"][key]["difference"] == 0 and m["replay_check"]["prompts"] == 4
        cost = m["cost_model"]["block_sizes"][str(b)]
        assert cost["predicted_speedup"] == pytest.approx(s["tau"] / cost["cycle_over_t_plain"])
        assert cost["measured_speedup"] == s["speedup"]
    assert len(m["replay_prompts"]) == 6 and {r["set"] for r in m["replay_prompts"]} == {"a", "b"}
    assert set(m["cost_model"]["t_verify_s"]) == {"1", "2", "3", "4"} and m["cost_model"]["best_predicted_block_size"] in (2, 4)
    # the DVC metrics file: headline scalars only, each tau with its interval over prompts
    h = headline(m, 2000)
    assert h["overall"]["prompts"] == 6 and h["overall"]["decoded_prompts"] == 4 and h["sets"]["a"]["prompts"] == 3
    for key in ("b2", "b4"):
        o = h["overall"][key]
        assert o["tau"] == m["overall"][key]["tau"] and o["tau_lo"] <= o["tau"] <= o["tau_hi"]
        # the field's other tau: each prompt's own emitted / cycles, averaged (pooled stays the headline)
        own = [r[key]["emitted"] / r[key]["cycles"] for r in m["replay_prompts"]]
        assert o["tau_prompt_mean"] == pytest.approx(sum(own) / len(own))
        assert h["sets"]["a"][key]["tau_prompt_mean"] == pytest.approx(
            statistics.mean(r[key]["emitted"] / r[key]["cycles"] for r in m["replay_prompts"] if r["set"] == "a"))
        assert o["speedup"] == pytest.approx(m["overall"][key]["speedup"]) and o["speedup_lo"] <= o["speedup_hi"]
    assert h["replay_check_max_difference"] == 0 and h["tau_definition"].startswith("tau: pooled")
    leaves = lambda d: sum(leaves(v) if isinstance(v, dict) else 1 for v in d.values())
    assert leaves(h) < 40  # a screenful, not the details
    # ...and the details hold no figure of the headline; the report joins them back to the same values
    from specauf.report.run import with_headline

    d = without_headline(m, h)
    assert all(f not in d[part][key] for part, key, f in (("overall", "b2", "tau"), ("overall", "b4", "speedup")))
    assert "tau" not in d["sets"]["a"]["b4"] and "speedup" in d["sets"]["a"]["b4"]  # per-set speed: details only
    assert d["overall"]["b4"]["acceptance_per_position"] == m["overall"]["b4"]["acceptance_per_position"]
    joined = with_headline(d, h, "headline")
    for key in ("b2", "b4"):
        assert joined["overall"][key]["tau"] == m["overall"][key]["tau"]
        assert joined["sets"]["b"][key]["tau"] == m["sets"]["b"][key]["tau"]
    assert set(m["peers"]) == {"hf_plain", "hf_prompt_lookup"}
    assert m["peers"]["hf_plain"]["speedup_vs_hf_plain"] == 1.0
    assert m["machine"]["torch_threads"] == torch.get_num_threads()
    # every contender ran on one calibrated kernel plan, for rows 1..4 (our blocks), 1..4 (lookup 3 + 1)
    kernels = m["linear_kernels"]
    assert kernels["mode"] == "auto" and kernels["plan"]
    assert all(set(by_rows) == {1, 2, 3, 4} for by_rows in kernels["plan"].values())
    assert not any("_specauf_kernels" in mod.__dict__ for mod in setup[0].modules())  # target restored
    assert run(setup, linear_kernels="stock", prompt_lookup_num_tokens=0)["linear_kernels"] == {"mode": "stock", "plan": None}


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
