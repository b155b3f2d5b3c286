"""The second verifier's own paths (Gemma 3 270M): scaled input embeddings seen identically by
training and decoding, Gemma's per-type RoPE, the base model's chat template and stop token, and
what the drafter refuses from Gemma's layers.

The target end to end (exact decoding, labels, sliding window crossed) is
tests/test_architectures.py's gemma3 case, its GGUF chunks tests/test_gguf_source.py; here tiny
random models.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specauf.config import LabelsParams, RolloutsParams, TargetParams, TrainParams
from specauf.data.dataset import LabelsDataset
from specauf.evaluate.decode import DrafterProposer
from specauf.train.drafter import BlockDrafter, DrafterConfig, RotaryEmbedding
from specauf.errors import UserError
from specauf.data.labels import run_labels
from specauf.data.rollouts import run_rollouts
from specauf.target.run import TargetError, load_target, materialize_target
from specauf.target.access import init_from_target
from specauf.target.tiny import tiny_config
from specauf.train.run import DrafterRun
from specauf.train.batches import TrainData
from tests.conftest import prompt_rows

CPU = torch.device("cpu")
GEMMA = dict(arch="gemma3", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=1, vocab_size=512,
             tie_word_embeddings=True)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the tiny Gemma target ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    materialize_target(TargetParams(source="random", random=GEMMA), root / "target", seed=0, params_hash="test")
    model, tok, manifest = load_target(root / "target")
    extra = {"target_fingerprint": manifest["fingerprint"]}
    run_rollouts(model, tok, prompt_rows(4), RolloutsParams(max_new_tokens=8, batch_size=4, shard_size=4),
                 out_dir=root / "rollouts", work_dir=root / "rollouts-work", seed=0,
                 stop_ids=manifest["stop_token_ids"], manifest_extra=extra)
    run_labels(model, root / "rollouts", LabelsParams(layer_ids=[0, 2], feature_dtype="float32", batch_size=4),
               out_dir=root / "labels", work_dir=root / "labels-work", pad_id=manifest["pad_token_id"], manifest_extra=extra)
    return model, manifest, root


def test_training_and_decoding_embed_block_tokens_as_the_target(gemma, monkeypatch):
    """Gemma multiplies embedding rows by sqrt(hidden) inside its embedding module: a drafter
    trained on raw rows and decoded on scaled ones (or the reverse) would see another input."""
    model, manifest, root = gemma
    embed = model.get_input_embeddings()
    assert float(embed.embed_scale) == 8.0  # sqrt(64)
    seen = []
    real_forward = BlockDrafter.forward

    def recording(self, block_embeds, *a, **k):
        seen.append(block_embeds.detach().clone())
        return real_forward(self, block_embeds, *a, **k)

    monkeypatch.setattr(BlockDrafter, "forward", recording)
    params = TrainParams(variants=["auf"], block_size=4, draft_vocab_size=0, anchors_per_seq=4, micro_batch_size=2,
                         heldout_fraction=0.0, num_layers=1, precision="fp32")
    data = TrainData(params, LabelsDataset(root / "labels"), 0, manifest["mask_token_id"],
                     model.get_output_embeddings().weight.shape[0], model, CPU)
    trainer = DrafterRun(params, "auf", model, manifest, data, 0, CPU)
    batch = data.train_batch(0, 0, 1)
    trainer.forward(trainer.drafter, batch)
    ids = batch.block_input_ids
    with torch.no_grad():
        target_embeds = model.model.embed_tokens(ids)
    assert torch.equal(seen[-1].view_as(target_embeds), target_embeds)
    assert not torch.allclose(target_embeds, embed.weight[ids])  # the raw rows are not what the target sees

    proposer = DrafterProposer(trainer.drafter.eval(), model)
    context, anchor = [5, 6, 7, 8], 9
    with torch.no_grad():
        out = model(torch.tensor([context]), output_hidden_states=True)
    proposer.reset(context)
    proposer.add_context(out.hidden_states)
    proposer.propose(torch.tensor(context + [anchor]), 3)
    block = torch.tensor([[anchor] + [trainer.drafter.mask_token_id] * 3])
    with torch.no_grad():
        assert torch.equal(seen[-1], model.model.embed_tokens(block).to(seen[-1].dtype))


def test_drafter_takes_gemmas_full_attention_rope_and_gelu_tanh():
    tc = tiny_config("gemma3", num_layers=6, num_kv_heads=1)
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(tc).eval()
    cfg = DrafterConfig.from_target_config(target.config, num_layers=1, block_size=4, mask_token_id=3)
    assert (cfg.head_dim, cfg.rope_theta, cfg.hidden_act) == (32, 1000000.0, "gelu_pytorch_tanh")
    pos = torch.arange(300)[None]
    # the drafter's layers attend over the whole context: full attention's RoPE, not the sliding layers'
    cos_ref, sin_ref = target.get_decoder().rotary_emb(torch.zeros(1), pos, "full_attention")
    cos_slide, _ = target.get_decoder().rotary_emb(torch.zeros(1), pos, "sliding_attention")
    cos, sin = RotaryEmbedding(cfg)(pos, torch.float32)
    assert torch.allclose(cos, cos_ref, atol=1e-6) and torch.allclose(sin, sin_ref, atol=1e-6)
    assert not torch.allclose(cos, cos_slide, atol=1e-3)


def test_init_from_target_is_refused_for_gemmas_layers():
    tc = tiny_config("gemma3", num_layers=3)
    target = AutoModelForCausalLM.from_config(tc).eval()
    drafter = BlockDrafter(DrafterConfig.from_target_config(target.config, num_layers=1, block_size=4, mask_token_id=3))
    with pytest.raises(UserError) as e:
        init_from_target(drafter, target)
    assert str(e.value) == ("train.init_from_target: Gemma3ForCausalLM's layers (four norms each, RMSNorm scaling "
                            "by 1 + weight) do not map onto the drafter's Llama-style layer; set it to false")


def test_a_base_models_chat_template_and_stop_tokens_come_from_params(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}<|im_start|>"
    manifest = materialize_target(TargetParams(source="random", random=GEMMA, chat_template=template,
                                               stop_tokens=["<|endoftext|>"]), tmp_path / "t", seed=0, params_hash="x")
    assert manifest["chat_template"] == "target.chat_template" and manifest["stop_token_ids"] == [0, 2]
    _, tok, _ = load_target(tmp_path / "t")
    assert tok.chat_template == template
    with pytest.raises(TargetError, match=r"^target\.stop_tokens: '<end_of_turn>' is not a token of the tokenizer$"):
        materialize_target(TargetParams(source="random", random=GEMMA, stop_tokens=["<end_of_turn>"]),
                           tmp_path / "u", seed=0, params_hash="x")
    assert not (tmp_path / "u").exists()


def test_features_float16_cannot_hold_are_refused_not_stored(gemma, tmp_path):
    """Gemma 3 270M's residual stream passes float16's 65,504 (its embeddings are scaled by 25):
    stored as float16 the features would be inf, and training would learn from them. The labels
    stage refuses in one line naming the param; float32 stores them."""
    _, manifest, root = gemma
    model, _, _ = load_target(root / "target")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e4)  # a residual stream past 65,504, as the real model's
    run = lambda dtype, name: run_labels(
        model, root / "rollouts", LabelsParams(layer_ids=[0, 2], feature_dtype=dtype, batch_size=4),
        out_dir=tmp_path / name, work_dir=tmp_path / f"{name}-work", pad_id=manifest["pad_token_id"],
        manifest_extra={"target_fingerprint": manifest["fingerprint"]})
    with pytest.raises(UserError, match=r"^labels\.feature_dtype: float16 cannot hold the target's features "
                                        r"\(layer [02] reaches \d+\); set bfloat16 or float32$"):
        run("float16", "fp16")
    assert not (tmp_path / "fp16").exists()
    run("float32", "fp32")
    assert LabelsDataset(tmp_path / "fp32")[0]["features"].isfinite().all()
