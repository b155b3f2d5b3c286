"""vLLM's speculators (0.9.0) trains DFlash on our data: its offline format, its flags, its checkpoint.

What it reads (speculators 0.9.0, offline DFlash): a `datasets` folder (input_ids, loss_mask,
seq_len) plus per-row safetensors with the aux layers AND the target's last pre-norm state (its
labels are that state's argmax through the verifier's norm and lm_head; we add one target pass to
store it). On a CPU it needs three calls replaced (benchmarks/peer_speculators_run.py) and
`--loss-implementation eager`, `--draft-attn-impl sdpa`, `--num-workers 0`; its DFlash layers are
causal inside the block unless `--full-attention-indices` names them; its layer ids are ours + 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = "speculators==0.9.0"


def last_hidden_states(model, input_ids):
    """The target's last decoder layer output before the final norm (what speculators stores as
    `verifier_last_hidden_states` and turns into labels through the verifier's norm and lm_head)."""
    import torch

    out = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=input_ids[None])
    finally:
        hook.remove()
    return out["h"][0]


def speculators_rows(workspace: Path, out: Path, max_seq_len: int) -> dict:
    """Per labelled sequence (our data/labels row index r): hs/row_<r>.safetensors with
    `hidden_states` (S, 5 + 1, H) float32 (our stored features of the 5 layers, then the target's
    last pre-norm state) and `token_ids`, truncated to max_seq_len like our trainer. Written once;
    returns {r: {"input_ids", "response_start"}} and the label agreement check."""
    import torch
    from safetensors.torch import save_file

    from specauf.data.dataset import LabelsDataset
    from specauf.target.run import load_target

    done = out / "rows.json"
    if done.is_file():
        return json.loads(done.read_text())
    ds = LabelsDataset(workspace / "data/labels")
    model, _, _ = load_target(workspace / "data/target", "cpu")
    n_layers, hidden = len(ds.manifest["layer_ids"]), ds.manifest["hidden_size"]
    (out / "hs").mkdir(parents=True, exist_ok=True)
    rows, agree, total = {}, 0, 0
    for r in range(len(ds)):
        item = ds[r]
        ids = item["input_ids"][:max_seq_len]
        feats = item["features"][: len(ids)].float().reshape(len(ids), n_layers, hidden)
        last = last_hidden_states(model, ids)
        with torch.no_grad():  # the labels speculators will make: argmax of the verifier's logits
            labels = model.lm_head(model.model.norm(last)).argmax(-1)
        start = item["response_start"]
        agree += int((labels[start - 1: len(ids) - 1] == item["acceptance_ids"][start: len(ids)]).sum())
        total += len(ids) - start
        save_file({"hidden_states": torch.cat([feats, last[:, None]], 1).contiguous(), "token_ids": ids.contiguous()},
                  str(out / "hs" / f"row_{r}.safetensors"))
        rows[str(r)] = {"len": len(ids), "response_start": start}
    info = {"rows": rows, "vocab_size": model.config.vocab_size, "label_agreement": {"agree": agree, "total": total}}
    done.write_text(json.dumps(info))
    return info


def speculators_data(workspace: Path, ours, rows: dict, seed: int, setting: str, out: Path) -> tuple[Path, float]:
    """The data folder of one seed and setting: our training rows of that seed (our trainer's own
    held-out split), then its held-out rows (the peer's train_data_ratio cuts there), as a
    `datasets` folder (input_ids, loss_mask, seq_len) with hidden_states/hs_<i> linking to the
    rows' files, and our drafter's draft vocabulary (d2t/t2d). `matched` gives every row the
    seq_len of half the packing width, so the peer packs exactly two sequences per step like our
    trainer; `default` gives the real lengths (the peer packs as it does)."""
    import numpy as np
    from datasets import Dataset

    from specauf.data.dataset import LabelsDataset
    from specauf.train.batches import split_heldout
    from specauf.train.draft_vocab import DraftVocab

    folder = out / f"data-{setting}-seed{seed}"
    ds = LabelsDataset(workspace / "data/labels", verify=False)
    train, held = split_heldout(ds, ours.heldout_fraction, seed, ours.max_seq_len)
    order = train + held
    if not (folder / "done").is_file():
        input_ids, loss_mask = [], []
        for r in order:
            row = rows["rows"][str(r)]
            input_ids.append(ds[r]["input_ids"][: row["len"]].tolist())
            # anchors where ours are (a + 1 >= response_start): the last prompt position and every
            # response position; slot 0 (the anchor) is never a label, so no prompt token is one
            loss_mask.append([int(p >= row["response_start"] - 1) for p in range(row["len"])])
        seq_len = [ours.max_seq_len] * len(order) if setting == "matched" else [len(x) for x in input_ids]
        Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_mask, "seq_len": seq_len}
                          ).with_format("torch").save_to_disk(str(folder))
        (folder / "hidden_states").mkdir()
        for i, r in enumerate(order):
            (folder / "hidden_states" / f"hs_{i}.safetensors").symlink_to(out / "hs" / f"row_{r}.safetensors")
        # our trainer's draft vocabulary of this seed (the same rows, the same rule: our drafter's d2t)
        d2t = DraftVocab.build(ds, train, ours.draft_vocab_size, rows["vocab_size"]).d2t.numpy()
        np.save(folder / "d2t.npy", d2t - np.arange(len(d2t)))  # speculators' d2t: offsets (target = d + d2t[d])
        t2d = np.zeros(rows["vocab_size"], dtype=bool)
        t2d[d2t] = True
        np.save(folder / "t2d.npy", t2d)
        (folder / "done").write_text("")
    return folder, (len(train) + 0.5) / len(order)


