"""Command line: the `specauf` tool and the shared runner behind every `stages/<name>.py`."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from specauf.artifacts import ArtifactError, hash_obj, versions
from specauf.config import ParamsError, Params, full_params_yaml, load_params, params_doc, section_dict

log = logging.getLogger("specauf")
USER_ERRORS = (ParamsError, ArtifactError, ValueError, FileNotFoundError)


def stage_main(name: str, run, add_args=None, argv=None) -> None:
    """Parse `--params` and stage paths, load and validate params, run, turn user errors into one line.

    Bad input exits with status 2 and a single `error: ...` line naming the culprit; outputs are
    only ever replaced whole (see artifacts.atomic_dir), so a failed stage destroys nothing.
    """
    from specauf.runtime import setup_logging

    parser = argparse.ArgumentParser(prog=f"stages/{name}.py")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging(name)
    try:
        params = load_params(args.params)
        run(params, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full writing {e.filename or 'stage output'}: nothing finished was replaced", file=sys.stderr)
            sys.exit(2)
        raise


def stage_manifest_extra(params: Params, *sections: str, target: dict | None = None, **inputs: str) -> dict:
    """What every manifest records about its making: params hash (of the sections read), versions,
    the target fingerprint, and the sha256 of each input's manifest (`rollouts=dir` ->
    `rollouts_manifest_sha256`)."""
    from specauf.artifacts import sha256_file

    extra = {"params_hash": hash_obj(section_dict(params, *sections)), "versions": versions()}
    if target is not None:
        extra["target_fingerprint"] = target["fingerprint"]
    for name, directory in inputs.items():
        extra[f"{name}_manifest_sha256"] = sha256_file(Path(directory) / "manifest.json")
    return extra


PROJECT_FILES = ["dvc.yaml", "stages", "specauf", "pyproject.toml", ".dvcignore"]


def new_workspace(dest: Path, preset: str) -> None:
    """A fresh git+DVC workspace running this pipeline with a preset's params (for demos and tests)."""
    root = Path(__file__).resolve().parent.parent
    preset_file = root / "presets" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise ValueError(f"--preset: no preset {preset!r} (have: {', '.join(p.stem for p in (root / 'presets').glob('*.yaml'))})")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest}: directory is not empty")
    for name in PROJECT_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(preset_file, dest / "params.yaml")
    (dest / ".gitignore").write_text("__pycache__/\n/data/.work/\n")
    bin_dir = str(Path(sys.executable).parent)  # the venv's dvc and python, also when PATH lacks them
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "GIT_AUTHOR_NAME": "specauf", "GIT_AUTHOR_EMAIL": "specauf@localhost",
           "GIT_COMMITTER_NAME": "specauf", "GIT_COMMITTER_EMAIL": "specauf@localhost"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "spec-auf workspace"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="specauf", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check-params", help="validate a params file and print the sections")
    p.add_argument("params", nargs="?", default="params.yaml")
    p = sub.add_parser("params-doc", help="print docs/params.md (generated from the field docstrings)")
    p.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the generated text")
    p = sub.add_parser("fill-params", help="rewrite a params file with every key spelled out (DVC needs them all)")
    p.add_argument("params")
    p = sub.add_parser("new", help="create a git+DVC workspace with a params preset (e.g. smoke)")
    p.add_argument("dest", type=Path)
    p.add_argument("--preset", default="smoke")
    p = sub.add_parser("export", help="write a trained drafter in the DFlash layout SGLang and vLLM load")
    p.add_argument("drafter", type=Path, help="a train output, e.g. data/drafters/auf")
    p.add_argument("out", type=Path)
    p.add_argument("--target", type=Path, help="its target folder (needed for a draft vocabulary; checks the fingerprint)")
    p.add_argument("--strict", action="store_true", help="fail unless the engines run exactly the evaluated drafter")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "check-params":
            params = load_params(args.params)
            print(f"{args.params}: ok ({', '.join(Params.model_fields)})")
            print(f"train variants: {', '.join(params.train.variants)}")
        elif args.cmd == "params-doc":
            text = params_doc()
            if args.check:
                if Path(args.check).read_text() != text:
                    print(f"error: {args.check} is out of date; regenerate with `specauf params-doc > {args.check}`", file=sys.stderr)
                    sys.exit(1)
            else:
                sys.stdout.write(text)
        elif args.cmd == "fill-params":
            path = Path(args.params)
            header = "".join(l for l in path.read_text().splitlines(keepends=True) if l.startswith("#"))
            text = full_params_yaml(load_params(path), header)
            Path(path).write_text(text)
            print(f"{path}: every key written")
        elif args.cmd == "new":
            new_workspace(args.dest, args.preset)
            print(f"created {args.dest}: cd there and run `dvc repro`")
        elif args.cmd == "export":
            from specauf.export import export_drafter
            from specauf.runtime import setup_logging

            setup_logging("export")  # its warning (a drafter the engines run differently) must show
            m = export_drafter(args.drafter, args.out, args.target, strict=args.strict)
            print(f"wrote {args.out}: {m['architecture']}, {len(m['tensors'])} tensors"
                  + ("" if m["reference_equivalent"] else "; NOT reference-equivalent, see `differences` in its manifest.json"))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
