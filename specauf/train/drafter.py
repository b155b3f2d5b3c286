"""The masked block drafter (DFlash-style), docs/method.md section 2.

A few decoder layers with the target's hidden size. It owns no embedding table and no LM head:
the caller embeds the block `[anchor, MASK, ..., MASK]` with the target's frozen embeddings and
turns our output hidden states into logits with the target's frozen lm_head. It sees the target
through *context features*: the outputs of a few target decoder layers, concatenated, projected
by `fc` and RMS-normalised by `hidden_norm`. In every layer the keys/values are
[context ; block] and the queries come from the block only, so all B-1 guesses of a block come
out of one forward pass.

Module and parameter names follow the reference implementation (z-lab/dflash,
`DFlashDraftModel` over Qwen3 layers) so that checkpoints have the same weight layout:
`fc`, `hidden_norm`, `layers.N.self_attn.{q,k,v,o}_proj`, `layers.N.self_attn.{q,k}_norm`,
`layers.N.mlp.{gate,up,down}_proj`, `layers.N.{input,post_attention}_layernorm`, `norm`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from specauf.train.domino import attach_head
from specauf.target.access import check_target_supported, default_target_layer_ids, target_activation, target_rope, text_config, validate_target_layer_ids

REMOVED_LEVERS = ("context_layer_norm", "context_feature_scale")


class DrafterConfig(PretrainedConfig):
    """Drafter hyper-parameters; mask token and feature layers live in `dflash_config` as in the reference."""

    model_type = "specauf_dflash"

    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    block_size: int = 16
    num_target_layers: int = 4
    dflash_config: dict | None = None
    # Draft vocabulary: the drafter scores only these target ids (the `d2t` buffer). About half a
    # CPU training step is the 49k-way lm_head; the most frequent few thousand response tokens
    # cover almost every label. 0 = the full target vocabulary.
    draft_vocab_size: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Two conditioning levers measured as no help were removed (docs/benchmarks.md, "Removed
        # levers"); a drafter trained with one computes something this model no longer can.
        removed = sorted(k for k in REMOVED_LEVERS if kwargs.pop(k, False))
        if removed:
            raise ValueError(f"drafter config sets {', '.join(removed)}, a removed training lever: retrain the drafter")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.dflash_config is None:
            self.dflash_config = {}
        if "target_layer_ids" not in self.dflash_config:
            self.dflash_config["target_layer_ids"] = default_target_layer_ids(
                self.num_target_layers, self.num_hidden_layers)
        validate_target_layer_ids(self.dflash_config["target_layer_ids"], self.num_target_layers)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        super().__post_init__(**kwargs)

    @property
    def mask_token_id(self) -> int | None:
        return self.dflash_config.get("mask_token_id")

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.dflash_config["target_layer_ids"])

    @classmethod
    def from_target_config(cls, target_config, num_layers: int, block_size: int,
                           mask_token_id: int, target_layer_ids: list[int] | None = None,
                           **overrides) -> "DrafterConfig":
        """Copy the shapes and rope of a Llama/Qwen2/Qwen3/Mistral config, so the target's layers,
        embeddings and lm_head fit. `target_layer_ids=None` takes one feature layer per drafter
        layer, as the reference does."""
        check_target_supported(target_config)
        tc = text_config(target_config)
        heads = tc.num_attention_heads
        theta, rope_params = target_rope(tc)
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        L = tc.num_hidden_layers
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(L, num_layers)
        kw = dict(
            vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size, num_hidden_layers=num_layers,
            num_attention_heads=heads, num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            hidden_act=target_activation(tc),
            max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
            rope_theta=float(theta), rope_scaling=None if rope_type == "default" else rope_params,
            block_size=block_size, num_target_layers=L,
            dflash_config={"mask_token_id": int(mask_token_id), "target_layer_ids": list(target_layer_ids)},
        )
        kw.update(overrides)
        return cls(**kw)


class RMSNorm(nn.Module):
    """RMSNorm in float32, as HF Llama/Qwen3 do (same numerics as the target's norms)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary position ids; no weights and no buffers.

    inv_freq is recomputed per call (a few hundred flops) so nothing has to survive HF's
    meta-device loading. Supports default, linear and llama3 rope scaling.
    """

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = dict(config.rope_scaling or {})
        kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {kind!r} is not supported (default, linear, llama3)")
        self.kind = kind

    def inv_freq(self, device) -> torch.Tensor:
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        if self.kind == "linear":
            inv = inv / self.scaling["factor"]
        elif self.kind == "llama3":  # same rule as transformers' _compute_llama3_parameters
            s = self.scaling
            factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            wavelen = 2 * torch.pi / inv
            scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
            inv = torch.where(medium, smoothed, scaled)
        return inv

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, P, d); cos/sin (N, P, d)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class DrafterCache:
    """Per-layer K/V (post-rope) for decoding.

    Decoding appends the K/V of newly committed context positions together with the block's,
    then crops the block away, so context K/V are computed exactly once.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (N, kv_heads, P, d) for this layer; return the layer's full K/V."""
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions of every layer."""
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]


class DrafterAttention(nn.Module):
    def __init__(self, config: DrafterConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.dropout = config.attention_dropout
        H, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(H, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # per head, Qwen3 style
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, ctx, rope_q, rope_k, attention_mask=None, cache=None):
        """x (N,Q,H) normed block states; ctx (N,C,H) projected context or None."""
        N, Q, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(N, Q, self.n_head, self.head_dim)).transpose(1, 2)
        kv_in = x if ctx is None else torch.cat([ctx, x], dim=1)
        P = kv_in.shape[1]
        k = self.k_norm(self.k_proj(kv_in).view(N, P, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(kv_in).view(N, P, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        groups = self.n_head // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(N, Q, -1))


class DrafterMLP(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    """Pre-norm decoder layer. input_layernorm normalises the block stream only: the context
    stream was already normalised once by hidden_norm and is shared by all layers."""

    def __init__(self, config: DrafterConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DrafterAttention(config, layer_idx)
        self.mlp = DrafterMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, ctx, rope_q, rope_k, attention_mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_k, attention_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class BlockDrafter(PreTrainedModel):
    """Masked block drafter. Default HF init: Linear ~ N(0, initializer_range), norms = 1."""

    config_class = DrafterConfig
    base_model_prefix = "drafter"
    _no_split_modules = ["DrafterLayer"]

    def __init__(self, config: DrafterConfig):
        super().__init__(config)
        n = len(config.target_layer_ids)
        self.fc = nn.Linear(n * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DrafterLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        if config.draft_vocab_size:
            self.register_buffer("d2t", torch.arange(config.draft_vocab_size, dtype=torch.long))
        attach_head(self, config)  # Domino's correction head (specauf/train/domino.py); DFlash: nothing
        self.post_init()

    def draft_head(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The target lm_head rows the drafter scores (all of them without a draft vocabulary).
        Callers take it once: gathering 8192 rows of a 49k-row head costs about 10 ms, a tenth of
        a CPU decode cycle if done per call."""
        return lm_head_weight[self.d2t] if self.config.draft_vocab_size else lm_head_weight

    def draft_logits(self, hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary; head = draft_head(lm_head), in the dtype to compute in.

        One 2-D matmul: a non-contiguous (N, B-1, H) view that requires grad is not folded into a
        matmul by torch but broadcast into a bmm that copies the whole head once per block (it
        made whole fp32 training steps 1.9x as long, bf16 ones 5x)."""
        h = hidden.to(head.dtype)
        return (h.reshape(-1, h.shape[-1]) @ head.T).reshape(*h.shape[:-1], head.shape[0])

    def target_logits(self, hidden: torch.Tensor, head: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits over the full target vocabulary (vocab_size ids); ids outside the draft vocabulary
        get -inf, so argmax and sampling at decode time only ever propose draft-vocabulary tokens."""
        return self.to_target_vocab(self.draft_logits(hidden, head), vocab_size)

    def to_target_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Draft-vocabulary logits spread over the target's vocab_size ids (-inf elsewhere)."""
        if not self.config.draft_vocab_size:
            return logits
        full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
        return full.index_copy_(-1, self.d2t, logits) if full.dim() == 1 else full.scatter_(-1, self.d2t.expand(*logits.shape[:-1], -1), logits)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return self.config.target_layer_ids

    def project_context(self, context_features: torch.Tensor) -> torch.Tensor:
        """(N,C,n*H) raw target features -> (N,C,H) normalised context stream."""
        return self.hidden_norm(self.fc(context_features.to(self.fc.weight.dtype)))

    def forward(self, block_embeds, context_features=None, block_position_ids=None,
                context_position_ids=None, attention_mask=None, past_key_values=None,
                use_cache=False):
        """Return the final-normed hidden states of the block tokens (N,Q,H).

        attention_mask: bool (N,1,Q,K_total), True = attend, keys ordered
        [cached context..., new context (C), block (Q)]; None = attend to every key.
        past_key_values: a DrafterCache, appended in place (new context and block K/V); the
        caller crops the block back off. use_cache without a cache is an error rather than a
        silently discarded cache.
        """
        if use_cache and past_key_values is None:
            raise ValueError("use_cache=True needs a DrafterCache passed as past_key_values")
        x = block_embeds
        N, Q, _ = x.shape
        if block_position_ids is None:
            raise ValueError("block_position_ids is required (block positions are anchor..anchor+B-1)")
        has_ctx = context_features is not None and context_features.shape[1] > 0
        ctx = self.project_context(context_features) if has_ctx else None
        key_pos = block_position_ids
        if has_ctx:
            if context_position_ids is None:
                raise ValueError("context_position_ids is required with context_features")
            key_pos = torch.cat([context_position_ids, block_position_ids], dim=1)
        rope_q = self.rotary_emb(block_position_ids, x.dtype)
        rope_k = self.rotary_emb(key_pos, x.dtype)
        if attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask[:, None]
        for layer in self.layers:
            x = layer(x, ctx, rope_q, rope_k, attention_mask, past_key_values)
        return self.norm(x)


# So `AutoModel.from_pretrained(drafter_dir)` works once this module is imported.
AutoConfig.register(DrafterConfig.model_type, DrafterConfig, exist_ok=True)
AutoModel.register(DrafterConfig, BlockDrafter, exist_ok=True)
