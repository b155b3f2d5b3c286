"""Stage `eval`: speculative decoding with one trained drafter on every evaluation set.

Plain decoding (block size 1 through the same engine), our drafter at each inference block
size, and transformers' own speed-ups (prompt lookup; assisted generation when a small draft
model is configured) run side by side on the same prompts in one process, so the speedups are
ratios measured under the same load. At temperature 0 an exactness gate compares every
speculative output with plain greedy decoding token for token.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time

import torch

from specauf.errors import ExactnessError
from specauf.config import EvalParams
from specauf.evaluate.cost_model import measure_cycle_costs, predict_speedups
from specauf.evaluate.decode import DrafterProposer, speculative_generate, summarize
from specauf.data.generation import encode_chat
from specauf.evaluate.linear_kernels import tune_linears, uninstall
from specauf.runtime import progress

log = logging.getLogger("specauf")


def _median_run(fn, repeats: int):
    """Run fn `repeats` times; return the first result with the median decode time."""
    runs = [fn() for _ in range(repeats)]
    t = statistics.median(r.decode_time_s for r in runs)
    best = min(runs, key=lambda r: abs(r.decode_time_s - t))
    return best


@torch.inference_mode()
def _hf_generate_time(target, ids: list[int], params: EvalParams, stop_ids: list[int], pad_id: int, **kw) -> tuple[float, int, list[int]]:
    """Seconds per token of transformers' generate after the first token, and its tokens.

    generate() has no hook around prefill, so the first token is timed separately (a
    max_new_tokens=1 call) and subtracted, matching our engine's prefill-excluded timing.
    """
    device = next(target.parameters()).device
    x = torch.tensor([ids], device=device)
    common = dict(do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id, attention_mask=torch.ones_like(x))
    t0 = time.perf_counter()
    target.generate(x, max_new_tokens=1, **common, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = target.generate(x, max_new_tokens=params.max_new_tokens, **common, **kw)[0, len(ids):].tolist()
    total = time.perf_counter() - t0
    return max(total - first, 1e-9), max(len(out) - 1, 1), out


def decode_row_counts(params: EvalParams) -> list[int]:
    """Every row count a decode-time target forward sees: plain steps (1), our verify blocks (up to
    the largest block size; fewer near max_new_tokens) and prompt lookup's (up to its tokens + 1)."""
    return list(range(1, max(*params.block_sizes, params.prompt_lookup_num_tokens + 1) + 1))


def evaluate_drafter(target, tokenizer, drafter, eval_sets: dict[str, list[dict]], params: EvalParams, *,
                     stop_ids: list[int], pad_id: int, seed: int, labels_dir, assistant=None) -> dict:
    """Replay tau on every prompt of every set (specauf.evaluate.replay), decode the first
    `prompts_per_set` of each plainly, with the drafter at each block size and with the peers, all on
    the same target linear kernels (`eval.linear_kernels`, recorded), and check replay against decode."""
    from specauf.data.dataset import LabelsDataset
    from specauf.evaluate.replay import replay_check, replay_drafter
    from specauf.train.domino import is_domino

    sizes = params.speculative_block_sizes
    timed = {name: rows[: params.prompts_per_set] for name, rows in eval_sets.items()}
    tuned = tune_linears(target, decode_row_counts(params), params.linear_kernels)
    try:
        metrics = _decode_all(target, tokenizer, drafter, timed, params, stop_ids=stop_ids, pad_id=pad_id,
                              seed=seed, assistant=assistant)
        first = next(r for rows in timed.values() for r in rows)  # same kernels and process as the timed decode
        costs = measure_cycle_costs(target, DrafterProposer(drafter, target, params.block_layout),
                                    encode_chat(tokenizer, first["turns"][:1]), sizes) if sizes else None
    finally:
        if tuned:
            uninstall(target)
    metrics["linear_kernels"] = {"mode": params.linear_kernels, **(tuned or {"plan": None})}
    every = {r["prompt_id"]: name for name, rows in eval_sets.items() for r in rows}
    answers = LabelsDataset(labels_dir)  # checksums verified once, for both replays
    replayed = replay_drafter(drafter, target, answers, every, sizes, params.block_layout,
                              params.replay_max_new_tokens, stop_ids)
    if params.temperature == 0:  # the decoded prompts again, over the decode's max_new_tokens
        short = replay_drafter(drafter, target, answers, {r["prompt_id"]: n for n, rows in timed.items() for r in rows},
                               sizes, params.block_layout, params.max_new_tokens, stop_ids, desc="replay check")
        metrics["replay_check"] = replay_check(metrics["prompts"], short)
    metrics["replay_prompts"] = replayed
    if is_domino(drafter.config):  # (DFlash drafters' metrics say nothing: their bytes stay as they were)
        metrics["settings"] = {**metrics["settings"], "backbone": "domino"}
    metrics["overall"], metrics["sets"] = _merge(replayed, None, metrics["overall"], sizes), {
        name: _merge(replayed, name, metrics["sets"][name], sizes) for name in eval_sets}
    if costs is not None:
        ov = metrics["overall"]
        metrics["cost_model"] = predict_speedups(costs, {b: ov[f"b{b}"]["tau"] for b in sizes},
                                                 {b: ov[f"b{b}"]["speedup"] for b in sizes})
    return metrics


