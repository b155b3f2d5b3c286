"""The report's markdown, one function per section, each reading one View of the runs.

Section order is the report's: the claims, the goals, the paper's numbers beside ours, tau with
its intervals, the overall and per-set tables, replay against decoding and speed, the runs
(`specauf/report/run.py` inserts the target line and the serving engines' table)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specauf import evidence
from specauf.artifacts import read_json
from specauf.config import run_name
from specauf.report.claims import (GOAL_OVER_PEER, GOAL_OVER_PLAIN, UNMEASURED, _ci, _fmt, _num, _plain_speed, _signed,
                                   _stat, best_peer, block_sizes, by_variant, goals, named_claims, pooled_tau, train_metric)
from specauf.report.figures import tau_interval

# The paper's numbers: Qwen3-8B target, B = 16, temperature 0, mean tau over
# six benchmarks. A different target and scale from anything run here: shown for orientation only.
PAPER = {
    "setting": "Qwen3-8B target, trained block size B = 16, ShareGPT training data, temperature 0, "
               "mean over six benchmarks",
    "rows": [("DFlash", 2.40, 2.61), ("Domino (DFlash + causal GRU head)", 2.56, 2.68)],
}
PEER_NAMES = {"hf_prompt_lookup": "prompt lookup", "hf_assisted": "assisted generation"}


@dataclass(frozen=True)
class View:
    """What every section reads: the runs and what they have in common."""
    data: dict
    resamples: int
    grouped: dict
    seeds: list
    sizes: list
    set_names: list
    n_prompts: list
    settings: dict

    @classmethod
    def of(cls, data: dict, resamples: int) -> "View":
        return cls(data, resamples, by_variant(data), sorted({d["seed"] for d in data.values()}),
                   sorted({k for d in data.values() for k in block_sizes(d["eval"]["overall"])}),
                   sorted({n for d in data.values() for n in (d["eval"].get("sets") or {})}),
                   sorted({len(d["prompts"]) for d in data.values() if d.get("prompts")}),
                   next(iter(data.values()))["eval"].get("settings") or {})

    @property
    def variants(self) -> list:
        return list(self.data)


def render_markdown(data: dict, resamples: int = evidence.RESAMPLES) -> str:
    v = View.of(data, resamples)
    sections = (_intro, _claims, _goals, _paper, _tau_intervals, _overall, _per_set, _replay_and_speed, _runs)
    return "\n".join(line for section in sections for line in section(v))


def _intro(v: View) -> list[str]:
    return ["# spec-auf report", "",
            f"Loss variants: {', '.join(v.variants)}. Inference block sizes: {', '.join(map(str, v.sizes)) or 'none'}. "
            "tau = mean tokens emitted per target forward (verification cycle); speedup = plain decoding "
            "time per output token / speculative time per output token, same engine, same prompts, same process.", ""]


def _claims(v: View) -> list[str]:
    """Verdicts first: what holds here, judged from intervals."""
    c = named_claims(v.data, v.resamples)
    L = ["## The paper's claims, measured here", "",
         f"tau is replayed on every prompt of every eval set ({', '.join(map(str, v.n_prompts)) or 'no'} prompts per "
         f"variant, the first {v.settings.get('replay_max_new_tokens', '–')} tokens of the target's greedy answer; "
         "docs/method.md section 5) and comes with 95% intervals from a paired bootstrap over prompts "
         f"({_interval_basis(v.seeds, v.resamples)}). A claim holds only where the interval excludes 0.", ""]
    L += _claim_lines(1, c["auf_beats_decay"]["label"], c["auf_beats_decay"], "auf", "decay")
    acc = c["decay_more_accurate"]
    L.append(f"2. **{acc['label']}: {acc['status']}.** {acc['detail']}; no prompt interval "
             "(the held-out split is a few sequences): seeds that disagree make it noise.")
    eq = c["auf_decay_matches_auf"]
    L.append(f"3. **{eq['label']} (95% interval of the difference inside ±{eq['tolerance']:.2f}, overall): "
             f"{eq['status']}.** {eq['detail']}.")
    L += _claim_lines(4, c["auf_beats_dpace"]["label"], c["auf_beats_dpace"], "auf", "dpace")
    return L + [""]


def _goals(v: View) -> list[str]:
    g = goals(v.data)
    L = ["## Issue goals", ""]
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
    return L + [""]


def _paper(v: View) -> list[str]:
    L = ["## The paper's numbers beside ours", "",
         f"**Paper (not this run)**: {PAPER['setting']}. A different target and a far larger scale: "
         "compare directions, not magnitudes.", ""]
    dpace = "dpace" in v.grouped  # the paper predates D-PACE: its rows have no such column
    rows = [[f"paper: {m}", f"{d:.2f}", f"{a:.2f}", f"{a - d:+.2f}", *(["–", "–"] if dpace else [])]
            for m, d, a in PAPER["rows"]]
    for k in v.sizes:
        d, a, p = (pooled_tau(v.grouped[x], k) if x in v.grouped else None for x in ("decay", "auf", "dpace"))
        rows.append([f"this run{' (Domino)' if v.settings.get('backbone') == 'domino' else ''}: overall, inference B={k}",
                     _fmt(d), _fmt(a),
                     _signed(None if d is None or a is None else a - d),
                     *([_fmt(p), _signed(None if p is None or a is None else a - p)] if dpace else [])])
    return L + _table(["", "tau decay", "tau auf", "auf - decay", *(["tau dpace", "auf - dpace"] if dpace else [])], rows)


def _tau_intervals(v: View) -> list[str]:
    """Each variant's tau with its interval (pooled over seeds)."""
    L = ["## tau with 95% intervals", "",
         f"Each loss variant over every replayed prompt{'' if len(v.seeds) == 1 else ' and training seed'} "
         f"({_interval_basis(v.seeds, v.resamples)}).", ""]
    set_cols = [*v.set_names, None]
    rows = [[x, str(k), *(_tau_ci(d, k, n, v.resamples) for n in set_cols)] for x, d in v.grouped.items() for k in v.sizes]
    return L + _table(["variant", "B", *v.set_names, "overall"], rows)


