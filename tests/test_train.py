"""Training stage: DeepSpeed on CPU (1 and 2 processes), exact resume, determinism, variants on
identical data, the draft vocabulary, and online features.

Everything trains a 1-layer drafter for a few dozen steps on labels of the tiny random target
(12 greedy rollouts of 16 tokens): a few seconds per run on one thread.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from specauf.params_file import full_params
from specauf.train import run as train_mod
from specauf.config import LabelsParams, RolloutsParams, TrainParams
from specauf.data.dataset import LabelsDataset
from specauf.errors import UserError
from specauf.train.distributed import deepspeed_config, load_checkpoint
from specauf.train.drafter import BlockDrafter
from specauf.data.labels import run_labels
from specauf.data.rollouts import run_rollouts
from specauf.train.run import DrafterRun, train_variant
from specauf.train.batches import TrainData, split_heldout
from tests.conftest import ROOT, Killed, die_after, prompt_rows

CPU = torch.device("cpu")
OUT_FILES = {"config.json", "model.safetensors", "ds_config.json", "manifest.json"}
# The base run: every test that compares final weights uses exactly these params.
BASE = dict(variants=["auf"], block_size=4, draft_vocab_size=0, anchors_per_seq=8, micro_batch_size=2,
            steps=24, lr=3e-3, warmup_steps=2, min_lr_ratio=0.1, heldout_fraction=0.25, eval_every=12,
            checkpoint_every=8, log_every=1, num_layers=1, init_from_target=True, precision="fp32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def same(a, b) -> bool:
    """Equal batch fields: tensors bit for bit, the rest (coverage, absent fields) by value."""
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def trainer(params: TrainParams, tiny_model, labels_dir, variant: str = "auf") -> DrafterRun:
    """The DrafterRun a run of these params builds, without training (its data at .data)."""
    model, _, manifest = tiny_model
    data = TrainData(params, LabelsDataset(labels_dir), 0, manifest["mask_token_id"],
                     model.get_output_embeddings().weight.shape[0], model, CPU)
    return DrafterRun(params, variant, model, manifest, data, 0, CPU)


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    """Greedy rollouts of the tiny target, labelled twice: offline fp16 features and online."""
    model, tok, manifest = tiny_model
    root = tmp_path_factory.mktemp("train-data")
    extra = {"target_fingerprint": manifest["fingerprint"]}
    run_rollouts(model, tok, prompt_rows(12), RolloutsParams(max_new_tokens=16, batch_size=6, shard_size=6),
                 out_dir=root / "rollouts", work_dir=root / "rollouts-work", seed=0,
                 stop_ids=manifest["stop_token_ids"], manifest_extra=extra)
    for mode in ("offline", "online"):
        params = LabelsParams(features=mode, layer_ids=[0, 2], feature_dtype="float16", batch_size=6)
        run_labels(model, root / "rollouts", params, out_dir=root / mode, work_dir=root / f"{mode}-work",
                   pad_id=0, manifest_extra=extra)
    return {"root": root, "offline": root / "offline", "online": root / "online"}


class Capture:
    """Patch specauf.train.run to remember the DrafterRun and the DeepSpeed engine of each run."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.trainers, self.engines = [], []
        capture = self

        class Recording(DrafterRun):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                capture.trainers.append(self)

        real_init = train_mod.init_engine

        def init_engine(*a, **k):
            engine = real_init(*a, **k)
            capture.engines.append(engine)
            return engine

        mp.setattr(train_mod, "DrafterRun", Recording)
        mp.setattr(train_mod, "init_engine", init_engine)


def train(tiny_model, labels_dir, root: Path, variant="auf", **overrides) -> dict:
    model, _, manifest = tiny_model
    params = TrainParams(**{**BASE, "variants": [variant], **overrides})
    manifest_out = train_variant(params, variant, target=model, target_manifest=manifest, labels_dir=labels_dir,
                                 out_dir=root / "out", work_dir=root / "work", metrics_dir=root / "metrics", seed=0,
                                 device=CPU, manifest_extra={"target_fingerprint": manifest["fingerprint"]})
    return {"manifest": manifest_out, "out": root / "out", "work": root / "work", "metrics": root / "metrics",
            "params": params}


