"""The serving-engine seam (specauf/serve/engines.py): the serve stage's loop, exactness check and
pooling run through the Engine interface, whatever engine sits behind it."""
from __future__ import annotations

import json

import pytest

from specauf.artifacts import write_json
from specauf.config import Params
from specauf.errors import ExactnessError
from specauf.serve.engines import ENGINES, LlamaCppEngine, Served
from specauf.serve.gguf_export import TARGET_FILES
from specauf.serve.run import check_exact, gguf_models, serve_drafter

TEXT = "one two three four five six seven eight nine ten"


class ScriptedEngine:
    """An engine that answers from a script: plain greedy is TEXT; speculative runs accept two
    guesses a cycle and return TEXT's prefix, except where `wrong` names the contender."""
    name = "scripted"

    def __init__(self, wrong: set[int] = frozenset()):
        self.wrong, self.calls = wrong, []

    def describe(self):
        return {"engine": self.name, "version": "1"}

    def drafter_file(self, export_manifest):
        return "drafter.bin"

    def peers(self, serve_params):
        return []

    def decode(self, model, prompts, contenders, done=None):
        out = {}
        for c in contenders:
            self.calls.append((c.kind, model.name, c.n_max))
            if c.kind == "plain":
                out[c.key] = [Served(TEXT, 10, 100.0) for _ in prompts]
                continue
            text = TEXT.replace("five", "FIVE") if c.n_max in self.wrong else TEXT[: 5 * c.tokens]
            out[c.key] = [Served(text, c.tokens + 1, 150.0, accepted=[2, 2, 1])
                          for _ in prompts]
        return out


@pytest.fixture
def inputs(tmp_path):
    params = Params.model_validate({"eval": {"block_sizes": [2, 4], "prompts_per_set": 1, "max_new_tokens": 4,
                                             "replay_max_new_tokens": 8},
                                    "serve": {"targets": ["f32"], "ngram": None}})
    gguf = tmp_path / "target_gguf"
    gguf.mkdir()
    (gguf / TARGET_FILES["f32"]).write_bytes(b"gguf")
    export = tmp_path / "export"
    export.mkdir()
    (export / "drafter.bin").write_bytes(b"d")
    write_json(export / "manifest.json", {"schema_version": 1, "kind": "export"})
    decoded = [{"set": "s", "prompt_id": "a", "b2": {"emitted": 6, "cycles": 4}, "b4": {"emitted": 8, "cycles": 4}}]
    (tmp_path / "prompts.json").write_text(json.dumps({"decoded": decoded}))
    prompts = [{"set": "s", "prompt_id": "a", "text": "hi"}]
    return params, gguf, export, prompts, tmp_path / "prompts.json"


def test_the_serve_loop_runs_any_engine_and_pools_once(inputs):
    params, gguf, export, prompts, decoded = inputs
    engine = ScriptedEngine()
    metrics, rows = serve_drafter(params, "auf-0", gguf_models(gguf, params.serve), export, prompts, decoded, {"a": "one two"}, engine=engine)
    assert [c[0] for c in engine.calls] == ["plain", "draft-dflash", "draft-dflash"]
    assert metrics["engine"] == "scripted" and metrics["version"] == "1" and metrics["exactness"]["mismatches"] == []
    b4 = metrics["targets"]["f32"]["b4"]
    assert b4["tau"] == (5 + 3) / 3 and b4["acceptance"] == [1.0, 2 / 3, 0.0] and b4["speedup"] == 1.5
    assert b4["tau_ours_decoded"] == 2.0 and metrics["targets"]["f32"]["plain"]["our_greedy_agreement"] == {"equal": 1, "prompts": 1}
    check_exact(metrics, gate=True)


def test_an_output_that_leaves_plain_greedy_fails_the_gate_for_any_engine(inputs):
    params, gguf, export, prompts, decoded = inputs
    engine = ScriptedEngine(wrong={3})
    metrics, rows = serve_drafter(params, "auf-0", gguf_models(gguf, params.serve), export, prompts, decoded, engine=engine)
    assert "f32/s/a (b4)" in metrics["exactness"]["mismatches"]
    assert rows[0]["b4"]["equals_plain"] is False
    with pytest.raises(ExactnessError, match=r"^scripted speculative output differs from its plain greedy output: .*f32/s/a \(b4\)"):
        check_exact(metrics, gate=True)


def test_vllm_is_registered_and_turns_its_counters_into_cycles():
    from specauf.serve.engines import VllmEngine, cycles_from_counters

    assert ENGINES["vllm"] is VllmEngine and VllmEngine(1, None, [2]).drafter_file({}) == "."
    cycles = cycles_from_counters({"drafts": 5, "accepted_per_position": [3, 1, 0]}, 3)
    assert sorted(cycles) == [0, 0, 1, 1, 2] and (sum(cycles) + len(cycles)) / len(cycles) == 1 + 4 / 5


def test_llama_cpp_is_registered_and_says_what_it_ran():
    from specauf.serve import llamacpp

    assert ENGINES["llama.cpp"] is LlamaCppEngine
    e = LlamaCppEngine(threads=1)
    assert e.describe() == {"engine": "llama.cpp", "llama_cpp_commit": llamacpp.SDIST_COMMIT, "threads": 1,
                            "run_flags": list(llamacpp.RUN_FLAGS)}
    assert e.drafter_file({"gguf": {"file": "x.gguf"}}) == "x.gguf" and e.drafter_file({}) == "drafter.gguf"


@pytest.mark.parametrize("body, n_predict, n_accept, cycles", [
    ("ab", 2, 0, [0, 0]),                                               # nothing accepted
    ("\x1b[36mA\x1b[37m\x1b[36mB\x1b[37mcd\x1b[36mE\x1b[37mf", 6, 3, [2, 1, 0]),  # runs closed by a target token
    ("x\x1b[36mA\x1b[37m", 4, 2, [0, 2]),                              # the last cycle cut at end of generation
    ("xy", 4, 1, [0, 0, 1]),                                            # an end-of-generation cycle that printed nothing
])
def test_llama_cpp_cycles_are_read_from_its_coloured_output(body, n_predict, n_accept, cycles):
    from specauf.serve.llamacpp import cycles_from_colour

    got = cycles_from_colour(body, n_predict, n_accept)
    assert sorted(got) == sorted(cycles) and sum(got) == n_accept and len(got) == n_predict - n_accept


def test_llama_cpp_output_that_does_not_add_up_is_a_bug_not_a_figure():
    from specauf.serve.llamacpp import cycles_from_colour

    with pytest.raises(RuntimeError, match="shows 2 accepted guesses, its n_accept 1"):
        cycles_from_colour("\x1b[36mA\x1b[37m\x1b[36mB\x1b[37mc", 3, 1)
    with pytest.raises(RuntimeError, match="shows 3 cycles with accepted guesses, more than its 2"):
        cycles_from_colour("\x1b[36mA\x1b[37mb\x1b[36mC\x1b[37md\x1b[36mE\x1b[37mf", 5, 3)
