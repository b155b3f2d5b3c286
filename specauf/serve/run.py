"""Each trained drafter served by a serving engine (stage serve: llama.cpp, serve.engine; stage
serve_vllm: vLLM, specauf/serve/vllm_gate.py), measured on the eval's timed prompts; every engine
sits behind specauf/serve/engines.py.

Why in the pipeline: a CPU user decodes with llama.cpp, not with our transformers loop, so the
question "what does this drafter buy" has a second answer there. On the prompts the eval times
(`eval.prompts_per_set` per set, `eval.max_new_tokens`), interleaved per prompt on one thread:
plain greedy, draft-dflash at each eval block size B (llama.cpp drafts B-1 tokens per cycle), and
llama.cpp's own n-gram speculation as a peer. Every speculative output must equal plain greedy
(the eval's exactness gate). With the f32 target GGUF (the eval's numerics) llama.cpp's tau is put
beside our decode's tau on the same prompts; the original (quantised) GGUF shows what a user gets.

One layout difference is known and stated in the metrics: llama.cpp runs a cycle of n guesses as
an (n+1)-token block (our eval.block_layout `short`); the eval's default layout `trained` runs the
trained B-token block and keeps n. At B = train.block_size the two are the same block.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from specauf.artifacts import ArtifactError, iter_shards, read_json, read_manifest, write_json
from specauf.errors import ExactnessError
from specauf.serve.engines import Contender, Engine, Served, engine_for
from specauf.serve.gguf_export import TARGET_FILES
from specauf.runtime import progress

log = logging.getLogger("specauf")


def timed_prompts(tokenizer, prompts_dir: Path, eval_params) -> list[dict]:
    """The eval's timed prompts as chat-template text and our token ids of it (the ids our decoder
    and vLLM are given): [{set, prompt_id, text, ids}], in the eval's order.

    llama.cpp parses special tokens anywhere in the text it is given, so a prompt whose own text
    holds one (`<|im_start|>`, the MASK string) would be served with forged markup: it is left
    out, with a warning (our decoder tokenizes such text as text: generation.encode_chat)."""
    from specauf.data.generation import encode_chat, special_token_strings
    from specauf.data.prompts import load_eval_prompts

    sets = load_eval_prompts(prompts_dir, eval_params.sets)
    specials = special_token_strings(tokenizer)
    out = []
    for name, rows in sets.items():
        for row in rows[: eval_params.prompts_per_set]:
            held = [t for t in specials if t in row["turns"][0]]
            if held:
                log.warning("serve: prompt %s of %s holds the special token %r as text; llama.cpp would parse it "
                            "as markup, so it is not served", row["prompt_id"], name, held[0])
                continue
            messages = [{"role": "user", "content": row["turns"][0]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out.append({"set": name, "prompt_id": row["prompt_id"], "text": text, "ids": encode_chat(tokenizer, [row["turns"][0]])})
    return out


def our_greedy_ids(eval_rollouts_dir: Path, prompt_ids) -> dict[str, list[int]]:
    """{prompt_id: our target's greedy answer ids} (data/eval_rollouts: fp32 transformers, the text
    tau is replayed on) for these prompts."""
    want, out = set(prompt_ids), {}
    manifest = read_manifest(eval_rollouts_dir, kind="rollouts")
    for table in iter_shards(eval_rollouts_dir, manifest):
        for pid, resp in zip(table.column("prompt_id").to_pylist(), table.column("response_ids").to_pylist()):
            if pid in want:
                out[pid] = resp
    return out


def our_greedy_texts(tokenizer, eval_rollouts_dir: Path, prompts: list[dict], n: int) -> dict[str, str]:
    """{prompt_id: the first n tokens of our target's greedy answer, as text}, for the timed prompts."""
    ids = our_greedy_ids(eval_rollouts_dir, [p["prompt_id"] for p in prompts])
    return {pid: tokenizer.decode(resp[:n], skip_special_tokens=True) for pid, resp in ids.items()}


def _pool(rows: list[dict], key: str, n_max: int | None) -> dict:
    """Pooled speed and, for a speculative contender, tau and acceptance by position."""
    tokens = sum(r[key]["tokens"] for r in rows)
    secs = sum(r[key]["tokens"] / r[key]["tokens_per_s"] for r in rows)
    out = {"tokens_per_s": tokens / secs if secs else None}
    if n_max is not None:
        cycles = [a for r in rows for a in r[key]["accepted"]]
        out["cycles"] = len(cycles)
        out["tau"] = (sum(cycles) + len(cycles)) / len(cycles) if cycles else None
        out["acceptance"] = [sum(a > i for a in cycles) / len(cycles) if cycles else None for i in range(n_max)]
    return out


def serve_drafter(params, run: str, models: dict[str, Path], export_dir: Path, prompts: list[dict],
                  eval_prompts_file: Path, our_greedy: dict[str, str] | None = None,
                  engine: Engine | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-prompt rows) of one drafter in a serving engine: each target model ({name:
    path}: `f32` is the eval's numerics, `source` the quantised GGUF), prompt and contender
    decoded through the Engine interface, every speculative output checked against the engine's
    own plain greedy (check_exact fails on a difference)."""
    sp, ep = params.serve, params.eval
    engine = engine or engine_for(sp)
    drafter = export_dir / engine.drafter_file(read_manifest(export_dir, kind="export"))
    if not drafter.exists():
        raise ArtifactError(f"{drafter}: missing (rerun the export stage with serve.engine {engine.name})")
    sizes = ep.speculative_block_sizes
    ours = {(r["set"], r["prompt_id"]): r for r in read_json(eval_prompts_file)["decoded"]}
    n = ep.max_new_tokens
    peers = [dataclasses.replace(c, tokens=n) for c in engine.peers(sp)]
    longest = max([b - 1 for b in sizes] + [c.n_max for c in peers])
    # plain runs long enough to hold every speculative run (they overshoot n by up to n_max + 1)
    contenders = [Contender("plain", None, 0, "plain", n + longest + 1),
                  *(Contender(f"b{b}", drafter, b - 1, "draft-dflash", n) for b in sizes), *peers]
    targets, rows, mismatches = {}, [], []
    with progress(total=len(models) * len(prompts) * len(contenders), desc=f"serve {run} ({engine.name})",
                  unit="run") as bar:
        for name, model in models.items():
            decoded = engine.decode(model, prompts, contenders, done=bar.update)
            t_rows = []
            for i, p in enumerate(prompts):
                plain = decoded["plain"][i]
                row = {"target": name, "set": p["set"], "prompt_id": p["prompt_id"],
                       "plain": {"tokens": plain.tokens, "tokens_per_s": plain.tokens_per_s}}
                if name == "f32" and our_greedy and p["prompt_id"] in our_greedy:  # the engine's f32 target is ours?
                    row["plain"]["equals_our_greedy"] = plain.text.startswith(our_greedy[p["prompt_id"]])
                for c in contenders[1:]:
                    row[c.key] = compare_with_plain(plain, decoded[c.key][i], n)
                    if not row[c.key]["equals_plain"]:
                        mismatches.append(f"{name}/{p['set']}/{p['prompt_id']} ({c.key})")
                t_rows.append(row)
            targets[name] = pooled_section(t_rows, contenders[1:], sizes, ours if name == "f32" else None)
            rows += t_rows
    metrics = {**engine.describe(), "prompts": len(prompts), "max_new_tokens": n,
               "block_layout": "short (an (n+1)-token block per cycle of n guesses)",
               "targets": targets, "exactness": {"checked": len(rows), "mismatches": mismatches}}
    if "f32" in targets and "source" in targets:
        metrics["quantisation_tau_drop"] = {f"b{b}": targets["f32"][f"b{b}"]["tau"] - targets["source"][f"b{b}"]["tau"]
                                            for b in sizes if targets["f32"][f"b{b}"]["tau"] and targets["source"][f"b{b}"]["tau"]}
    return metrics, rows


def gguf_models(target_gguf_dir: Path, serve_params) -> dict[str, Path]:
    """llama.cpp's targets: the GGUFs of serve.targets that the target_gguf stage wrote (a target
    that is not a GGUF has no `source`)."""
    models = {t: target_gguf_dir / TARGET_FILES[t] for t in serve_params.targets if (target_gguf_dir / TARGET_FILES[t]).is_file()}
    if not models:
        raise ArtifactError(f"{target_gguf_dir}: none of serve.targets {serve_params.targets} (rerun the target_gguf stage)")
    return models


def write_served(metrics_file: Path, run: str, metrics: dict, rows: list[dict]) -> None:
    """A serve stage's outputs: the per-prompt rows, then the metrics (last: DVC records the stage
    only when all its outputs exist)."""
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics_file.with_suffix(".prompts.json"), {"run": run, "rows": rows})
    write_json(metrics_file, metrics)
    log.info("wrote %s (%s, %d prompt rows)", metrics_file, metrics.get("engine"), len(rows))


def compare_with_plain(plain: Served, spec: Served, n: int) -> dict:
    """One speculative run's row: speed, cycles, and whether its text is the engine's plain greedy
    text (a prefix of it: a speculative run may stop past n, the plain one ran longer)."""
    same = plain.text.startswith(spec.text) and (spec.tokens >= n or plain.text == spec.text)
    row = {"tokens": spec.tokens, "tokens_per_s": spec.tokens_per_s, "accepted": spec.accepted, "equals_plain": same}
    if not same:
        at = next((i for i, (a, b) in enumerate(zip(plain.text, spec.text)) if a != b), min(len(plain.text), len(spec.text)))
        row["first_difference"] = {"char": at, "plain": plain.text[max(0, at - 20):at + 30],
                                   "speculative": spec.text[max(0, at - 20):at + 30]}
    return row


def pooled_section(t_rows: list[dict], contenders: list[tuple], sizes: list[int], ours: dict | None) -> dict:
    """One target's pooled figures per contender; with `ours` (the f32 target: our numerics), the
    agreement with our greedy answers and our decoded tau beside the engine's."""
    section = {"plain": _pool(t_rows, "plain", None)}
    for c in contenders:
        section[c.key] = _pool(t_rows, c.key, c.n_max)
        section[c.key]["speedup"] = section[c.key]["tokens_per_s"] / section["plain"]["tokens_per_s"]
    if ours is not None:
        checked = [r["plain"]["equals_our_greedy"] for r in t_rows if "equals_our_greedy" in r["plain"]]
        section["plain"]["our_greedy_agreement"] = {"equal": sum(checked), "prompts": len(checked)}
        for b in sizes:
            mine = [ours[(r["set"], r["prompt_id"])][f"b{b}"] for r in t_rows if (r["set"], r["prompt_id"]) in ours]
            tau_ours = sum(m["emitted"] for m in mine) / sum(m["cycles"] for m in mine) if mine else None
            section[f"b{b}"]["tau_ours_decoded"] = tau_ours
            section[f"b{b}"]["tau_minus_ours"] = (section[f"b{b}"]["tau"] - tau_ours
                                                   if tau_ours and section[f"b{b}"]["tau"] else None)
    return section


def check_exact(metrics: dict, gate: bool) -> None:
    """serve.exactness_gate: the engine's speculative outputs against its plain greedy ones."""
    bad = metrics.get("exactness", {}).get("mismatches", [])
    engine = metrics.get("engine", "the engine")
    if bad and gate:
        raise ExactnessError(f"{engine} speculative output differs from its plain greedy output: {', '.join(bad[:5])}")
    if bad:
        log.warning("%s speculative output differs from plain greedy: %s", engine, ", ".join(bad[:5]))
