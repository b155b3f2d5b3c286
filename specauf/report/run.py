"""Stage `report`: one markdown report and one figure comparing every trained loss variant.

Inputs are the outputs of every run (a loss variant trained with one seed, `<variant>-<seed>`): the
`eval` stage's `metrics/eval/<run>.json` (the headline), `.details.json` and `.prompts.json` and the DVCLive summaries of
the `train` stage (`metrics/train/<run>/metrics.json`). The paper's
qualitative claims (docs/method.md) and the issue's speed goals are judged from those
numbers, never assumed: a claim that the numbers do not support is reported as not holding.
"""
from __future__ import annotations

from pathlib import Path

from specauf import evidence
from specauf.artifacts import MANIFEST, SCHEMA_VERSION, ArtifactError, atomic_dir, read_json, write_bytes_atomic, write_json
from specauf.report.claims import (GOAL_OVER_PEER, GOAL_OVER_PLAIN, UNMEASURED, _ci, _fmt, _num, _plain_speed,
                            _signed, _stat, best_peer, block_sizes, by_variant, claim_auf_beats_decay,
                            claim_auf_beats_dpace, claim_auf_decay_matches_auf, claim_decay_more_accurate, goals,
                            pooled_tau, train_metric)
from specauf.config import run_name
from specauf.errors import UserError
from specauf.report.figures import overlay_rows, plot_acceptance, tau_interval

# The paper's numbers: Qwen3-8B target, B = 16, temperature 0, mean tau over
# six benchmarks. A different target and scale from anything run here: shown for orientation only.
PAPER = {
    "setting": "Qwen3-8B target, trained block size B = 16, ShareGPT training data, temperature 0, "
               "mean over six benchmarks",
    "rows": [("DFlash", 2.40, 2.61), ("Domino (DFlash + causal GRU head)", 2.56, 2.68)],
}
PEER_NAMES = {"hf_prompt_lookup": "prompt lookup", "hf_assisted": "assisted generation"}


# ------------------------------------------------------------------------------ loading

def load_inputs(eval_dir: str | Path, train_dir: str | Path, variants: list[str], seeds: list[int] = (0,)) -> dict[str, dict]:
    """{run label: {"variant", "seed", "eval", "train", "prompts", "decoded"}}, one per variant and
    seed (the label is the variant alone when there is one seed, else the run name `auf-1`); every
    per-prompt row gets its run's "seed". A missing or malformed file raises ArtifactError naming it."""
    if not variants:
        raise UserError("train.variants is empty: nothing to report")
    data = {}
    for v in variants:
        for seed in seeds:
            run = run_name(v, seed)
            ev_path = Path(eval_dir) / f"{run}.details.json"
            ev = read_json(ev_path)
            if not isinstance(ev, dict) or not isinstance(ev.get("overall"), dict):
                raise ArtifactError(f"{ev_path}: no 'overall' section (not an eval stage metrics file)")
            ev = with_headline(ev, read_json(Path(eval_dir) / f"{run}.json"), Path(eval_dir) / f"{run}.json")
            tr_path = Path(train_dir) / run / "metrics.json"
            tr = read_json(tr_path)
            if not isinstance(tr, dict):
                raise ArtifactError(f"{tr_path}: not a DVCLive metrics summary (expected a JSON object)")
            pr_path = Path(eval_dir) / f"{run}.prompts.json"  # per-prompt rows: without them, no interval
            rows = read_json(pr_path) if pr_path.is_file() else {}
            tag = lambda rs: None if rs is None else [{**r, "seed": seed} for r in rs]
            data[v if len(seeds) == 1 else run] = {"variant": v, "seed": seed, "eval": ev, "train": tr,
                                                   "prompts": tag(rows.get("replayed")),
                                                   "decoded": tag(rows.get("decoded"))}
    return data


