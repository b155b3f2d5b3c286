"""Target stage: sources, fingerprint, MASK choice, and the errors a user can hit."""
from __future__ import annotations

import json
import shutil

import pytest

from specauf.artifacts import ArtifactError
from specauf.config import TargetParams
from specauf.target.run import TargetError, choose_mask_token, load_target, materialize_target, read_target_manifest


def test_local_folder_source_keeps_weights_and_fingerprint(tiny_target, tmp_path):
    src, manifest = tiny_target
    m = materialize_target(TargetParams(source="local", path=str(src)), tmp_path / "t", seed=0, params_hash="x")
    assert m["fingerprint"] == manifest["fingerprint"]  # same weights and config, same fingerprint
    assert m["mask_token"] == "<|mask|>" and "chat_template.jinja" in {p.name for p in (tmp_path / "t").iterdir()}
    model, tok, _ = load_target(tmp_path / "t")
    assert not any(p.requires_grad for p in model.parameters())


def test_changed_weights_are_caught(tiny_target, tmp_path):
    shutil.copytree(tiny_target[0], tmp_path / "t")
    cfg = tmp_path / "t" / "config.json"
    data = json.loads(cfg.read_text())
    data["rms_norm_eps"] = 1e-3
    cfg.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="weights or config changed since the target stage"):
        read_target_manifest(tmp_path / "t")


def test_missing_folder_and_non_causal_model(tmp_path):
    with pytest.raises(TargetError, match=r"target.path: .* is not a Hugging Face model folder"):
        materialize_target(TargetParams(source="local", path=str(tmp_path / "nope")), tmp_path / "o", seed=0, params_hash="x")
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(TargetError, match="model type 't5' is not a causal LM"):
        materialize_target(TargetParams(source="local", path=str(tmp_path / "t5")), tmp_path / "o", seed=0, params_hash="x")
    from specauf.target.tiny import tiny_config

    tiny_config("llama").save_pretrained(tmp_path / "empty")  # a config but no weights or tokenizer
    with pytest.raises(TargetError, match="target.path: cannot"):
        materialize_target(TargetParams(source="local", path=str(tmp_path / "empty")), tmp_path / "o", seed=0, params_hash="x")
    assert not (tmp_path / "o").exists()


def test_tokenizer_without_chat_template(tiny_target, tmp_path):
    shutil.copytree(tiny_target[0], tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").unlink()
    tc = tmp_path / "t" / "tokenizer_config.json"
    data = json.loads(tc.read_text())
    data.pop("chat_template", None)
    tc.write_text(json.dumps(data))
    with pytest.raises(TargetError, match="has no chat template"):
        materialize_target(TargetParams(source="local", path=str(tmp_path / "t")), tmp_path / "o", seed=0, params_hash="x")


def test_trust_remote_code_off_by_default(tiny_target, tmp_path):
    """A checkpoint that needs custom code is refused unless the param allows it."""
    shutil.copytree(tiny_target[0], tmp_path / "t")
    cfg = tmp_path / "t" / "config.json"
    data = json.loads(cfg.read_text())
    data["model_type"] = "my_custom_lm"
    data["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    cfg.write_text(json.dumps(data))
    (tmp_path / "t" / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(TargetError, match="target.path: cannot read the config"):
        materialize_target(TargetParams(source="local", path=str(tmp_path / "t")), tmp_path / "o", seed=0, params_hash="x")


def test_mask_token_choice(tiny_model):
    _, tok, manifest = tiny_model
    assert choose_mask_token(tok, manifest["vocab_size"], None)[0] == tok.convert_tokens_to_ids("<|mask|>")
    assert choose_mask_token(tok, manifest["vocab_size"] + 5, None) == (len(tok), "first embedding row past the tokenizer")
    assert choose_mask_token(tok, manifest["vocab_size"], 7) == (7, "target.mask_token_id param")
    with pytest.raises(TargetError, match="outside the vocabulary"):
        choose_mask_token(tok, manifest["vocab_size"], 10**6)


def test_config_states_rope_for_transformers_4_and_5_readers(tiny_target, tmp_path):
    """transformers 5 saves only `rope_parameters`; a transformers 4 reader (vLLM, SGLang, the
    DFlash reference) would silently use rope_theta 10000 instead of the target's base."""
    shutil.copytree(tiny_target[0], tmp_path / "src")
    cfg = tmp_path / "src" / "config.json"
    data = json.loads(cfg.read_text())
    data.pop("rope_theta", None)
    data["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 123456.0}
    cfg.write_text(json.dumps(data))
    materialize_target(TargetParams(source="local", path=str(tmp_path / "src")), tmp_path / "t", seed=0, params_hash="x")
    written = json.loads((tmp_path / "t" / "config.json").read_text())
    assert written["rope_theta"] == 123456.0 and written["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert written["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 123456.0}
    model, _, _ = load_target(tmp_path / "t")
    assert model.config.rope_parameters["rope_theta"] == 123456.0
