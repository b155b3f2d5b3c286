"""The vLLM backend's conventions (specauf/data/vllm_backend.py), without vLLM: its completions follow our stop
convention, and disagreements between backends are counted."""
from __future__ import annotations

from types import SimpleNamespace

from specauf.data.vllm_backend import count_disagreements, normalise


def test_vllm_completion_follows_our_stop_convention():
    stop = [2, 7]
    out = lambda ids, reason, stop_reason=None: SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop_reason)
    assert normalise(out((5, 6, 7), "stop", 7), stop) == ([5, 6, 7], "stop")
    assert normalise(out((5, 6), "stop", 2), stop) == ([5, 6, 2], "stop")  # an engine that drops the stop id
    assert normalise(out((5, 6, 9), "length"), stop) == ([5, 6, 9], "length")
    assert count_disagreements([([1, 2], "stop"), ([3], "length")], [([1, 2], "stop"), ([3, 4], "length")]) == 1
