"""Our trainer beside the field's: a peer trains DFlash on exactly our training data, our replay judges it.

    python benchmarks/peer_trainers.py --throughput    # first, on a quiet machine: per-step times
    python benchmarks/peer_trainers.py --peers speculators,specforge --settings matched,default --seeds 0,1

Peers: vLLM's speculators 0.9.0 (benchmarks/peer_speculators.py) and SGLang's SpecForge 0.2.0
(benchmarks/peer_specforge.py); each module says what its peer reads and what a CPU needs.
For each peer, setting and seed: the peer is installed into a venv of its own (pinned, on our torch
wheel, under ~/.cache/spec-auf/peers; each pins a transformers ours cannot share), our training
sequences (data/labels: the same rows our train stage trains on, in the same held-out split of
that seed) are converted into the peer's offline format, the peer's own trainer trains a DFlash
drafter on them, the result is converted back into our drafter folder (weights by name; the peer's
frozen verifier tensors are dropped), checked against the peer's own forward on a stored sequence,
and replayed on every eval prompt by our eval's replay (specauf.evaluate.replay: lever_tau's), then
compared with our dpace and auf drafters of the same seed (their replay rows from
benchmarks/lever_tau.py's cache, or replayed here) with the paired two-level interval over seeds and
prompts, at each eval block size. A few decoded prompts per drafter check the converted drafter
through our decoder: every output must equal the target's greedy answer.

Settings (what each peer is given; the table prints them):
- `matched`: our default's drafter shape (1 layer, our 5 target layers, block 8, non-causal block
  attention; draft vocabulary 8192 = our drafter's of that seed where the peer has one: SpecForge's
  DFlash scores the whole vocabulary), D-PACE (alpha 0.5), hard labels (the target's greedy tokens),
  2 sequences x 32 anchors = 64 blocks per step, 1600 steps, AdamW lr 1e-3, 30 warmup steps,
  cosine, no weight decay, gradient clip 1, fp32. What stays the peer's own: its loss normalisation
  (speculators: weighted CE over a row's valid positions divided by their count; SpecForge: summed
  and divided by the batch size; ours divides by the weights' sum), torch's AdamW betas (0.9, 0.999;
  ours 0.95), cosine down to 0 (ours to train.min_lr_ratio), its anchor sampler, and (speculators)
  bf16 weights in its checkpoints.
- `default`: the peer's shipped DFlash defaults, for as many steps as fit in our default's training
  minutes at the per-step times `--throughput` measured. speculators 0.9.0: 5 draft layers, block
  16, D-PACE, CE, Muon lr 1e-3 with its AdamW group, linear schedule, weight decay 0.01, rows packed
  to 8192 tokens with 512 anchors each. SpecForge 0.2.0 (its shipped offline DFlash recipe and
  drafter config): 5 draft layers, block 16, DFlash CE with decay gamma 7, 512 anchors per
  sequence, 2 sequences x 4 accumulation steps, lr 6e-4, warmup 4%, cosine, clip 1; the whole
  vocabulary (it has no draft vocabulary). Both on our target layers (our labels
  hold those features; the peers' default layers would need another target pass), fp32 (their bf16
  default needs native bf16, which this CPU lacks), with non-causal block attention (what our
  drafter and DFlash engines run; speculators' default layers are causal sliding-window ones, which
  our drafter cannot represent).

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

import peer_specforge  # noqa: E402
import peer_speculators  # noqa: E402

# each peer: its pin, and its dependencies when the pin is installed --no-deps (SpecForge pins torch
# 2.11 and a GPU serving stack its offline trainer never imports)
PEERS = {"speculators": (peer_speculators.PIN, None), "specforge": (peer_specforge.PIN, peer_specforge.DEPS)}


def peers_home() -> Path:
    return Path(os.environ.get("SPECAUF_PEERS_HOME", Path.home() / ".cache" / "spec-auf" / "peers"))


def install(peer: str) -> Path:
    """The peer's Python, its venv installed once (a stamp names the pins and our torch)."""
    import torch

    from specauf.vllm import CUDA_ONLY

    pin, deps = PEERS[peer]
    venv, stamped = peers_home() / f"{peer}-venv", [pin, f"torch=={torch.__version__.split('+')[0]}", *(deps or [])]
    stamp = venv / "specauf-stamp.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == stamped:
        return venv / "bin" / "python"
    print(f"installing {' '.join(stamped)} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    if deps is None:
        subprocess.run([*pip, "install", "-q", *stamped], check=True)
    else:
        subprocess.run([*pip, "install", "-q", stamped[1], *deps], check=True)
        subprocess.run([*pip, "install", "-q", "--no-deps", pin], check=True)
    # PyPI's CUDA-only builds that die on a CPU torch at import (specauf/vllm.py says how); text needs none
    subprocess.run([*pip, "uninstall", "-q", "-y", *CUDA_ONLY], check=True)
    stamp.write_text(json.dumps(stamped))
    return venv / "bin" / "python"


def to_our_drafter(checkpoint: Path, like: Path, out: Path, manifest_extra: dict) -> Path:
    """The peer's DFlash checkpoint (safetensors + config.json) as our drafter folder: our config with
    the peer's shape (layers, block size), the peer's trained tensors by name (fc, hidden_norm,
    layers.*, norm; its frozen embed/lm_head/verifier copies are the target's and ours reads the
    target's own), our d2t (absolute ids) from its t2d, or the whole vocabulary where the peer has
    no draft vocabulary (SpecForge), and a manifest with the target fingerprint. Refuses a tensor it
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
    cfg.num_hidden_layers = peer_cfg.get("transformer_layer_config", peer_cfg)["num_hidden_layers"]
    cfg.block_size = peer_cfg["block_size"]
    if "t2d" not in weights:
        cfg.draft_vocab_size = 0
    drafter = BlockDrafter(cfg)
    mine = drafter.state_dict()
    skip = ("embed_tokens.", "lm_head.", "verifier_lm_head.", "verifier_norm.", "t2d")
    state = {k: v.float() for k, v in weights.items() if not k.startswith(skip)}
    if "t2d" in weights:
        state["d2t"] = torch.nonzero(weights["t2d"].bool()).flatten().long()
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
        "target_fingerprint": ours["target_fingerprint"], "draft_vocab_size": cfg.draft_vocab_size or None,
        "converted_from": str(checkpoint), **manifest_extra})
    return out


THROUGHPUT_PLAN = {"ours": (50, 250), "ours_domino": (50, 250), "speculators_matched": (50, 250),
                   "speculators_default": (2, 6), "specforge_matched": (50, 150), "specforge_default": (2, 6)}


def throughput(workspace: Path, ours, params_base: dict, rows: dict, out: Path, threads: int, lever: Path,
               contenders: list[str]) -> dict:
    """Seconds per training step, one contender after the other with nothing else of ours running:
    our trainer (DFlash, and Domino: issue 32's cost per step), each peer in the `matched` setting
    (the same 64 blocks per step) and in its `default` setting. Each trains a short and a long run
    from scratch; the difference over the extra steps leaves start-up out. Contenders timed earlier
    keep their numbers in throughput.json (`measured` says when each was timed)."""
    import yaml

    from lever_tau import run_stage

    seed = ours.seeds[0]
    like = our_drafter("dpace", seed, workspace, lever)
    f = out / "throughput.json"
    result = json.loads(f.read_text()) if f.is_file() else {"threads": threads, "wall_s": {}, "s_per_step": {}}
    if result["threads"] != threads:
        raise SystemExit(f"error: {f} was timed with {result['threads']} threads, not {threads}: move it away first")
    for stale in ("speculators_matched_over_ours", "domino_over_dflash"):  # before over_ours held every ratio
        result.pop(stale, None)
    for who in contenders:
        short, long = THROUGHPUT_PLAN[who]
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
                peer, setting = who.split("_")
                PEER_RUN[peer][0](install(peer), workspace, ours, rows, like, setting, seed, steps, d, out, threads)
            result["wall_s"][f"{who}-{steps}"] = time.perf_counter() - t0
        result["s_per_step"][who] = (result["wall_s"][f"{who}-{long}"] - result["wall_s"][f"{who}-{short}"]) / (long - short)
        result.setdefault("measured", {})[who] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    per_step = result["s_per_step"]
    result.update(
        plan={w: THROUGHPUT_PLAN[w] for w in per_step},
        blocks_per_s={w: 2 * ours.anchors_per_seq / per_step[w] for w in per_step if not w.endswith("default")},
        over_ours={w: per_step[w] / per_step["ours"] for w in per_step if w != "ours"},
        default_steps_in_our_minutes={w.split("_")[0]: round(ours.steps * per_step["ours"] / per_step[w])
                                      for w in per_step if w.endswith("default")})
    return result


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
    ap.add_argument("--block-sizes", default="2,4,8", help="a table per block size (of eval.speculative_block_sizes)")
    ap.add_argument("--throughput", action="store_true", help="only time our trainer and the peers' per step, "
                    "one after the other: run it with nothing else busy")
    ap.add_argument("--contenders", default=",".join(THROUGHPUT_PLAN), help=f"what --throughput times, of {', '.join(THROUGHPUT_PLAN)}")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--train-only", action="store_true", help="train and convert, judge later (runs in parallel)")
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
    rows = peer_speculators.speculators_rows(workspace, out, ours.max_seq_len)
    if args.throughput:
        from specauf.params_file import full_params

        result = throughput(workspace, ours, full_params(workspace / "params.yaml"), rows, out, args.threads, lever,
                            args.contenders.split(","))
        (out / "throughput.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    agree = rows["label_agreement"]
    print(f"labels: speculators' argmax labels equal our acceptance labels at {agree['agree']}/{agree['total']} positions")
    runs, model = {}, None
    like = our_drafter("dpace", params.train.seeds[0], workspace, lever)  # config and target facts
    for peer in args.peers.split(","):
        python = install(peer)
        if peer == "specforge":
            sf = peer_specforge.specforge_rows(workspace, out, ours.max_seq_len)["label_agreement"]
            print(f"labels: SpecForge's (the data tokens) equal our acceptance labels at {sf['agree']}/{sf['total']} positions")
        for setting in args.settings.split(","):
            for seed in seeds:
                name = f"{peer}_{setting}"
                run_dir = out / f"{name}-{seed}"
                drafter_dir = run_dir / "drafter"
                if not (drafter_dir / "model.safetensors").is_file():
                    steps = args.steps or (ours.steps if setting == "matched" else default_steps(out, peer))
                    checkpoint, record = PEER_RUN[peer][0](python, workspace, ours, rows, like, setting, seed, steps,
                                                           run_dir, out, args.threads)
                    (run_dir / "run.json").write_text(json.dumps({"peer": PEERS[peer][0], "setting": setting, "seed": seed,
                                                                   "steps": steps, **record}))
                    to_our_drafter(checkpoint, like, drafter_dir,
                                   {"trainer": PEERS[peer][0], "setting": setting, "seed": seed, "steps": steps})
                if not (run_dir / "conversion.json").is_file():
                    from specauf.target.run import load_target

                    model = model or load_target(workspace / "data/target", "cpu")[0]
                    held = next(r for r in sorted(map(int, rows["rows"])) if r % 7 == 3)  # any stored sequence
                    check = PEER_RUN[peer][1](python, run_dir, drafter_dir, model, workspace, held, ours, out)
                    print(f"{name}-{seed} conversion: {check}", flush=True)
                runs[(name, seed)] = drafter_dir
    if not args.train_only:
        for b in map(int, args.block_sizes.split(",")):
            judge(runs, seeds, workspace, out, lever, params, b, args.resamples)


def train_speculators(python: Path, workspace: Path, ours, rows: dict, like: Path, setting: str, seed: int, steps: int,
                      run_dir: Path, out: Path, threads: int) -> tuple[Path, dict]:
    """One speculators run; its last checkpoint and what run.json records."""
    data, ratio = peer_speculators.speculators_data(workspace, ours, rows, seed, setting, out)
    save = run_dir / "checkpoints"
    flags = peer_speculators.speculators_flags(ours, setting, seed, data, ratio, workspace, save, like_layers(like),
                                               like_mask(like), steps)
    minutes = peer_speculators.speculators_train(python, flags, run_dir / "train.log", threads)
    return peer_speculators.last_checkpoint(save), {"minutes": minutes, "flags": flags}


def train_specforge(python: Path, workspace: Path, ours, rows: dict, like: Path, setting: str, seed: int, steps: int,
                    run_dir: Path, out: Path, threads: int) -> tuple[Path, dict]:
    """One SpecForge run, exported by its own command; the export and what run.json records."""
    data, n_rows = peer_specforge.specforge_data(workspace, ours, seed, out)
    draft_cfg = peer_specforge.draft_config(like, setting, run_dir)
    config = peer_specforge.run_config(ours, setting, seed, data, n_rows, draft_cfg, workspace, run_dir / "checkpoints",
                                       steps, like_mask(like))
    minutes = peer_specforge.specforge_train(python, config, run_dir, threads)
    export = peer_specforge.export_checkpoint(python, run_dir / "checkpoints", draft_cfg, run_dir / "export")
    return export, {"minutes": minutes, "config": config}


def check_speculators(python: Path, run_dir: Path, drafter_dir: Path, model, workspace: Path, held: int, ours,
                      out: Path) -> dict:
    """The converted drafter against speculators' own forward on stored row `held`."""
    return peer_speculators.conversion_check(python, peer_speculators.last_checkpoint(run_dir / "checkpoints"),
                                             drafter_dir, workspace / "data/target", model,
                                             out / "hs" / f"row_{held}.safetensors", run_dir / "conversion.json")


def check_specforge(python: Path, run_dir: Path, drafter_dir: Path, model, workspace: Path, held: int, ours,
                    out: Path) -> dict:
    """The converted drafter against SpecForge's own forward on stored row `held`."""
    return peer_specforge.conversion_check(python, run_dir / "export", drafter_dir, model, workspace, held,
                                           ours.max_seq_len, run_dir / "conversion.json")


# What each peer runs: (train: its checkpoint and run record, conversion check)
PEER_RUN = {"speculators": (train_speculators, check_speculators), "specforge": (train_specforge, check_specforge)}


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


def judge(runs: dict, seeds: list[int], workspace: Path, out: Path, lever: Path, params, block_size: int,
          resamples: int) -> None:
    """Replay every converted drafter (and our dpace/auf of the same seeds, when lever_tau has not),
    check its outputs, and write table.json / table.md: tau per run, and each peer run minus our
    dpace and minus our auf, pooled and per set, at block_size (replays are cached)."""
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
    key = f"b{block_size}"
    set_names = list(sets)
    table = []
    for name in rows:
        mine = [r for rs in rows[name].values() for r in rs]
        entry = {"run": name, "seeds": sorted(rows[name]), "tau": ratio_ci(*paired_rows(mine, mine, key)[:2], resamples=resamples),
                 "runs": info.get(name)}
        if name in info:
            for base in ("ours_dpace", "ours_auf"):
                theirs = [r for rs in rows[base].values() for r in rs]
                entry[f"minus_{base}"] = {s or "all": paired_diff_ci(*paired_rows(mine, theirs, key, s), resamples=resamples)
                                          for s in [None, *set_names]}
                entry[f"verdict_{base}"] = {s: verdict(d) for s, d in entry[f"minus_{base}"].items()}
        table.append(entry)
    (out / f"table.{key}.json").write_text(json.dumps({"block_size": block_size, "seeds": seeds, "table": table}, indent=1))
    fmt = lambda d: f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    lines = [f"| run | tau B={block_size} [95%] | steps | train min/seed | exact outputs | conversion: max hidden diff | "
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


def default_steps(out: Path, peer: str) -> int:
    """Steps of a peer's `default` run: as many of its default steps as fit in our default's steps
    (train.steps) at the per-step times `--throughput` measured on a quiet machine."""
    f = out / "throughput.json"
    if not f.is_file():
        raise SystemExit(f"error: {f} missing: run `python benchmarks/peer_trainers.py --throughput` first "
                         "(with nothing else busy), or pass --steps")
    steps = json.loads(f.read_text()).get("default_steps_in_our_minutes", {}).get(peer)
    if steps is None:
        raise SystemExit(f"error: {f} has no timing of {peer}'s default setting: rerun --throughput")
    return steps


if __name__ == "__main__":
    main()
