"""Tiny random-init targets: the `smoke` preset's target and the test suite's fixtures.

A real tokenizer (byte-level BPE trained in ~1 s on bundled text) with a chat template, and a
random-init causal LM of a chosen architecture, so every stage runs for real in seconds.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]

# Enough varied English, code and arithmetic for a BPE with a few hundred merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "def add(a, b):\n    return a + b\n",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. ",
    "Speculative decoding drafts a block of tokens and the target verifies them at once. ",
    "Write a short story about a robot who learns to paint. Explain the theory of relativity. ",
    "for i in range(10):\n    print(i * i)\n",
    "What is 12 plus 30? The answer is 42. How many apples are left? ",
]


def build_tokenizer(vocab_size: int = 512, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ChatML-style special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (texts or []) + _CORPUS * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden_size: int = 64,
                num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                tie_word_embeddings: bool = False, max_position_embeddings: int = 2048, **extra):
    """A random-init config for one of the supported architectures (llama, qwen3, qwen2, mistral,
    gemma3: Gemma 3's text model with its sliding/full layer mix, per-type RoPE and GELU-tanh).

    `extra` sets any other config field (`head_dim`, `rope_parameters`, ...), so tests can give
    a tiny model the quirks of a real one (Qwen3's head_dim != hidden/heads, Llama 3's rope)."""
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6,
    )
    if arch == "qwen3":
        kw["head_dim"] = hidden_size // num_heads
    if arch == "gemma3":
        # Gemma 3 270M's quirks at tiny width: head_dim wider than hidden / heads, full attention
        # every few layers and sliding attention (a short window, so tests cross it) between,
        # RoPE base 1e6 on full layers and 1e4 on sliding ones.
        arch = "gemma3_text"
        head_dim = 2 * hidden_size // num_heads
        kw.update(head_dim=head_dim, query_pre_attn_scalar=head_dim, hidden_activation="gelu_pytorch_tanh",
                  sliding_window=16, layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                                                  for i in range(num_layers)],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return AutoConfig.for_model(arch, **{**kw, **extra})


def build_tiny_target(out_dir: str | Path, arch: str = "llama", seed: int = 0, **config_kw) -> Path:
    """Write a random-init causal LM and its tokenizer as an HF folder (safetensors)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(config_kw.pop("vocab_size", 512))
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kw)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves logits nearly flat; a larger spread makes greedy choices decisive,
    # so test outputs are far from ties and robust to float reordering.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0.0, 1.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