def speculators_flags(ours, setting: str, seed: int, data: Path, ratio: float, workspace: Path, save: Path,
                      layer_ids: list[int], mask_token_id: int, steps: int) -> list[str]:
    """The peer's command line for a setting (TrainConfig flags of speculators 0.9.0)."""
    flags = ["--speculator-type", "dflash", "--verifier-name-or-path", str(workspace / "data/target"),
             "--data-path", str(data), "--train-data-ratio", str(ratio), "--seed", str(seed),
             "--save-path", str(save), "--log-dir", str(save / "logs"), "--max-steps", str(steps), "--epochs", "1000",
             "--on-missing", "raise", "--num-workers", "0", "--hidden-states-dtype", "float32",
             "--draft-attn-impl", "sdpa", "--loss-implementation", "eager", "--checkpoint-freq", "1",
             # speculators counts a layer's output as hidden_states[i + 1] of the embeddings-first list: ours + 1
             "--target-layer-ids", *[str(i + 1) for i in layer_ids],
             "--d2t-path", str(data / "d2t.npy"), "--t2d-path", str(data / "t2d.npy"),
             "--draft-vocab-size", str(ours.draft_vocab_size), "--mask-token-id", str(mask_token_id)]
    if setting == "matched":
        layers = ours.num_layers
        flags += ["--num-layers", str(layers), "--block-size", str(ours.block_size),
                  "--per-position-loss-weight", "dpace", "--dpace-alpha", str(ours.dpace_alpha), "--loss-fn", "ce",
                  "--total-seq-len", str(2 * ours.max_seq_len), "--max-anchors", str(2 * ours.anchors_per_seq),
                  "--optimizer", "adamw", "--lr", str(ours.lr), "--weight-decay", str(ours.weight_decay),
                  "--scheduler-type", "cosine", "--scheduler-warmup-steps", str(ours.warmup_steps)]
    else:
        layers = 5  # the peer's DFlash default (TrainConfig._resolve_derived_defaults)
    # every layer non-causal inside the block, as our drafter and DFlash engines run it (the peer's
    # default is causal sliding-window layers, which our drafter cannot represent)
    return flags + ["--full-attention-indices", *[str(i) for i in range(layers)]]


def speculators_train(python: Path, flags: list[str], log_file: Path, threads: int) -> float:
    """Run the peer's trainer (benchmarks/peer_speculators_run.py in its venv); its minutes."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        subprocess.run([str(python), str(ROOT / "benchmarks" / "peer_speculators_run.py"), "--threads", str(threads),
                        "--", *flags], check=True, stdout=log, stderr=log,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    return round((time.perf_counter() - t0) / 60, 2)


def last_checkpoint(save: Path) -> Path:
    epochs = sorted((int(d.name), d) for d in save.iterdir() if d.name.isdigit() and (d / "config.json").is_file())
    if not epochs:
        raise SystemExit(f"error: {save}: the peer wrote no checkpoint")
    return epochs[-1][1]


def conversion_check(python: Path, checkpoint: Path, drafter_dir: Path, target_dir: Path, model, hs_file: Path,
                     out_file: Path) -> dict:
    """The converted drafter against the peer's own model: the peer's training forward on one stored
    sequence (its anchors, its masks: peer_speculators_run.py --logits), then ours on the same
    anchors and features; the largest logit difference and how often the argmax guesses agree."""
    import torch
    from safetensors.torch import load_file

    from specauf.train.blocks import block_attention_mask
    from specauf.train.drafter import BlockDrafter

    if out_file.is_file():
        return json.loads(out_file.read_text())
    dump = out_file.with_suffix(".peer.safetensors")
    subprocess.run([str(python), str(ROOT / "benchmarks" / "peer_speculators_run.py"), "--logits", str(checkpoint),
                    str(target_dir), str(hs_file), str(dump)], check=True, capture_output=True)
    peer, row = load_file(str(dump)), load_file(str(hs_file))
    drafter = BlockDrafter.from_pretrained(drafter_dir).eval()
    a = peer["anchors"].long()
    A, W = len(a), drafter.config.block_size
    ids = torch.full((A, W), drafter.mask_token_id, dtype=torch.long)
    ids[:, 0] = row["token_ids"][a]
    C = int(a.max())
    feats = row["hidden_states"][:, :-1].flatten(1)
    with torch.no_grad():
        hidden = drafter(model.get_input_embeddings()(ids).view(1, A * W, -1), feats[None, :C],
                         block_position_ids=(a[:, None] + torch.arange(W)[None]).view(1, -1),
                         context_position_ids=torch.arange(C)[None],
                         attention_mask=block_attention_mask(a, W, C)[None, None])
        mine = drafter.draft_logits(hidden.view(A, W, -1)[:, 1:], drafter.draft_head(model.lm_head.weight))
    theirs = peer["logits"].view(A, W, -1)[:, 1:]
    # the drafter's output before the vocabulary head: the converted weights alone (the peer scores it
    # with a bf16 copy of the target's lm_head rows saved in its checkpoint; ours reads the target's)
    check = {"anchors": A, "positions": A * (W - 1),
             "max_abs_hidden_difference": float((hidden.view(A, W, -1)[:, 1:] - peer["hidden"].view(A, W, -1)[:, 1:]).abs().max()),
             "max_abs_logit_difference": float((mine - theirs).abs().max()),
             "argmax_agreement": float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())}
    out_file.write_text(json.dumps(check))
    return check
