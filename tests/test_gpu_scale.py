"""benchmarks/gpu_scale.py, the pipeline without DVC: DVC's stage commands, in DVC's order and names."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import yaml

from specauf.params_file import full_params
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_scale", ROOT / "benchmarks" / "gpu_scale.py")
gpu_scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_scale)


def test_stages_run_as_dvc_names_and_orders_them():
    params = full_params(ROOT / "presets" / "smollm2-gpu-scale.yaml")
    commands = gpu_scale.stage_commands(params, ROOT)
    names = [name for name, _ in commands]
    assert names == list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    train = dict(commands)["train"]
    assert [env["DVC_STAGE"] for env, _ in train] == [f"train@{v}-{s}" for v in ("decay", "dpace", "auf") for s in (0, 1)]
    assert all(argv[:2] == [sys.executable, "stages/train.py"] for _, argv in train)
    # every stage's inputs are made by a stage that runs before it (or are source files)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    made: set[str] = set()
    for name in names:
        for dep in stages[name].get("deps", []):
            if dep.startswith("data/") and not dep.startswith("data/inputs"):
                root = "/".join(dep.split("/")[:2]).split("$")[0]
                assert any(m.startswith(root) for m in made), f"{name} reads {dep} before it is made"
        for out in stages[name].get("outs", []):
            made.add(next(iter(out)) if isinstance(out, dict) else out)


def test_only_none_writes_the_filled_params_and_runs_nothing(tmp_path):
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--preset",
                    str(ROOT / "presets" / "smollm2-gpu-scale.yaml"), "--set", "train.steps=7", "--only", "none",
                    "--workspace", str(tmp_path), "--out", str(tmp_path / "out")],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    written = yaml.safe_load((tmp_path / "out" / "params.yaml").read_text())
    expected = full_params(ROOT / "presets" / "smollm2-gpu-scale.yaml")
    expected["train"]["steps"] = 7
    assert written == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["params.yaml"]
    assert not (tmp_path / "data").exists()


def test_collect_keeps_what_the_report_reads(tmp_path):
    ws, out = tmp_path / "ws", tmp_path / "out"
    (ws / "metrics" / "eval").mkdir(parents=True)
    (ws / "metrics" / "eval" / "auf-0.json").write_text("{}")
    (ws / "data" / "target").mkdir(parents=True)
    (ws / "data" / "target" / "manifest.json").write_text('{"kind": "target"}')
    (ws / "data" / "target" / "model.safetensors").write_bytes(b"weights")
    gpu_scale.collect(ws, out)
    assert (out / "metrics" / "eval" / "auf-0.json").read_text() == "{}"
    assert (out / "data" / "target" / "manifest.json").read_text() == '{"kind": "target"}'
    assert not (out / "data" / "target" / "model.safetensors").exists()
