"""The served-equals-evaluated gate: vLLM's own DFlash serving our export, against our replay.

Why: the field's most common serving failure is silent. An export that loads and serves at
about 1% acceptance, with no error (a layer id off by one, a draft vocabulary read the wrong way,
a block-size convention), passes every exactness check, since verification keeps the output the
target's. Only the acceptance shows it. So on the same prompts and tokens vLLM's tau, from its own
counters, must equal our replay's tau (specauf/evaluate/replay.py, the drafter as trained, at
vLLM's layout: n guesses from an (n+1)-token block, layout `short`) within vllm.tau_tolerance,
else the stage fails naming the run, block size, both figures and the likely causes.

Both taus count the bonus token: vLLM's is 1 + accepted draft tokens / drafts (a draft is one
verification step). vLLM drafts a full block in a request's last step too and counts the guesses
it accepts past max_tokens before cutting them, which our eval's walk never drafts; so the replay
here keeps vLLM's books (replay.serving_walk), and the requests stop early enough (batch_horizon)
that our greedy answers still hold the tokens those guesses meet.
"""
from __future__ import annotations

import logging
from pathlib import Path

from specauf.errors import ExactnessError

log = logging.getLogger("specauf")

CAUSES = ("the export's target_layer_ids, its d2t (offsets, not absolute ids), its mask_token_id, or "
          "num_speculative_tokens != block size - 1")


def batch_prompts(tokenizer, eval_sets: dict[str, list[dict]], per_set: int, max_new_tokens: int) -> dict:
    """The first `per_set` prompts of each eval set, as our token ids, for the concurrent phase."""
    from specauf.data.generation import encode_chat

    rows = [(name, r) for name, rs in eval_sets.items() for r in rs[:per_set]]
    return {"sets": [n for n, _ in rows], "prompt_ids": [r["prompt_id"] for _, r in rows],
            "ids": [encode_chat(tokenizer, [r["turns"][0]]) for _, r in rows], "max_new_tokens": max_new_tokens}


def batch_horizon(replay_max_new_tokens: int, widest_guesses: int) -> int:
    """New tokens per batch request: every guess vLLM's last step checks must meet a token of our
    greedy answer (eval.replay_max_new_tokens long), so the widest contender's guesses fit before it."""
    return replay_max_new_tokens - widest_guesses


def replay_served(drafter_dir: Path, target, eval_labels_dir: Path, batch: dict, sizes: list[int],
                  stop_ids: list[int]) -> list[dict]:
    """Our replay of the drafter as trained over the batch prompts, at vLLM's layout and in its books."""
    import torch

    from specauf.evaluate.replay import replay_drafter
    from specauf.train.drafter import BlockDrafter

    drafter = BlockDrafter.from_pretrained(drafter_dir).eval()
    with torch.no_grad():
        return replay_drafter(drafter, target, eval_labels_dir, dict(zip(batch["prompt_ids"], batch["sets"])), sizes,
                              "short", batch["max_new_tokens"], stop_ids, desc="replay (vLLM's layout and books)",
                              served=True)


def served_tau(counters: dict) -> dict:
    """tau, acceptance by position (per cycle) and guesses per cycle from vLLM's counters."""
    drafts = counters["drafts"]
    return {"cycles": drafts, "tau": 1 + counters["accepted_tokens"] / drafts if drafts else None,
            "accepted_per_cycle": [a / drafts if drafts else None for a in counters["accepted_per_position"]],
            "guesses_per_cycle": counters["draft_tokens"] / drafts if drafts else None}


def replayed_tau(replay_rows: list[dict], key: str) -> dict:
    """Our replay in vLLM's books (replay_drafter(served=True)), pooled as served_tau pools."""
    cycles = sum(r[key]["cycles"] for r in replay_rows)
    accepted = [sum(col) for col in zip(*(r[key]["accepted"] for r in replay_rows))]
    return {"cycles": cycles, "tau": 1 + sum(accepted) / cycles if cycles else None,
            "accepted_per_cycle": [a / cycles if cycles else None for a in accepted]}


