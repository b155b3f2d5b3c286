"""The worker that runs in vLLM's venv (specauf/vllm_worker.py), given a job through specauf.vllm.run_job
on the tiny trained workspace (tests.conftest.vllm_workspace): per-request counters add up to the
pooled ones of the same requests served at once, a DFlash engine answers what the plain one does,
and an engine that cannot start fails alone."""
from __future__ import annotations

from specauf import vllm


def test_a_job_runs_every_engine_and_its_counters_add_up(vllm_workspace):
    from specauf.data.generation import encode_chat
    from specauf.data.prompts import load_eval_prompts
    from specauf.target.run import load_target

    ws, _ = vllm_workspace
    _, tok, manifest = load_target(ws / "data/target")
    ids = [encode_chat(tok, [r["turns"][0]]) for rows in load_eval_prompts(ws / "data/prompts", None).values() for r in rows][:4]
    sampling = {"temperature": 0.0, "max_tokens": 24, "stop_token_ids": manifest["stop_token_ids"]}
    phases = [{"name": "one", "one_at_a_time": True, "prompts": ids, "sampling": sampling},
              {"name": "all", "one_at_a_time": False, "prompts": ids, "sampling": sampling}]
    spec = {"drafter": str((ws / "data/export/auf").resolve()), "num_speculative_tokens": 3}
    job = {"common": {"model": str((ws / "data/target").resolve()), "dtype": "float32", "seed": 0, "max_model_len": 256,
                      "max_num_seqs": 4},
           "engines": [{"key": "dflash", "speculative": spec, "phases": phases},
                       {"key": "missing", "speculative": {**spec, "drafter": str(ws / "no-such-export")}, "phases": phases},
                       {"key": "plain", "speculative": None, "phases": phases}]}
    answer = vllm.run_job(job, threads=1)
    assert answer["vllm_version"] == vllm.PACKAGE.split("==")[1]
    assert set(answer["engines"]["missing"]) == {"error"}  # fails alone; the plain engine after it ran
    dflash, plain = answer["engines"]["dflash"]["phases"], answer["engines"]["plain"]["phases"]
    tokens = lambda phase: [r["token_ids"] for r in phase["requests"]]
    assert tokens(dflash["one"]) == tokens(dflash["all"]) == tokens(plain["one"]) == tokens(plain["all"])
    assert all(0 < len(t) <= 24 for t in tokens(plain["one"]))
    assert "counters" not in plain["all"] and all("counters" not in r for r in plain["one"]["requests"])
    per_request = [r["counters"] for r in dflash["one"]["requests"]]
    pooled = dflash["all"]["counters"]
    for key in ("drafts", "draft_tokens", "accepted_tokens"):
        assert sum(c[key] for c in per_request) == pooled[key], key
    assert [sum(c["accepted_per_position"][i] for c in per_request) for i in range(3)] == pooled["accepted_per_position"]
    assert pooled["draft_tokens"] == 3 * pooled["drafts"] and pooled["accepted_tokens"] == sum(pooled["accepted_per_position"])
    assert pooled["accepted_tokens"] > 0 and all(r["seconds"] > 0 for r in dflash["one"]["requests"])