def _tau_cols(v: View) -> list[str]:
    return [f"tau B={k}" for k in v.sizes] + [f"speedup B={k}" for k in v.sizes]


def _overall(v: View) -> list[str]:
    rows = []
    for x in v.variants:
        ev, tr = v.data[x]["eval"], v.data[x]["train"]
        ov = ev["overall"]
        peer = best_peer(ev)
        ours = max((s for s in (_stat(ov, k, "speedup") for k in v.sizes) if s is not None), default=None)
        rows.append([x, *(_fmt(_stat(ov, k, "tau")) for k in v.sizes),
                     *(_fmt(_stat(ov, k, "speedup"), 2, "x") for k in v.sizes),
                     _fmt(_plain_speed(ov), 1),
                     _fmt(train_metric(tr, "heldout/token_accuracy")), _fmt(train_metric(tr, "heldout/acceptance_length")),
                     _fmt(ours, 2, "x"),
                     "–" if peer is None else f"{peer[1]:.2f}x ({PEER_NAMES.get(peer[0], peer[0])})"])
    return (["## Overall (all eval sets pooled)", ""]
            + _table(["variant", *_tau_cols(v), "plain tok/s", "held-out token acc (full mask)", "offline tau (training)",
                      "our best speedup", "best peer speedup"], rows)
            + ["Peer speedups are over transformers' own plain `generate` in the same run; ours are over "
               "our engine's plain decoding. Offline tau is the training stage's held-out acceptance-length "
               "estimate (teacher-forced, no decoding).", ""] + _prompt_mean_line(v))


def _prompt_mean_line(v: View) -> list[str]:
    """tau the other way the field quotes it, so a paper's per-prompt mean is compared like with like."""
    cells = [f"{x} " + " / ".join(_fmt(_stat(v.data[x]["eval"]["overall"], k, "tau_prompt_mean")) for k in v.sizes)
             for x in v.variants]
    return [f"Every tau in this report is pooled: all emitted tokens over all draft-verify cycles. The mean of "
            f"per-prompt tau (each prompt's own, averaged; `tau_prompt_mean` in metrics/eval), at B = "
            f"{' / '.join(map(str, v.sizes))}: {'; '.join(cells)}.", ""]


