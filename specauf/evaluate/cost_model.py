"""Why a block size wins or loses: the measured cost of one cycle against what it emits.

A speculative cycle costs one target forward of b tokens over the cached context (verify, with
the hidden states the drafter reads) plus one drafter call; plain decoding costs a 1-token forward
per token. So the speedup to expect is tau(b) x t_plain / (t_verify(b) + t_draft(b)). Measured in
the eval stage's own process, kernels and threads, right after its timed decode, interleaved over
repeats (A, B, A, B: a load change hits every contender alike), medians.
"""
from __future__ import annotations

import statistics
import time

import torch

from specauf.evaluate.decode import _sync
from specauf.target.access import cache_kwarg, rollback_cache, crop_cache

REPEATS = 15


@torch.inference_mode()
def measure_cycle_costs(target, proposer, prompt_ids: list[int], sizes: list[int], repeats: int = REPEATS) -> dict:
    """Median seconds of: a plain 1-token step, a verify forward of m = 1..max(sizes) tokens, and
    the drafter's proposal of b-1 guesses, all over the cache of `prompt_ids`."""
    device = next(target.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    P = prompt.shape[0]
    cache = rollback_cache(target)
    fwd = {cache_kwarg(target): cache, "use_cache": True}
    out = target(prompt[None], position_ids=torch.arange(P, device=device)[None], logits_to_keep=1,
                 output_hidden_states=True, **fwd)
    proposer.reset(prompt)
    proposer.add_context(out.hidden_states)
    seq = torch.cat([prompt, out.logits[0, -1:].argmax(-1)])
    proposer.propose(seq, 1)  # moves the prompt's features into the drafter's cache
    B = max(sizes)
    samples: dict[str, list[float]] = {}

    def clock(name, fn):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.setdefault(name, []).append(time.perf_counter() - t0)

    for _ in range(repeats):
        clock("plain", lambda: target(seq[-1:][None], position_ids=torch.tensor([[P]], device=device), **fwd))
        crop_cache(cache, P)
        for m in range(1, B + 1):
            block = seq[-1:].repeat(m)
            clock(f"verify{m}", lambda: target(block[None], position_ids=torch.arange(P, P + m, device=device)[None],
                                               output_hidden_states=True, **fwd))
            crop_cache(cache, P)
        for b in sizes:
            clock(f"draft{b}", lambda: proposer.propose(seq, b - 1))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"context_tokens": P, "repeats": repeats, "t_plain_s": med["plain"],
            "t_verify_s": {str(m): med[f"verify{m}"] for m in range(1, B + 1)},
            "t_verify_over_t_plain": {str(m): med[f"verify{m}"] / med["plain"] for m in range(1, B + 1)},
            "t_draft_s": {str(b): med[f"draft{b}"] for b in sizes}}


def predict_speedups(costs: dict, taus: dict[int, float], measured: dict[int, float]) -> dict:
    """Predicted speedup per block size from tau and the cycle costs, beside the measured one."""
    rows = {}
    for b, tau in taus.items():
        cycle = costs["t_verify_s"][str(b)] + costs["t_draft_s"][str(b)]
        rows[str(b)] = {"tau": tau, "cycle_over_t_plain": cycle / costs["t_plain_s"],
                        "predicted_speedup": tau * costs["t_plain_s"] / cycle, "measured_speedup": measured.get(b)}
    best = max(rows, key=lambda k: rows[k]["predicted_speedup"]) if rows else None
    return {**costs, "block_sizes": rows, "best_predicted_block_size": None if best is None else int(best)}
