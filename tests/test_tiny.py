"""Tiny random-init targets: reproducible bytes per seed, a usable tokenizer and chat template."""
from __future__ import annotations

import hashlib

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from specauf.target.tiny import build_tiny_target, build_tokenizer, tiny_config


def _weights_sha(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_tiny_target(tmp_path / "a", seed=3, num_layers=2, hidden_size=32)
    b = build_tiny_target(tmp_path / "b", seed=3, num_layers=2, hidden_size=32)
    c = build_tiny_target(tmp_path / "c", seed=4, num_layers=2, hidden_size=32)
    assert _weights_sha(a) == _weights_sha(b) != _weights_sha(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_saved_folder_loads_as_a_causal_lm_that_stops_on_its_eos(tmp_path):
    folder = build_tiny_target(tmp_path / "t", arch="qwen3", num_layers=2, hidden_size=32)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_round_trips_text_and_renders_chat():
    tok = build_tokenizer(512)
    text = "def add(a, b):\n    return a + b\n  The fox: 42!"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("assistant")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_config_keeps_the_requested_shape(arch):
    c = tiny_config(arch, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (arch, 48, 3, 2, 16)
