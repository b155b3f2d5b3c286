"""Our trainer beside the field's: a peer trains DFlash on exactly our training data, our replay judges it.

    python benchmarks/peer_trainers.py --peers speculators --settings matched,default --seeds 0,1

For each peer, setting and seed: the peer is installed into a venv of its own (pinned, on our torch
wheel, under ~/.cache/spec-auf/peers; it pins a transformers ours cannot share), our training
sequences (data/labels: the same rows our train stage trains on, in the same held-out split of
that seed) are converted into the peer's offline format, the peer's own trainer trains a DFlash
drafter on them, the result is converted back into our drafter folder (weights by name; the peer's
frozen verifier tensors are dropped) and replayed on every eval prompt by our eval's replay
(specauf.evaluate.replay: lever_tau's), then compared with our dpace and auf drafters of the same
seed (their replay rows from benchmarks/lever_tau.py's cache, or replayed here) with the paired
two-level interval over seeds and prompts. A few decoded prompts per drafter check the converted
drafter through our decoder: every output must equal the target's greedy answer.

Settings (what each peer is given; the table prints them):
- `matched`: our default's drafter shape (1 layer, our 5 target layers, draft vocabulary 8192 =
  our drafter's of that seed, block 8, non-causal block attention), D-PACE (alpha 0.5), hard
  labels (the target's argmax), 2 sequences x 32 anchors = 64 blocks per step, 1600 steps,
  AdamW lr 1e-3, 30 warmup steps, cosine, no weight decay, gradient clip 1, fp32. What stays the
  peer's own: its loss normalisation (weighted CE summed over a row's valid positions and divided
  by their count; ours divides by the weights' sum), torch's AdamW betas (0.9, 0.999; ours 0.95),
  cosine down to 0 (ours to train.min_lr_ratio), and bf16 weights in its checkpoints.
- `default`: the peer's shipped DFlash defaults (speculators 0.9.0: 5 draft layers, block 16,
  D-PACE, CE, Muon lr 1e-3 with its AdamW group, linear schedule, weight decay 0.01, rows packed to
  8192 tokens with 512 anchors each), for as many steps as fit in our default's training minutes at
  the per-step times `--throughput` measured; on our target layers (our labels hold those features;
  the peer's default layers would need another target pass), fp32 (its bf16 default needs native
  bf16, which this CPU lacks), with non-causal block attention (what our drafter and DFlash engines
  run; its default layers are causal sliding-window ones, which our drafter cannot represent).
On a CPU the peer also needs `--loss-implementation eager` (its fused losses need Triton),
`--draft-attn-impl sdpa` (flex attention needs a compiler) and `--num-workers 0`.

    python benchmarks/peer_trainers.py --throughput    # first, on a quiet machine: per-step times

Everything goes under --out (default benchmarks/.cache/peer_trainers/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PEERS = {"speculators": "speculators==0.9.0"}


def peers_home() -> Path:
    return Path(os.environ.get("SPECAUF_PEERS_HOME", Path.home() / ".cache" / "spec-auf" / "peers"))


def install(peer: str) -> Path:
    """The peer's Python, its venv installed once (a stamp names the pin and our torch)."""
    import torch

    from specauf.vllm import CUDA_ONLY

    venv, pin = peers_home() / f"{peer}-venv", [PEERS[peer], f"torch=={torch.__version__.split('+')[0]}"]
    stamp = venv / "specauf-stamp.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == pin:
        return venv / "bin" / "python"
    print(f"installing {' '.join(pin)} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", *pin], check=True)
    # PyPI's CUDA-only builds that die on a CPU torch at import (specauf/vllm.py says how); text needs none
    subprocess.run([*pip, "uninstall", "-q", "-y", *CUDA_ONLY], check=True)
    stamp.write_text(json.dumps(pin))
    return venv / "bin" / "python"


# ---------------------------------------------------------------- our data -> speculators' offline format

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


def peer_train(python: Path, flags: list[str], log_file: Path, threads: int) -> float:
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


