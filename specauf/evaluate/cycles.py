"""The decode accounting, stated once: how many guesses a cycle proposes, where a stop token cuts
it, which block positions count as attempted and accepted, and the pooled summary. The decode
loop (specauf/evaluate/decode.py) and the replay (specauf/evaluate/replay.py) both keep their
books with these, so replayed tau can equal decoded tau by construction, not by two copies
agreeing.

Conventions: the prefill's token belongs to no cycle; a cycle emits its accepted guesses and the
target's own token (the bonus), cut right after a stop token; block position k is attempted when
it was proposed, every earlier guess was accepted and its slot survived the cut.
"""
from __future__ import annotations


def guesses_per_block(n_max: int, max_new_tokens: int, committed: int) -> int:
    """Guesses a cycle proposes with `committed` tokens generated (the prefill's included): the
    last cycle never drafts past max_new_tokens."""
    return min(n_max, max_new_tokens - committed - 1)


def close_cycle(emitted: list[int], n: int, n_acc: int, stops: set[int], attempted: list[int],
                accepted: list[int]) -> tuple[list[int], bool]:
    """(the tokens the cycle keeps, whether it stopped), counting its attempted and accepted block
    positions into the two lists. `emitted` = the n_acc accepted guesses and the bonus."""
    stop_at = next((i for i, t in enumerate(emitted) if t in stops), None)
    if stop_at is not None:
        emitted = emitted[: stop_at + 1]
    for k in range(1, min(n, n_acc + 1, len(emitted)) + 1):
        attempted[k - 1] += 1
        accepted[k - 1] += int(k <= n_acc)
    return emitted, stop_at is not None


def pool_cycles(prompts: int, emitted: int, cycles: int, histogram: list[int], attempted: list[int],
                accepted: list[int]) -> dict:
    """The pooled summary of many prompts' cycles: tau as a ratio of sums (long outputs weigh
    more, as they do in wall-clock time), the emitted-length histogram, acceptance by position."""
    return {"prompts": prompts, "cycles": cycles, "decode_tokens": emitted,
            "tau": emitted / cycles if cycles else float("nan"),
            "length_histogram": histogram, "attempted": attempted, "accepted": accepted,
            "acceptance_per_position": [a / t if t else float("nan") for a, t in zip(accepted, attempted)]}
