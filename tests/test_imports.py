"""The shape of specauf/: no import circle (lazy imports inside functions count too), no module
past 400 lines, every module has its tests/test_<module>.py, and the drafter module holds the model
only (what it reads from a target lives in specauf/target_access.py)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "specauf"
MAX_LINES = 400


def imports_of(path: Path) -> set[str]:
    """The specauf modules a module imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "specauf":
            parts = node.module.split(".")
            found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("specauf.")}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return (found & modules) - {path.stem}


def test_no_import_circle():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in done:
            return
        on_path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        on_path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_checker_finds_a_circle(tmp_path, monkeypatch):
    """The walk above on a package that has one (a test that cannot fail proves nothing)."""
    (tmp_path / "a.py").write_text("from specauf.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from specauf import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    try:
        test_no_import_circle()
    except AssertionError as e:
        assert "a -> b -> a" in str(e)
    else:
        raise AssertionError("the circle a -> b -> a was not found")


def test_no_module_past_400_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_module_has_its_test_file():
    """A newcomer changing specauf/<module>.py finds its tests in tests/test_<module>.py."""
    tests = PACKAGE.parent / "tests"
    missing = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem != "__init__" and not (tests / f"test_{p.stem}.py").is_file())
    assert not missing, missing


def test_drafter_module_is_the_model_only():
    """Top-level definitions of specauf/drafter.py: the config, the modules and their helpers."""
    tree = ast.parse((PACKAGE / "drafter.py").read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert names == {"DrafterConfig", "RMSNorm", "RotaryEmbedding", "rotate_half", "apply_rope",
                     "DrafterCache", "DrafterAttention", "DrafterMLP", "DrafterLayer", "BlockDrafter"}, names