def logged(metrics_dir: Path, name: str) -> list[tuple[int, float]]:
    lines = (metrics_dir / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0] == f"step\t{name.split('/')[-1]}"
    return [(int(s), float(v)) for s, v in (l.split("\t") for l in lines[1:])]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base_run(tiny_model, data, tmp_path_factory):
    """One uninterrupted single-process run with BASE params (the reference for later tests)."""
    with pytest.MonkeyPatch.context() as mp:
        cap = Capture(mp)
        t0 = time.perf_counter()
        run = train(tiny_model, data["offline"], tmp_path_factory.mktemp("base"))
        run["seconds"] = time.perf_counter() - t0
    run["trainer"], run["engine"] = cap.trainers[0], cap.engines[0]
    return run


# --------------------------------------------------------------------------- single process


def test_single_process_training_learns(base_run, tiny_model, data):
    p = base_run["params"]
    # the loss falls: mean of the first vs last 5 logged steps (one micro batch each)
    loss = logged(base_run["metrics"], "loss")
    assert [s for s, _ in loss] == list(range(1, p.steps + 1))  # one row per step, at its own step
    first, last = [sum(v for _, v in loss[i]) / 5 for i in (slice(0, 5), slice(-5, None))]
    assert last < 0.7 * first, (first, last)
    # and held-out token accuracy rises above the untrained drafter's (same seed = same init)
    model, _, manifest = tiny_model
    fresh = trainer(p, tiny_model, data["offline"])
    before = fresh.evaluate(fresh.drafter.eval())
    after = base_run["manifest"]["heldout"]
    assert after["heldout/blocks"] == before["heldout/blocks"] > 0  # the same fixed held-out blocks
    assert after["heldout/token_accuracy"] > before["heldout/token_accuracy"] + 0.05, (before, after)


def test_the_saved_drafter_is_the_trained_one(base_run, tiny_model):
    p, (_, _, manifest) = base_run["params"], tiny_model
    out = base_run["out"]
    assert {f.name for f in out.iterdir()} == OUT_FILES
    assert not base_run["work"].exists()  # checkpoints only serve a resume
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "drafter" and m["variant"] == "auf" and m["world_size"] == 1 and m["steps"] == p.steps
    # from_pretrained gives exactly the weights the engine trained
    loaded = BlockDrafter.from_pretrained(out)
    trained = base_run["trainer"].drafter.state_dict()
    assert base_run["engine"].module is base_run["trainer"].drafter
    assert loaded.state_dict().keys() == trained.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert loaded.mask_token_id == manifest["mask_token_id"] and loaded.target_layer_ids == [0, 2]
    assert json.loads((out / "ds_config.json").read_text()) == deepspeed_config(p)
    # DVCLive's summary holds each held-out figure once: the final (saved) drafter's, as the manifest
    summary = json.loads((base_run["metrics"] / "metrics.json").read_text())
    assert not [k for k in summary if k.startswith("heldout/")]
    assert {f"heldout/{k}": v for k, v in summary["heldout"].items()} == m["heldout"]


def test_the_lr_follows_warmup_cosine_to_its_floor(base_run):
    p = base_run["params"]
    lr = dict(logged(base_run["metrics"], "lr"))
    assert lr[p.steps] == pytest.approx(p.lr * p.min_lr_ratio)
    assert max(lr.values()) <= p.lr and max(lr.values()) > 0.9 * p.lr


@pytest.fixture(scope="module")
def tuned_run(tiny_model, data, tmp_path_factory):
    """A run with non-default ZeRO stage, accumulation, clipping, lr schedule and weight decay,
    with its DeepSpeed engine."""
    with pytest.MonkeyPatch.context() as mp:
        cap = Capture(mp)
        run = train(tiny_model, data["offline"], tmp_path_factory.mktemp("tuned"), steps=3, zero_stage=1, grad_accum=2,
                    grad_clip=0.5, lr=2e-3, warmup_steps=1, min_lr_ratio=0.2, weight_decay=0.01, eval_every=100,
                    log_every=1)
    return run, cap.engines[0]