def served_vs_replay(batches: dict, batch: dict, replay_rows: list[dict], sizes: list[int],
                     our_greedy: dict[str, list[int]], tolerance: float) -> dict:
    """The concurrent phase's figures: per block size vLLM's tau beside the replay's on the same
    prompts, throughput plain vs DFlash, every DFlash answer against vLLM's plain one, and vLLM's
    plain answers against our target's greedy ones (data/eval_rollouts)."""
    plain = batches["plain"]
    plain_ids = [r["token_ids"] for r in plain["requests"]]
    tokens = sum(map(len, plain_ids))
    out = {"prompts": len(plain_ids), "max_new_tokens": batch["max_new_tokens"], "tolerance": tolerance,
           "plain": {"tokens": tokens, "seconds": plain["seconds"], "tokens_per_s": tokens / plain["seconds"]}}
    agree = [plain_ids[i] == our_greedy[pid][: len(plain_ids[i])] for i, pid in enumerate(batch["prompt_ids"])
             if pid in our_greedy]
    out["plain"]["our_greedy_agreement"] = {"equal": sum(agree), "prompts": len(agree)}
    for b in sizes:
        key = f"b{b}"
        got = batches[key]
        ids = [r["token_ids"] for r in got["requests"]]
        differ = [batch["prompt_ids"][i] for i, (x, y) in enumerate(zip(ids, plain_ids)) if x != y]
        t = sum(map(len, ids))
        served, ours = served_tau(got["counters"]), replayed_tau(replay_rows, key)
        out[key] = {"tokens_per_s": t / got["seconds"], "speedup": (t / got["seconds"]) / out["plain"]["tokens_per_s"],
                    "outputs_differing_from_plain": differ, "vllm": served, "replay": ours,
                    "tau_difference": served["tau"] - ours["tau"] if served["tau"] is not None else None}
    return out


def check_served(run: str, section: dict, exact_mismatches: list[str], gate: bool) -> None:
    """Fail (gate on) or warn: vLLM's tau off our replay's beyond the tolerance at any block size,
    or a vLLM DFlash output that is not vLLM's plain greedy output."""
    problems = []
    for key, v in section.items():
        if not (key.startswith("b") and key[1:].isdigit()):
            continue
        d, guesses = v["tau_difference"], v["vllm"]["guesses_per_cycle"]
        if guesses is not None and guesses != int(key[1:]) - 1:  # tau alone misses it when late guesses fail anyway
            problems.append(f"{run}: vLLM drafts {guesses:g} guesses a cycle at block size {key[1:]}, the evaluated "
                            f"block {int(key[1:]) - 1}: num_speculative_tokens must be block size - 1")
        elif d is None or abs(d) > section["tolerance"]:
            served = "no tau (it never drafted)" if v["vllm"]["tau"] is None else f"tau {v['vllm']['tau']:.4f}"
            problems.append(f"{run}: vLLM serves {served} at "
                            f"block size {key[1:]}, our replay of the same drafter {v['replay']['tau']:.4f} on the same "
                            f"{section['prompts']} prompts (tolerance {section['tolerance']}): the export is not the "
                            f"drafter we evaluated; check {CAUSES}")
        if v["outputs_differing_from_plain"]:
            exact_mismatches = [*exact_mismatches, *(f"batch/{p} ({key})" for p in v["outputs_differing_from_plain"])]
    if exact_mismatches:
        problems.append(f"{run}: vLLM DFlash output differs from vLLM's plain greedy output: {', '.join(exact_mismatches[:5])}")
    if problems and gate:
        raise ExactnessError(problems[0])
    for p in problems:
        log.warning("%s (vllm.gate off)", p)
    if not problems:
        log.info("%s: vLLM's tau equals our replay's within %s on %d prompts (%s); every DFlash output is vLLM's plain "
                 "greedy", run, section["tolerance"], section["prompts"],
                 ", ".join(f"B={k[1:]} {v['vllm']['tau']:.4f} vs {v['replay']['tau']:.4f}" for k, v in section.items()
                           if k.startswith("b") and k[1:].isdigit()))


def serve_with_vllm(params, run: str, target_dir: Path, prompts_dir: Path, eval_rollouts_dir: Path,
                    eval_labels_dir: Path, drafter_dir: Path, export_dir: Path, eval_prompts_file: Path,
                    engine=None) -> tuple[dict, list[dict]]:
    """(metrics, per-prompt rows) of one drafter served by vLLM: the serve stage's measurement on
    the eval's timed prompts (one request at a time), then the concurrent batch and the gate."""
    from specauf.data.prompts import load_eval_prompts
    from specauf.serve.engines import VllmEngine
    from specauf.serve.run import our_greedy_ids, our_greedy_texts, serve_drafter, timed_prompts
    from specauf.target.run import load_target_for

    ep, vp = params.eval, params.vllm
    target, tokenizer, manifest = load_target_for(target_dir, drafter_dir, "drafter", "cpu",
                                                  trust_remote_code=params.target.trust_remote_code)
    stop_ids = manifest["stop_token_ids"]
    eval_sets = load_eval_prompts(prompts_dir, ep.sets)
    horizon = batch_horizon(ep.replay_max_new_tokens, max(ep.speculative_block_sizes) - 1)
    batch = batch_prompts(tokenizer, eval_sets, vp.batch_prompts_per_set, horizon)
    engine = engine or VllmEngine(params.serve.threads, tokenizer, stop_ids, manifest["dtype"], batch=batch,
                                  trust_remote_code=params.target.trust_remote_code)
    prompts = timed_prompts(tokenizer, prompts_dir, ep)
    greedy = our_greedy_texts(tokenizer, eval_rollouts_dir, prompts, ep.max_new_tokens)
    metrics, rows = serve_drafter(params, run, {"f32": target_dir}, export_dir, prompts, eval_prompts_file, greedy, engine)
    replayed = replay_served(drafter_dir, target, eval_labels_dir, batch, ep.speculative_block_sizes, stop_ids)
    metrics["batch"] = served_vs_replay(engine.batches, batch, replayed, ep.speculative_block_sizes,
                                        our_greedy_ids(eval_rollouts_dir, batch["prompt_ids"]), vp.tau_tolerance)
    metrics["engine_start_s"] = engine.engine_start_s
    return metrics, rows


