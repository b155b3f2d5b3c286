"""Optional rollouts backend: a serving engine (vLLM) instead of our transformers loop.

Why: on a GPU, continuous batching (finished rows are replaced by waiting prompts at once) and a
paged KV cache (bigger batches in the same memory) generate many times more tokens per second than
a static batch loop; see docs/pipeline.md. The engine gets the exact prompt token ids our own
`encode_chat` made, stops only on the target manifest's stop ids, and its answers fill the same
Arrow schema, so nothing downstream knows which backend ran.

vLLM is imported lazily, only here: it is GPU/Linux-only and not a dependency of this project.
"""
from __future__ import annotations

import importlib.util
import logging

from specauf.errors import UserError

log = logging.getLogger("specauf")

INSTALL_HINT = {"vllm": "rollouts.backend=vllm needs vLLM: pip install vllm (GPU, Linux)"}


def require_backend(backend: str) -> None:
    """Fail before any compute (one `error:` line) when the chosen engine is not installed."""
    if backend != "transformers" and importlib.util.find_spec(backend) is None:
        raise UserError(INSTALL_HINT[backend])


class VllmEngine:
    """vllm.LLM over the materialised target folder; answers rows like rollouts.generate_shard."""

    def __init__(self, target_dir, *, seed: int, trust_remote_code: bool = False):
        from vllm import LLM

        # dtype "auto" = the folder's dtype (target.dtype), as the transformers backend loads it.
        self.llm = LLM(model=str(target_dir), dtype="auto", seed=seed, trust_remote_code=trust_remote_code)

    def answer(self, rows: list[dict], params, *, row_seeds: list[int] | None,
               stop_ids: list[int]) -> list[tuple[list[int], str]]:
        """(response ids, finish reason) per row, response ending with its stop token when stopped."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def sampling(i: int) -> SamplingParams:
            # ignore_eos: stop on our stop ids only (they include eos), exactly as generate_batch.
            return SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                                  max_tokens=params.max_new_tokens, stop_token_ids=list(stop_ids), ignore_eos=True,
                                  seed=row_seeds[i] if row_seeds is not None else None, detokenize=False)

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in rows],
                                 [sampling(i) for i in range(len(rows))], use_tqdm=False)
        return [normalise(o.outputs[0], stop_ids) for o in outs]


def normalise(completion, stop_ids: list[int]) -> tuple[list[int], str]:
    """vLLM's CompletionOutput -> our (ids, "stop" | "length") convention."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop":
        if (not ids or ids[-1] not in stop_ids) and isinstance(completion.stop_reason, int):
            ids.append(completion.stop_reason)
        return ids, "stop"
    return ids, "length"


def count_disagreements(reference: list[tuple[list[int], str]], other: list[tuple[list[int], str]]) -> int:
    """Rows whose response or finish reason differ between two backends."""
    return sum(a != b for a, b in zip(reference, other))
