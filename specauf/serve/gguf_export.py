"""The drafter as a llama.cpp DFlash GGUF, written with llama.cpp's own gguf-py.

Why not llama.cpp's converter: its `DFlashModel` cannot write a draft vocabulary (`Can not map
tensor 'd2t'`), which its runtime does read (src/models/dflash.cpp: `d2t` as I64 ABSOLUTE target
ids scattering `output.weight`'s rows into the full vocabulary). So we write what the runtime reads,
with the writer of the same sdist (specauf.serve.llamacpp.gguf_module), and nothing of the converter:
- `general.architecture = dflash` and Qwen3-shaped hyper-parameters under `dflash.*`;
- `dflash.block_size`, `dflash.target_layers` = our target_layer_ids + 1 (llama.cpp captures a
  layer's INPUT; our ids name hidden_states[i + 1], the OUTPUT of layer i),
  `dflash.attention.causal = false` (the block attends bidirectionally),
  `dflash.sample_from_anchor = true` (slot 0 of a block is the anchor, our layout);
- the target's tokenizer keys (llama.cpp checks that drafter and target share a vocabulary) with
  `tokenizer.ggml.mask_token_id`;
- the weights under gguf-py's tensor names for MODEL_ARCH.DFLASH, fp32 as trained; no embedding
  table (the target's is used), and for a draft vocabulary `output.weight` = the target lm_head
  rows of the draft vocabulary with `d2t` absolute.
"""
from __future__ import annotations

import logging
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from specauf.artifacts import MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, sha256_file, versions, write_json
from specauf.errors import UserError
from specauf.target.gguf_source import gguf_path

log = logging.getLogger("specauf")

# data/target_gguf: the target as llama.cpp runs it, by the serve.targets names.
TARGET_FILES = {"f32": "f32.gguf", "source": "source.gguf"}


def served_source_gguf(params) -> Path | None:
    """The original GGUF to copy into data/target_gguf: only where llama.cpp serves it
    (serve.targets names `source`), so a target whose GGUF exists only assembled from chunk
    packages (target.gguf_chunks) is never asked for it when nothing is served."""
    wanted = params.serve.engine != "none" and params.target.source == "gguf" and "source" in params.serve.targets
    return gguf_path(params.target) if wanted else None


def build_target_ggufs(params, target_dir: Path, source_gguf: Path | None, out_dir: Path) -> dict:
    """data/target_gguf: the target as llama.cpp runs it (serve.targets); `f32` is always written
    (the drafter GGUF copies its tokenizer)."""
    from specauf.serve import llamacpp
    from specauf.target.run import read_target_manifest

    tm = read_target_manifest(target_dir)
    with atomic_dir(out_dir, "target_gguf") as tmp:
        files = {}
        if params.serve.engine != "none":
            llamacpp.tool("llama-completion")  # built before any work, or one line saying how
            log.info("converting %s to f32 GGUF with llama.cpp %s's converter", target_dir, llamacpp.SDIST_COMMIT)
            llamacpp.convert_target(Path(target_dir), tmp / TARGET_FILES["f32"], "f32")
            if source_gguf is not None:  # served_source_gguf decided it is served
                shutil.copyfile(source_gguf, tmp / TARGET_FILES["source"])
                log.info("copied the original GGUF %s", source_gguf.name)
            elif "source" in params.serve.targets:
                log.info("serve.targets has source, but target.source is %s: no original GGUF, f32 only", params.target.source)
            files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.gguf"))}
        manifest = {"schema_version": SCHEMA_VERSION, "kind": "target_gguf", "engine": params.serve.engine,
                    "files": files, "source_gguf": source_gguf.name if source_gguf else None,
                    "target_fingerprint": tm["fingerprint"], "versions": versions(),
                    **({"llama_cpp": {"sdist": llamacpp.SDIST, "commit": llamacpp.SDIST_COMMIT}}
                       if params.serve.engine != "none" else {})}
        write_json(tmp / MANIFEST, manifest)
    log.info("wrote %s: %s", out_dir, ", ".join(files) or "nothing (serve.engine none)")
    return manifest


