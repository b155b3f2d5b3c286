"""What the pipeline reads from a target (specauf/target/access.py): the feature-layer rule and
concat, RoPE, whether an architecture can host the drafter, and the copy of its top layers."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.target.access import (check_target_supported, context_features_from_hidden_states,
                                   default_target_layer_ids, init_from_target, target_rope)
from specauf.target.tiny import build_tiny_target, tiny_config

MASK = 3
BLOCK = 4


@pytest.fixture(scope="module")
def llama_target(tmp_path_factory):
    path = build_tiny_target(tmp_path_factory.mktemp("llama"), arch="llama", seed=0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_default_target_layer_ids():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B, the paper's setting
    assert default_target_layer_ids(4, 1) == [2]
    assert default_target_layer_ids(24, 2) == [1, 21]
    with pytest.raises(ValueError):
        DrafterConfig(num_target_layers=4, dflash_config={"mask_token_id": MASK, "target_layer_ids": [4]})


def test_context_features_index_decoder_layer_outputs(llama_target):
    ids = torch.randint(4, 200, (1, 9))
    with torch.no_grad():
        out = llama_target(ids, output_hidden_states=True)
    feats = context_features_from_hidden_states(out.hidden_states, [0, 2])
    assert feats.shape == (1, 9, 128)
    assert torch.equal(feats[..., :64], out.hidden_states[1])
    assert torch.equal(feats[..., 64:], out.hidden_states[3])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_init_from_target_copies_top_layers(tmp_path, arch):
    target = AutoModelForCausalLM.from_pretrained(build_tiny_target(tmp_path, arch=arch))
    cfg = DrafterConfig.from_target_config(target.config, num_layers=2, block_size=4,
                                           mask_token_id=MASK, target_layer_ids=[1, 2])
    drafter = BlockDrafter(cfg)
    copied = init_from_target(drafter, target)
    t_layers = target.model.layers
    assert torch.equal(drafter.layers[1].self_attn.q_proj.weight, t_layers[3].self_attn.q_proj.weight)
    assert torch.equal(drafter.layers[0].mlp.down_proj.weight, t_layers[2].mlp.down_proj.weight)
    assert torch.equal(drafter.norm.weight, target.model.norm.weight)
    assert "layers.0.post_attention_layernorm.weight" in copied and "fc.weight" in copied
    # the context projection starts as the identity on the highest feature layer (id 2 = chunk 1)
    H = cfg.hidden_size
    assert torch.equal(drafter.fc.weight[:, H:], torch.eye(H)) and not drafter.fc.weight[:, :H].any()
    assert torch.equal(drafter.hidden_norm.weight, t_layers[2].input_layernorm.weight)
    if arch == "qwen3":
        assert torch.equal(drafter.layers[0].self_attn.k_norm.weight, t_layers[2].self_attn.k_norm.weight)
    else:
        assert "layers.0.self_attn.q_norm.weight" not in copied
        assert torch.all(drafter.layers[0].self_attn.q_norm.weight == 1)


def test_rope_per_attention_type_takes_full_attention():
    """transformers 5 nests rope per attention type for mixed models (Gemma 3: sliding 1e4, full
    1e6); the drafter's layers are full attention. Reading it flat used to fall back to 1e4."""
    assert target_rope(AutoConfig.for_model("gemma3_text")) == (1000000.0, {"rope_type": "default"})


def test_unsupported_rope_and_missing_layers_are_named():
    """At drafter-build time too: a rope the drafter cannot reproduce, and a model whose decoder
    layers are not where init_from_target looks."""
    yarn = tiny_config("qwen2", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                 "original_max_position_embeddings": 512})
    with pytest.raises(ValueError, match=r"^Qwen2Config \(model type 'qwen2'\) cannot host the drafter: it lacks a supported "
                                         r"rope type \(has 'yarn'; the drafter supports default, linear, llama3\) \("):
        DrafterConfig.from_target_config(yarn, num_layers=1, block_size=BLOCK, mask_token_id=3)

    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=2))
    check_target_supported(model.config, model)  # the intact model passes
    model.get_decoder().layers = model.get_decoder().layers[:1]  # a layer list that does not match the config
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM \(model type 'llama'\) cannot host the drafter: it lacks "
                                         r"decoder layers at model.get_decoder\(\).layers \("):
        check_target_supported(model.config, model)
