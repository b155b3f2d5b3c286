"""Several processes for one stage: self-relaunch under a launcher, and the rank group's shard split.

A DVC stage command stays one line (`python stages/rollouts.py ...`). When `launch.processes` > 1
and no launcher started this process (no RANK/WORLD_SIZE in the environment), the stage replaces
itself with `torchrun` or `deepspeed` running the same script and arguments; every rank then
finds the launcher's environment and runs the stage body. Params reach the launcher only as
argv list items (os.execv, never a shell).

Inside, `RankGroup` splits the work: shard i belongs to rank i % N. The shard partition itself
(rows per shard, batches per shard) never depends on N, so N processes write exactly the shards
one process would; rank 0 waits for the others (a gloo barrier) and writes the manifest last.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from pathlib import Path

from specauf.errors import UserError
from specauf.config import LaunchParams

log = logging.getLogger("specauf")

# Ranks wait at the barrier for the slowest one: on a resumed run one rank may still have many
# shards left while the others have none, so the wait is bounded by the stage, not by seconds.
# A crashed rank does not leave the others waiting: the launcher tears the whole group down.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


def under_launcher(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_argv(launch: LaunchParams, script: str, args: list[str], python: str = sys.executable,
                  master_port: int | None = None) -> list[str]:
    """The argv that runs `script args` as launch.processes ranks per machine.

    The launchers run as `python -m ...` of this interpreter, so no PATH lookup picks another
    environment's torchrun or deepspeed.
    """
    n = str(launch.processes)
    if launch.launcher == "torchrun":
        # --standalone: a local rendezvous on a free port (several runs may share a machine).
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n, script, *args]
    argv = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", n,
            "--master_port", str(master_port or free_port()), "--no_local_rank"]
    if launch.hostfile is not None:
        argv += ["--hostfile", launch.hostfile]
    return [*argv, script, *args]


def relaunch_if_needed(launch: LaunchParams, stage: str, inputs: dict[str, str] | None = None,
                       argv: list[str] | None = None) -> None:
    """Replace this process by the launcher when several processes are asked for and none runs us.

    Returns (doing nothing) for one process or when already under a launcher. `inputs` (directory
    -> manifest kind) are checked first: a missing upstream output is then one `error:` line with
    exit status 2, not N rank errors and the launcher's failure report.
    """
    if launch.processes == 1 or under_launcher():
        return
    if launch.hostfile is not None and not Path(launch.hostfile).is_file():
        raise UserError(f"launch.hostfile: {launch.hostfile} does not exist")
    from specauf.artifacts import read_manifest

    for directory, kind in (inputs or {}).items():
        read_manifest(directory, kind=kind)
    argv = sys.argv if argv is None else argv
    cmd = launcher_argv(launch, argv[0], list(argv[1:]))
    log.info("%s: starting %d processes per machine under %s", stage, launch.processes, launch.launcher)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def rank_device(device):
    """On CUDA each rank of a launched group takes its LOCAL_RANK device; CPU stays CPU."""
    import torch

    local_rank, world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device.type != "cuda" or world == 1:
        return device
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"launch.processes: local rank {local_rank} has no GPU "
                         f"({torch.cuda.device_count()} visible); use at most one process per GPU")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


class RankGroup:
    """This process's place among the stage's ranks (rank 0 of 1 without a launcher)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._pg = None
        if self.world > 1:
            import torch.distributed as dist

            # gloo whatever the device: the group only synchronises and sums a few counters, and
            # gloo needs no GPU binding (NCCL would, and would add nothing here).
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self._pg = dist.group.WORLD
            if self.rank:
                os.environ["SPECAUF_NO_PROGRESS"] = "1"  # one progress bar (rank 0's), not N interleaved
                log.setLevel(logging.WARNING)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard_index: int) -> bool:
        return shard_index % self.world == self.rank

    def barrier(self) -> None:
        if self._pg is not None:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, value: int | float) -> float:
        """Sum of `value` over all ranks (every rank gets it)."""
        if self._pg is None:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def close(self) -> None:
        if self._pg is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._pg = None


def open_work(group: RankGroup, work_dir, key: dict):
    """The shared resumable work dir: rank 0 creates (or wipes stale) it first, then the others join."""
    from specauf.artifacts import ShardedWork

    work = ShardedWork(work_dir, key) if group.is_main else None
    group.barrier()
    return work if work is not None else ShardedWork.join(work_dir)


def collect_entries(work, count: int) -> list[dict]:
    """Every shard's entry from the work dir (whichever rank wrote it), in shard order; rank 0
    calls this after the barrier, so a missing shard means a rank failed without saying so."""
    from specauf.artifacts import ArtifactError

    entries = [work.done(i) for i in range(count)]
    missing = [i for i, e in enumerate(entries) if e is None]
    if missing:
        raise ArtifactError(f"{work.dir}: shard {missing[0]} is missing after all ranks finished")
    return entries
