"""The conversion check's peer half, in SpecForge's venv (benchmarks/peer_trainers.py runs it).

    <specforge venv>/bin/python benchmarks/peer_specforge_run.py EXPORT INPUTS OUT

SpecForge's own DFlash draft model, loaded from its own HF export, runs its training forward on
inputs our side wrote (safetensors: the noise embeddings of anchored blocks, one stored sequence's
target features, the anchors) with the mask its trainer builds (create_dflash_sdpa_mask) and the
position ids its trainer builds, and writes the drafter's output states, for our converted drafter
to be put beside. Nothing of ours is imported here.
"""
from __future__ import annotations

import sys


def main(export: str, inputs: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from specforge.algorithms.common.dflash_family_model import create_dflash_sdpa_mask
    from specforge.modeling.draft.dflash import DFlashDraftModel

    torch.set_num_threads(1)
    x = load_file(inputs)
    model = DFlashDraftModel.from_pretrained(export, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    anchors, S, W = x["anchors"].long()[None], x["target_hidden"].shape[1], model.config.block_size
    mask = create_dflash_sdpa_mask(anchors, torch.ones_like(anchors, dtype=torch.bool), S, W, "cpu")
    position_ids = torch.cat([torch.arange(S), (anchors[0, :, None] + torch.arange(W)).flatten()])[None]
    with torch.no_grad():
        hidden = model(position_ids=position_ids, noise_embedding=x["noise_embedding"], target_hidden=x["target_hidden"],
                       attention_mask=mask)
    save_file({"hidden": hidden[0].float().contiguous()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
