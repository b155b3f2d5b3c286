"""DeepSpeed plumbing: the config a params section makes, fp32 masters, atomic checkpoints."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from specauf.config import TrainParams
from specauf.train.distributed import (_NotYetStarted, deepspeed_config, ensure_rank_env, init_engine, load_checkpoint,
                                 restore_master_weights, save_checkpoint)

CPU = torch.device("cpu")


def test_config_states_the_params_and_no_warmup_is_a_full_rate_start(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    p = TrainParams(micro_batch_size=2, grad_accum=4, grad_clip=0.5, zero_stage=1, precision="bf16", lr=3e-4,
                    weight_decay=0.1, steps=50, warmup_steps=0, min_lr_ratio=0.2)
    cfg = deepspeed_config(p)
    assert cfg["train_batch_size"] == 2 * 4 * 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 1} and cfg["bf16"] == {"enabled": True}
    assert cfg["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                       "torch_adam": True}
    assert cfg["scheduler"]["params"] == {"total_num_steps": 50, "warmup_num_steps": 1, "warmup_type": "linear",
                                          "warmup_min_ratio": 1.0, "cos_min_ratio": 0.2}
    with pytest.raises(ValueError, match="'auto' must be resolved"):
        deepspeed_config(TrainParams(precision="auto"))


def test_rank_env_is_filled_only_without_a_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    ensure_rank_env()

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1") and int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ensure_rank_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("1", "2")  # a launcher's values win


def test_the_scheduler_not_started_warning_alone_is_dropped():
    record = lambda msg: logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, None, None)
    f = _NotYetStarted()
    assert not f.filter(record("Attempting to get learning rate from scheduler before it has started"))
    assert f.filter(record("some other warning"))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    p = TrainParams(precision="bf16", steps=10, warmup_steps=1, micro_batch_size=1, lr=1e-2)
    eng = init_engine(model, deepspeed_config(p), CPU)
    x = torch.randn(1, 8)
    for _ in range(3):
        loss = eng(x.bfloat16()).float().square().mean()
        eng.backward(loss)
        eng.step()
    return eng


def test_masters_replace_the_bf16_roundings(engine):
    masters = [m.clone() for m in engine.optimizer.fp32_groups[0]]
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert any(not torch.equal(m.bfloat16().float(), m) for m in masters)  # the low bits a bf16 save would drop
    restore_master_weights(engine)
    assert [p.dtype for p in engine.module.parameters()] == [torch.float32] * 4
    assert all(torch.equal(p, m) for p, m in zip(engine.module.parameters(), masters))


def test_checkpoints_point_latest_last_and_keep_only_the_newest(tmp_path):
    torch.manual_seed(0)
    eng = init_engine(torch.nn.Linear(4, 2), deepspeed_config(TrainParams(precision="fp32", steps=5)), CPU)
    ckpt = tmp_path / "ckpt"
    assert load_checkpoint(eng, ckpt) == 0  # nothing yet: a fresh start
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "loss.tsv").write_text("step\tloss\n1\t2.0\n")
    save_checkpoint(eng, ckpt, 2, snapshot=metrics)
    save_checkpoint(eng, ckpt, 4, snapshot=metrics)
    assert (ckpt / "latest").read_text() == "step4" and not (ckpt / "step2").exists()
    assert (ckpt / "step4" / "metrics" / "loss.tsv").read_text() == "step\tloss\n1\t2.0\n"
    before = [p.detach().clone() for p in eng.module.parameters()]
    with torch.no_grad():
        for p in eng.module.parameters():
            p.add_(1.0)
    assert load_checkpoint(eng, ckpt) == 4
    assert all(torch.equal(p, q) for p, q in zip(eng.module.parameters(), before))