def tokenizer_gguf(target_gguf_dir: Path) -> Path:
    """The GGUF whose tokenizer the drafter GGUF copies (the f32 one: converted from data/target,
    so it holds exactly the tokenizer our stages used)."""
    return Path(target_gguf_dir) / TARGET_FILES["f32"]


@lru_cache(maxsize=4)
def _tokenizer_fields(path: str, mtime: float) -> tuple:
    """(name, value, types) of every tokenizer.* key of a GGUF (cached: an export writes several)."""
    from specauf.serve.llamacpp import gguf_module

    with gguf_module() as gguf:
        reader = gguf.GGUFReader(path)
        return tuple((name, f.contents(), list(f.types)) for name, f in reader.fields.items()
                     if name.startswith("tokenizer."))


def write_drafter_gguf(config, state: dict[str, torch.Tensor], lm_head: torch.Tensor | None,
                       tokenizer_from: Path, out_file: Path) -> dict:
    """Write one drafter (DrafterConfig + our state dict) to out_file; return its summary for the manifest."""
    from specauf.serve.llamacpp import SDIST_COMMIT, gguf_module

    tokenizer_from = Path(tokenizer_from)
    if not tokenizer_from.is_file():
        raise ArtifactError(f"{tokenizer_from}: missing (rerun the target_gguf stage)")
    if config.rope_scaling:
        raise UserError(f"GGUF export: rope scaling {config.rope_scaling} is not written (only default RoPE)")
    if config.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh"):
        raise UserError(f"GGUF export: hidden_act {config.hidden_act!r} is not one llama.cpp's DFlash runs")
    fields = _tokenizer_fields(str(tokenizer_from), tokenizer_from.stat().st_mtime)
    n_vocab = next((len(v) for name, v, _ in fields if name == "tokenizer.ggml.tokens"), None)
    if n_vocab != config.vocab_size:
        raise ArtifactError(f"{tokenizer_from}: {n_vocab} tokens, the drafter has a {config.vocab_size}-token vocabulary")
    with gguf_module() as gguf:
        arch = gguf.MODEL_ARCH.DFLASH
        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        w = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
        w.add_name("spec-auf DFlash drafter")
        w.add_context_length(int(config.max_position_embeddings))
        w.add_embedding_length(int(config.hidden_size))
        w.add_block_count(int(config.num_hidden_layers))
        w.add_feed_forward_length(int(config.intermediate_size))
        w.add_head_count(int(config.num_attention_heads))
        w.add_head_count_kv(int(config.num_key_value_heads))
        w.add_key_length(int(config.head_dim))
        w.add_value_length(int(config.head_dim))
        w.add_rope_freq_base(float(config.rope_theta))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_hidden_act(config.hidden_act)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_block_size(int(config.block_size))
        w.add_target_layers([int(i) + 1 for i in config.target_layer_ids])
        w.add_causal_attention(False)
        w.add_sample_from_anchor(True)
        for name, value, types in fields:
            w.add_key_value(name, value, types[0], sub_type=types[-1] if len(types) > 1 else None)
        w.add_mask_token_id(int(config.mask_token_id))
        tensors = {}
        for key, t in sorted(state.items()):
            if key == "d2t":
                continue
            gname = names.get_name("model." + key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ArtifactError(f"drafter tensor {key!r} has no llama.cpp DFlash name")
            tensors[gname] = t.detach().to(torch.float32).contiguous().numpy()
        if "d2t" in state:
            if lm_head is None:
                raise UserError("the drafter has a draft vocabulary: its GGUF needs the target's lm_head rows (--target)")
            d2t = state["d2t"].to(torch.long)
            tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.D2T]] = d2t.numpy()  # absolute target ids, I64
            tensors["output.weight"] = lm_head[d2t].to(torch.float32).contiguous().numpy()
        for gname, arr in tensors.items():
            w.add_tensor(gname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s: llama.cpp DFlash GGUF, %d tensors (gguf-py of llama.cpp %s)", out_file.name, len(tensors), SDIST_COMMIT)
    return {"file": out_file.name, "llama_cpp_commit": SDIST_COMMIT,
            "target_layers": [int(i) + 1 for i in config.target_layer_ids],
            "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}}