def with_headline(details: dict, top, where: Path) -> dict:
    """The details file with the figures the eval stage keeps only in its headline (DVC's metrics
    file) joined back: tau per set and block size, the overall speedup."""
    if not isinstance(top, dict) or not isinstance(top.get("overall"), dict):
        raise ArtifactError(f"{where}: no 'overall' section (not an eval stage headline)")

    def section(detail: dict, head: dict) -> dict:
        return {k: ({**v, **{f: x for f, x in head[k].items() if f in ("tau", "speedup")}}
                    if isinstance(head.get(k), dict) and isinstance(v, dict) else v) for k, v in detail.items()}

    return {**details, "overall": section(details["overall"], top["overall"]),
            "sets": {n: section(s, (top.get("sets") or {}).get(n, {})) for n, s in (details.get("sets") or {}).items()}}


# ------------------------------------------------------------------------------ markdown

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _exactness(ev: dict) -> str:
    ex = ev.get("exactness") or {}
    if not ex.get("checked"):
        return "not checked (temperature > 0)"
    bad = ex.get("mismatches") or []
    return "passed (identical to plain greedy)" if not bad else f"FAILED on {len(bad)} output(s)"


def _interval_basis(seeds: list, resamples: int) -> str:
    return (f"{resamples} resamples, seed {evidence.SEED}; "
            + ("one training seed: the seed-to-seed spread is not in these intervals" if len(seeds) == 1 else
               f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}), resampled as well as the prompts: two levels"))


