"""The shared runner behind every `stages/<name>.py`: params, one-line errors, which instance runs."""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
from pathlib import Path

from specauf.artifacts import hash_obj, versions
from specauf.config import Params, parse_run_name, section_dict
from specauf.errors import UserError
from specauf.params_file import parse_params, read_params_yaml


@contextlib.contextmanager
def one_line_errors():
    """User errors, a full disk, an unwritable output and Ctrl-C/SIGTERM end in one `error:` line
    (exit 2, or 128 + the signal); anything else is a bug and keeps its traceback."""
    def on_term(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term) if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else None
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; finished outputs are untouched and a rerun resumes", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full writing {e.filename or 'stage output'}: nothing finished was replaced", file=sys.stderr)
            sys.exit(2)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"error: cannot write {e.filename or 'an output'}: {os.strerror(e.errno)}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def unchanged_since(path, started_with, when: str) -> None:
    """Refuse a params file that differs from `started_with` (parsed YAML), naming the first
    changed key: DVC records the params it reads when a stage ends, so a value edited while the
    stage ran (`dvc exp run -S` leaves its edit behind even when refused) would be recorded beside
    outputs made with the old one."""
    now, then = _flat(read_params_yaml(path)), _flat(started_with)
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k, "<absent>") != then.get(k, "<absent>"))
    if changed:
        k = changed[0]
        raise UserError(f"{path}: {k} changed while {when} ({then.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
                        f"{f', and {len(changed) - 1} more keys' if len(changed) > 1 else ''}); nothing was recorded for this "
                        "stage, whose outputs would mix two settings: rerun `dvc repro` to make them with the file as it is now")


def _dvc_process() -> str | None:
    """`<pid>-<start time>` of the `dvc repro` (or `dvc exp run`) running this stage: the nearest
    ancestor process whose environment lacks DVC_STAGE (DVC sets it for the commands it starts)."""
    pid = os.getppid()
    while pid > 1:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None  # no /proc (not Linux): the stage-level check alone
        if not any(e.startswith(b"DVC_STAGE=") for e in environ):
            return f"{pid}-{stat[19]}"
        pid = int(stat[1])
    return None


def same_params_through_the_repro(path, started_with) -> None:
    """Under `dvc repro`, every stage runs with the params file the repro's first stage read: the
    first one leaves its parsed copy in .dvc/tmp/specauf-repro/, the next ones compare with it."""
    repro = _dvc_process() if os.environ.get("DVC_STAGE") else None
    if repro is None:
        return
    from specauf.artifacts import read_json, write_json

    folder = Path(os.environ.get("DVC_ROOT", ".")) / ".dvc" / "tmp" / "specauf-repro"
    mine = folder / f"{repro}.json"
    if mine.is_file():
        unchanged_since(path, read_json(mine)["params"], "this `dvc repro` ran (earlier stages read the old value)")
        return
    for old in folder.glob("*.json") if folder.is_dir() else ():  # the stamps of repros that have ended
        if not Path(f"/proc/{old.stem.split('-')[0]}").exists():
            old.unlink(missing_ok=True)
    write_json(mine, {"params": started_with})


def dvc_stage_item(name: str) -> str | None:
    """The `<item>` of a foreach/matrix stage `name@<item>` that DVC is running (DVC_STAGE).

    dvc.yaml's commands carry no interpolated param (a variant named `auf;rm -rf ~` must never
    reach a shell): each instance learns which one it is from the environment DVC sets."""
    stage = os.environ.get("DVC_STAGE", "")
    prefix = f"{name}@"
    return stage[len(prefix):] if stage.startswith(prefix) else None


def stage_run(params: Params, name: str, variant: str | None, seed: int | None) -> tuple[str, int]:
    """The (loss variant, training seed) a train/eval/export instance works on: --variant and
    --seed, else DVC_STAGE (`train@auf-0`); the variant must be in train.variants and the seed in
    train.seeds (a lone --variant takes the first seed)."""
    if variant is None:
        item = dvc_stage_item(name)
        if item is None:
            raise UserError(f"stages/{name}.py: pass --variant (or run it as a `{name}@<variant>-<seed>` DVC stage)")
        parsed = parse_run_name(item)
        if parsed is None:
            raise UserError(f"DVC_STAGE: {name}@{item} is not `{name}@<variant>-<seed>` (dvc.yaml's matrix)")
        variant, seed = parsed
    if variant not in params.train.variants:
        raise UserError(f"--variant: {variant!r} is not in train.variants ({', '.join(params.train.variants)})")
    seed = params.train.seeds[0] if seed is None else seed
    if seed not in params.train.seeds:
        raise UserError(f"--seed: {seed} is not in train.seeds ({', '.join(map(str, params.train.seeds))})")
    return variant, seed


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--variant and --seed: which run a train/eval/export instance is (under DVC: from its stage name)."""
    parser.add_argument("--variant", help="a loss variant of train.variants (under DVC: from the stage name)")
    parser.add_argument("--seed", type=int, help="a training seed of train.seeds (default: the first)")


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
    with one_line_errors():
        started_with = read_params_yaml(args.params)
        params = parse_params(started_with, str(args.params))  # the file read once: validated and kept to compare
        same_params_through_the_repro(args.params, started_with)
        run(params, args)
        unchanged_since(args.params, started_with, "this stage ran")


def split_stage_main(name: str, run, add_args, argv=None, upstream: str | None = None) -> None:
    """stage_main for a script behind two stages, `name` (--split train) and `eval_<name>` (--split
    eval): adds --split, --out and --work, and fills each path the stage it runs as implies:
    data/<stage>, data/.work/<stage>, and --<upstream> from data/[eval_]<upstream>."""
    def args_of(p):
        p.add_argument("--split", choices=("train", "eval"), default="train",
                       help=f"train: stage {name}; eval: stage eval_{name} (over the evaluation prompts)")
        p.add_argument("--out", help=f"default data/{name} (train) or data/eval_{name} (eval)")
        p.add_argument("--work", help="default data/.work/<stage>")
        add_args(p)

    def fill(params, args):
        prefix = "" if args.split == "train" else "eval_"
        args.stage = prefix + name
        if upstream is not None and getattr(args, upstream) is None:
            setattr(args, upstream, f"data/{prefix}{upstream}")
        args.out = args.out or f"data/{args.stage}"
        args.work = args.work or f"data/.work/{args.stage}"
        run(params, args)
    stage_main(name, fill, args_of, argv=argv)


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