def to_our_drafter(checkpoint: Path, like: Path, out: Path, manifest_extra: dict) -> Path:
    """The peer's DFlash checkpoint as our drafter folder: our config with the peer's shape (layers,
    block size), the peer's trained tensors by name (fc, hidden_norm, layers.*, norm; its frozen
    embed/lm_head/verifier copies are the target's and ours reads the target's own), our d2t
    (absolute ids) from its t2d, and a manifest with the target fingerprint. Refuses a tensor it
    cannot place, so a renamed weight cannot silently stay at its initial value."""
    import torch
    from safetensors.torch import load_file

    from specauf.artifacts import read_manifest, write_json
    from specauf.train.drafter import BlockDrafter, DrafterConfig

    peer_cfg = json.loads((checkpoint / "config.json").read_text())
    weights = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    cfg = DrafterConfig.from_pretrained(like)
    cfg.num_hidden_layers = peer_cfg["transformer_layer_config"]["num_hidden_layers"]
    cfg.block_size = peer_cfg["block_size"]
    drafter = BlockDrafter(cfg)
    mine = drafter.state_dict()
    skip = ("embed_tokens.", "lm_head.", "verifier_lm_head.", "verifier_norm.", "t2d")
    state = {k: v.float() for k, v in weights.items() if not k.startswith(skip)}
    state["d2t"] = torch.nonzero(weights["t2d"].bool()).flatten().long() if "t2d" in weights else mine["d2t"]
    unplaced = sorted(set(state) - set(mine))
    missing = sorted(set(mine) - set(state))
    if unplaced or missing:
        raise SystemExit(f"error: {checkpoint}: tensors the conversion cannot place {unplaced[:5]}, ours left unset {missing[:5]}")
    drafter.load_state_dict(state, strict=True)
    ours = read_manifest(like, kind="drafter")
    out.mkdir(parents=True, exist_ok=True)
    drafter.save_pretrained(out, safe_serialization=True)
    write_json(out / "manifest.json", {
        "schema_version": ours["schema_version"], "kind": "drafter", "block_size": cfg.block_size,
        "mask_token_id": ours["mask_token_id"], "target_layer_ids": ours["target_layer_ids"],
        "target_fingerprint": ours["target_fingerprint"], "draft_vocab_size": ours["draft_vocab_size"],
        "converted_from": str(checkpoint), **manifest_extra})
    return out


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


