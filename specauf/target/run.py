"""The target model: materialise it once as a local HF folder, fingerprint it, load it.

Every later stage records the fingerprint it was built with, so a target swapped under existing
rollouts or labels is caught before any compute.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from specauf.artifacts import (
    MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, file_fingerprint, hash_obj, loading, read_manifest,
    versions, write_json,
)
from specauf.config import TargetParams
from specauf.errors import UserError
from specauf.target.gguf_source import packaged_gguf

log = logging.getLogger("specauf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TargetError(UserError):
    """The target cannot be used; the message names the param, path or id at fault."""


def _check_causal(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TargetError(f"{where}: model type {config.model_type!r} is not a causal LM")
    if getattr(config, "is_encoder_decoder", False):
        raise TargetError(f"{where}: encoder-decoder models cannot be targets")


def _check_supported(config, where: str, model=None) -> None:
    """Refuse, before any compute, an architecture the drafter cannot use (GPT-2's learned
    positions, BERT's encoder, no `layers` list): the rollouts and labels would be wasted."""
    from specauf.target.access import check_target_supported

    try:
        check_target_supported(config, model)
    except ValueError as e:
        raise TargetError(f"{where}: {e}") from None


def _load_source(params: TargetParams, seed: int, work_parent: Path):
    """Return (model, tokenizer, description) for the configured source (work_parent: where a
    chunked GGUF is assembled for the load)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[params.dtype]
    if params.source == "random":
        from specauf.target.tiny import build_tiny_target
        import tempfile

        r = params.random
        with tempfile.TemporaryDirectory(prefix="specauf-random-target-") as tmp:  # loaded into memory, then gone
            build_tiny_target(tmp, r.arch, seed=seed, vocab_size=r.vocab_size, hidden_size=r.hidden_size,
                              num_layers=r.num_layers, num_heads=r.num_heads, num_kv_heads=r.num_kv_heads,
                              tie_word_embeddings=r.tie_word_embeddings)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(tmp)
        return model, tok, f"random {r.arch} (seed {seed})"
    if params.source == "gguf":
        with packaged_gguf(params, work_parent) as path:
            log.info("dequantising %s (about a minute on 2 cores, once)", path.name)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        # The weights are dequantised; drop the GGUF marker so the folder saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tok, f"gguf {params.gguf_package}/{params.gguf_file}"
    src = params.path if params.source == "local" else params.hub_id
    key = "target.path" if params.source == "local" else "target.hub_id"
    if params.source == "local" and not (Path(src) / "config.json").is_file():
        raise TargetError(f"{key}: {src} is not a Hugging Face model folder (no config.json)")
    kw = dict(trust_remote_code=params.trust_remote_code, revision=params.revision)
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except Exception as e:  # transformers raises many types for unknown or remote-code models
        raise TargetError(f"{key}: cannot read the config of {src} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    _check_causal(config, key)
    _check_supported(config, key)
    from safetensors import SafetensorError

    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or random-byte model.safetensors among them
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TargetError(f"{key}: cannot load {src}, a file is damaged or missing ({type(e).__name__}: {first})") from None
    return model, tok, f"{params.source} {src}"


def choose_mask_token(tokenizer, vocab_size: int, requested: int | None) -> tuple[int, str]:
    """Pick the token id the drafter uses as MASK, and say why.

    Order: an explicit param; the tokenizer's own mask token; the first embedding row past the
    tokenizer (models often pad their tables; Qwen3 does); else the last added special token that
    is not eos/bos/pad/unk and that the chat template never emits (SmolLM2: `<empty_output>`, 16).
    """
    if requested is not None:
        if requested >= vocab_size:
            raise TargetError(f"target.mask_token_id: {requested} is outside the vocabulary (size {vocab_size})")
        return requested, "target.mask_token_id param"
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < vocab_size:
        return tokenizer.mask_token_id, "tokenizer mask token"
    if vocab_size > len(tokenizer):
        return len(tokenizer), "first embedding row past the tokenizer"
    reserved = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = tokenizer.chat_template or ""
    candidates = [
        i for i, t in tokenizer.added_tokens_decoder.items()
        if t.special and i not in reserved and t.content not in template and i < vocab_size
    ]
    if not candidates:
        raise TargetError("target.mask_token_id: the tokenizer has no unused special token; set one explicitly")
    return max(candidates), f"last unused special token {tokenizer.convert_ids_to_tokens(max(candidates))!r}"


def stop_token_ids(tokenizer, generation_config, extra_tokens: list[str] = ()) -> list[int]:
    """The eos ids of the generation config and tokenizer, and the ids of `target.stop_tokens`."""
    ids = set()
    for token in extra_tokens:
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(found) != token:
            raise TargetError(f"target.stop_tokens: {token!r} is not a token of the tokenizer")
        ids.add(int(found))
    for src in (generation_config.eos_token_id if generation_config is not None else None, tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, list) else [src])
    return sorted(ids)


def _write_rope_both_ways(config_json: Path, config) -> None:
    """Add the transformers-4 RoPE keys to a config.json saved by transformers 5, so every engine
    that reads data/target (vLLM, SGLang, the DFlash reference, llama.cpp's converter) sees the
    same RoPE base as our own code."""
    from specauf.target.access import rope_config_keys, target_rope, text_config

    theta, scaling = target_rope(config)
    if theta is None:
        return
    data = json.loads(config_json.read_text())
    # A multimodal config nests the text model's keys; write them where the text config lives.
    where = data.get("text_config", data) if text_config(config) is not config else data
    for key, value in rope_config_keys(theta, scaling).items():
        where.setdefault(key, value)
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def materialize_target(params: TargetParams, out_dir: str | Path, seed: int, params_hash: str) -> dict:
    out_dir = Path(out_dir)
    model, tok, described = _load_source(params, seed, out_dir.parent)
    if params.chat_template is not None:
        tok.chat_template = params.chat_template
    if not tok.chat_template:
        raise TargetError(f"target.chat_template: the tokenizer of {described} has no chat template; set one")
    config = model.config
    _check_causal(config, "target")
    _check_supported(config, "target", model)
    vocab = model.get_input_embeddings().weight.shape[0]
    mask_id, mask_reason = choose_mask_token(tok, vocab, params.mask_token_id)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    stops = stop_token_ids(tok, model.generation_config, params.stop_tokens)
    with atomic_dir(out_dir, "target") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_rope_both_ways(tmp / "config.json", config)
        tok.save_pretrained(tmp)
        fingerprint = weights_fingerprint(tmp)
        manifest = {
            "schema_version": SCHEMA_VERSION, "kind": "target", "source": described,
            "fingerprint": fingerprint, "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": vocab, "tokenizer_size": len(tok), "dtype": params.dtype,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "mask_token_id": mask_id, "mask_token": tok.convert_ids_to_tokens(mask_id),
            "mask_token_reason": mask_reason, "stop_token_ids": stops,
            "chat_template": "target.chat_template" if params.chat_template is not None else "tokenizer",
            "pad_token_id": tok.pad_token_id, "trust_remote_code": params.trust_remote_code,
            "params_hash": params_hash, "versions": versions(),
        }
        write_json(tmp / MANIFEST, manifest)
    log.info("wrote %s: %s, %d layers, hidden %d, vocab %d, fingerprint %s, mask %d (%s)", out_dir,
             described, config.num_hidden_layers, config.hidden_size, vocab, fingerprint[:12], mask_id, mask_reason)
    return manifest


def weights_fingerprint(folder: str | Path) -> str:
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    return file_fingerprint(files)


def read_target_manifest(target_dir: str | Path, verify: bool = True) -> dict:
    manifest = read_manifest(target_dir, kind="target")
    if verify:
        actual = weights_fingerprint(target_dir)
        if actual != manifest["fingerprint"]:
            raise ArtifactError(f"{Path(target_dir)}: weights or config changed since the target stage "
                                f"(fingerprint {actual[:12]} != manifest {manifest['fingerprint'][:12]}); rerun `dvc repro target`")
    return manifest


def load_target(target_dir: str | Path, device: torch.device | str = "cpu", dtype: str | None = None,
                trust_remote_code: bool = False):
    """Load the materialised target (frozen, eval mode) with its tokenizer and manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_target_manifest(target_dir)
    dtype = DTYPES[dtype or manifest["dtype"]]
    with loading(target_dir):
        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(target_dir, trust_remote_code=trust_remote_code)
    model.to(device).eval().requires_grad_(False)
    return model, tok, manifest


def load_target_for(target_dir, upstream_dir, kind: str, device, trust_remote_code: bool = False):
    """Load the target and check that the `kind` artifact in upstream_dir was made with it."""
    upstream = read_manifest(upstream_dir, kind=kind)
    model, tokenizer, manifest = load_target(target_dir, device, trust_remote_code=trust_remote_code)
    if "target_fingerprint" not in upstream:
        raise ArtifactError(f"{Path(upstream_dir) / MANIFEST}: records no target fingerprint (not made by this pipeline)")
    check_fingerprint(upstream["target_fingerprint"], manifest, f"the {kind} in {upstream_dir}", target_dir)
    return model, tokenizer, manifest


def check_fingerprint(expected: str, target_manifest: dict, what: str, target_dir="data/target") -> None:
    if expected != target_manifest["fingerprint"]:
        raise ArtifactError(f"{what} were made with target {expected[:12]}, but {target_dir} is now "
                            f"{target_manifest['fingerprint'][:12]}: the target changed; rerun `dvc repro` to rebuild them")


def params_fingerprint(obj) -> str:
    return hash_obj(json.loads(json.dumps(obj, default=str)))
