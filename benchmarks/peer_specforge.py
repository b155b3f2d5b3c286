"""SGLang's SpecForge (0.2.0) trains DFlash on our data: its offline format, its config, its export.

What SpecForge's offline DFlash reads (specforge/algorithms/common/dflash_family_data.py and
dflash_family_model.py, 0.2.0): one file per sequence with `input_ids` (S,), `loss_mask` (S,) and
`hidden_states` (S, layers x H), the aux-layer states concatenated in layer order, which is our
labels' `features` column as it is. Labels are the data tokens at anchor + k (our rollouts are the
target's greedy output, so they are our acceptance labels: `specforge_rows` counts where they agree);
anchors are drawn uniformly among positions p with loss_mask[p] and loss_mask[p + 1]; DFlash has no
draft vocabulary (the drafter scores the target's whole vocabulary through its frozen lm_head);
D-PACE's weighted CE is summed and divided by the batch size (ours divides by the weights' sum);
AdamW (torch's betas, no weight decay) over fp32 masters, cosine with linear warmup.

On this CPU it runs as shipped, in one process (gloo, `fsdp_sharding: NO_SHARD`), with
`attention_backend: sdpa` (flex attention needs a compiler) and `dataloader_num_workers: 0`.
Its checkpoints are pickles; `specforge export --to hf` (its own command, run in its venv) writes
safetensors, which is all our side reads.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

# not its pins: torch (ours), sglang (a GPU serving stack its offline DFlash trainer never imports)
# and the trackers/kernels it imports only when configured (wandb, tensorboard, yunchang)
PIN = "specforge==0.2.0"
DEPS = ["transformers==5.8.1", "datasets", "tqdm", "accelerate", "huggingface-hub", "numpy", "pydantic", "psutil",
        "pyyaml", "safetensors", "requests", "typing-extensions", "rich", "typer"]


def specforge_rows(workspace: Path, out: Path, max_seq_len: int) -> dict:
    """Per labelled sequence (our data/labels row r): sf/row_<r>.ckpt (torch.save: the format the
    peer reads; we never load these files) with our stored features in float32, the token ids and
    loss_mask = 1 from the last prompt position on (our anchors: a + 1 >= response_start),
    truncated to max_seq_len like our trainer. Written once."""
    import torch

    from specauf.data.dataset import LabelsDataset

    done = out / "sf_rows.json"
    if done.is_file():
        return json.loads(done.read_text())
    ds = LabelsDataset(workspace / "data/labels")
    (out / "sf").mkdir(parents=True, exist_ok=True)
    agree = total = 0
    for r in range(len(ds)):
        item = ds[r]
        ids = item["input_ids"][:max_seq_len]
        start = item["response_start"]
        agree += int((ids[start:] == item["acceptance_ids"][start: len(ids)]).sum())
        total += len(ids) - start
        torch.save({"input_ids": ids.clone(), "loss_mask": (torch.arange(len(ids)) >= start - 1).long(),
                    "hidden_states": item["features"][: len(ids)].float().contiguous()}, out / "sf" / f"row_{r}.ckpt")
    info = {"rows": len(ds), "label_agreement": {"agree": agree, "total": total}}
    done.write_text(json.dumps(info))
    return info


def specforge_data(workspace: Path, ours, seed: int, out: Path) -> tuple[Path, int]:
    """The rows our trainer trains on for this seed (its own held-out split), as a folder of links
    named in our order; SpecForge reads every file in it. Returns (folder, rows)."""
    from specauf.data.dataset import LabelsDataset
    from specauf.train.batches import split_heldout

    folder = out / f"data-specforge-seed{seed}"
    train, _ = split_heldout(LabelsDataset(workspace / "data/labels", verify=False), ours.heldout_fraction, seed,
                             ours.max_seq_len)
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(train):
            link = folder / f"{i:06d}.ckpt"
            if not link.is_symlink():
                link.symlink_to(out / "sf" / f"row_{r}.ckpt")
        (folder / "done").write_text("")
    return folder, len(train)


def draft_config(like: Path, setting: str, folder: Path) -> Path:
    """SpecForge's DFlash draft config (a Qwen3-style config, like the one it generates from the
    target) with our target layers and mask id: `matched` takes our drafter's shape (layers, block),
    `default` the shape of the DFlash drafters it ships configs for (configs/qwen3-8b-dflash.json:
    5 layers, block 16). Layer ids: its layer i is the output of decoder layer i, like ours (its
    extract_context_feature reads hidden_states[i + 1])."""
    cfg = json.loads((like / "config.json").read_text())
    for key in ("draft_vocab_size", "transformers_version", "dtype"):
        cfg.pop(key, None)
    if setting == "default":
        cfg.update(num_hidden_layers=5, block_size=16)
    cfg.update(architectures=["DFlashDraftModel"], model_type="qwen3", layer_types=["full_attention"] * cfg["num_hidden_layers"],
               sliding_window=None, use_sliding_window=False, use_cache=True, pad_token_id=0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "draft_config.json").write_text(json.dumps(cfg, indent=1))
    return folder / "draft_config.json"


def run_config(ours, setting: str, seed: int, data: Path, n_rows: int, draft_cfg: Path, workspace: Path, save: Path,
               steps: int, mask_token_id: int) -> dict:
    """The peer's run config (its typed schema, specforge/config/schema.py) for a setting. `matched`:
    our batch (2 sequences x 32 anchors), D-PACE alpha, lr, warmup steps, cosine, clip, fp32.
    `default`: its shipped offline DFlash recipe (examples/configs/offline/colocated/
    qwen3.5-4b-dflash-offline-amd.yaml: DFlash CE with loss_decay_gamma 7, 512 anchors, batch 2 x
    4 accumulation steps, lr 6e-4, warmup 4%, cosine, clip 1), fp32 and sdpa instead of its bf16 and
    flex attention (this CPU has no native bf16 and no compiler)."""
    accumulation = 1 if setting == "matched" else 4
    training = {"strategy": "dflash", "max_steps": steps, "num_epochs": math.ceil(steps * 2 * accumulation / n_rows) + 1,
                "fsdp_sharding": "NO_SHARD", "attention_backend": "sdpa", "log_interval": 50, "seed": seed,
                "batch_size": 2, "lr_scheduler": "cosine"}
    if setting == "matched":
        training.update(num_anchors=ours.anchors_per_seq, loss_type="dpace", dpace_alpha=ours.dpace_alpha,
                        learning_rate=ours.lr, warmup_ratio=min(1.0, ours.warmup_steps / steps), max_grad_norm=ours.grad_clip)
    else:
        training.update(accumulation_steps=accumulation, num_anchors=512, loss_type="dflash", loss_decay_gamma=7.0,
                        learning_rate=6e-4, warmup_ratio=0.04, max_grad_norm=1.0)
    return {"model": {"target_model_path": str(workspace / "data/target"), "draft_model_config": str(draft_cfg),
                      "torch_dtype": "float32", "mask_token_id": mask_token_id},
            "data": {"hidden_states_path": str(data), "max_length": ours.max_seq_len, "dataloader_num_workers": 0},
            "training": training, "run_id": "run", "output_dir": str(save)}


def specforge_train(python: Path, config: dict, run_dir: Path, threads: int) -> float:
    """`specforge train --config` in its venv; its minutes."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        subprocess.run([str(python.parent / "specforge"), "train", "--config", str(run_dir / "config.yaml")], check=True,
                       stdout=log, stderr=log, cwd=run_dir,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    return round((time.perf_counter() - t0) / 60, 2)