def throughput(python: Path, workspace: Path, ours, params_base: dict, rows: dict, out: Path, threads: int) -> dict:
    """Seconds per training step, one contender after the other with nothing else of ours running:
    our trainer (DFlash, and Domino: issue 32's cost per step), the peer in the `matched` setting
    (the same 64 blocks per step) and in its `default` setting. Each trains a short and a long run
    from scratch; the difference over the extra steps leaves start-up out."""
    import yaml

    from lever_tau import run_stage

    seed = ours.seeds[0]
    like = our_drafter("dpace", seed, workspace, out)
    wall, plan = {}, {"ours": (50, 250), "ours_domino": (50, 250), "speculators_matched": (50, 250),
                      "speculators_default": (2, 6)}
    for who, (short, long) in plan.items():
        for steps in (short, long):
            d = out / "throughput" / f"{who}-{steps}"
            t0 = time.perf_counter()
            if who.startswith("ours"):
                d.mkdir(parents=True, exist_ok=True)
                p = json.loads(json.dumps(params_base))
                p["train"].update(variants=["dpace"], steps=steps, torch_threads=threads,
                                  **({"domino": {}} if who == "ours_domino" else {}))
                (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
                run_stage("train", d / "params.yaml", ["--variant", "dpace", "--seed", str(seed), "--labels",
                          str(workspace / "data/labels"), "--target", str(workspace / "data/target"), "--out",
                          str(d / "drafter"), "--work", str(d / "work"), "--metrics", str(d / "metrics")], d / "train.log",
                          workspace)
            else:
                setting = who.split("_")[1]
                data, ratio = speculators_data(workspace, ours, rows, seed, setting, out)
                peer_train(python, speculators_flags(ours, setting, seed, data, ratio, workspace, d / "checkpoints",
                                                     like_layers(like), like_mask(like), steps), d / "train.log", threads)
            wall[(who, steps)] = time.perf_counter() - t0
    per_step = {who: (wall[(who, b)] - wall[(who, a)]) / (b - a) for who, (a, b) in plan.items()}
    return {"threads": threads, "plan": plan, "wall_s": {f"{w}-{n}": v for (w, n), v in wall.items()},
            "s_per_step": per_step, "blocks_per_s": {w: 2 * ours.anchors_per_seq / per_step[w]
                                                      for w in ("ours", "ours_domino", "speculators_matched")},
            "speculators_matched_over_ours": per_step["speculators_matched"] / per_step["ours"],
            "domino_over_dflash": per_step["ours_domino"] / per_step["ours"],
            "default_steps_in_our_minutes": round(ours.steps * per_step["ours"] / per_step["speculators_default"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="speculators", help=f"comma-separated, of {', '.join(PEERS)}")
    ap.add_argument("--settings", default="matched,default")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workspace", default=str(ROOT))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / ".cache" / "peer_trainers"))
    ap.add_argument("--lever-cache", default=str(ROOT / "benchmarks" / ".cache" / "lever_tau"),
                    help="benchmarks/lever_tau.py --out: our dpace/auf drafters and replay rows per seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override every run's steps (a smoke run)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--throughput", action="store_true", help="only time our trainer and the peer's per step "
                    "(matched setting), one after the other: run it with nothing else busy")
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()
    from specauf.params_file import load_params
    from specauf.runtime import setup_logging

    setup_logging("peer_trainers")
    import torch

    torch.set_num_threads(args.threads)
    workspace, out, lever = Path(args.workspace).resolve(), Path(args.out).resolve(), Path(args.lever_cache).resolve()
    params = load_params(workspace / "params.yaml")
    ours = params.train
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = speculators_rows(workspace, out, ours.max_seq_len)
    if args.throughput:
        from specauf.params_file import full_params

        result = throughput(install("speculators"), workspace, ours, full_params(workspace / "params.yaml"), rows, out,
                            args.threads)
        (out / "throughput.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    agree = rows["label_agreement"]
    print(f"labels: the peer's argmax labels equal our acceptance labels at {agree['agree']}/{agree['total']} positions")
    runs, model = {}, None
    for peer in args.peers.split(","):
        python = install(peer)
        for setting in args.settings.split(","):
            for seed in seeds:
                name = f"{peer}_{setting}"
                run_dir = out / f"{name}-{seed}"
                like = our_drafter("dpace", params.train.seeds[0], workspace, lever)  # config and target facts
                drafter_dir = run_dir / "drafter"
                if not (drafter_dir / "model.safetensors").is_file():
                    data, ratio = speculators_data(workspace, ours, rows, seed, setting, out)
                    steps = args.steps or (ours.steps if setting == "matched" else default_steps(out))
                    save = run_dir / "checkpoints"
                    flags = speculators_flags(ours, setting, seed, data, ratio, workspace, save, like_layers(like),
                                              like_mask(like), steps)
                    minutes = peer_train(python, flags, run_dir / "train.log", args.threads)
                    (run_dir / "run.json").write_text(json.dumps({"peer": PEERS[peer], "setting": setting, "seed": seed,
                                                                   "steps": steps, "minutes": minutes, "flags": flags}))
                    to_our_drafter(last_checkpoint(save), like, drafter_dir,
                                   {"trainer": PEERS[peer], "setting": setting, "seed": seed, "steps": steps})
                if not (run_dir / "conversion.json").is_file():
                    from specauf.target.run import load_target

                    model = model or load_target(workspace / "data/target", "cpu")[0]
                    held = next(r for r in sorted(map(int, rows["rows"])) if r % 7 == 3)  # any stored sequence
                    check = conversion_check(python, last_checkpoint(run_dir / "checkpoints"), drafter_dir,
                                             workspace / "data/target", model, out / "hs" / f"row_{held}.safetensors",
                                             run_dir / "conversion.json")
                    print(f"{name}-{seed} conversion: {check}", flush=True)
                runs[(name, seed)] = drafter_dir
    judge(runs, seeds, workspace, out, lever, params, args)


def exact_outputs(drafter, target, tokenizer, prompts: list[tuple[str, dict]], greedy: dict, params, stop_ids) -> dict:
    """The converted drafter through our decoder (the eval's exactness gate): every output at every
    eval block size must be the target's greedy answer (data/eval_rollouts), token for token."""
    from specauf.data.generation import encode_chat
    from specauf.evaluate.decode import DrafterProposer, speculative_generate

    checked, bad = 0, []
    for b in params.eval.speculative_block_sizes:
        proposer = DrafterProposer(drafter, target, params.eval.block_layout)
        for name, row in prompts:
            res = speculative_generate(target, encode_chat(tokenizer, [row["turns"][0]]), proposer=proposer, block_size=b,
                                       max_new_tokens=params.eval.max_new_tokens, stop_token_ids=stop_ids)
            checked += 1
            if res.token_ids != greedy[row["prompt_id"]][: len(res.token_ids)]:
                bad.append(f"{name}/{row['prompt_id']} b{b}")
    return {"checked": checked, "differ": bad}


def judge(runs: dict, seeds: list[int], workspace: Path, out: Path, lever: Path, params, args) -> None:
    """Replay every converted drafter (and our dpace/auf of the same seeds, when lever_tau has not),
    check its outputs, and write table.json / table.md: tau per run, and each peer run minus our
    dpace and minus our auf, pooled and per set, at --block-size."""
    import torch

    from lever_tau import replay
    from specauf.data.dataset import LabelsDataset
    from specauf.data.prompts import load_eval_prompts
    from specauf.evidence import paired_diff_ci, paired_rows, ratio_ci, verdict
    from specauf.serve.run import our_greedy_ids
    from specauf.target.run import load_target
    from specauf.train.drafter import BlockDrafter

    model, tokenizer, manifest = load_target(workspace / "data/target", "cpu")
    answers = LabelsDataset(workspace / "data/eval_labels")
    sets = load_eval_prompts(workspace / "data/prompts", params.eval.sets)
    every = {r["prompt_id"]: name for name, rs in sets.items() for r in rs}
    decoded = [(name, r) for name, rs in sets.items() for r in rs[: params.eval.prompts_per_set]]
    greedy = our_greedy_ids(workspace / "data/eval_rollouts", [r["prompt_id"] for _, r in decoded])
    rows, info = {}, {}
    for variant in ("dpace", "auf"):
        for seed in seeds:
            cached = lever / f"{variant}-{seed}.replay.json"
            rows.setdefault(f"ours_{variant}", {})[seed] = replay(our_drafter(variant, seed, workspace, lever), cached, params,
                                                                  seed, (model, manifest), answers, every)
    for (name, seed), drafter_dir in runs.items():
        rows.setdefault(name, {})[seed] = replay(drafter_dir, out / f"{name}-{seed}.replay.json", params, seed,
                                                 (model, manifest), answers, every)
        check = out / f"{name}-{seed}.exact.json"
        if not check.is_file():
            drafter = BlockDrafter.from_pretrained(drafter_dir).eval()
            with torch.no_grad():
                check.write_text(json.dumps(exact_outputs(drafter, model, tokenizer, decoded, greedy, params,
                                                          manifest["stop_token_ids"])))
        conv = out / f"{name}-{seed}" / "conversion.json"
        info.setdefault(name, {})[seed] = {**json.loads((out / f"{name}-{seed}" / "run.json").read_text()),
                                           "exactness": json.loads(check.read_text()),
                                           "conversion": json.loads(conv.read_text()) if conv.is_file() else None}
    key = f"b{args.block_size}"
    set_names = list(sets)
    table = []
    for name in rows:
        mine = [r for rs in rows[name].values() for r in rs]
        entry = {"run": name, "seeds": sorted(rows[name]), "tau": ratio_ci(*paired_rows(mine, mine, key)[:2], resamples=args.resamples),
                 "runs": info.get(name)}
        if name in info:
            for base in ("ours_dpace", "ours_auf"):
                theirs = [r for rs in rows[base].values() for r in rs]
                entry[f"minus_{base}"] = {s or "all": paired_diff_ci(*paired_rows(mine, theirs, key, s), resamples=args.resamples)
                                          for s in [None, *set_names]}
                entry[f"verdict_{base}"] = {s: verdict(d) for s, d in entry[f"minus_{base}"].items()}
        table.append(entry)
    (out / f"table.{key}.json").write_text(json.dumps({"block_size": args.block_size, "seeds": seeds, "table": table}, indent=1))
    fmt = lambda d: f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    lines = [f"| run | tau B={args.block_size} [95%] | steps | train min/seed | exact outputs | conversion: max hidden diff | "
             "minus our dpace (all) | " + " | ".join(f"minus dpace: {s}" for s in set_names) + " | minus our auf (all) |",
             "|" + "---|" * (7 + len(set_names))]
    for e in table:
        t = e["tau"]
        runs_ = e["runs"] or {}
        steps = "/".join(str(r["steps"]) for r in runs_.values()) or "1600"
        minutes = "/".join(str(r["minutes"]) for r in runs_.values()) or "lever_tau"
        exact = (f"{sum(r['exactness']['checked'] - len(r['exactness']['differ']) for r in runs_.values())}/"
                 f"{sum(r['exactness']['checked'] for r in runs_.values())}") if runs_ else "eval stage"
        conv = [r["conversion"]["max_abs_hidden_difference"] for r in runs_.values() if r.get("conversion")]
        cells = [e["run"], f"{t['value']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}]", steps, minutes, exact,
                 f"{max(conv):.1e}" if conv else ""]
        if "minus_ours_dpace" in e:
            cells += [fmt(e["minus_ours_dpace"]["all"]), *(fmt(e["minus_ours_dpace"][s]) for s in set_names),
                      fmt(e["minus_ours_auf"]["all"])]
        else:
            cells += [""] * (2 + len(set_names))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / f"table.{key}.md").write_text(md)
    print(md)


def our_drafter(variant: str, seed: int, workspace: Path, lever: Path) -> Path:
    """Our drafter of this variant and seed: the default pipeline's, else lever_tau's."""
    for d in (workspace / "data" / "drafters" / f"{variant}-{seed}", lever / f"{variant}-{seed}" / "drafter"):
        if (d / "model.safetensors").is_file():
            return d
    raise SystemExit(f"error: no {variant} drafter of seed {seed}: run `python benchmarks/lever_tau.py --runs {variant} "
                     f"--seeds {seed}` first")


def like_layers(like: Path) -> list[int]:
    return json.loads((like / "manifest.json").read_text())["target_layer_ids"]


def like_mask(like: Path) -> int:
    return json.loads((like / "manifest.json").read_text())["mask_token_id"]


def default_steps(out: Path) -> int:
    """Steps of a `default` run: as many of the peer's default steps as fit in our default's steps
    (train.steps) at the per-step times `--throughput` measured on a quiet machine."""
    f = out / "throughput.json"
    if not f.is_file():
        raise SystemExit(f"error: {f} missing: run `python benchmarks/peer_trainers.py --throughput` first "
                         "(with nothing else busy), or pass --steps")
    steps = json.loads(f.read_text()).get("default_steps_in_our_minutes")
    if steps is None:
        raise SystemExit(f"error: {f} has no timing of the peer's default setting: rerun --throughput")
    return steps




if __name__ == "__main__":
    main()