def _per_set(v: View) -> list[str]:
    L = []
    for name in v.set_names:
        L += [f"## Eval set: {name}", ""]
        rows = []
        for x in v.variants:
            s = (v.data[x]["eval"].get("sets") or {}).get(name)
            rows.append([x, *(_fmt(_stat(s, k, "tau")) for k in v.sizes),
                         *(_fmt(_stat(s, k, "speedup"), 2, "x") for k in v.sizes), _fmt(_plain_speed(s), 1),
                         "–" if not isinstance(s, dict) else str(next((y.get("prompts") for y in s.values()
                                                                      if isinstance(y, dict) and "prompts" in y), "–"))])
        L += _table(["variant", *_tau_cols(v), "plain tok/s", "prompts"], rows)
    return L


def _replay_and_speed(v: View) -> list[str]:
    """Replay against decoding, and the decoded speedups with their intervals."""
    st = v.settings
    L = ["## Replay against decoding, and speed", "",
         f"Speed comes from decoding the first {st.get('prompts_per_set', '–')} prompts of each set "
         f"({st.get('max_new_tokens', '–')} new tokens, block layout `{st.get('block_layout', '–')}`); on those prompts "
         "the replay must give the decoded tau (else the stage fails).", ""]
    rows = []
    for x in v.variants:
        ev, dec = v.data[x]["eval"], v.data[x].get("decoded") or []
        chk = ev.get("replay_check") or {}
        for k in block_sizes(ev["overall"]):
            pooled = (chk.get("pooled") or {}).get(f"b{k}") or {}
            ci = evidence.speedup_ci(dec, f"b{k}", resamples=v.resamples)
            rows.append([x, str(k), _fmt(_num(pooled.get("decoded_tau"))), _fmt(_num(pooled.get("replayed_tau"))),
                         str(chk.get("prompts_differing", "–")),
                         "–" if ci is None else f"{ci['value']:.2f}x [{ci['lo']:.2f}, {ci['hi']:.2f}]"])
    L += _table(["variant", "B", "decoded tau", "replayed tau (same prompts)", "prompts differing",
                 "speedup [95% interval over prompts]"], rows)
    return L + _cost_lines(v.data)


def _runs(v: View) -> list[str]:
    """Runs: exactness and machine."""
    L = ["## Runs: exactness gate and machine", ""]
    rows = []
    for x in v.variants:
        ev = v.data[x]["eval"]
        m, st = ev.get("machine") or {}, ev.get("settings") or {}
        rows.append([x, _exactness(ev), str(m.get("device", "–")), str(m.get("torch_threads", "–")),
                     str(m.get("cpu_count", "–")), str(m.get("processor", "–")),
                     str(st.get("temperature", "–")), str(st.get("max_new_tokens", "–")), str(st.get("repeats", "–")),
                     _kernels(ev.get("linear_kernels"))])
    L += _table(["variant", "exactness gate", "device", "torch threads", "CPUs", "processor", "temperature",
                 "max new tokens", "timed repeats", "target linear kernels"], rows)
    platforms = sorted({str((d["eval"].get("machine") or {}).get("platform")) for d in v.data.values()
                        if (d["eval"].get("machine") or {}).get("platform")})
    if platforms:
        L += [f"Platform: {'; '.join(platforms)}.", ""]
    return L + ["![acceptance by block position](acceptance.png)", ""]


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


def engine_metrics(serve_dir: str | Path, data: dict, engine: str) -> dict[str, dict]:
    """{run label: a serve stage's metrics (SERVE_DIR/RUN.json)} for the runs an engine served."""
    files = {label: Path(serve_dir) / f"{run_name(d['variant'], d['seed'])}.json" for label, d in data.items()}
    found = {label: read_json(f) for label, f in files.items() if f.is_file()}
    return {label: m for label, m in found.items() if m.get("engine") == engine}


