"""The package's shape, read from its code: which specauf modules a file imports (at top level or
inside a function), each stage script's import closure (what dvc.yaml must list as its code
deps), and the order of the stage packages (each imports only earlier ones and the core).

`specauf deps` prints the closures and `specauf deps --write` puts them into dvc.yaml, so nobody
keeps some two hundred dep lines by hand; tests/test_codedeps.py checks dvc.yaml equals them.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The stage packages in pipeline order: a package may import an earlier one, never a later one.
# Everything else under specauf/ is the core (params, artifacts, running a stage, shared leaves),
# which imports no stage package; the `specauf` command (cli) is the one entry above them all.
VERBS = ("target", "data", "train", "evaluate", "serve", "report")
ENTRY = "specauf.cli"


def module_file(module: str, root: Path = ROOT) -> str:
    rel = module.replace(".", "/")
    return f"{rel}.py" if (root / f"{rel}.py").is_file() else f"{rel}/__init__.py"


def specauf_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names of the specauf modules a file imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "specauf":
            found.add(node.module)
            base = root / node.module.replace(".", "/")
            found |= {f"{node.module}.{a.name}" for a in node.names if (base / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "specauf"}
    return found


def import_closure(script: str, root: Path = ROOT) -> set[str]:
    """The files a stage script runs: itself and every specauf module reachable through imports,
    with each package's __init__ on the way (Python runs them; the top one holds the version
    every manifest records)."""
    files, todo = {script}, [script]
    while todo:
        for module in specauf_imports(root / todo.pop(), root):
            parts = module.split(".")
            inits = [module_file(".".join(parts[:i]), root) for i in range(1, len(parts))]
            for f in (module_file(module, root), *inits):
                if f not in files and (root / f).is_file():
                    files.add(f)
                    todo.append(f)
    return files


def verb_of(module: str) -> str | None:
    """The stage package a dotted module belongs to (None: the core)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in VERBS else None


def order_violations(root: Path = ROOT) -> list[str]:
    """`A imports B` for every import that breaks the pipeline order."""
    out = []
    for path in sorted((root / "specauf").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        if module == ENTRY:
            continue
        mine = verb_of(module)
        for dep in sorted(specauf_imports(path, root)):
            theirs = verb_of(dep)
            if theirs is None:
                continue
            if mine is None or VERBS.index(theirs) > VERBS.index(mine):
                out.append(f"{module} imports {dep}")
    return out


def stage_code_deps(dvc_yaml: Path) -> dict[str, list[str]]:
    """{stage: its sorted code deps}, for every stage of dvc.yaml (from its command's script)."""
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: sorted(import_closure(spec["cmd"].split()[1], dvc_yaml.parent)) for name, spec in stages.items()}


def write_code_deps(dvc_yaml: Path) -> list[str]:
    """Replace each stage's code deps in dvc.yaml (text edit: comments and layout stay); return
    the stages whose list changed."""
    wanted = stage_code_deps(dvc_yaml)
    lines, out, changed, stage = dvc_yaml.read_text().splitlines(keepends=True), [], [], None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  ([a-z_]+):", line)
        if m:
            stage = m.group(1)
        if line.rstrip() == "    deps:" and stage in wanted:
            out.append(line)
            i += 1
            old = []
            while i < len(lines) and re.match(r"^      - .*\.py$", lines[i].rstrip()):
                old.append(lines[i].strip()[2:])
                i += 1
            out += [f"      - {f}\n" for f in wanted[stage]]
            if old != wanted[stage]:
                changed.append(stage)
            continue
        out.append(line)
        i += 1
    dvc_yaml.write_text("".join(out))
    return changed
