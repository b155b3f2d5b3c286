"""dvc.yaml's code deps are exactly what each stage imports (transitively), read from the code
(specauf/codedeps.py; `specauf deps --write` regenerates them)."""
from __future__ import annotations

import shutil

import yaml

from specauf.codedeps import import_closure, stage_code_deps, write_code_deps
from tests.conftest import ROOT


def test_closure_sees_lazy_imports_and_package_inits():
    closure = import_closure("stages/eval.py")
    assert "specauf/train/drafter.py" in closure  # imported inside run()
    assert {"specauf/__init__.py", "specauf/evaluate/__init__.py", "specauf/train/__init__.py"} <= closure
    assert "specauf/report/run.py" not in import_closure("stages/train.py")


def test_code_deps_are_each_stages_import_closure():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    generated = stage_code_deps(ROOT / "dvc.yaml")
    for name, spec in stages.items():
        spec = spec.get("do", spec)
        code = sorted(d for d in spec["deps"] if d.endswith(".py"))
        script = spec["cmd"].split()[1]  # `python stages/<script>.py [constant flags]`
        assert script in code, (name, script)
        assert code == generated[name], (name, sorted(set(code) ^ set(generated[name])))
        data = [d for d in spec["deps"] if not d.endswith(".py")]
        assert all(d.startswith(("data/", "metrics/")) for d in data), (name, data)


def test_write_puts_the_closures_into_dvc_yaml_and_keeps_the_rest(tmp_path):
    """A stale dvc.yaml (a dep missing, one too many) is rewritten to the closures; the comments,
    params and outs stay as they were."""
    for name in ("specauf", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "dvc.yaml").read_text()
    stale = text.replace("      - specauf/train/losses.py\n", "", 1).replace(
        "      - specauf/artifacts.py\n", "      - specauf/artifacts.py\n      - specauf/verify.py\n", 1)
    assert stale != text
    (tmp_path / "dvc.yaml").write_text(stale)
    changed = write_code_deps(tmp_path / "dvc.yaml")
    assert changed and (tmp_path / "dvc.yaml").read_text() == text
    assert write_code_deps(tmp_path / "dvc.yaml") == []