def _merge(replayed: list[dict], set_name: str | None, decoded: dict, sizes: list[int]) -> dict:
    """A set's section: replayed tau and acceptance (every prompt), the decode's speed (its prompts)."""
    from specauf.evaluate.replay import summarize_replay

    rows = [r for r in replayed if set_name is None or r["set"] == set_name]
    out = {"plain": decoded["plain"]}
    for b in sizes:
        d = decoded[f"b{b}"]
        out[f"b{b}"] = {**summarize_replay(rows, f"b{b}"), "speedup": d["speedup"],
                        "decoded": {k: d[k] for k in ("prompts", "tau", "tokens_per_s", "time_per_output_token_s")}}
    return out


def _decode_all(target, tokenizer, drafter, eval_sets: dict[str, list[dict]], params: EvalParams, *,
                stop_ids: list[int], pad_id: int, seed: int, assistant=None) -> dict:
    device = next(target.parameters()).device
    proposer = DrafterProposer(drafter, target, params.block_layout)
    sizes = params.speculative_block_sizes
    per_set: dict[str, dict] = {}
    pooled: dict[str, list] = {"plain": [], **{f"b{b}": [] for b in sizes}}
    peers: dict[str, list[tuple[float, int]]] = {}
    mismatches: list[str] = []
    prompt_rows: list[dict] = []  # per prompt, for intervals over prompts (specauf/evidence.py)
    total = sum(len(rows) for rows in eval_sets.values())
    gen = lambda: torch.Generator(device=device).manual_seed(seed)
    decode = dict(max_new_tokens=params.max_new_tokens, stop_token_ids=stop_ids, temperature=params.temperature,
                  top_p=params.top_p, top_k=params.top_k)
    with progress(total=total, desc="eval", unit="prompt") as bar:
        for name, rows in eval_sets.items():
            results: dict[str, list] = {k: [] for k in pooled}
            for row in rows:
                ids = encode_chat(tokenizer, row["turns"][:1])
                plain = _median_run(lambda: speculative_generate(target, ids, block_size=1, generator=gen(), **decode), params.repeats)
                results["plain"].append(plain)
                prompt_rows.append({"set": name, "prompt_id": row["prompt_id"],
                                    "plain": {"tokens": plain.decode_tokens, "time_s": plain.decode_time_s}})
                for b in sizes:
                    spec = _median_run(lambda: speculative_generate(target, ids, proposer=proposer, block_size=b,
                                                                    generator=gen(), **decode), params.repeats)
                    results[f"b{b}"].append(spec)
                    prompt_rows[-1][f"b{b}"] = {"emitted": spec.decode_tokens, "cycles": spec.num_cycles,
                                                "time_s": spec.decode_time_s}
                    if params.temperature == 0 and spec.token_ids != plain.token_ids:
                        mismatches.append(f"{name}/{row['prompt_id']} (block {b})")
                if params.prompt_lookup_num_tokens or assistant is not None:
                    peers.setdefault("hf_plain", []).append(_hf_generate_time(target, ids, params, stop_ids, pad_id)[:2])
                if params.prompt_lookup_num_tokens:
                    peers.setdefault("hf_prompt_lookup", []).append(_hf_generate_time(
                        target, ids, params, stop_ids, pad_id, prompt_lookup_num_tokens=params.prompt_lookup_num_tokens)[:2])
                if assistant is not None:
                    peers.setdefault("hf_assisted", []).append(_hf_generate_time(
                        target, ids, params, stop_ids, pad_id, assistant_model=assistant)[:2])
                bar.update(1)
            per_set[name] = _set_metrics(results)
            for k, v in results.items():
                pooled[k].extend(v)
    overall = _set_metrics(pooled)
    peer_metrics = {}
    if peers:
        base = sum(t for t, _ in peers["hf_plain"]) / sum(n for _, n in peers["hf_plain"])
        ours_plain = overall["plain"]["time_per_output_token_s"]
        for k, v in peers.items():
            tpt = sum(t for t, _ in v) / sum(n for _, n in v)
            peer_metrics[k] = {"time_per_output_token_s": tpt, "speedup_vs_hf_plain": base / tpt,
                               "speedup_vs_plain": ours_plain / tpt}
    best_peer = max((v["speedup_vs_hf_plain"] for k, v in peer_metrics.items() if k != "hf_plain"), default=None)
    best_ours = max((overall[f"b{b}"]["speedup"] for b in sizes), default=None)
    return {
        "overall": overall, "sets": per_set, "peers": peer_metrics, "prompts": prompt_rows,
        "best": {"ours_speedup": best_ours, "best_peer_speedup": best_peer,
                 "ours_over_best_peer": best_ours / best_peer if best_ours and best_peer else None},
        "exactness": {"checked": params.temperature == 0, "mismatches": mismatches},
        "machine": {"torch_threads": torch.get_num_threads(), "device": str(device), "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "platform": platform.platform()},
        "settings": params.model_dump(),
    }


def _set_metrics(results: dict[str, list]) -> dict:
    plain = summarize(results["plain"])
    out = {"plain": {k: plain[k] for k in ("time_per_output_token_s", "tokens_per_s", "decode_tokens")}}
    for key, runs in results.items():
        if key == "plain":
            continue
        s = summarize(runs)
        s["speedup"] = plain["time_per_output_token_s"] / s["time_per_output_token_s"]
        out[key] = s
    return out


TAU_DEFINITION = ("tau: pooled, total emitted tokens / total draft-verify cycles over the prompts (the headline); "
                  "tau_prompt_mean: the mean over prompts of each prompt's own tau")


def headline(metrics: dict, resamples: int) -> dict:
    """What `dvc metrics show` prints: per set and overall, each block size's replayed tau with its 95%
    interval over prompts and the prompt count; overall, the decoded speedup with its interval and the
    replay check's largest pooled difference. Everything else goes to the details file. One run:
    its intervals are over prompts only (the report's resample seeds too).

    The field quotes tau two ways: pooled (all emitted tokens / all cycles: `tau`, the headline,
    every interval and comparison here) and the mean of per-prompt tau (`tau_prompt_mean`), which
    weighs a short answer as much as a long one; `tau_definition` says so in the file itself."""
    from specauf import evidence

    replayed, decoded = metrics["replay_prompts"], metrics["prompts"]
    sizes = sorted(int(k[1:]) for k in metrics["overall"] if k.startswith("b"))

    def section(name: str | None) -> dict:
        rows = [r for r in replayed if name is None or r["set"] == name]
        out: dict = {"prompts": len(rows)}
        for b in sizes:
            ci = evidence.ratio_ci([r[f"b{b}"]["emitted"] for r in rows], [r[f"b{b}"]["cycles"] for r in rows],
                                  resamples=resamples)
            per_prompt = [r[f"b{b}"]["emitted"] / r[f"b{b}"]["cycles"] for r in rows if r[f"b{b}"]["cycles"]]
            out[f"b{b}"] = {"tau": ci["value"], "tau_lo": ci["lo"], "tau_hi": ci["hi"],
                            "tau_prompt_mean": sum(per_prompt) / len(per_prompt) if per_prompt else None}
        return out

    overall = section(None)
    overall["decoded_prompts"] = len(decoded)
    for b in sizes:
        sp = evidence.speedup_ci(decoded, f"b{b}", resamples=resamples)
        if sp is not None:
            overall[f"b{b}"].update(speedup=sp["value"], speedup_lo=sp["lo"], speedup_hi=sp["hi"])
    out = {"variant": metrics.get("variant"), "seed": metrics.get("seed"), "tau_definition": TAU_DEFINITION, "overall": overall,
           "sets": {name: section(name) for name in metrics["sets"]}}
    if "replay_check" in metrics:
        out["replay_check_max_difference"] = max((abs(v["difference"]) for v in metrics["replay_check"]["pooled"].values()),
                                                 default=0.0)
    return out


def without_headline(metrics: dict, top: dict) -> dict:
    """The details: `metrics` less the figures the headline holds (tau per set and block size, the
    overall speedup), so no figure is stored twice; specauf.report.run.load_inputs joins them back."""
    def section(detail: dict, head: dict) -> dict:
        return {k: ({f: x for f, x in v.items() if f not in head[k]} if k in head and isinstance(v, dict) else v)
                for k, v in detail.items()}

    return {**metrics, "overall": section(metrics["overall"], top["overall"]),
            "sets": {name: section(s, top["sets"][name]) for name, s in metrics["sets"].items()}}


def check_exactness(metrics: dict, gate: bool) -> None:
    bad = metrics["exactness"]["mismatches"]
    if bad and gate:
        raise ExactnessError(f"exactness gate: speculative output differs from plain greedy on {len(bad)} prompt(s): "
                             + ", ".join(bad[:20]))
