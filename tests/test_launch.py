"""Several processes for one stage (specauf/launch.py): the launcher's argv is plain items (no shell),
and no relaunch for one process or under a launcher."""
from __future__ import annotations

import pytest

from specauf.config import LaunchParams
from specauf.errors import UserError
from specauf.launch import launcher_argv, relaunch_if_needed

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_launcher_argv_is_a_list_of_plain_items():
    py = "/venv/bin/python"
    assert launcher_argv(LaunchParams(processes=4), "stages/labels.py", ["--out", "a b;c"], python=py) == [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "stages/labels.py", "--out", "a b;c"]
    ds = LaunchParams(processes=8, launcher="deepspeed", hostfile="my hosts;$(x)")
    assert launcher_argv(ds, "stages/rollouts.py", [], python=py, master_port=29555) == [
        py, "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port", "29555", "--no_local_rank",
        "--hostfile", "my hosts;$(x)", "stages/rollouts.py"]


def test_no_relaunch_for_one_process_or_under_a_launcher(monkeypatch, tmp_path):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    relaunch_if_needed(LaunchParams(processes=1), "rollouts")  # returns: nothing to start
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    relaunch_if_needed(LaunchParams(processes=2), "rollouts")  # already a rank: returns
    monkeypatch.delenv("RANK")
    with pytest.raises(UserError, match="launch.hostfile: .*nohosts does not exist"):
        relaunch_if_needed(LaunchParams(processes=2, launcher="deepspeed", hostfile=str(tmp_path / "nohosts")), "x")
