"""Everything the pipeline reads from a loaded transformers target, in one place: which layers
feed the drafter and how their outputs become context features (the same concat for the labels
stage's stored features and for decode-time features, so the two cannot diverge), the text config
and RoPE, whether an architecture can host the drafter at all, whether a trained drafter fits a
target, the KV-cache calling convention, and the copy of the target's top layers into a new
drafter. The drafter itself (specauf/train/drafter.py) is only the model.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.activations import ACT2FN

from specauf.errors import UserError


def default_target_layer_ids(num_target_layers: int, n: int) -> list[int]:
    """Spread n feature layers from the 2nd to the 3rd-last target layer (reference rule).

    A single layer takes the middle one. The ids index decoder layers, 0-based.
    """
    L = num_target_layers
    if n < 1:
        raise ValueError(f"need at least one target layer id, got n={n}")
    ids = [L // 2] if n == 1 else [round(1 + i * (L - 4) / (n - 1)) for i in range(n)]
    validate_target_layer_ids(ids, L)
    return ids


def validate_target_layer_ids(ids: list[int], num_target_layers: int) -> None:
    bad = [i for i in ids if not 0 <= i < num_target_layers]
    if not ids or bad:
        raise ValueError(f"target layer ids {ids} must be non-empty and in [0, {num_target_layers})")


def context_features_from_hidden_states(hidden_states, layer_ids: list[int]) -> torch.Tensor:
    """Concatenate the outputs of the chosen target decoder layers (N, S, n*H).

    HF `output_hidden_states` puts the embeddings at index 0, so decoder layer i's output is at i+1.
    """
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


ROPE_TYPES = ("default", "linear", "llama3")


def text_config(config):
    """The text half of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def target_rope(target_config) -> tuple[float | None, dict]:
    """(theta, scaling params) of a target: transformers 5 keeps both in `rope_parameters`
    (per attention type for models that mix them; the drafter's layers are full attention),
    transformers 4 keeps theta in `rope_theta` and scaling in `rope_scaling`."""
    tc = text_config(target_config)
    params = dict(getattr(tc, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        params = dict(params.get("full_attention") or next(iter(params.values())))
    theta = params.pop("rope_theta", None) or getattr(tc, "rope_theta", None)
    if not params:
        params = dict(getattr(tc, "rope_scaling", None) or {})
    return theta, params


def target_activation(target_config) -> str:
    """The MLP activation: `hidden_act` (Llama, Qwen) or `hidden_activation` (Gemma 3's GELU-tanh)."""
    tc = text_config(target_config)
    return getattr(tc, "hidden_act", None) or getattr(tc, "hidden_activation", None) or "silu"


def rope_config_keys(theta: float, scaling: dict | None) -> dict:
    """The RoPE entries of a config.json that transformers 4 and 5 readers both parse the same way.

    transformers 5 writes only `rope_parameters`; a transformers 4 reader (vLLM, SGLang, the
    DFlash reference code) then falls back to its default `rope_theta` (10000) and computes wrong
    logits without a word. So both spellings are written, and they agree."""
    scaling = dict(scaling) if scaling and scaling.get("rope_type", scaling.get("type")) != "default" else None
    return {"rope_theta": float(theta), "rope_scaling": scaling,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": float(theta)}}


def target_incompatibilities(target_config, model=None) -> list[str]:
    """What a target lacks for the drafter (empty: none), so an unsupported architecture is
    refused in one line when the target is materialised instead of failing deep inside training
    with an AttributeError. The drafter copies the target's shapes, RoPE and RMSNorm epsilon,
    reads its hidden states, borrows its embedding table and lm_head, and initialises from its
    top decoder layers (`get_decoder().layers`, final `norm`)."""
    tc = text_config(target_config)
    missing = [f"config.{k}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                       "max_position_embeddings", "vocab_size")
               if getattr(tc, k, None) is None]
    theta, rope = target_rope(tc)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if theta is None:
        missing.append("rotary position embeddings (config.rope_parameters / rope_theta)")
    elif kind not in ROPE_TYPES:
        missing.append(f"a supported rope type (has {kind!r}; the drafter supports {', '.join(ROPE_TYPES)})")
    if getattr(tc, "rms_norm_eps", None) is None:
        missing.append("RMSNorm (config.rms_norm_eps)")
    if target_activation(tc) not in ACT2FN:
        missing.append(f"a known activation (config.hidden_act {target_activation(tc)!r})")
    if model is not None:
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != getattr(tc, "num_hidden_layers", None):
            missing.append("decoder layers at model.get_decoder().layers")
        if not isinstance(getattr(base, "norm", None), nn.Module):
            missing.append("a final norm at model.get_decoder().norm")
        H, V = getattr(tc, "hidden_size", None), model.get_input_embeddings()
        if not isinstance(V, nn.Embedding) or V.weight.shape[1] != H:
            missing.append("an input embedding table (nn.Embedding of width hidden_size)")
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None or tuple(head.weight.shape[1:]) != (H,):
            missing.append("an lm_head (get_output_embeddings() with a (vocab, hidden_size) weight)")
    return missing


def check_target_supported(target_config, model=None) -> None:
    """Raise ValueError naming the architecture and everything it lacks for the drafter."""
    missing = target_incompatibilities(target_config, model)
    if missing:
        arch = type(model).__name__ if model is not None else (
            getattr(target_config, "architectures", None) or [type(target_config).__name__])[0]
        raise UserError(f"{arch} (model type {target_config.model_type!r}) cannot host the drafter: it lacks "
                         + "; ".join(missing) + " (supported: decoder-only RoPE + RMSNorm models such as "
                         "Llama, Qwen2, Qwen3, Mistral)")


def check_drafter_fits(drafter, target, where: str) -> None:
    """Refuse a drafter built for another target before any decoding: another hidden size would
    only fail deep inside a forward pass, and another vocabulary would not fail at all (the drafter
    borrows the target's lm_head), it would just propose junk and report a meaningless tau."""
    c = drafter.config
    hidden = target.get_input_embeddings().weight.shape[1]
    vocab = target.get_output_embeddings().weight.shape[0]
    layers = target.config.get_text_config().num_hidden_layers
    if c.hidden_size != hidden:
        raise UserError(f"{where}: drafter hidden size {c.hidden_size} does not match the target's {hidden} "
                         "(trained for another target?)")
    if c.vocab_size != vocab:
        raise UserError(f"{where}: drafter vocabulary {c.vocab_size} does not match the target's {vocab} "
                         "(trained for another target?)")
    bad = [i for i in c.target_layer_ids if not 0 <= i < layers]
    if bad:
        raise UserError(f"{where}: drafter reads target layer {bad[0]}, the target has {layers} layers")
    if c.mask_token_id is None or not 0 <= c.mask_token_id < vocab:
        raise UserError(f"{where}: drafter mask token id {c.mask_token_id} is outside the target's vocabulary ({vocab})")


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def rollback_cache(model):
    """A KV cache that speculative decoding can crop back to the accepted prefix. Sliding-window
    layers (Gemma 3) keep only the last window of K/V and refuse a crop past it, unless they
    record the past until the next crop; full-attention layers (Llama, Qwen) are unaffected."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()
    return cache


def crop_cache(cache, length: int) -> None:
    """Drop cached positions >= length (a negative crop works on every transformers 4.x/5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def decoder_layers(target_model) -> tuple[nn.ModuleList, nn.Module]:
    """The target's decoder layers and final norm (what init_from_target copies from)."""
    base = target_model.get_decoder() if hasattr(target_model, "get_decoder") else target_model.model
    return base.layers, base.norm


@torch.no_grad()
def init_from_target(drafter, target_model) -> list[str]:
    """Copy the target's TOP decoder layers (and final norm) into the drafter where shapes match.

    The drafter's output goes through the target's lm_head, which expects the statistics of the
    target's last layers; starting from those layers gives a small CPU-trained drafter a useful
    prior. Returns the copied drafter parameter names. q_norm/k_norm stay ones when the target
    (e.g. Llama) has none.
    """
    t_layers, t_norm = decoder_layers(target_model)
    if hasattr(t_layers[-1], "pre_feedforward_layernorm"):
        raise UserError(f"train.init_from_target: {type(target_model).__name__}'s layers (four norms each, RMSNorm "
                        "scaling by 1 + weight) do not map onto the drafter's Llama-style layer; set it to false")
    n = len(drafter.layers)
    if n > len(t_layers):
        raise UserError(f"train.num_layers: {n} drafter layers cannot start from the target's top layers: "
                         f"it has only {len(t_layers)} (lower it or set train.init_from_target: false)")
    pairs = [(f"layers.{j}.", t_layers[len(t_layers) - n + j]) for j in range(n)]
    pairs.append(("norm.", t_norm))
    own = dict(drafter.named_parameters())
    copied = []
    for prefix, t_module in pairs:
        for name, t_param in t_module.named_parameters():
            key = prefix + name
            if key in own and own[key].shape == t_param.shape:
                own[key].copy_(t_param.to(own[key].dtype))
                copied.append(key)
    # Context stream: start `fc` as the identity on the highest feature layer and `hidden_norm` as
    # the first copied layer's input norm, so the copied attention initially reads the context
    # the way the target's own upper layers read their input (keys/values of a real hidden state).
    top = max(range(len(drafter.target_layer_ids)), key=lambda i: drafter.target_layer_ids[i])
    H = drafter.config.hidden_size
    drafter.fc.weight.zero_()
    drafter.fc.weight[:, top * H:(top + 1) * H].copy_(torch.eye(H, dtype=drafter.fc.weight.dtype))
    first = t_layers[len(t_layers) - n]
    if hasattr(first, "input_layernorm") and first.input_layernorm.weight.shape == drafter.hidden_norm.weight.shape:
        drafter.hidden_norm.weight.copy_(first.input_layernorm.weight.to(drafter.hidden_norm.weight.dtype))
    copied += ["fc.weight", "hidden_norm.weight"]
    return copied