# The field's silent serving bugs, as an export can carry them (the fourth is a serving flag, not a
# file): what tests/test_vllm_gate.py and benchmarks/vllm_gate.py show the gate catches.
SPECULATORS = "right, speculators format"  # serve.export.write_speculators: must pass like the DFlash layout
BROKEN = ("layer ids shifted by one", "mask token id off by one", "d2t as absolute ids",
          "num_speculative_tokens = block size")


def broken_export(src: Path, dest: Path, how: str) -> Path:
    """A copy of an export with one of BROKEN's first three bugs."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    if how == BROKEN[0]:
        config["dflash_config"]["target_layer_ids"] = [i + 1 for i in config["dflash_config"]["target_layer_ids"]]
    elif how == BROKEN[1]:
        config["dflash_config"]["mask_token_id"] += 1
    elif how == BROKEN[2]:
        state = load_file(dest / "model.safetensors")
        state["d2t"] = state["d2t"] + torch.arange(len(state["d2t"]), dtype=state["d2t"].dtype)
        save_file(state, dest / "model.safetensors")
    else:
        raise ValueError(f"not an export bug: {how!r}")
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def check_broken_exports(target_dir: Path, drafter_dir: Path, export_dir: Path, prompts_dir: Path,
                         eval_rollouts_dir: Path, eval_labels_dir: Path, block_size: int, per_set: int,
                         max_new_tokens: int, tolerance: float, scratch: Path, threads: int = 1) -> dict:
    """The gate against BROKEN, on a real drafter: the right export (in the DFlash layout and in
    the speculators format) and each broken one served at `block_size` in one vLLM worker (the
    concurrent phase), each judged by check_served against our replay. {case: {tau, replay_tau,
    tau_difference, outputs_differing_from_plain, caught (the gate's line, or vLLM's error when it
    could not serve), passed}}; both right ones must pass, the rest must be caught."""
    from specauf.data.prompts import load_eval_prompts
    from specauf.serve.engines import Contender, VllmEngine
    from specauf.serve.export import write_speculators
    from specauf.serve.run import our_greedy_ids
    from specauf.target.run import load_target

    target, tok, manifest = load_target(target_dir)
    k = block_size - 1
    batch = batch_prompts(tok, load_eval_prompts(prompts_dir, None), per_set, batch_horizon(max_new_tokens, k + 1))
    engine = VllmEngine(threads, tok, manifest["stop_token_ids"], manifest["dtype"], batch=batch, keep_going=True)
    exports = {how: broken_export(export_dir, scratch / f"broken{i}", how) for i, how in enumerate(BROKEN[:3])}
    speculators = scratch / "speculators"
    write_speculators(export_dir, speculators, str(target_dir), block_size)
    engine.decode(target_dir, [], [Contender("plain", None, 0, "plain", 1), Contender("right", export_dir, k, "draft-dflash", 1),
                                   Contender(SPECULATORS, speculators, k, "draft-dflash", 1),
                                   *(Contender(how, path, k, "draft-dflash", 1) for how, path in exports.items()),
                                   Contender(BROKEN[3], export_dir, k + 1, "draft-dflash", 1)])  # the widest: k + 1
    replayed = replay_served(drafter_dir, target, eval_labels_dir, batch, [block_size], manifest["stop_token_ids"])
    greedy = our_greedy_ids(eval_rollouts_dir, batch["prompt_ids"])
    key, out = f"b{block_size}", {}
    for case in ("right", SPECULATORS, *BROKEN):
        if case in engine.failed:
            out[case] = {"caught": engine.failed[case].splitlines()[0], "passed": False}
            continue
        section = served_vs_replay({"plain": engine.batches["plain"], key: engine.batches[case]}, batch, replayed,
                                   [block_size], greedy, tolerance)
        v = section[key]
        row = {"tau": v["vllm"]["tau"], "replay_tau": v["replay"]["tau"], "tau_difference": v["tau_difference"],
               "outputs_differing_from_plain": v["outputs_differing_from_plain"], "passed": True}
        try:
            check_served("run", section, [], gate=True)
        except ExactnessError as e:
            row.update(caught=str(e), passed=False)
        out[case] = row
    return {"prompts": len(batch["prompt_ids"]), "max_new_tokens": batch["max_new_tokens"], "block_size": block_size,
            "cases": out}
