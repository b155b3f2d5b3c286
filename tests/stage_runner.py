"""Run stage scripts in this process, as `python stages/<name>.py --params P ...` would, on a
workspace in a temporary directory; check the bad-input contract (docs/bad-input.md).

In-process because a subprocess pays ~10 s of torch/transformers imports per stage run.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import sys
from pathlib import Path

import torch
import yaml

from specauf import artifacts
from tests.conftest import ROOT

WORDS = "the quick brown fox jumps over a lazy dog while robots paint stories and add numbers".split()


def prompts_jsonl(path: Path, n: int, prefix: str, texts: list[str] | None = None) -> Path:
    texts = texts or [f"{' '.join(WORDS[i % 7: i % 7 + 4 + i % 5])} number {i}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SCRIPTS = {"eval_rollouts": "rollouts", "eval_labels": "labels"}  # stage -> script (run with --split eval)


class Workspace:
    """A workspace directory: good params (`params(over)` writes a variant), each stage's flags,
    and `run`, which runs a stage script in this process."""

    def __init__(self, root: Path):
        self.root = root
        self.good = {
            "base": {"seed": 0, "torch_threads": 1, "device": "cpu"},
            "target": {"source": "random", "random": {"num_layers": 4}},
            "prompts": {"train": [{"source": "jsonl", "count": 8, "path": str(root / "train.jsonl")}],
                        "eval": {"chat": [{"source": "jsonl", "count": 2, "path": str(root / "eval.jsonl")}]}},
            "rollouts": {"max_new_tokens": 6, "batch_size": 4, "shard_size": 3},
            "labels": {"layer_ids": [0, 2], "batch_size": 4},
            "launch": {"processes": 1},  # in this process (the shipped default is 2: the two cores)
            "train": {"variants": ["auf"], "block_size": 4, "draft_vocab_size": 0, "anchors_per_seq": 4,
                      "micro_batch_size": 2, "steps": 3, "warmup_steps": 0, "heldout_fraction": 0.25,
                      "eval_every": 3, "checkpoint_every": 1, "log_every": 1},
            "eval": {"block_sizes": [2, 4], "prompts_per_set": 1, "max_new_tokens": 4, "replay_max_new_tokens": 6},
        }
        self.n = 0

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    def params(self, over: dict | None = None, text: str | None = None) -> Path:
        self.n += 1
        path = self.root / "params" / f"p{self.n}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text if text is not None else yaml.safe_dump(merge(self.good, over or {})))
        return path

    def flags(self, stage: str) -> dict[str, str]:
        d = {k: str(self.root / v) for k, v in {
            "target": "data/target", "prompts": "data/prompts", "rollouts": "data/rollouts",
            "labels": "data/labels", "drafter": "data/drafters/auf", "metrics": "metrics/eval/auf.json",
            "eval_rollouts": "data/eval_rollouts", "eval_labels": "data/eval_labels"}.items()}
        return {
            "target": {"out": d["target"]},
            "prompts": {"out": d["prompts"]},
            "rollouts": {"target": d["target"], "prompts": d["prompts"], "out": d["rollouts"],
                         "work": str(self.root / "work/rollouts")},
            "labels": {"target": d["target"], "rollouts": d["rollouts"], "out": d["labels"],
                       "work": str(self.root / "work/labels")},
            "eval_rollouts": {"split": "eval", "target": d["target"], "prompts": d["prompts"], "out": d["eval_rollouts"],
                              "work": str(self.root / "work/eval_rollouts")},
            "eval_labels": {"split": "eval", "target": d["target"], "rollouts": d["eval_rollouts"],
                            "out": d["eval_labels"], "work": str(self.root / "work/eval_labels")},
            "train": {"variant": "auf", "target": d["target"], "labels": d["labels"], "out": d["drafter"],
                      "work": str(self.root / "work/train"), "metrics": str(self.root / "metrics/train/auf")},
            "eval": {"variant": "auf", "target": d["target"], "prompts": d["prompts"], "drafter": d["drafter"],
                     "metrics": d["metrics"], "eval-labels": d["eval_labels"]},
        }[stage]

    def run(self, stage: str, params: Path | None = None, **flags) -> tuple[int, list[str]]:
        """`python stages/<stage>.py --params P --flag value ...` in this process: (exit code, stderr lines).

        The stage's progress log goes to its own buffer: stderr here is what the stage printed
        itself (a real run shows the `[stage] ...` log lines before the error line)."""
        params = params or self.params()
        script = str(ROOT / "stages" / f"{SCRIPTS.get(stage, stage)}.py")
        argv = [script, "--params", str(params)]
        for k, v in {**self.flags(stage), **flags}.items():
            argv += [f"--{k}", str(v)]
        from specauf.runtime import setup_logging

        handler = setup_logging(stage).handlers[0]
        old_stream, old_argv, err = handler.setStream(io.StringIO()), sys.argv, io.StringIO()
        threads = torch.get_num_threads()  # the stage sets base.torch_threads for the whole process
        sys.argv = argv
        try:
            with contextlib.redirect_stderr(err):
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = old_argv
            handler.setStream(old_stream)
            torch.set_num_threads(threads)
        return code, err.getvalue().splitlines()


def snapshot(path: Path) -> dict:
    """Every byte under path, plus the names beside it (a leftover `.name.*.tmp` shows up there)."""
    files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.is_dir() else {"": path.read_bytes()}
    return {"files": files, "siblings": sorted(p.name for p in path.parent.iterdir())}


def expect_error(ws: Workspace, stage: str, message: str, params: Path | None = None, **flags) -> str:
    """Run a stage on bad input: exit 2, one `error:` line matching `message` (regex), the output
    the workspace already holds for that stage untouched. Returns the line."""
    outputs = [ws / p for p in {"eval": ["metrics/eval/auf.json"]}.get(stage, [])] or \
        [Path(ws.flags(stage)["out"])]
    before = [snapshot(p) for p in outputs]
    code, err = ws.run(stage, params, **flags)
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    for p, b in zip(outputs, before):
        assert snapshot(p) == b, f"{p} changed"
    return err[0]


def train_on_labels(ws: "Workspace", labels: Path, tmp_path: Path) -> tuple[int, list[str], Path]:
    """The train stage on a labels folder of the test's own (its outputs under tmp_path):
    (exit code, stderr lines, the drafter folder it would write)."""
    out = tmp_path / "drafter"
    code, err = ws.run("train", labels=str(labels), out=str(out), work=str(tmp_path / "work"),
                       metrics=str(tmp_path / "metrics"))
    return code, err, out


def save_drafter(out: Path, target_dir: Path, **overrides) -> None:
    """A drafter folder as the train stage writes it (untrained: eval's checks come before decoding)."""
    from transformers import AutoConfig

    from specauf.train.drafter import BlockDrafter, DrafterConfig

    tm = json.loads((target_dir / "manifest.json").read_text())
    config = DrafterConfig.from_target_config(AutoConfig.from_pretrained(target_dir), num_layers=1, block_size=4,
                                              mask_token_id=tm["mask_token_id"], target_layer_ids=[0, 2], **overrides)
    BlockDrafter(config).save_pretrained(out, safe_serialization=True)
    artifacts.write_json(out / "manifest.json", {"schema_version": artifacts.SCHEMA_VERSION, "kind": "drafter",
                                                 "variant": "auf", "block_size": 4,
                                                 "target_fingerprint": tm["fingerprint"]})


def built_workspace(root: Path, target_dir: Path) -> Workspace:
    """A Workspace whose prompts, rollouts and labels are built from a tiny target, with an
    untrained drafter and earlier eval outputs in place (what a stage on bad input must not touch)."""
    import shutil

    ws = Workspace(root)
    shutil.copytree(target_dir, ws / "data/target")
    prompts_jsonl(ws / "train.jsonl", 8, "t")
    prompts_jsonl(ws / "eval.jsonl", 2, "e", ["Write a short poem about the sea.", "What is seven times six?"])
    for stage in ("prompts", "rollouts", "labels", "eval_rollouts", "eval_labels"):
        code, err = ws.run(stage)
        assert code == 0, (stage, err)
    save_drafter(ws / "data/drafters/auf", ws / "data/target")
    artifacts.write_json(ws / "metrics/eval/auf.json", {"overall": {"previous": "result"}})
    return ws
