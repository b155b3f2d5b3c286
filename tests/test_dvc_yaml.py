"""dvc.yaml's code deps are exactly what each stage imports (transitively), read from the code."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT


def specauf_imports(path: Path) -> set[str]:
    """Modules of the specauf package a file imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "specauf":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "specauf"}
    return found


def module_file(module: str) -> str:
    rel = module.replace(".", "/")
    return f"{rel}.py" if (ROOT / f"{rel}.py").is_file() else f"{rel}/__init__.py"


def import_closure(script: str) -> set[str]:
    """The files a stage script runs: itself and every specauf module reachable through imports
    (with the package's __init__, which holds the version every manifest records)."""
    files, todo = {script}, [script]
    while todo:
        for module in specauf_imports(ROOT / todo.pop()):
            for f in (module_file(module), "specauf/__init__.py"):
                if f not in files:
                    files.add(f)
                    todo.append(f)
    return files


def test_closure_sees_lazy_imports():
    assert "specauf/drafter.py" in import_closure("stages/eval.py")  # imported inside run()
    assert "specauf/report.py" not in import_closure("stages/train.py")


def test_code_deps_are_each_stages_import_closure():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        spec = spec.get("do", spec)
        code = {d for d in spec["deps"] if d.endswith(".py")}
        script = spec["cmd"].split()[1]  # `python stages/<script>.py [constant flags]`
        assert script in code, (name, script)
        assert code == import_closure(script), (name, sorted(code ^ import_closure(script)))
        data = [d for d in spec["deps"] if not d.endswith(".py")]
        assert all(d.startswith(("data/", "metrics/")) for d in data), (name, data)