def served_lines(serve_dir: str | Path, data: dict) -> list[str]:
    """"Served by llama.cpp": each run's serve stage metrics (metrics/serve/RUN.json), when present."""
    found = engine_metrics(serve_dir, data, "llama.cpp")
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


def vllm_lines(serve_dir: str | Path, data: dict) -> list[str]:
    """"Served by vLLM": each run's serve_vllm metrics (metrics/serve_vllm/RUN.json), when present."""
    found = engine_metrics(serve_dir, data, "vllm")
    if not found:
        return []
    m0 = next(iter(found.values()))
    sizes = sorted({int(k[1:]) for m in found.values() for k in m["batch"] if k[1:].isdigit()})
    batch = m0["batch"]
    L = ["## Served by vLLM", "",
         f"vLLM {m0['vllm_version']} ({m0['package']}, its own DFlash: `speculative_config` method `dflash`, "
         f"num_speculative_tokens = B - 1), {m0['dtype']}, {m0['threads']} thread, loading data/export as it is. One "
         f"request at a time: the eval's {m0['prompts']} timed prompts, {m0['max_new_tokens']} new tokens (tau (ours) = "
         f"our decode's tau on them). All at once: the first {batch['prompts']} eval prompts "
         f"({batch['max_new_tokens']} new tokens), where vLLM's tau (from its counters: 1 + accepted per draft, "
         "the bonus token counted as ours counts it) must equal our replay of the trained drafter on the same "
         f"prompts within {batch['tolerance']} (the served-equals-evaluated gate). Speedup = tokens/s over vLLM's "
         "plain greedy, same engine settings.", ""]
    rows = []
    for label, m in found.items():
        t, b = m["targets"]["f32"], m["batch"]
        cells = [label, _fmt(t["plain"]["tokens_per_s"], 1)]
        for k in sizes:
            c = t.get(f"b{k}") or {}
            cells.append(f"{_fmt(c.get('tau'))} ({_fmt(c.get('tau_ours_decoded'))}), {_fmt(c.get('speedup'), 2)}x")
        cells.append(_fmt(b["plain"]["tokens_per_s"], 1))
        for k in sizes:
            c = b.get(f"b{k}") or {}
            cells.append(f"{_fmt(c['vllm']['tau'])} / {_fmt(c['replay']['tau'])} ({c['tau_difference']:+.4f}), "
                         f"{_fmt(c.get('speedup'), 2)}x" if c else "–")
        rows.append(cells)
    L += _table(["run", "1 request: plain tokens/s", *(f"B={k}: tau (ours), speedup" for k in sizes),
                 f"{batch['prompts']} at once: plain tokens/s", *(f"B={k}: tau vLLM / replay (diff), speedup" for k in sizes)], rows)
    def exact(m):
        batch_bad = sum(len(m["batch"][f"b{k}"]["outputs_differing_from_plain"]) for k in sizes if f"b{k}" in m["batch"])
        a, g = m["targets"]["f32"]["plain"].get("our_greedy_agreement"), m["batch"]["plain"]["our_greedy_agreement"]
        return (("every DFlash output equals vLLM's plain greedy" if not m["exactness"]["mismatches"] and not batch_bad
                 else f"{len(m['exactness']['mismatches']) + batch_bad} DFlash outputs leave vLLM's plain greedy")
                + (f"; vLLM's plain greedy equals our target's on {a['equal']}/{a['prompts']} timed and "
                   f"{g['equal']}/{g['prompts']} batch prompts" if a else ""))
    L += ["Exactness: " + "; ".join(f"{label}: {exact(m)}" for label, m in found.items()) + ".", ""]
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


def _claim_lines(n: int, label: str, c: dict, a: str, b: str) -> list[str]:
    lines = [f"{n}. **{label}: {c['status']}.** {c['detail']}."]
    if c["rows"]:
        lines.append(f"   - {a} - {b}, per set and block size: " + "; ".join(
            f"{r['set']} B={r['block_size']} {_ci(r)}" for r in c["rows"]))
    return lines
