"""benchmarks/peer_trainers.py's conversion of a peer's DFlash checkpoint into our drafter folder.

Both peers' layouts, built here from a tiny drafter of ours under the peer's names: SpecForge's HF
export (top-level num_hidden_layers/block_size, no draft vocabulary) and speculators' checkpoint
(transformer_layer_config, a t2d mask, frozen verifier copies beside). The converted drafter must
compute exactly what the peer's weights compute, and a tensor the conversion cannot place must stop it.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from specauf.artifacts import SCHEMA_VERSION, write_json
from specauf.train.blocks import block_attention_mask
from specauf.train.drafter import BlockDrafter, DrafterConfig
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("peer_trainers", ROOT / "benchmarks" / "peer_trainers.py")
peer_trainers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_trainers)

VOCAB, MASK = 60, 3


def like_folder(tmp_path, draft_vocab):
    """Our drafter folder the conversion takes its config and target facts from (layers 2, block 4)."""
    cfg = DrafterConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, block_size=4, num_target_layers=6,
                        draft_vocab_size=draft_vocab, dflash_config={"mask_token_id": MASK, "target_layer_ids": [1, 3]})
    d = tmp_path / "like"
    BlockDrafter(cfg).save_pretrained(d, safe_serialization=True)
    write_json(d / "manifest.json", {"schema_version": SCHEMA_VERSION, "kind": "drafter", "block_size": 4,
                                     "mask_token_id": MASK, "target_layer_ids": [1, 3], "target_fingerprint": "f" * 64,
                                     "draft_vocab_size": draft_vocab})
    return d


def peer_weights(layers, block, draft_vocab, seed):
    """A trained-looking drafter of another shape than `like` (the peer's own): its tensors by name."""
    torch.manual_seed(seed)
    cfg = DrafterConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, block_size=block, num_target_layers=6,
                        draft_vocab_size=draft_vocab, dflash_config={"mask_token_id": MASK, "target_layer_ids": [1, 3]})
    model = BlockDrafter(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    return model


def hidden(model, seed=1):
    """The drafter's output states on fixed anchored blocks (what both sides must agree on)."""
    g = torch.Generator().manual_seed(seed)
    W, a, C = model.config.block_size, torch.tensor([2, 5, 9]), 12
    embeds = torch.randn(1, len(a) * W, 32, generator=g)
    feats = torch.randn(1, C, 2 * 32, generator=g)
    with torch.no_grad():
        return model(embeds, feats, block_position_ids=(a[:, None] + torch.arange(W)).view(1, -1),
                     context_position_ids=torch.arange(C)[None],
                     attention_mask=block_attention_mask(a, W, C)[None, None])


def test_specforge_export_converts_exactly_with_the_whole_vocabulary(tmp_path):
    like = like_folder(tmp_path, draft_vocab=16)
    peer = peer_weights(layers=1, block=6, draft_vocab=0, seed=0)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(export / "model.safetensors"))
    (export / "config.json").write_text(json.dumps({"architectures": ["DFlashDraftModel"], "num_hidden_layers": 1,
                                                    "block_size": 6, "vocab_size": VOCAB}))
    out = peer_trainers.to_our_drafter(export, like, tmp_path / "ours", {"trainer": "specforge==0.2.0"})
    mine = BlockDrafter.from_pretrained(out).eval()
    assert mine.config.num_hidden_layers == 1 and mine.config.block_size == 6 and not mine.config.draft_vocab_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["draft_vocab_size"] is None and manifest["block_size"] == 6
    assert manifest["target_fingerprint"] == "f" * 64 and manifest["trainer"] == "specforge==0.2.0"
    assert torch.equal(hidden(mine), hidden(peer))


def test_speculators_checkpoint_converts_its_t2d_and_drops_the_verifier_copies(tmp_path):
    like = like_folder(tmp_path, draft_vocab=16)
    peer = peer_weights(layers=2, block=4, draft_vocab=16, seed=2)
    ids = torch.sort(torch.randperm(VOCAB)[:16]).values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    state = {k: v.contiguous() for k, v in peer.state_dict().items() if k != "d2t"}
    state.update(t2d=t2d, **{"embed_tokens.weight": torch.randn(VOCAB, 32), "verifier_lm_head.weight": torch.randn(VOCAB, 32)})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(state, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"transformer_layer_config": {"num_hidden_layers": 2}, "block_size": 4}))
    mine = BlockDrafter.from_pretrained(peer_trainers.to_our_drafter(ckpt, like, tmp_path / "ours", {})).eval()
    assert torch.equal(mine.d2t, ids) and mine.config.draft_vocab_size == 16
    assert torch.equal(hidden(mine), hidden(peer))

    state["layers.0.self_attn.renamed.weight"] = torch.zeros(3)  # a tensor ours has no place for
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(SystemExit, match="cannot place.*renamed"):
        peer_trainers.to_our_drafter(ckpt, like, tmp_path / "ours2", {})
