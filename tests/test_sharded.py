"""Sharded data stages: 2 processes write the bytes of 1 (manifests included), resume across
process counts, launcher argv, and the optional vLLM backend's params and missing-install error."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from specauf.data import rollouts as rollouts_mod
from specauf.config import ParamsError
from specauf.params_file import full_params, load_params
from specauf.data.prompts import write_prompt_sets
from tests.conftest import ROOT, Killed, die_after, prompt_rows
from tests.test_launch import LAUNCH_ENV

def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_params(path, **launch):
    """The smoke preset, shrunk to 13 prompts in 5 shards of 3 (odd counts: ranks get unequal shares)."""
    p = full_params(ROOT / "presets" / "smoke.yaml")
    p["rollouts"].update(max_new_tokens=8, batch_size=2, shard_size=3)
    p["labels"].update(batch_size=2, layer_ids=[0, 2])
    p["launch"] = {"processes": 1, **launch}
    path.write_text(yaml.safe_dump(p))
    return path


def launched(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a stage script the way DVC does: one plain `python stages/x.py` command, no launcher env."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", SPECAUF_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_two_processes_write_the_bytes_of_one_and_resume(tiny_target, tmp_path, monkeypatch):
    target = tiny_target[0]
    write_prompt_sets(tmp_path / "prompts", prompt_rows(13), {})
    one = write_params(tmp_path / "one.yaml")
    two = write_params(tmp_path / "two.yaml", processes=2)
    ds = write_params(tmp_path / "ds.yaml", processes=2, launcher="deepspeed")
    rollouts, labels = load_stage("rollouts"), load_stage("labels")
    common = ["--target", str(target)]

    # Reference: one process, in this process.
    rollouts.main(argv=["--params", str(one), *common, "--prompts",
                        str(tmp_path / "prompts"), "--out", str(tmp_path / "r1"), "--work", str(tmp_path / "w-r1")])
    labels.main(argv=["--params", str(one), *common, "--rollouts",
                      str(tmp_path / "r1"), "--out", str(tmp_path / "l1"), "--work", str(tmp_path / "w-l1")])

    # A one-process run killed after two of five shards ...
    real = rollouts_mod.generate_shard
    die_after(monkeypatch, rollouts_mod, "generate_shard", 2)
    work = tmp_path / "w-r2"
    with pytest.raises(Killed):
        rollouts.main(argv=["--params", str(one), *common, "--prompts",
                            str(tmp_path / "prompts"), "--out", str(tmp_path / "r2"), "--work", str(work)])
    monkeypatch.setattr(rollouts_mod, "generate_shard", real)
    assert sorted(p.name for p in work.glob("*.arrow")) == ["shard-00000.arrow", "shard-00001.arrow"]

    # ... is finished by two torchrun ranks (the script relaunches itself): the launch params are
    # not part of the work key, so they keep both shards and write the other three.
    proc = launched("rollouts.py", "--params", str(two), *common, "--prompts", str(tmp_path / "prompts"),
                    "--out", str(tmp_path / "r2"), "--work", str(work))
    assert "starting 2 processes per machine under torchrun" in proc.stderr
    assert "resumed: kept 2 finished shards, generated 3" in proc.stderr
    r1, r2 = files(tmp_path / "r1"), files(tmp_path / "r2")
    assert len(r1) == 6 and r2 == r1  # 5 shards + manifest, byte for byte
    assert not work.exists()

    # Labels from scratch on two ranks under the deepspeed launcher.
    proc = launched("labels.py", "--params", str(ds), *common, "--rollouts", str(tmp_path / "r2"),
                    "--out", str(tmp_path / "l2"), "--work", str(tmp_path / "w-l2"))
    assert "starting 2 processes per machine under deepspeed" in proc.stderr
    l1, l2 = files(tmp_path / "l1"), files(tmp_path / "l2")
    assert len(l1) == 6 and l2 == l1


def test_missing_input_is_one_line_before_any_launch(tmp_path):
    params = write_params(tmp_path / "two.yaml", processes=2)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "labels.py"), "--params", str(params),
                           "--target", str(tmp_path / "target"), "--rollouts", str(tmp_path / "rollouts"),
                           "--out", str(tmp_path / "labels")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'target' / 'manifest.json'}: missing (run the stage that produces it)"]


@pytest.mark.parametrize("text,message", [
    ("launch:\n  processes: 0\n", "launch.processes: Input should be greater than or equal to 1 (got 0)"),
    ("launch:\n  launcher: mpirun\n", "launch.launcher: Input should be 'torchrun' or 'deepspeed' (got 'mpirun')"),
    ("launch:\n  hostfile: hosts\n", "launch: hostfile needs launcher: deepspeed"),
    ("rollouts:\n  backend: tgi\n", "rollouts.backend: Input should be 'transformers' or 'vllm' (got 'tgi')"),
    ("rollouts:\n  crosscheck_prompts: -1\n", "rollouts.crosscheck_prompts: Input should be greater than or equal to 0"),
])
def test_bad_launch_and_backend_params(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_vllm_backend_missing_fails_first_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECAUF_VLLM_PYTHON", str(tmp_path / "no-python"))  # vLLM's venv absent
    params = tmp_path / "params.yaml"
    params.write_text("rollouts:\n  backend: vllm\n")
    rollouts = load_stage("rollouts")
    out = tmp_path / "rollouts"
    with pytest.raises(SystemExit) as code:  # missing target and prompts: the backend check comes first
        rollouts.main(argv=[
            "--params", str(params), "--target", str(tmp_path / "none"), "--prompts", str(tmp_path / "none"),
            "--out", str(out), "--work", str(tmp_path / "work")])
    assert code.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: vLLM is not installed: run `bash scripts/run.sh vllm` (or `specauf vllm install`), "
        "or set SPECAUF_VLLM_PYTHON to a Python with vllm"]
    assert not out.exists() and not (tmp_path / "work").exists()