def render_markdown(data: dict, resamples: int = evidence.RESAMPLES) -> str:
    variants = list(data)
    grouped = by_variant(data)
    seeds = sorted({d["seed"] for d in data.values()})
    c1, c2, c3, c4 = claims(data, resamples)
    g = goals(data)
    all_sizes = sorted({k for d in data.values() for k in block_sizes(d["eval"]["overall"])})
    set_names = sorted({n for d in data.values() for n in (d["eval"].get("sets") or {})})
    n_prompts = sorted({len(d["prompts"]) for d in data.values() if d.get("prompts")})
    L = ["# spec-auf report", "",
         f"Loss variants: {', '.join(variants)}. Inference block sizes: {', '.join(map(str, all_sizes)) or 'none'}. "
         "tau = mean tokens emitted per target forward (verification cycle); speedup = plain decoding "
         "time per output token / speculative time per output token, same engine, same prompts, same process.", ""]

    # -- verdicts first: what holds here, judged from intervals
    st = next(iter(data.values()))["eval"].get("settings") or {}
    L += ["## The paper's claims, measured here", "",
          f"tau is replayed on every prompt of every eval set ({', '.join(map(str, n_prompts)) or 'no'} prompts per "
          f"variant, the first {st.get('replay_max_new_tokens', '–')} tokens of the target's greedy answer; "
          "docs/method.md section 5) and comes with 95% intervals from a paired bootstrap over prompts "
          f"({_interval_basis(seeds, resamples)}). A claim holds only where the interval excludes 0.", ""]
    for n, (label, c) in enumerate([("auf tau > decay tau on every eval set", c1)], start=1):
        L += _claim_lines(n, label, c, "auf", "decay")
    L.append(f"2. **decay has the higher full-mask token accuracy (held-out): {c2['status']}.** {c2['detail']}; no prompt interval "
             "(the held-out split is a few sequences): seeds that disagree make it noise.")
    L.append(f"3. **auf_decay ≈ auf (95% interval of the difference inside ±{c3['tolerance']:.2f}, overall): "
             f"{c3['status']}.** {c3['detail']}.")
    L += _claim_lines(4, "auf tau > dpace tau on every eval set (D-PACE, the field's default)", c4, "auf", "dpace")
    L.append("")
    L += ["## Issue goals", ""]
    if g["best"] is None:
        L.append(f"- best speedup >= {GOAL_OVER_PLAIN:g}x over plain decoding: {UNMEASURED} (no speedup recorded).")
        L.append(f"- best speedup >= {GOAL_OVER_PEER:g}x over the best peer: {UNMEASURED}.")
    else:
        b = g["best"]
        L.append(f"- best speedup >= {GOAL_OVER_PLAIN:g}x over plain decoding: **{g['over_plain']}** "
                 f"({b['speedup']:.2f}x: {b['variant']}, inference block size {b['block_size']}).")
        if g["peer"] is None:
            L.append(f"- best speedup >= {GOAL_OVER_PEER:g}x over the best peer: **{UNMEASURED}** (no peer was run).")
        else:
            p = g["peer"]
            L.append(f"- best speedup >= {GOAL_OVER_PEER:g}x over the best peer: **{g['over_peer']}** "
                     f"({b['speedup']:.2f}x vs {PEER_NAMES.get(p['name'], p['name'])} {p['speedup']:.2f}x "
                     f"= {g['ratio']:.2f}x; peer measured in the same {b['variant']} eval run).")
    L.append("")

    # -- the paper beside ours
    L += ["## The paper's numbers beside ours", "",
          f"**Paper (not this run)**: {PAPER['setting']}. A different target and a far larger scale: "
          "compare directions, not magnitudes.", ""]
    dpace = "dpace" in grouped  # the paper predates D-PACE: its rows have no such column
    rows = [[f"paper: {m}", f"{d:.2f}", f"{a:.2f}", f"{a - d:+.2f}", *(["–", "–"] if dpace else [])]
            for m, d, a in PAPER["rows"]]
    for k in all_sizes:
        d, a, p = (pooled_tau(grouped[v], k) if v in grouped else None for v in ("decay", "auf", "dpace"))
        rows.append([f"this run: overall, inference B={k}", _fmt(d), _fmt(a),
                     _signed(None if d is None or a is None else a - d),
                     *([_fmt(p), _signed(None if p is None or a is None else a - p)] if dpace else [])])
    L += _table(["", "tau decay", "tau auf", "auf - decay", *(["tau dpace", "auf - dpace"] if dpace else [])], rows)

    # -- each variant's tau with its interval (pooled over seeds)
    L += ["## tau with 95% intervals", "",
          f"Each loss variant over every replayed prompt{'' if len(seeds) == 1 else ' and training seed'} "
          f"({_interval_basis(seeds, resamples)}).", ""]
    set_cols = [*set_names, None]
    rows = []
    for v, d in grouped.items():
        for k in all_sizes:
            rows.append([v, str(k), *(_tau_ci(d, k, n, resamples) for n in set_cols)])
    L += _table(["variant", "B", *set_names, "overall"], rows)

    # -- per-set tables
    tau_cols = [f"tau B={k}" for k in all_sizes] + [f"speedup B={k}" for k in all_sizes]
    L += ["## Overall (all eval sets pooled)", ""]
    rows = []
    for v in variants:
        ev, tr = data[v]["eval"], data[v]["train"]
        ov = ev["overall"]
        peer = best_peer(ev)
        ours = max((s for s in (_stat(ov, k, "speedup") for k in all_sizes) if s is not None), default=None)
        rows.append([v, *(_fmt(_stat(ov, k, "tau")) for k in all_sizes),
                     *(_fmt(_stat(ov, k, "speedup"), 2, "x") for k in all_sizes),
                     _fmt(_plain_speed(ov), 1),
                     _fmt(train_metric(tr, "heldout/token_accuracy")), _fmt(train_metric(tr, "heldout/acceptance_length")),
                     _fmt(ours, 2, "x"),
                     "–" if peer is None else f"{peer[1]:.2f}x ({PEER_NAMES.get(peer[0], peer[0])})"])
    L += _table(["variant", *tau_cols, "plain tok/s", "held-out token acc (full mask)", "offline tau (training)",
                 "our best speedup", "best peer speedup"], rows)
    L += ["Peer speedups are over transformers' own plain `generate` in the same run; ours are over "
          "our engine's plain decoding. Offline tau is the training stage's held-out acceptance-length "
          "estimate (teacher-forced, no decoding).", ""]
    for name in set_names:
        L += [f"## Eval set: {name}", ""]
        rows = []
        for v in variants:
            s = (data[v]["eval"].get("sets") or {}).get(name)
            rows.append([v, *(_fmt(_stat(s, k, "tau")) for k in all_sizes),
                         *(_fmt(_stat(s, k, "speedup"), 2, "x") for k in all_sizes), _fmt(_plain_speed(s), 1),
                         "–" if not isinstance(s, dict) else str(next((x.get("prompts") for x in s.values()
                                                                      if isinstance(x, dict) and "prompts" in x), "–"))])
        L += _table(["variant", *tau_cols, "plain tok/s", "prompts"], rows)

    # -- replay against decoding, and the decoded speedups with their intervals
    L += ["## Replay against decoding, and speed", "",
          f"Speed comes from decoding the first {st.get('prompts_per_set', '–')} prompts of each set "
          f"({st.get('max_new_tokens', '–')} new tokens, block layout `{st.get('block_layout', '–')}`); on those prompts "
          "the replay must give the decoded tau (else the stage fails).", ""]
    rows = []
    for v in variants:
        ev, dec = data[v]["eval"], data[v].get("decoded") or []
        chk = ev.get("replay_check") or {}
        for k in block_sizes(ev["overall"]):
            pooled = (chk.get("pooled") or {}).get(f"b{k}") or {}
            ci = evidence.speedup_ci(dec, f"b{k}", resamples=resamples)
            rows.append([v, str(k), _fmt(_num(pooled.get("decoded_tau"))), _fmt(_num(pooled.get("replayed_tau"))),
                         str(chk.get("prompts_differing", "–")),
                         "–" if ci is None else f"{ci['value']:.2f}x [{ci['lo']:.2f}, {ci['hi']:.2f}]"])
    L += _table(["variant", "B", "decoded tau", "replayed tau (same prompts)", "prompts differing",
                 "speedup [95% interval over prompts]"], rows)
    L += _cost_lines(data)

    # -- runs: exactness and machine
    L += ["## Runs: exactness gate and machine", ""]
    rows = []
    for v in variants:
        ev = data[v]["eval"]
        m, st = ev.get("machine") or {}, ev.get("settings") or {}
        rows.append([v, _exactness(ev), str(m.get("device", "–")), str(m.get("torch_threads", "–")),
                     str(m.get("cpu_count", "–")), str(m.get("processor", "–")),
                     str(st.get("temperature", "–")), str(st.get("max_new_tokens", "–")), str(st.get("repeats", "–")),
                     _kernels(ev.get("linear_kernels"))])
    L += _table(["variant", "exactness gate", "device", "torch threads", "CPUs", "processor", "temperature",
                 "max new tokens", "timed repeats", "target linear kernels"], rows)
    platforms = sorted({str((d["eval"].get("machine") or {}).get("platform")) for d in data.values()
                        if (d["eval"].get("machine") or {}).get("platform")})
    if platforms:
        L += [f"Platform: {'; '.join(platforms)}.", ""]
    L += ["![acceptance by block position](acceptance.png)", ""]
    return "\n".join(L)


