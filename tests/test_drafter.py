"""The block drafter: config, reference weight layout, save/load, cache, init, and an overfit gate."""
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from specauf.train.blocks import block_attention_mask, build_blocks, sample_anchors
from specauf.train.drafter import BlockDrafter, DrafterCache, DrafterConfig, RotaryEmbedding
from specauf.target.access import context_features_from_hidden_states
from specauf.train.losses import compute_loss
from specauf.target.tiny import build_tiny_target

MASK = 3


@pytest.fixture(scope="module")
def llama_target(tmp_path_factory):
    path = build_tiny_target(tmp_path_factory.mktemp("llama"), arch="llama", seed=0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def randomize(model, seed=0):
    """Non-trivial norms too, so a lost or misplaced weight changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_from_target_config_copies_shapes(arch):
    from specauf.target.tiny import tiny_config
    tc = tiny_config(arch, hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2)
    cfg = DrafterConfig.from_target_config(tc, num_layers=2, block_size=8, mask_token_id=MASK,
                                           target_layer_ids=None)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert cfg.head_dim == 16 and cfg.vocab_size == tc.vocab_size and cfg.num_target_layers == 6
    assert cfg.rope_theta == tc.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.target_layer_ids == [1, 3] and cfg.mask_token_id == MASK and cfg.block_size == 8


def test_state_dict_uses_reference_names_and_no_embeddings():
    cfg = DrafterConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_target_layers=8,
                        dflash_config={"mask_token_id": MASK, "target_layer_ids": [1, 3, 5]})
    sd = BlockDrafter(cfg).state_dict()
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    expected |= {f"layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert set(sd) == expected
    assert sd["fc.weight"].shape == (32, 3 * 32)
    assert sd["layers.0.self_attn.q_norm.weight"].shape == (8,)  # per head
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)


def test_save_load_round_trip(tmp_path):
    cfg = DrafterConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_target_layers=8, block_size=4,
                        rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                        dflash_config={"mask_token_id": MASK, "target_layer_ids": [2, 5]})
    model = randomize(BlockDrafter(cfg)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    loaded = BlockDrafter.from_pretrained(tmp_path).eval()
    assert loaded.config.target_layer_ids == [2, 5] and loaded.mask_token_id == MASK
    assert loaded.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 32, generator=g), torch.randn(1, 6, 64, generator=g) * 50,
            torch.arange(6, 10)[None], torch.arange(6)[None])
    with torch.no_grad():
        assert torch.equal(model(*args), loaded(*args))
        fresh = BlockDrafter(cfg).eval()  # guards against a round trip that never loaded the weights
        assert not torch.allclose(fresh(*args), loaded(*args))
        auto = AutoModel.from_pretrained(tmp_path).eval()
        assert isinstance(auto, BlockDrafter) and torch.equal(auto(*args), model(*args))


@pytest.mark.parametrize("scaling", [
    None, {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_matches_transformers_llama(scaling):
    """Rope read from a transformers-5 target config reproduces the target's own cos/sin."""
    params = {"rope_theta": 500000.0, "rope_type": "default", **(scaling or {})}
    tc = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=4, max_position_embeddings=512, rope_parameters=params)
    cfg = DrafterConfig.from_target_config(tc, num_layers=1, block_size=4, mask_token_id=MASK)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == (None if scaling is None else scaling)
    pos = torch.arange(300)[None]
    cos_ref, sin_ref = LlamaRotaryEmbedding(tc)(torch.zeros(1), pos)
    cos, sin = RotaryEmbedding(cfg)(pos, torch.float32)
    assert torch.allclose(cos, cos_ref, atol=1e-6) and torch.allclose(sin, sin_ref, atol=1e-6)


def test_cache_decoding_equals_full_context():
    """Appending newly committed context K/V and cropping the block each step is exact."""
    cfg = DrafterConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_target_layers=8, block_size=4,
                        dflash_config={"mask_token_id": MASK, "target_layer_ids": [2, 5]})
    model, B = randomize(BlockDrafter(cfg)).eval(), 4
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 20, 64, generator=g)
    cache, committed = DrafterCache(), 0
    with torch.no_grad():
        for anchor in [7, 9, 9, 15]:  # 9 twice: a step with no new context (C = 0)
            embeds = torch.randn(1, B, 32, generator=g)
            new = feats[:, committed:anchor] if anchor > committed else None
            out = model(embeds, new, torch.arange(anchor, anchor + B)[None],
                        torch.arange(committed, anchor)[None], past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == anchor + B
            cache.crop(anchor)
            committed = anchor
            full = model(embeds, feats[:, :anchor], torch.arange(anchor, anchor + B)[None],
                         torch.arange(anchor)[None])
            assert torch.allclose(out, full, atol=1e-5)


def test_overfit_one_sequence_to_full_acceptance(llama_target):
    """Gate: a 1-layer drafter can memorise one sequence, so every full block is accepted."""
    target, B, S, response_start = llama_target, 4, 40, 10
    torch.manual_seed(0)
    ids = torch.randint(4, target.config.vocab_size, (S,))
    cfg = DrafterConfig.from_target_config(target.config, num_layers=1, block_size=B,
                                           mask_token_id=MASK, target_layer_ids=[1, 2])
    drafter = BlockDrafter(cfg)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    with torch.no_grad():
        feats = context_features_from_hidden_states(
            target(ids[None], output_hidden_states=True).hidden_states, cfg.target_layer_ids)
    anchors = sample_anchors(response_start, S, B, num_anchors=10_000)
    blocks = build_blocks(ids, response_start, S, anchors, B, MASK)
    A = len(anchors)
    with torch.no_grad():
        block_embeds = embed(blocks["block_input_ids"]).view(1, A * B, -1)
    mask = block_attention_mask(anchors, B, S)[None, None]
    args = (block_embeds, feats, blocks["block_position_ids"].view(1, -1), torch.arange(S)[None], mask)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(400):
        hidden = drafter(*args).view(A, B, -1)[:, 1:]
        loss, diag = compute_loss("auf", lm_head(hidden), blocks["labels"], blocks["validity"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if diag["token_accuracy"] == 1.0:
            break
    full = blocks["validity"].all(1)
    assert diag["token_accuracy"].item() == 1.0, f"accuracy {diag['token_accuracy']:.3f} after {step} steps"
    assert torch.all(diag["acceptance_lengths"][full] == B)


def test_a_drafter_trained_with_a_removed_lever_is_refused(tmp_path):
    """context_layer_norm and context_feature_scale were removed (measured as no help): a drafter
    saved with one of them on computes what this model cannot, so loading it fails in one line."""
    import json

    from specauf.artifacts import ArtifactError, loading

    with pytest.raises(ValueError, match="sets context_layer_norm, a removed training lever: retrain"):
        DrafterConfig(context_layer_norm=True)
    config = DrafterConfig(context_layer_norm=False, context_feature_scale=False)  # off: the same model as today
    BlockDrafter(config).save_pretrained(tmp_path / "d", safe_serialization=True)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "context_layer_norm" not in cfg
    (tmp_path / "d" / "config.json").write_text(json.dumps({**cfg, "context_feature_scale": True}))
    with pytest.raises(ArtifactError, match="context_feature_scale, a removed training lever"), loading(tmp_path / "d"):
        BlockDrafter.from_pretrained(tmp_path / "d")
