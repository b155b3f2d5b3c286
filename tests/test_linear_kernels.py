"""Calibrated linear kernels: each computes F.linear's product, a plan routes each layer by row
count and comes off cleanly, and greedy speculative decoding stays exact on a rerouted target."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from specauf.evaluate import linear_kernels as lk
from specauf.evaluate.decode import OracleProposer, speculative_generate
from specauf.target.tiny import build_tiny_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = build_tiny_target(tmp_path_factory.mktemp("lk") / "llama", arch="llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():  # attention that matters, so a wrong K/V or product shows in the argmax
        for name, w in model.named_parameters():
            if ".self_attn." in name and name.endswith("_proj.weight"):
                w.mul_(5.0)
    return model


def shapes_of(model):
    return {f"{o}x{i}" for (o, i) in lk._linears(model)}


@pytest.mark.parametrize("kernel", lk.available_kernels())
@pytest.mark.parametrize("bias", [False, True])
def test_every_kernel_computes_f_linear(kernel, bias):
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((7, 5), (64, 192), (300, 64)):
        w = torch.randn(out_f, in_f, generator=g)
        b = torch.randn(out_f, generator=g) if bias else None
        for shape in ((1, in_f), (3, in_f), (1, 8, in_f), (2, 3, in_f)):
            x = torch.randn(*shape, generator=g)
            want = F.linear(x, w, b)
            got = lk.KERNELS[kernel](x, w, w.t().contiguous(), b)
            assert got.shape == want.shape and got.is_contiguous()  # strided output would slow what follows
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calibrate_covers_every_shape_and_row_count(target):
    result = lk.calibrate(target, [1, 2, 4], repeats=1)
    assert set(result["plan"]) == shapes_of(target)
    rerouted = sum(k != "linear" for by_rows in result["plan"].values() for k in by_rows.values())
    assert lk.describe_plan(result["plan"]) == f"{rerouted} of {3 * len(shapes_of(target))} shape/row pairs off F.linear"
    for key, by_rows in result["plan"].items():
        assert set(by_rows) == {1, 2, 4}
        assert set(by_rows.values()) <= set(lk.available_kernels())
        for r, timing in result["ms"][key].items():
            assert set(timing) == set(lk.available_kernels()) and all(t > 0 for t in timing.values())
            best = by_rows[r]  # the winner is the fastest, unless within the margin of F.linear
            assert best == "linear" or timing[best] == min(timing.values()) and timing[best] < 0.95 * timing["linear"]
    with pytest.raises(ValueError, match="unknown linear kernel 'fast'"):
        lk.calibrate(target, [1], kernels=["linear", "fast"])


def test_install_routes_by_row_count_and_uninstall_restores(target):
    ids = torch.randint(4, target.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = target(ids).logits
        plan = {key: {1: "pretransposed", 6: "weight_major"} for key in shapes_of(target)}
        n = lk.install(target, plan)
        assert n == sum(len(m) for m in lk._linears(target).values())
        proj = target.model.layers[0].mlp.up_proj
        x1, x6, x3 = (torch.randn(1, r, proj.in_features) for r in (1, 6, 3))
        assert torch.equal(proj(x1), x1 @ proj.weight.t().contiguous())
        assert torch.equal(proj(x6), lk.KERNELS["weight_major"](x6, proj.weight, None, proj.bias))
        assert torch.equal(proj(x3), F.linear(x3, proj.weight, proj.bias))  # rows not planned: stock
        rerouted = target(ids).logits
        torch.testing.assert_close(rerouted, before, rtol=1e-4, atol=1e-4)
        lk.uninstall(target)
        assert not any("_specauf_kernels" in m.__dict__ or "forward" in m.__dict__ for m in target.modules())
        assert torch.equal(target(ids).logits, before)


def test_greedy_speculation_stays_exact_on_rerouted_kernels(target):
    """Plain steps on one kernel, verify blocks on others: speculative output == plain greedy."""
    V = target.config.vocab_size
    kernels = [k for k in lk.available_kernels() if k != "linear"]
    plan = {key: {r: kernels[r % len(kernels)] for r in range(1, 9)} for key in shapes_of(target)}
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, V, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(4)]
    refs = [speculative_generate(target, p, block_size=1, max_new_tokens=24).token_ids for p in prompts]
    lk.install(target, plan)
    try:
        for i, (prompt, ref) in enumerate(zip(prompts, refs)):
            assert speculative_generate(target, prompt, block_size=1, max_new_tokens=24).token_ids == ref
            for b in (2, 4, 8):
                oracle = OracleProposer(torch.cat([prompt, torch.tensor(ref)]), V, error_rate=0.3, seed=10 * i + b)
                r = speculative_generate(target, prompt, proposer=oracle, block_size=b, max_new_tokens=24)
                assert r.token_ids == ref, (i, b)
    finally:
        lk.uninstall(target)


def test_tune_linears_modes(target):
    assert lk.tune_linears(target, [1, 2], "stock") is None
    assert not any("_specauf_kernels" in m.__dict__ for m in target.modules())
    with pytest.raises(ValueError, match="eval.linear_kernels: 'fastest'"):
        lk.tune_linears(target, [1], "fastest")
    result = lk.tune_linears(target, [1, 2], "auto")
    try:
        assert set(result["plan"]) == shapes_of(target)
        rerouted = {k for p in result["plan"].values() for k in p.values()} - {"linear"}
        assert any("_specauf_kernels" in m.__dict__ for m in target.modules()) == bool(rerouted)
    finally:
        lk.uninstall(target)


def test_tune_linears_skips_the_weight_copy_when_memory_is_short(target, monkeypatch):
    """`pretransposed` doubles the weights it serves: not a candidate when that would not fit."""
    weight_bytes = sum(m.weight.nbytes for group in lk._linears(target).values() for m in group)
    monkeypatch.setattr(lk, "available_memory_bytes", lambda: 2 * weight_bytes - 1)
    result = lk.tune_linears(target, [1, 2], "auto")
    try:
        assert all("pretransposed" not in t for by_rows in result["ms"].values() for t in by_rows.values())
        assert not any(m.__dict__.get("_specauf_weight_t") is not None for m in target.modules())
    finally:
        lk.uninstall(target)
    monkeypatch.setattr(lk, "available_memory_bytes", lambda: 2 * weight_bytes)
    result = lk.tune_linears(target, [1], "auto")
    lk.uninstall(target)
    assert all("pretransposed" in t for by_rows in result["ms"].values() for t in by_rows.values())
    monkeypatch.undo()
    free = lk.available_memory_bytes()  # the real reading of /proc/meminfo
    assert free is None or free > weight_bytes
