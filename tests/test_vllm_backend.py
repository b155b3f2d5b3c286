"""The vLLM rollouts backend (specauf/data/vllm_backend.py): its answers follow our stop convention,
disagreements between backends are counted, and for real (vLLM's venv, tests.conftest.vllm_workspace)
the rollouts stage with `rollouts.backend: vllm` writes the transformers backend's rows, byte for
byte in every column, through one kept worker for every shard."""
from __future__ import annotations

from specauf.data.vllm_backend import count_disagreements, normalise


def test_vllm_answers_follow_our_stop_convention():
    stop = [2, 7]
    out = lambda ids, reason, stop_token=None: {"token_ids": ids, "finish_reason": reason, "stop_token": stop_token}
    assert normalise(out([5, 6, 7], "stop", 7), stop) == ([5, 6, 7], "stop")
    assert normalise(out([5, 6], "stop", 2), stop) == ([5, 6, 2], "stop")  # an engine that drops the stop id
    assert normalise(out([5, 6, 9], "length"), stop) == ([5, 6, 9], "length")
    assert count_disagreements([([1, 2], "stop"), ([3], "length")], [([1, 2], "stop"), ([3, 4], "length")]) == 1


def test_rollouts_through_vllm_equal_the_transformers_backend(vllm_workspace):
    from specauf.artifacts import iter_shards, read_manifest

    ws, _ = vllm_workspace
    params = ws.params({"target": {"source": "local", "path": str(ws / "src")},
                        "rollouts": {"max_new_tokens": 64, "backend": "vllm", "crosscheck_prompts": 2}})
    code, err = ws.run("rollouts", params, out=ws / "data/rollouts_vllm", work=ws / "work/rollouts_vllm")
    assert code == 0, err

    def rows(d):
        m = read_manifest(d, kind="rollouts")
        return m, [r for t in iter_shards(d, m) for r in t.to_pylist()]

    (m_t, ours), (m_v, theirs) = rows(ws / "data/rollouts"), rows(ws / "data/rollouts_vllm")
    assert len(ours) == 8 and len(m_v["shards"]) == 3  # three shards: one kept worker served them all
    assert theirs == ours  # prompt ids, answers and finish reasons, row for row


def test_conversations_through_vllm_equal_the_transformers_backend(vllm_workspace):
    """Multi-turn rows (a Hugging Face dataset read with hf.user_turns: all): vLLM answers each
    turn after its own earlier answers exactly as the transformers backend does."""
    import datasets

    from specauf.artifacts import iter_shards, read_manifest

    ws, _ = vllm_workspace
    chats = ws / "chats.parquet"
    words = "fox dog robot paint story apple".split()
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"tell me about the {w}"},
                                              {"role": "assistant", "content": "a reply from the data"},
                                              {"role": "user", "content": f"and the number {i}?"}]}
                                for i, w in enumerate(words)]).to_parquet(str(chats))
    over = {"target": {"source": "local", "path": str(ws / "src")},
            "prompts": {"train": [{"source": "hf", "count": 6, "hf": {"path": str(chats), "user_turns": "all"}}]},
            "rollouts": {"max_new_tokens": 24, "shard_size": 4, "crosscheck_prompts": 0}}
    code, err = ws.run("prompts", ws.params(over), out=ws / "data/prompts_chats")
    assert code == 0, err
    tables = {}
    for backend in ("transformers", "vllm"):
        params = ws.params({**over, "rollouts": {**over["rollouts"], "backend": backend}})
        out = ws / f"data/rollouts_chats_{backend}"
        code, err = ws.run("rollouts", params, prompts=ws / "data/prompts_chats", out=out, work=ws / f"work/chats_{backend}")
        assert code == 0, (backend, err)
        tables[backend] = [r for t in iter_shards(out, read_manifest(out)) for r in t.to_pylist()]
    assert len(tables["vllm"]) == 6 and tables["vllm"] == tables["transformers"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ws / "data/target")
    assert all(tok.decode(r["prompt_ids"]).count("and the number") == 1 for r in tables["vllm"])  # the second turn was asked