def test_params_reach_the_deepspeed_config_file(tuned_run):
    run, _ = tuned_run
    cfg = json.loads((run["out"] / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["train_batch_size"] == 2 * 2 * 1
    assert cfg["gradient_clipping"] == 0.5
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["lr"] == 2e-3 and opt["params"]["weight_decay"] == 0.01
    assert opt["params"]["torch_adam"] is True  # FusedAdam would JIT-build
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"]["total_num_steps"] == 3 and sched["params"]["warmup_num_steps"] == 1
    assert sched["params"]["cos_min_ratio"] == 0.2


def test_params_reach_the_engine(tuned_run):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    _, engine = tuned_run
    assert engine.zero_optimization_stage() == 1
    assert engine.gradient_accumulation_steps() == 2 and engine.gradient_clipping() == 0.5
    assert isinstance(engine.lr_scheduler, WarmupCosineLR)
    assert engine.get_lr()[0] == pytest.approx(2e-3 * 0.2)
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_a_step_is_an_optimizer_step_not_a_micro_batch(tuned_run):
    run, engine = tuned_run
    assert engine.global_steps == 3
    assert [s for s, _ in logged(run["metrics"], "loss")] == [1, 2, 3]


# --------------------------------------------------------------------------- resume and checkpoints


class Payload:
    """An arbitrary picklable object: unpickling it would run code (here, record that it did)."""

    loaded = False

    def __init__(self):
        self.note = "runs code when unpickled"

    def __setstate__(self, state):
        Payload.loaded = True
        self.__dict__.update(state)


def killed_in_step_10(tiny_model, data, root: Path, **overrides) -> None:
    """A BASE run (24 steps, checkpoints every 8) killed in step 10, after the checkpoint of step 8."""
    with pytest.MonkeyPatch.context() as mp:
        die_after(mp, train_mod, "compute_loss", 10)
        with pytest.raises(Killed, match="killed"):
            train(tiny_model, data["offline"], root, **overrides)


def test_kill_and_resume_gives_identical_weights(base_run, tiny_model, data, tmp_path, monkeypatch):
    """Exact: torch.equal on every tensor and byte-identical model.safetensors (tolerance 0)."""
    killed_in_step_10(tiny_model, data, tmp_path)
    ckpt = tmp_path / "work" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step8" and (ckpt / "step8").is_dir()
    assert not (tmp_path / "out").exists()

    # a `latest` naming a missing tag: a clear error, nothing trained or written
    (ckpt / "latest").write_text("step16")
    with pytest.raises(UserError, match=r"latest names checkpoint 'step16', which is missing; delete .*checkpoints"):
        train(tiny_model, data["offline"], tmp_path)
    (ckpt / "latest").write_text("step8")

    steps_seen = []
    real_name = DrafterRun.loss_name
    monkeypatch.setattr(DrafterRun, "loss_name", lambda self, s: steps_seen.append(s) or real_name(self, s))
    resumed = train(tiny_model, data["offline"], tmp_path)
    assert steps_seen == list(range(8, 24))  # continued from the checkpoint, not from scratch
    a, b = weights(resumed["out"]), weights(base_run["out"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (resumed["out"] / "model.safetensors").read_bytes() == (base_run["out"] / "model.safetensors").read_bytes()
    assert resumed["manifest"]["heldout"] == base_run["manifest"]["heldout"]


def test_checkpoints_load_weights_only(base_run, tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = base_run["engine"]
    ce = engine.checkpoint_engine
    assert isinstance(ce, TorchCheckpointEngine) and type(ce) is not TorchCheckpointEngine
    assert type(ce).__name__ == "WeightsOnlyCheckpointEngine"
    # a plain checkpoint round-trips
    engine.save_checkpoint(str(tmp_path / "ok"), tag="step3", client_state={"step": 3})
    assert load_checkpoint(engine, tmp_path / "ok") == 3
    # one carrying a pickled object is refused before the object is rebuilt
    engine.save_checkpoint(str(tmp_path / "evil"), tag="step5", client_state={"step": 5, "payload": Payload()})
    assert (tmp_path / "evil" / "latest").read_text().strip() == "step5"
    Payload.loaded = False
    from specauf.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="UnpicklingError: [Ww]eights.only"):  # one line naming the checkpoint
        load_checkpoint(engine, tmp_path / "evil")
    assert Payload.loaded is False
    # (sanity: the same file does hold the object: its pickle stream names the Payload class,
    # read as bytes so the test itself never unpickles untrusted data)
    import zipfile

    files = list((tmp_path / "evil" / "step5").glob("*model_states.pt"))
    with zipfile.ZipFile(files[0]) as z:
        stream = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    assert files and Payload.__name__.encode() in stream and Payload.__module__.encode() in stream


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_losses_and_bytes(base_run, tiny_model, data, tmp_path):
    again = train(tiny_model, data["offline"], tmp_path)
    for name in ("loss", "train/token_accuracy", "train/acceptance_length", "lr", "heldout/token_accuracy"):
        assert logged(again["metrics"], name) == logged(base_run["metrics"], name), name
    assert (again["out"] / "model.safetensors").read_bytes() == (base_run["out"] / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- bf16


def test_bf16_trains_saves_fp32_masters_and_resumes_exactly(tiny_model, data, tmp_path):
    """bf16 (what `auto` picks on a CPU with native bf16): the loss falls, the saved drafter holds
    the optimizer's fp32 master weights (not their bf16 roundings), and a kill-and-resume ends
    byte-identical to an uninterrupted run (tolerance 0)."""
    with pytest.MonkeyPatch.context() as mp:
        cap = Capture(mp)
        whole = train(tiny_model, data["offline"], tmp_path / "whole", precision="bf16")
    engine = cap.engines[0]
    assert engine.bfloat16_enabled() and whole["manifest"]["precision"] == "bf16"
    assert json.loads((whole["out"] / "ds_config.json").read_text())["bf16"]["enabled"] is True
    loss = [v for _, v in logged(whole["metrics"], "loss")]
    assert sum(loss[-5:]) < 0.8 * sum(loss[:5]), loss
    saved = weights(whole["out"])
    masters = [m for g in engine.optimizer.fp32_groups for m in g]
    named = [n for n, _ in engine.module.named_parameters()]
    assert len(masters) == len(named) and all(saved[n].dtype == torch.float32 for n in named)
    for n, m in zip(named, masters):
        assert torch.equal(saved[n], m), n
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)  # restoring them mattered

    killed_in_step_10(tiny_model, data, tmp_path / "resumed", precision="bf16")
    resumed = train(tiny_model, data["offline"], tmp_path / "resumed", precision="bf16")
    assert (resumed["out"] / "model.safetensors").read_bytes() == (whole["out"] / "model.safetensors").read_bytes()
    assert resumed["manifest"]["heldout"] == whole["manifest"]["heldout"]


def test_precision_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    from specauf import runtime

    assert runtime.pick_precision("fp32", CPU) == "fp32" and runtime.pick_precision("bf16", CPU) == "bf16"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        assert runtime.pick_precision("auto", CPU) == want
    assert TrainParams().precision == "auto"  # the default, as params.yaml ships it
    with pytest.raises(ValueError, match="precision"):
        TrainParams(precision="fp16")


# --------------------------------------------------------------------------- variants


def test_variants_see_identical_batches_and_curriculum_switches(tiny_model, data, tmp_path, monkeypatch):
    """The loop trains on TrainData.train_batch(step * grad_accum + micro, rank, world), a pure
    function of those and the seed, which no variant enters: recorded, the indices are the same
    for every variant, and so are the batches rebuilt from them."""
    asked = []
    real = TrainData.train_batch
    monkeypatch.setattr(TrainData, "train_batch", lambda self, *a: asked.append(a) or real(self, *a))
    seen = {}
    for variant in ("auf", "decay", "decay_then_auf"):
        asked.clear()
        train(tiny_model, data["offline"], tmp_path / variant, variant, steps=5, grad_accum=2, curriculum_switch=0.4,
              eval_every=100, log_every=5)
        seen[variant] = list(asked)
    assert seen["auf"] == seen["decay"] == seen["decay_then_auf"] == [(i, 0, 1) for i in range(10)]
    one, other = (trainer(TrainParams(**BASE), tiny_model, data["offline"]).data for _ in range(2))
    for i in range(10):
        a, b = vars(one.train_batch(i, 0, 1)), vars(other.train_batch(i, 0, 1))
        assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), i
    # ...and the losses do make a difference
    assert not torch.equal(weights(tmp_path / "auf" / "out")["fc.weight"], weights(tmp_path / "decay" / "out")["fc.weight"])
    m = json.loads((tmp_path / "decay_then_auf" / "out" / "manifest.json").read_text())
    assert m["loss_schedule"] == "decay then auf"


def test_the_loss_schedule_is_a_function_of_the_step(tiny_model, data):
    p = TrainParams(**{**BASE, "steps": 20, "curriculum_switch": 0.25})
    t = {v: trainer(p, tiny_model, data["offline"], v) for v in ("auf", "decay_then_auf")}
    assert [t["decay_then_auf"].loss_name(s) for s in range(20)] == ["decay"] * 5 + ["auf"] * 15
    assert {t["auf"].loss_name(s) for s in range(20)} == {"auf"}


# --------------------------------------------------------------------------- draft vocabulary


def test_draft_vocabulary(tiny_model, data, tmp_path):
    model = tiny_model[0]
    ds = LabelsDataset(data["offline"])
    size = 10
    p = TrainParams(**{**BASE, "draft_vocab_size": size, "steps": 2, "eval_every": 100})
    small = trainer(p, tiny_model, data["offline"])
    full = trainer(p.model_copy(update={"draft_vocab_size": 0}), tiny_model, data["offline"])
    counts = Counter()
    for i in small.data.train_rows:
        it = ds[i]
        counts.update(it["acceptance_ids"][it["response_start"]:].tolist())
    assert len(counts) > size  # some labels fall outside
    want = sorted(sorted(counts, key=lambda t: (-counts[t], t))[:size])
    assert small.drafter.d2t.tolist() == want

    # labels outside the draft vocabulary end their block; inside, they map to draft ids
    inside = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    inside[want] = True
    cut = 0
    for s in range(6):
        rows = small.data.rows_at(s, 0, 1)
        a, b = small.data.batch(rows, 100 + s, 8), full.data.batch(rows, 100 + s, 8)
        assert torch.equal(a.block_input_ids, b.block_input_ids)
        keep = inside[b.labels].long().cummin(1).values.bool()
        assert torch.equal(a.validity, b.validity & keep)
        assert torch.equal(small.drafter.d2t[a.labels][a.validity], b.labels[a.validity])
        cut += int((b.validity & ~a.validity).sum())
    assert cut > 0

    run = train(tiny_model, data["offline"], tmp_path, draft_vocab_size=size, steps=2, eval_every=100)
    assert run["manifest"]["draft_vocab_size"] == size
    hit = sum(counts[t] for t in want) / sum(counts.values())
    assert run["manifest"]["draft_label_coverage"] == pytest.approx(hit)
    drafter = BlockDrafter.from_pretrained(run["out"])
    assert drafter.config.draft_vocab_size == size and drafter.d2t.tolist() == want
    lm_head = model.get_output_embeddings().weight.detach()
    hidden = torch.randn(3, 5, lm_head.shape[1])
    logits = drafter.target_logits(hidden, drafter.draft_head(lm_head), lm_head.shape[0])
    assert logits.shape == (3, 5, lm_head.shape[0])
    assert torch.isneginf(logits[..., ~inside]).all() and torch.isfinite(logits[..., inside]).all()
    assert torch.allclose(logits[..., inside], hidden @ lm_head[want].T)
    assert inside[logits.argmax(-1)].all()


def test_distillation_reads_the_targets_top_k_of_each_label(tiny_model, data, tmp_path):
    model, _, manifest = tiny_model
    params = LabelsParams(features="offline", layer_ids=[0, 2], feature_dtype="float16", batch_size=6,
                          top_k=4)
    run_labels(model, data["root"] / "rollouts", params, out_dir=tmp_path / "topk", work_dir=tmp_path / "topk-work",
               pad_id=0, manifest_extra={"target_fingerprint": manifest["fingerprint"]})
    ds = LabelsDataset(tmp_path / "topk")
    p = TrainParams(**{**BASE, "distill_weight": 0.5, "steps": 2, "eval_every": 100})
    full = trainer(p, tiny_model, tmp_path / "topk")
    small = trainer(p.model_copy(update={"draft_vocab_size": 10}), tiny_model, tmp_path / "topk")
    for s in range(4):
        rows = full.data.rows_at(s, 0, 1)
        a, b = full.data.batch(rows, 100 + s, 8), small.data.batch(rows, 100 + s, 8)
        v = a.validity
        assert a.soft_ids.shape == (*a.labels.shape, 4) and v.any()
        # the stored top-k of position a+k: its top-1 is that position's acceptance label, probs renormalised
        assert torch.equal(a.soft_ids[..., 0][v], a.labels[v])
        assert (a.soft_probs[v].diff(dim=-1) <= 0).all()
        assert torch.allclose(a.soft_probs.sum(-1)[v], torch.ones(int(v.sum())))
        # in a draft vocabulary the mass outside it is dropped and the rest renormalised
        inside = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        inside[small.drafter.d2t] = True
        keep = inside[a.soft_ids] & v[..., None]
        want = torch.where(keep, a.soft_probs, 0.0)
        want = want / want.sum(-1, keepdim=True).clamp_min(1e-12)
        assert torch.equal(small.drafter.d2t[b.soft_ids][keep], a.soft_ids[keep])
        assert torch.allclose(torch.where(v[..., None], b.soft_probs, 0.0), want, atol=1e-6)
    run = train(tiny_model, tmp_path / "topk", tmp_path / "run", distill_weight=0.5, steps=2, eval_every=100)
    assert run["manifest"]["distill_weight"] == 0.5
    with pytest.raises(ValueError, match=r"train.distill_weight = 0.5 .*labels.top_k > 0"):
        trainer(p, tiny_model, data["offline"])


# --------------------------------------------------------------------------- online features


def test_online_features_match_offline(tiny_model, data, tmp_path, monkeypatch):
    model, _, manifest = tiny_model
    p = TrainParams(**BASE)
    off, on = trainer(p, tiny_model, data["offline"]).data, trainer(p, tiny_model, data["online"]).data
    assert on.online and not off.online and on.train_rows == off.train_rows
    for s in range(4):
        rows = off.rows_at(s, 0, 1)
        a, b = vars(off.batch(rows, 7 + s, 8)), vars(on.batch(rows, 7 + s, 8))
        assert a.keys() == b.keys()
        for k in a:
            if k != "context_features":
                assert same(a[k], b[k]), k
        # the same features at every real position (fp16 storage: atol 1e-2); past a shorter
        # sequence, offline pads with zeros and online holds the target's output for padding
        # tokens, which no block can see
        fa, fb = a["context_features"], b["context_features"]
        assert fa.shape == fb.shape and fa.abs().max() > 0.1
        C = fa.shape[1]
        for n, row in enumerate(rows):
            S = len(off.ds[row]["input_ids"])
            assert torch.allclose(fa[n, :S], fb[n, :S], atol=1e-2, rtol=1e-2), (fa[n, :S] - fb[n, :S]).abs().max()
            assert not a["attention_mask"][n, 0, :, S:C].any()



def test_online_training_runs_the_frozen_target_in_every_step(tiny_model, data, tmp_path, monkeypatch):
    """labels.features online: training runs the frozen target inside each step and leaves it frozen."""
    model, _, manifest = tiny_model
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = train(tiny_model, data["online"], tmp_path, steps=4, eval_every=100, log_every=2)
    assert len(calls) >= 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(q.requires_grad for q in model.parameters())
    assert {f.name for f in run["out"].iterdir()} == OUT_FILES
    losses = [v for _, v in logged(run["metrics"], "loss")]
    assert len(losses) == 2 and all(map(lambda v: v == v and v > 0, losses))


# --------------------------------------------------------------------------- two processes


def _params_file(path: Path, **train) -> Path:
    params = full_params(ROOT / "presets" / "smoke.yaml")
    params["base"] |= {"torch_threads": 1, "device": "cpu", "seed": 0}
    params["train"] |= {k: v for k, v in BASE.items()} | train
    path.write_text(yaml.safe_dump(params))
    return path


def test_two_process_gloo_run_trains_and_rank0_writes(tiny_target, data, tmp_path):
    steps = 16
    params = _params_file(tmp_path / "params.yaml", steps=steps, eval_every=8, checkpoint_every=8)
    out, work, metrics, logs = tmp_path / "drafter", tmp_path / "work", tmp_path / "metrics", tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECAUF_NO_PROGRESS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # this process may be "rank 0 of 1" from the in-process tests
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3",
           str(ROOT / "stages" / "train.py"), "--params", str(params), "--variant", "auf",
           "--target", str(tiny_target[0]), "--labels", str(data["offline"]),
           "--out", str(out), "--work", str(work), "--metrics", str(metrics)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + str(rank_logs)[-3000:]
    assert sorted(rank_logs) == [0, 1]
    assert f"wrote {out}" in rank_logs[0] and "wrote" not in rank_logs[1]  # only rank 0 writes outputs
    assert {f.name for f in out.iterdir()} == OUT_FILES
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no stray temp folders
    assert not work.exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["variant"] == "auf"
    cfg = json.loads((out / "ds_config.json").read_text())
    assert cfg["train_batch_size"] == BASE["micro_batch_size"] * 2
    loss = logged(metrics, "loss")
    assert [s for s, _ in loss] == list(range(1, steps + 1))  # one logger (rank 0), one row per step
    first, last = sum(v for _, v in loss[:4]) / 4, sum(v for _, v in loss[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    drafter = BlockDrafter.from_pretrained(out)
    assert drafter.config.block_size == BASE["block_size"]


def test_train_processes_param_relaunches_under_the_launcher(tiny_target, data, tmp_path):
    """`train.processes: 2` runs the one-line stage command as 2 DeepSpeed ranks (the stage
    re-executes itself under torchrun): same weights as launching torchrun by hand."""
    steps = 6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECAUF_NO_PROGRESS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    outs = {}
    for how in ("param", "by_hand"):
        d = tmp_path / how
        d.mkdir()
        params = _params_file(d / "params.yaml", steps=steps, eval_every=steps, checkpoint_every=100,
                              processes=2 if how == "param" else 1)
        stage = [str(ROOT / "stages" / "train.py"), "--params", str(params), "--variant", "auf",
                 "--target", str(tiny_target[0]), "--labels", str(data["offline"]),
                 "--out", str(d / "drafter"), "--work", str(d / "work"), "--metrics", str(d / "metrics")]
        launcher = [] if how == "param" else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        proc = subprocess.run([sys.executable, *launcher, *stage], cwd=d, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((d / "drafter" / "manifest.json").read_text())["world_size"] == 2
        outs[how] = weights(d / "drafter")
    assert outs["param"].keys() == outs["by_hand"].keys()
    for k in outs["param"]:
        assert torch.equal(outs["param"][k], outs["by_hand"][k]), k




def test_loss_normalization_and_tv_acceptance_reach_the_loss(tiny_model, data):
    """train.loss_normalization changes how the batch's blocks are averaged, and soft AUF's `tv`
    acceptance needs the target's top-k at the same temperature: refused in one line otherwise."""
    from specauf.train.losses import WEIGHTS, per_position_ce, weighted_mean

    params = TrainParams(**{**BASE, "variants": ["dpace"], "loss_normalization": "block"})
    t = trainer(params, tiny_model, data["offline"], variant="dpace")
    batch = t.data.train_batch(0, 0, 1)
    loss, _ = t.loss(t.drafter, batch, step=0)
    logits, labels, validity, _ = t.forward(t.drafter, batch)
    ce = per_position_ce(logits, labels)
    w = WEIGHTS["dpace"](logits, labels, validity, ce, t.loss_options, None)  # differs per block
    assert torch.allclose(loss, weighted_mean(ce, w, "block"))
    assert not torch.allclose(loss, weighted_mean(ce, w, "batch"))
    with pytest.raises(UserError, match=r"train\.soft_auf_acceptance 'tv' needs the target's top-k distribution, "
                                        r"which .* does not hold: set labels.top_k > 0$"):
        trainer(TrainParams(**{**BASE, "variants": ["soft_auf"], "soft_auf_acceptance": "tv"}), tiny_model,
                data["offline"], variant="soft_auf")


def test_muon_trains_through_deepspeed_and_resumes_exactly(tiny_model, data, tmp_path):
    """train.optimizer muon: DeepSpeed's MuonWithAuxAdam (Muon on the 2-D weights at muon_lr, AdamW on
    the norms at lr) trains other weights than AdamW, and a run killed after its step-8
    checkpoint resumes to the uninterrupted run's bytes (momentum buffers included)."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    with pytest.MonkeyPatch.context() as mp:
        cap = Capture(mp)
        whole = train(tiny_model, data["offline"], tmp_path / "whole", optimizer="muon")
    opt = cap.engines[0].optimizer
    opt = getattr(opt, "optimizer", opt)
    assert isinstance(opt, MuonWithAuxAdam)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon-params", "adam-params"}
    muon = {id(p) for p in groups["muon-params"]["params"]}
    named = dict(cap.trainers[0].drafter.named_parameters())
    assert all((id(p) in muon) == (p.dim() == 2) for p in named.values())  # matrices to Muon, norms to AdamW
    killed_in_step_10(tiny_model, data, tmp_path / "resumed", optimizer="muon")
    resumed = train(tiny_model, data["offline"], tmp_path / "resumed", optimizer="muon")
    assert (resumed["out"] / "model.safetensors").read_bytes() == (whole["out"] / "model.safetensors").read_bytes()
    adamw = train(tiny_model, data["offline"], tmp_path / "adamw")
    assert (adamw["out"] / "model.safetensors").read_bytes() != (whole["out"] / "model.safetensors").read_bytes()