def served_lines(serve_dir: str | Path, data: dict) -> list[str]:
    """"Served by llama.cpp": each run's serve stage metrics (metrics/serve/RUN.json), when present."""
    found = {label: read_json(Path(serve_dir) / f"{run_name(d['variant'], d['seed'])}.json") for label, d in data.items()
             if (Path(serve_dir) / f"{run_name(d['variant'], d['seed'])}.json").is_file()}
    found = {k: v for k, v in found.items() if v.get("engine") == "llama.cpp"}
    if not found:
        return []
    any_m = next(iter(found.values()))
    sizes = sorted({int(k[1:]) for m in found.values() for t in m["targets"].values() for k in t if k[1:].isdigit()})
    L = ["## Served by llama.cpp", "",
         f"llama.cpp {any_m['llama_cpp_commit']} (`llama-speculative-simple --spec-type draft-dflash`, "
         f"{' '.join(any_m['run_flags'])}, {any_m['threads']} thread) on the eval's {any_m['prompts']} timed prompts, "
         f"{any_m['max_new_tokens']} new tokens, interleaved per prompt. tau = 1 + accepted per cycle; speedup = "
         "tokens/s over llama.cpp's plain greedy on the same GGUF; f32 = converted from data/target (the eval's "
         "numerics: \"ours\" is our decode's tau on the same prompts), source = the original GGUF. "
         f"llama.cpp runs a cycle of n guesses as an (n+1)-token block (layout `short`).", ""]
    rows = []
    for label, m in found.items():
        for name, t in m["targets"].items():
            cells = [label, name, _fmt(t["plain"]["tokens_per_s"], 1)]
            for b in sizes:
                c = t.get(f"b{b}") or {}
                ours = c.get("tau_ours_decoded")
                cells.append(f"{_fmt(c.get('tau'))}" + (f" ({_fmt(ours)})" if ours is not None else "")
                             + f", {_fmt(c.get('speedup'), 2)}x")
            ng = t.get("ngram")
            cells.append("–" if ng is None else f"{_fmt(ng.get('tau'))}, {_fmt(ng.get('speedup'), 2)}x")
            rows.append(cells)
    L += _table(["run", "target GGUF", "plain tokens/s", *(f"B={b}: tau (ours), speedup" for b in sizes),
                 "n-gram peer: tau, speedup"], rows)
    def agreement(m):
        a = ((m["targets"].get("f32") or {}).get("plain") or {}).get("our_greedy_agreement")
        return f"; f32 plain greedy equals our target's on {a['equal']}/{a['prompts']} prompts" if a else ""
    def differing(m):  # prompt runs (target, prompt) with any contender leaving plain greedy
        return len({x.rsplit(" (", 1)[0] for x in m["exactness"]["mismatches"]})
    exact = [f"{label}: {m['exactness']['checked']} prompt runs, "
             + ("every speculative output equals plain greedy" if not m["exactness"]["mismatches"]
                else f"{differing(m)} with a speculative output that leaves plain greedy "
                     f"({len(m['exactness']['mismatches'])} contender runs; metrics/serve/*.prompts.json says where)")
             + agreement(m) for label, m in found.items()]
    drops = [f"{label} " + ", ".join(f"{k} {v:+.3f}" for k, v in m.get("quantisation_tau_drop", {}).items())
             for label, m in found.items() if m.get("quantisation_tau_drop")]
    L += ["Exactness: " + "; ".join(exact) + "."] + (["", "tau drop f32 -> source GGUF: " + "; ".join(drops) + "."] if drops else []) + [""]
    return L


