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


def start_vllm(target_dir, device, prompt_rows: list[dict], params, *, seed: int, trust_remote_code: bool = False):
    """(engine, tokenizer, target manifest). Greedy: first answer the first `crosscheck_prompts`
    prompts with the transformers backend and warn with the count of rows vLLM answers otherwise.

    The transformers model is freed before vLLM starts: vLLM reserves most of the GPU's memory.
    """
    import gc

    import torch
    from transformers import AutoTokenizer

    from specauf.rollouts import answer_rows, encode_prompts
    from specauf.target import load_target, read_target_manifest

    check = params.crosscheck_prompts if params.temperature == 0 else 0
    if check:
        model, tokenizer, manifest = load_target(target_dir, device, trust_remote_code=trust_remote_code)
        rows = encode_prompts(tokenizer, prompt_rows, params)[0][:check]
        stop_ids = manifest["stop_token_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        reference = answer_rows(model, rows, params, seed=seed, stop_ids=stop_ids, pad_id=pad_id)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        manifest = read_target_manifest(target_dir)
        tokenizer = AutoTokenizer.from_pretrained(target_dir, trust_remote_code=trust_remote_code)
    engine = VllmEngine(target_dir, seed=seed, trust_remote_code=trust_remote_code)
    if check and rows:
        got = engine.answer(rows, params, row_seeds=None, stop_ids=manifest["stop_token_ids"])
        differ = count_disagreements([reference[i] for i in range(len(rows))], got)
        if differ:
            log.warning("WARNING: vLLM and transformers greedy answers differ on %d of the first %d prompts "
                        "(kernels and reduction order differ across engines, most in bf16/fp16: exact "
                        "agreement is not guaranteed)", differ, len(rows))
        else:
            log.info("vLLM and transformers greedy answers agree on the first %d prompts", len(rows))
    return engine, tokenizer, manifest


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
