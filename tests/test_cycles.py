"""The decode accounting both the decode loop and the replay keep (specauf/evaluate/cycles.py)."""
from __future__ import annotations

import math

from specauf.evaluate.cycles import close_cycle, guesses_per_block, pool_cycles


def test_guesses_stop_at_max_new_tokens():
    assert guesses_per_block(7, 48, 1) == 7
    assert guesses_per_block(7, 48, 45) == 2 and guesses_per_block(7, 48, 47) == 0


def test_a_cycle_is_cut_after_its_stop_token_and_counts_attempts_by_the_rules():
    att, acc = [0] * 3, [0] * 3
    kept, stopped = close_cycle([5, 6, 7, 8], n=3, n_acc=3, stops=set(), attempted=att, accepted=acc)
    assert kept == [5, 6, 7, 8] and not stopped and att == [1, 1, 1] and acc == [1, 1, 1]
    kept, stopped = close_cycle([5, 9], n=3, n_acc=1, stops=set(), attempted=att, accepted=acc)
    assert kept == [5, 9] and att == [2, 2, 1] and acc == [2, 1, 1]  # k=2 attempted (and failed), k=3 never
    kept, stopped = close_cycle([5, 2, 7, 8], n=3, n_acc=3, stops={2}, attempted=att, accepted=acc)
    assert kept == [5, 2] and stopped and att == [3, 3, 1] and acc == [3, 2, 1]  # slot 3 cut by the stop


def test_pooled_tau_is_a_ratio_of_sums():
    s = pool_cycles(2, emitted=9, cycles=4, histogram=[0, 1, 2, 1], attempted=[4, 2], accepted=[3, 0])
    assert s["tau"] == 9 / 4 and s["acceptance_per_position"] == [0.75, 0.0] and s["prompts"] == 2
    assert math.isnan(pool_cycles(0, 0, 0, [], [1], [0])["tau"])
