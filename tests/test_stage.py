"""The stage runner (specauf/stage.py): which run a train/eval/export instance is."""
from __future__ import annotations

import pytest

from specauf.params_file import parse_params


def test_stages_refuse_a_run_outside_the_params(tmp_path, monkeypatch):
    """A DVC_STAGE (or --variant/--seed) naming a variant or seed that train.variants/train.seeds do
    not list is refused; the matrix item `auf-1` is variant auf, seed 1."""
    from specauf.errors import UserError
    from specauf.stage import stage_run

    params = parse_params({"train": {"variants": ["decay", "auf"], "seeds": [0, 1]}})
    monkeypatch.setenv("DVC_STAGE", "train@auf-1")
    assert stage_run(params, "train", None, None) == ("auf", 1)
    assert stage_run(params, "train", "decay", None) == ("decay", 0)  # a lone --variant: the first seed
    monkeypatch.setenv("DVC_STAGE", "train@full-0")
    with pytest.raises(UserError, match=r"'full' is not in train.variants"):
        stage_run(params, "train", None, None)
    monkeypatch.setenv("DVC_STAGE", "train@auf-7")
    with pytest.raises(UserError, match=r"--seed: 7 is not in train.seeds \(0, 1\)"):
        stage_run(params, "train", None, None)
    monkeypatch.setenv("DVC_STAGE", "train@auf")
    with pytest.raises(UserError, match=r"not `train@<variant>-<seed>`"):
        stage_run(params, "train", None, None)
    monkeypatch.setenv("DVC_STAGE", "eval@auf-0")
    with pytest.raises(UserError, match="pass --variant"):
        stage_run(params, "train", None, None)