def _tau_ci(d: dict, k: int, set_name: str | None, resamples: int) -> str:
    ci = tau_interval(d, k, set_name, resamples)
    return "–" if ci is None else f"{ci['value']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def _cost_lines(data: dict) -> list[str]:
    """The cost model (specauf/evaluate/cost_model.py): why a block size wins or loses, from measured costs."""
    rows, sentences = [], []
    for v, d in data.items():
        cm = d["eval"].get("cost_model")
        if not isinstance(cm, dict) or not isinstance(cm.get("block_sizes"), dict):
            continue
        tp = _num(cm.get("t_plain_s"))
        for b, r in sorted(cm["block_sizes"].items(), key=lambda kv: int(kv[0])):
            tv, td = _num((cm.get("t_verify_s") or {}).get(b)), _num((cm.get("t_draft_s") or {}).get(b))
            rows.append([v, b, _fmt(_num(r.get("tau"))), _fmt(tv / tp if tv and tp else None, 2),
                         _fmt(td / tp if td and tp else None, 2), _fmt(_num(r.get("cycle_over_t_plain")), 2),
                         _fmt(_num(r.get("predicted_speedup")), 2, "x"), _fmt(_num(r.get("measured_speedup")), 2, "x")])
        best = cm.get("best_predicted_block_size")
        r = cm["block_sizes"].get(str(best)) if best is not None else None
        if r:
            tau, cycle = _num(r.get("tau")), _num(r.get("cycle_over_t_plain"))
            if tau is not None and cycle is not None:
                sentences.append(f"{v}: B={best} predicts best because its cycle costs {cycle:.2f} plain steps and emits "
                                 f"{tau:.2f} tokens ({'faster' if tau > cycle else 'slower'} than plain decoding); "
                                 + ("larger blocks add more cycle cost than tau." if int(best) < max(map(int, cm["block_sizes"]))
                                    else "it is the largest block measured."))
    if not rows:
        return []
    return ["**Cost model**: a cycle costs a b-token verify forward plus one drafter call, in plain 1-token steps "
            "(measured in the eval process, medians); predicted speedup = tau x t_plain / (t_verify + t_draft).", "",
            *_table(["variant", "B", "tau (replayed)", "verify / t_plain", "draft / t_plain", "cycle / t_plain",
                     "predicted speedup", "measured speedup"], rows), *(f"- {x}" for x in sentences), ""]


