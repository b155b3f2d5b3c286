"""Process setup: the log format (levels), progress that does not flood a log file, threads."""
from __future__ import annotations

import logging
import time

import torch

from specauf import runtime


def test_progress_into_a_log_file_writes_few_plain_lines(monkeypatch, capsys):
    """stderr captured (not a terminal): a line per interval, each its own line, and a new postfix
    every step does not force a line (it made one 67 KB line of a stage's log before)."""
    monkeypatch.setattr(runtime, "NON_TTY_INTERVAL", 0.25)
    monkeypatch.delenv("SPECAUF_NO_PROGRESS", raising=False)  # the suite silences bars; this test needs one
    with runtime.progress(total=40, desc="train auf-0", unit="step") as bar:
        for i in range(40):
            time.sleep(0.025)
            bar.update(1)
            bar.set_postfix(loss=1.0 / (i + 1))
    lines = [line.strip("\r ") for line in capsys.readouterr().err.split("\n") if line.strip()]
    assert 2 <= len(lines) <= 8, lines
    assert lines[-1].startswith("train auf-0: 40/40 step [") and "step/s" in lines[-1] and "loss=" in lines[-1]
    assert all("\r" not in line for line in lines)


def test_warnings_name_their_level(capsys):
    formatter = runtime.StageFormatter("labels")
    info = logging.LogRecord("specauf", logging.INFO, __file__, 1, "wrote %s", ("data/labels",), None)
    warn = logging.LogRecord("specauf", logging.WARNING, __file__, 1, "labels differ at %d positions", (3,), None)
    assert formatter.format(info) == "[labels] wrote data/labels"
    assert formatter.format(warn) == "[labels] WARNING: labels differ at 3 positions"


def test_setup_applies_threads_and_seed():
    from specauf.config import BaseParams

    before = torch.get_num_threads()
    try:
        device = runtime.setup(BaseParams(seed=3, torch_threads=1, device="cpu"), "t")
        assert device.type == "cpu" and torch.get_num_threads() == 1
        a = torch.rand(3)
        runtime.setup(BaseParams(seed=3, torch_threads=1, device="cpu"), "t")
        assert torch.equal(a, torch.rand(3))
    finally:
        torch.set_num_threads(before)
