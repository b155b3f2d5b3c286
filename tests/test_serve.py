"""The serve stage's measurement (specauf/serve/run.py) on the tiny SmolLM2-tokenizer target: llama.cpp
plain, draft-dflash at each block size and the n-gram peer, every output checked against plain
greedy, tau beside our decode's on the same prompts, and the report's table."""
from __future__ import annotations

import pytest
import torch

from specauf.artifacts import write_json
from specauf.config import Params
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.serve.export import export_drafter
from specauf.report.render import served_lines
from specauf.errors import ExactnessError
from specauf.serve.run import check_exact, gguf_models, serve_drafter
from tests.test_export import save_drafter


def test_serve_drafter_measures_and_checks_every_output(llama_target, tmp_path):
    from specauf.evaluate.decode import DrafterProposer, speculative_generate
    from specauf.data.generation import encode_chat
    from specauf.target.run import load_target

    target_dir, target_gguf, tm = llama_target
    model, tok, _ = load_target(target_dir)
    params = Params.model_validate({"train": {"block_size": 4}, "eval": {"block_sizes": [2, 4], "max_new_tokens": 12},
                                    "serve": {"targets": ["f32"], "ngram_n_max": 2}})
    config = DrafterConfig.from_target_config(model.config, num_layers=1, block_size=4, mask_token_id=tm["mask_token_id"],
                                              target_layer_ids=[1, 2])
    save_drafter(tmp_path / "drafter", config, tm["fingerprint"], seed=1)
    export_drafter(tmp_path / "drafter", tmp_path / "export", target_dir, gguf_tokenizer=target_gguf)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf/f32.gguf").symlink_to(target_gguf)
    turns = {"a": "Name three rivers.", "b": "Count to five."}
    prompts = [{"set": "s", "prompt_id": k, "text": tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                                           add_generation_prompt=True)} for k, t in turns.items()]
    # our decode's rows on the same prompts, as the eval writes them (metrics/eval/RUN.prompts.json)
    drafter = BlockDrafter.from_pretrained(tmp_path / "drafter").eval()
    proposer = DrafterProposer(drafter, model, "short")
    rows, greedy = [], {}
    for k, t in turns.items():
        with torch.no_grad():
            ids = encode_chat(tok, [t])
            greedy[k] = tok.decode(model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):],
                                   skip_special_tokens=True)
        row = {"set": "s", "prompt_id": k}
        for b in (2, 4):
            r = speculative_generate(model, encode_chat(tok, [t]), proposer=proposer, block_size=b, max_new_tokens=12)
            row[f"b{b}"] = {"emitted": r.decode_tokens, "cycles": r.num_cycles}
        rows.append(row)
    write_json(tmp_path / "eval.prompts.json", {"decoded": rows})

    metrics, per_prompt = serve_drafter(params, "auf-0", gguf_models(tmp_path / "gguf", params.serve), tmp_path / "export", prompts,
                                        tmp_path / "eval.prompts.json", greedy)
    check_exact(metrics, gate=True)
    assert metrics["exactness"] == {"checked": 2, "mismatches": []}
    f32 = metrics["targets"]["f32"]
    assert set(f32) == {"plain", "b2", "b4", "ngram"} and f32["plain"]["tokens_per_s"] > 0
    assert f32["plain"]["our_greedy_agreement"] == {"equal": 2, "prompts": 2}  # llama.cpp's f32 target is ours
    for key, n_max in (("b2", 1), ("b4", 3), ("ngram", 2)):
        c = f32[key]
        cycles = [a for r in per_prompt for a in r[key]["accepted"]]
        assert c["cycles"] == len(cycles) > 0 and c["tau"] == pytest.approx((sum(cycles) + len(cycles)) / len(cycles))
        assert len(c["acceptance"]) == n_max and all(0 <= a <= 1 for a in c["acceptance"])
        assert c["speedup"] == pytest.approx(c["tokens_per_s"] / f32["plain"]["tokens_per_s"])
        assert all(r[key]["equals_plain"] for r in per_prompt)
    ours = sum(r["b4"]["emitted"] for r in rows) / sum(r["b4"]["cycles"] for r in rows)
    assert f32["b4"]["tau_ours_decoded"] == pytest.approx(ours)
    assert f32["b4"]["tau_minus_ours"] == pytest.approx(f32["b4"]["tau"] - ours)

    write_json(tmp_path / "serve/auf-0.json", metrics)
    lines = served_lines(tmp_path / "serve", {"auf": {"variant": "auf", "seed": 0}})
    assert lines[0] == "## Served by llama.cpp"
    assert any(line.startswith("| auf | f32 |") for line in lines)
    assert "every speculative output equals plain greedy; f32 plain greedy equals our target's on 2/2 prompts" in "\n".join(lines)


def test_exactness_gate_fails_the_stage():
    bad = {"engine": "llama.cpp", "exactness": {"checked": 3, "mismatches": ["f32/s/a (b4)"]}}
    with pytest.raises(ExactnessError, match="^llama.cpp speculative output differs from its plain greedy output: f32/s/a"):
        check_exact(bad, gate=True)
    check_exact(bad, gate=False)  # a warning, not a failure
