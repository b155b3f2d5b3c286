"""The shape of specauf/: no import circle (lazy imports inside functions count too), no module
past 400 lines, every module has its tests/test_<module>.py, and the drafter module holds the model
only (what it reads from a target lives in specauf/target/access.py)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "specauf"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """{dotted module: file} of every module under specauf/."""
    root = PACKAGE.parent
    return {".".join(p.relative_to(root).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The specauf modules (dotted) a module imports anywhere in its body."""
    from specauf.codedeps import specauf_imports

    return (specauf_imports(path, PACKAGE.parent) & set(modules())) - {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)}


def test_no_import_circle():
    graph = {m: imports_of(p) for m, p in modules().items()}
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in done:
            return
        on_path.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        on_path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_checker_finds_a_circle(tmp_path, monkeypatch):
    """The walk above on a package that has one (a test that cannot fail proves nothing)."""
    pkg = tmp_path / "specauf"
    pkg.mkdir()
    (pkg / "a.py").write_text("from specauf.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from specauf import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    try:
        test_no_import_circle()
    except AssertionError as e:
        assert "specauf.a -> specauf.b -> specauf.a" in str(e)
    else:
        raise AssertionError("the circle a -> b -> a was not found")


def test_stage_packages_import_only_earlier_ones():
    """target < data < train < evaluate < serve < report: a package imports earlier ones and the
    core, never a later one; the core imports none (the `specauf` command excepted)."""
    from specauf.codedeps import order_violations

    assert order_violations() == []


def test_the_order_check_finds_a_backward_import(tmp_path):
    for pkg in ("specauf", "specauf/data", "specauf/train"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "specauf/data/rollouts.py").write_text("def f():\n    from specauf.train import drafter\n")
    (tmp_path / "specauf/train/drafter.py").write_text("from specauf.data import rollouts\n")
    (tmp_path / "specauf/config.py").write_text("from specauf.data.rollouts import f\n")
    from specauf.codedeps import order_violations

    assert order_violations(tmp_path) == ["specauf.config imports specauf.data.rollouts",
                                          "specauf.data.rollouts imports specauf.train.drafter"]


def test_no_module_past_400_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_module_has_its_test_file():
    """A newcomer changing specauf/<package>/<module>.py finds its tests in tests/test_<module>.py
    (a stage package's run.py: tests/test_<package>.py)."""
    tests = PACKAGE.parent / "tests"

    def test_file(module: str) -> str:
        parts = module.split(".")
        return f"test_{parts[-2] if parts[-1] == 'run' else parts[-1]}.py"

    missing = sorted(m for m in modules() if not m.endswith("__init__") and not (tests / test_file(m)).is_file())
    assert not missing, missing


def test_package_inits_are_empty():
    """A re-export in an __init__ would widen every stage's import closure (and rerun stages)."""
    full = [m for m, p in modules().items() if m.endswith("__init__") and m != "specauf.__init__" and p.read_text().strip()]
    assert not full, full


def test_drafter_module_is_the_model_only():
    """Top-level definitions of specauf/train/drafter.py: the config, the modules and their helpers."""
    tree = ast.parse((PACKAGE / "train" / "drafter.py").read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert names == {"DrafterConfig", "RMSNorm", "RotaryEmbedding", "rotate_half", "apply_rope",
                     "DrafterCache", "DrafterAttention", "DrafterMLP", "DrafterLayer", "BlockDrafter"}, names