def export_checkpoint(python: Path, save: Path, draft_cfg: Path, out: Path) -> Path:
    """The run's last checkpoint through the peer's own `specforge export --to hf` (safetensors)."""
    steps = sorted((int(d.name.rsplit("step", 1)[1]), d) for d in save.glob("run-step*") if d.is_dir())
    if not steps:
        raise SystemExit(f"error: {save}: the peer wrote no checkpoint")
    if not (out / "model.safetensors").is_file():
        subprocess.run([str(python.parent / "specforge"), "export", "--to", "hf", "--checkpoint", str(steps[-1][1]),
                        "--draft-config", str(draft_cfg), "--output-dir", str(out)], check=True, capture_output=True)
    return out


def conversion_check(python: Path, export: Path, drafter_dir: Path, model, workspace: Path, row: int, max_seq_len: int,
                     out_file: Path, anchors: int = 16) -> dict:
    """The converted drafter against SpecForge's own model (benchmarks/peer_specforge_run.py): the
    same noise embeddings (anchor token, then MASK), the same stored features of labelled sequence
    `row` and the same anchors through its forward with its trainer's mask and positions, and through
    ours; the largest difference of the output states and how often the argmax guesses agree."""
    import torch
    from safetensors.torch import load_file, save_file

    from specauf.data.dataset import LabelsDataset
    from specauf.train.blocks import block_attention_mask
    from specauf.train.drafter import BlockDrafter

    if out_file.is_file():
        return json.loads(out_file.read_text())
    item = LabelsDataset(workspace / "data/labels", verify=False)[row]
    drafter = BlockDrafter.from_pretrained(drafter_dir).eval()
    W, ids = drafter.config.block_size, item["input_ids"]
    S = min(len(ids), max_seq_len)  # what specforge_rows stored for it
    start = item["response_start"]
    a = torch.linspace(start - 1, S - 2, anchors).round().long().unique()  # anchors its sampler could draw
    blocks = torch.full((len(a), W), drafter.mask_token_id, dtype=torch.long)
    blocks[:, 0] = ids[a]
    feats = item["features"][:S].float()[None]
    with torch.no_grad():
        noise = model.get_input_embeddings()(blocks).view(1, len(a) * W, -1)
    inputs, dump = out_file.with_suffix(".inputs.safetensors"), out_file.with_suffix(".peer.safetensors")
    save_file({"noise_embedding": noise.contiguous(), "target_hidden": feats.contiguous(), "anchors": a}, str(inputs))
    subprocess.run([str(python), str(Path(__file__).parent / "peer_specforge_run.py"), str(export), str(inputs), str(dump)],
                   check=True, capture_output=True)
    theirs = load_file(str(dump))["hidden"].view(len(a), W, -1)[:, 1:]
    with torch.no_grad():
        mine = drafter(noise, feats, block_position_ids=(a[:, None] + torch.arange(W)[None]).view(1, -1),
                       context_position_ids=torch.arange(S)[None],
                       attention_mask=block_attention_mask(a, W, S)[None, None]).view(len(a), W, -1)[:, 1:]
        head = model.lm_head.weight
        agree = (drafter.draft_logits(mine, drafter.draft_head(head)).argmax(-1)
                 == drafter.draft_logits(theirs, drafter.draft_head(head)).argmax(-1)).float().mean()
    check = {"anchors": len(a), "positions": len(a) * (W - 1),
             "max_abs_hidden_difference": float((mine - theirs).abs().max()), "argmax_agreement": float(agree)}
    out_file.write_text(json.dumps(check))
    return check