def _kernels(k) -> str:
    """eval.linear_kernels as run: the calibrated (shape, rows) pairs that left F.linear."""
    if not isinstance(k, dict):
        return "–"
    plan = k.get("plan")
    if not isinstance(plan, dict):
        return str(k.get("mode", "–"))
    pairs = [(shape, r) for shape, by_rows in plan.items() if isinstance(by_rows, dict)
             for r, kernel in by_rows.items() if kernel != "linear"]
    total = sum(len(by_rows) for by_rows in plan.values() if isinstance(by_rows, dict))
    return f"{k.get('mode', 'auto')}: {len(pairs)} of {total} shape/row pairs off F.linear"


# ------------------------------------------------------------------------------ entry point

def target_line(manifest: dict) -> str:
    """Which verifier the report is about, and whose prompt format: a base model's template is
    the preset's choice, not the model's, and the report says so."""
    fmt = ("the params' `target.chat_template` (the model ships none)" if manifest.get("chat_template") == "target.chat_template"
           else "the tokenizer's own chat template")
    return (f"Target: {manifest['source']} ({manifest['model_type']}, {manifest['num_hidden_layers']} layers, hidden "
            f"{manifest['hidden_size']}, vocabulary {manifest['vocab_size']:,}); prompts in {fmt}; answers stop at "
            f"token ids {', '.join(map(str, manifest['stop_token_ids']))}; drafter MASK = {manifest['mask_token']!r}.")


def write_report(eval_dir: str | Path, train_dir: str | Path, variants: list[str], out_dir: str | Path,
                 seeds: list[int] = (0,), resamples: int = evidence.RESAMPLES, serve_dir: str | Path | None = None,
                 target_manifest: dict | None = None) -> dict:
    """Read every run's metrics, write out_dir/report.md and out_dir/acceptance.png (whole or not
    at all); return the claims and goals."""
    data = load_inputs(eval_dir, train_dir, variants, seeds)
    text = render_markdown(data, resamples)
    if target_manifest is not None:
        text = text.replace("# spec-auf report\n\n", f"# spec-auf report\n\n{target_line(target_manifest)}\n\n", 1)
    if serve_dir is not None and (served := served_lines(serve_dir, data)):
        text = text.replace("## Runs: exactness gate and machine", "\n".join(served) + "\n## Runs: exactness gate and machine", 1)
    overlays = overlay_rows(data, train_dir, resamples)
    png = plot_acceptance(data, overlays["tau"])
    with atomic_dir(out_dir, "report") as tmp:
        write_bytes_atomic(tmp / "acceptance.png", png)
        write_bytes_atomic(tmp / "report.md", text.encode())
        for name, rows in overlays.items():  # dvc.yaml's top-level plots overlay the runs from these
            write_json(tmp / "plots" / f"{name}.json", rows)
        write_json(tmp / MANIFEST, {"schema_version": SCHEMA_VERSION, "kind": "report", "variants": list(variants),
                                    "seeds": list(seeds), "bootstrap_resamples": resamples,
                                    "files": ["acceptance.png", "report.md", *(f"plots/{n}.json" for n in overlays)]})
    return {"claims": claims(data, resamples), "goals": goals(data)}


def claims(data: dict, resamples: int = evidence.RESAMPLES) -> list[dict]:
    """The four claims, in the report's order, each over every seed of its variants."""
    grouped = by_variant(data)
    return [claim_auf_beats_decay(grouped, resamples), claim_decay_more_accurate(grouped),
            claim_auf_decay_matches_auf(grouped, resamples=resamples), claim_auf_beats_dpace(grouped, resamples)]


def _claim_lines(n: int, label: str, c: dict, a: str, b: str) -> list[str]:
    lines = [f"{n}. **{label}: {c['status']}.** {c['detail']}."]
    if c["rows"]:
        lines.append(f"   - {a} - {b}, per set and block size: " + "; ".join(
            f"{r['set']} B={r['block_size']} {_ci(r)}" for r in c["rows"]))
    return lines
