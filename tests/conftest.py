"""Shared fixtures: tiny random-init targets materialised through the real target stage."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("SPECAUF_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    """A random 4-layer Llama target folder with its manifest (as the target stage writes it)."""
    from specauf.config import TargetParams
    from specauf.runtime import setup_logging
    from specauf.target.run import materialize_target

    setup_logging("test")
    out = tmp_path_factory.mktemp("target") / "target"
    params = TargetParams(source="random", random={"arch": "llama", "num_layers": 4})
    manifest = materialize_target(params, out, seed=0, params_hash="test")
    return out, manifest


@pytest.fixture(scope="session")
def tiny_model(tiny_target):
    from specauf.target.run import load_target

    model, tok, manifest = load_target(tiny_target[0])
    return model, tok, manifest


RANK_ENV = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


@pytest.fixture(autouse=True)
def no_rank_env_leak():
    """An in-process training run makes this process "rank 0 of 1" through os.environ, with a
    MASTER_PORT its own process group still listens on; a stage started later as a subprocess
    (dvc repro) would inherit that and fail to bind the port. After every test the variables
    are as the session found them (module fixtures set them too, so not just per test)."""
    yield
    for k, v in RANK_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tests time nothing, but 2 torch threads beside another busy process run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(BaseException):
    """A simulated SIGKILL: nothing in the stage may catch it (a stage turns KeyboardInterrupt
    and SIGTERM into a one-line exit 130; a real kill gets no such chance)."""


def die_after(monkeypatch, owner, name: str, calls: int) -> None:
    """Make `owner.name` raise Killed (a kill, as far as the stage can tell) on call
    number calls + 1: the first `calls` calls run for real."""
    real, done = getattr(owner, name), []

    def dying(*a, **k):
        if len(done) == calls:
            raise Killed("killed")
        done.append(1)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, dying)


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts of varied lengths (so batches need padding)."""
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog robot paint story add numbers apples".split()
    return [{"prompt_id": f"p{i:03d}", "source": "test",
             "turns": [" ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))]} for i in range(n)]


def git_dvc_workspace(dest: Path, params_text: str | None = None, preset: str = "smoke") -> Path:
    """A fresh git+DVC workspace of this pipeline (as `specauf new` makes it)."""
    from specauf.cli import new_workspace

    new_workspace(dest, preset)
    if params_text is not None:
        (dest / "params.yaml").write_text(params_text)
        subprocess.run(["git", "commit", "-qam", "params"], cwd=dest, check=True)
    return dest


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("dvc") or str(Path(os.sys.executable).parent / "dvc")
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


# Kill-friendly smoke sizes: enough shards, steps and checkpoints that a stage can be killed
# between two of them (tests/test_kill.py), still a whole `dvc repro` in about a minute.
BUILT_SMOKE_EDITS = {("rollouts", "shard_size"): 3, ("train", "steps"): 12,
                     ("train", "checkpoint_every"): 2, ("train", "log_every"): 2, ("train", "eval_every"): 4}
BUILT_SMOKE_TRAIN_PROMPTS = 24


def built_smoke_params() -> str:
    """The smoke preset with BUILT_SMOKE_EDITS applied, as params.yaml text."""
    import yaml

    from specauf.params_file import full_params

    params = full_params(ROOT / "presets" / "smoke.yaml")
    for (section, key), value in BUILT_SMOKE_EDITS.items():
        params[section][key] = value
    params["prompts"]["train"][0]["count"] = BUILT_SMOKE_TRAIN_PROMPTS
    return yaml.safe_dump(params, sort_keys=False)


def git_commit_all(ws: Path, message: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "specauf", "GIT_AUTHOR_EMAIL": "specauf@localhost",
           "GIT_COMMITTER_NAME": "specauf", "GIT_COMMITTER_EMAIL": "specauf@localhost"}
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=ws, check=True, env=env)


@pytest.fixture(scope="session")
def built_smoke(tmp_path_factory) -> Path:
    """A smoke workspace (built_smoke_params) after a whole `dvc repro`, committed with its
    dvc.lock. Read-only: tests copy it (copy_workspace) instead of paying for another repro."""
    ws = tmp_path_factory.mktemp("built") / "ws"
    git_dvc_workspace(ws)
    (ws / "params.yaml").write_text(built_smoke_params())
    # the log of this first whole repro, for tests that check what it ran (built_smoke_repro_log)
    (ws.parent / "repro.log").write_text(dvc(ws, "repro").stdout)
    git_commit_all(ws, "smoke pipeline built")
    return ws


def built_smoke_repro_log(built: Path) -> str:
    """The stdout of the `dvc repro` that built the built_smoke workspace."""
    return (built.parent / "repro.log").read_text()


def copy_workspace(src: Path, dest: Path) -> Path:
    """A copy of a workspace with its git repo and DVC cache (a clone would lack the cache)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def decisive_model(config, seed: int = 0):
    """A random causal LM whose greedy choices are decisive: far from ties, so two engines' float
    orders (ggml's, vLLM's kernels) pick the same tokens as transformers does."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
        # over 49k tokens the top two logits of a random head are often within 1e-4 (relative), which
        # llama.cpp's float order can flip; rows of log-normal norms put the top far ahead (>= 3e-3)
        head = model.get_output_embeddings().weight
        head.mul_(torch.exp(2.0 * torch.randn(head.shape[0], 1)))
    return model


@pytest.fixture(scope="session")
def llama_target(tmp_path_factory):
    """(target dir, its f32 GGUF) for the llama.cpp tests: a random 4-layer Llama with SmolLM2's
    real tokenizer (llama.cpp's converter knows it; a tokenizer trained for a test is not one it
    knows), materialised by the target stage's own code and converted by llama.cpp's converter.
    Skipped, with the command that builds it, where llama.cpp is not built."""
    from transformers import AutoTokenizer

    from specauf.serve import llamacpp
    from specauf.config import TargetParams
    from specauf.runtime import setup_logging
    from specauf.target.gguf_source import gguf_path
    from specauf.target.run import materialize_target
    from specauf.target.tiny import tiny_config

    if not llamacpp.installed():
        pytest.skip("llama.cpp tools not built: run `specauf llamacpp install`")
    setup_logging("test")
    root = tmp_path_factory.mktemp("llama_target")
    src = gguf_path(TargetParams())
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = tiny_config("llama", vocab_size=len(tok), hidden_size=64, num_layers=4, rope_theta=50000.0,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = decisive_model(config)
    model.save_pretrained(root / "src", safe_serialization=True)
    tok.save_pretrained(root / "src")
    target = root / "target"
    manifest = materialize_target(TargetParams(source="local", path=str(root / "src")), target, seed=0, params_hash="test")
    gguf = root / "f32.gguf"
    llamacpp.convert_target(target, gguf, "f32")
    return target, gguf, manifest


@pytest.fixture(scope="session")
def vllm_workspace(tmp_path_factory):
    """(workspace, params) for the vLLM tests: built by our stages on a decisive tiny Llama whose
    greedy answers loop, so a drafter learns them in a few hundred steps, acceptance is high and a
    broken export shows. Skipped, with the command that installs it, where vLLM is not installed."""
    import yaml

    from specauf import vllm
    from tests.stage_runner import Workspace, prompts_jsonl

    if not vllm.installed():
        pytest.skip("vLLM not installed: run `specauf vllm install`")
    import torch
    from specauf.config import Params
    from specauf.serve.export import export_drafter
    from specauf.target.tiny import build_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("vllm_ws")
    tok = build_tokenizer()
    # head_dim 64: vLLM's CPU attention has kernels for a few head sizes only (16 is refused)
    config = tiny_config("llama", vocab_size=len(tok), hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=4,
                         rope_theta=50000.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = decisive_model(config, seed=3)
    with torch.no_grad():  # attention writes nothing: the next token is a function of the last one, so
        for layer in model.model.layers:  # answers loop, and a drafter learns them in seconds
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(root / "src", safe_serialization=True)
    tok.save_pretrained(root / "src")
    prompts_jsonl(root / "train.jsonl", 64, "t")
    prompts_jsonl(root / "eval.jsonl", 8, "e", [f"tell me about {w} and the number {i}" for i, w in
                                                  enumerate("fox dog robot paint story apple river cloud".split())])
    ws = Workspace(root)
    over = {"target": {"source": "local", "path": str(root / "src")},
            "prompts": {"eval": {"chat": [{"source": "jsonl", "count": 8, "path": str(root / "eval.jsonl")}]}},
            "rollouts": {"max_new_tokens": 64},
            "labels": {"layer_ids": [1, 2]},
            "train": {"block_size": 4, "draft_vocab_size": 64, "anchors_per_seq": 16, "micro_batch_size": 4,
                      "steps": 200, "lr": 3e-3, "warmup_steps": 10, "eval_every": 200, "checkpoint_every": 200,
                      "log_every": 50},
            "eval": {"block_sizes": [2, 4], "prompts_per_set": 2, "max_new_tokens": 16, "replay_max_new_tokens": 48},
            "vllm": {"batch_prompts_per_set": 8}}
    params_file = ws.params(over)
    for stage in ("target", "prompts", "rollouts", "labels", "train", "eval_rollouts", "eval_labels", "eval"):
        code, err = ws.run(stage, params_file)
        assert code == 0, (stage, err)
    export_drafter(ws / "data/drafters/auf", ws / "data/export/auf", ws / "data/target")
    params = Params.model_validate(yaml.safe_load(params_file.read_text()))
    return ws, params
