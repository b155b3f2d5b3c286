"""The paper's claims and the issue's goals, judged from the eval and train stages' numbers.

tau claims are judged from 95% intervals of paired differences over prompts, and over training
seeds when there are several (specauf/evidence.py), never from point estimates alone: "holds" only
when the interval excludes 0 in the claimed direction, "reversed" when it excludes 0 the other
way, "not significant" otherwise. Claim 2 (token accuracy) has one number per variant (the mean
over seeds), without an interval: it is reported as such.

The claims read one entry per loss variant (`by_variant`), the report's tables one per run.
"""
from __future__ import annotations

import math
import re
from typing import Any

from specauf import evidence

GOAL_OVER_PLAIN = 2.0      # issue goal: best speedup over plain decoding
GOAL_OVER_PEER = 1.3       # issue goal: best speedup over the best peer (transformers' own)
HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"
REVERSED, NOT_SIGNIFICANT, INCONCLUSIVE, TOO_FEW = (evidence.REVERSED, evidence.NOT_SIGNIFICANT, evidence.INCONCLUSIVE,
                                                    evidence.TOO_FEW)
MET, NOT_MET = "met", "not met"


def _num(x: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, inf or not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _block_key(key: str) -> int | None:
    m = re.fullmatch(r"b(\d+)", key)
    return int(m.group(1)) if m else None



def train_metric(summary: dict, key: str) -> float | None:
    """A DVCLive summary value by its logged name (`heldout/token_accuracy`): flat or nested."""
    if key in summary:
        return _num(summary[key])
    node: Any = summary
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return _num(node)


def block_sizes(section: dict) -> list[int]:
    """Inference block sizes measured in an overall/set section, ascending."""
    return sorted(k for k in (_block_key(key) for key in section) if k is not None)


def _stat(section: dict | None, k: int, field: str) -> float | None:
    s = (section or {}).get(f"b{k}")
    return _num(s.get(field)) if isinstance(s, dict) else None


def _plain_speed(section: dict | None) -> float | None:
    p = (section or {}).get("plain")
    return _num(p.get("tokens_per_s")) if isinstance(p, dict) else None


def _sections(ev: dict) -> dict[str, dict]:
    sets = ev.get("sets") or {}
    return {"overall": ev["overall"], **{n: s for n, s in sets.items() if isinstance(s, dict)}}


def best_peer(ev: dict) -> tuple[str, float] | None:
    """The fastest transformers peer of one eval run: (name, speedup over transformers' plain)."""
    peers = ev.get("peers") or {}
    found = [(name, _num(p.get("speedup_vs_hf_plain"))) for name, p in sorted(peers.items())
             if name != "hf_plain" and isinstance(p, dict)]
    found = [(n, s) for n, s in found if s is not None]
    return max(found, key=lambda t: t[1]) if found else None



def by_variant(runs: dict) -> dict:
    """Runs (one per variant and training seed) grouped by variant: every seed's per-prompt rows
    (each row carries its seed), every seed's training summary, and the first run's eval metrics
    (settings and block sizes, the same for every seed)."""
    out: dict = {}
    for r in runs.values():
        v = out.setdefault(r["variant"], {"eval": r["eval"], "trains": [], "prompts": [], "decoded": [], "seeds": []})
        v["trains"].append(r["train"])
        v["prompts"] += r.get("prompts") or []
        v["decoded"] += r.get("decoded") or []
        v["seeds"].append(r["seed"])
    return out


def pooled_tau(d: dict, k: int, set_name: str | None = None) -> float | None:
    """tau of one variant at block size k over every seed's replayed prompts (a ratio of sums)."""
    rows = [r for r in d.get("prompts") or [] if f"b{k}" in r and (set_name is None or r["set"] == set_name)]
    den = sum(r[f"b{k}"]["cycles"] for r in rows)
    return sum(r[f"b{k}"]["emitted"] for r in rows) / den if den else None


def _fmt(x: float | None, digits: int = 3, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.3f}"



def _diff_row(data: dict, a: str, b: str, set_name: str | None, k: int, resamples: int) -> dict:
    """tau(a) - tau(b) at inference block size k on one set (None: all sets pooled), with its
    interval (over prompts, and seeds when there are several)."""
    cols = evidence.paired_rows(data[a].get("prompts") or [], data[b].get("prompts") or [], f"b{k}", set_name)
    row = {"set": set_name or "overall", "block_size": k, a: None, b: None, "diff": None, "lo": None, "hi": None}
    if not cols[0].size:
        return row
    row[a] = cols[0].sum() / cols[1].sum()
    row[b] = cols[2].sum() / cols[3].sum()
    d = evidence.paired_diff_ci(*cols, resamples=resamples)
    row.update(diff=d["value"], lo=d["lo"], hi=d["hi"], prompts=d["prompts"], seeds=d["seeds"])
    return row


def _grid(data: dict, a: str, b: str, resamples: int) -> list[dict]:
    sets = sorted({r["set"] for v in (a, b) for r in data[v].get("prompts") or []})
    sizes = sorted(set(block_sizes(data[a]["eval"]["overall"])) | set(block_sizes(data[b]["eval"]["overall"])))
    return [_diff_row(data, a, b, name, k, resamples) for name in [*sets, None] for k in sizes]


def claim_beats(data: dict, a: str = "auf", b: str = "decay", resamples: int = evidence.RESAMPLES) -> dict:
    """tau(a) > tau(b) on every eval set and overall, at every inference block size, each judged
    from the paired 95% interval of the difference over prompts."""
    if a not in data or b not in data:
        missing = [v for v in (b, a) if v not in data]
        return {"status": UNMEASURED, "detail": f"variant(s) {', '.join(missing)} not trained", "rows": [],
                "held": [], "failed": [], "open": [], "missing": []}
    rows = _grid(data, a, b, resamples)
    measured = [r for r in rows if r["diff"] is not None]
    held = [r for r in measured if evidence.verdict(r) == HOLDS]
    failed = [r for r in measured if evidence.verdict(r) == REVERSED]
    few = [r for r in measured if evidence.verdict(r) == TOO_FEW]
    open_ = [r for r in measured if r not in held and r not in failed]
    missing = [r for r in rows if r["diff"] is None]
    status = UNMEASURED if not measured else REVERSED if failed else TOO_FEW if few else NOT_SIGNIFICANT if open_ else HOLDS
    return {"status": status, "rows": rows, "held": held, "failed": failed, "open": open_, "missing": missing,
            "detail": f"{len(held)} of {len(rows)} set/block-size pairs hold (95% interval of {a} - {b} above 0), "
                      f"{len(failed)} reversed, {len(open_) - len(few)} not significant"
                      + (f", {len(few)} on fewer than {evidence.MIN_PROMPTS} prompts (judged nothing)" if few else "")
                      + (f", {len(missing)} without per-prompt rows" if missing else "")}


def claim_auf_beats_decay(data: dict, resamples: int = evidence.RESAMPLES) -> dict:
    """Claim 1 (the paper's): tau(auf) > tau(decay) on every eval set."""
    return claim_beats(data, "auf", "decay", resamples)


def claim_auf_beats_dpace(data: dict, resamples: int = evidence.RESAMPLES) -> dict:
    """Claim 4 (the field's baseline since D-PACE): tau(auf) > tau(dpace) on every eval set."""
    return claim_beats(data, "auf", "dpace", resamples)


def claim_auf_decay_matches_auf(data: dict, margin: float = evidence.EQUIVALENCE_MARGIN,
                                resamples: int = evidence.RESAMPLES) -> dict:
    """Claim 3: auf_decay ~ auf, overall at every block size: the interval of the difference
    inside +-margin (equivalence), wholly outside it (does not hold), or neither (inconclusive)."""
    if "auf" not in data or "auf_decay" not in data:
        missing = [v for v in ("auf", "auf_decay") if v not in data]
        return {"status": UNMEASURED, "rows": [], "tolerance": margin, "detail": f"variant(s) {', '.join(missing)} not trained"}
    rows = [r for r in _grid(data, "auf_decay", "auf", resamples) if r["set"] == "overall"]
    verdicts = [evidence.equivalence(r, margin) for r in rows if r["diff"] is not None]
    status = (UNMEASURED if not verdicts else FAILS if FAILS in verdicts else TOO_FEW if TOO_FEW in verdicts
              else INCONCLUSIVE if INCONCLUSIVE in verdicts else HOLDS)
    return {"status": status, "rows": rows, "tolerance": margin,
            "detail": "; ".join(f"B={r['block_size']}: auf_decay - auf {_ci(r)}" for r in rows) or "no inference block size measured"}


def _ci(r: dict) -> str:
    return "–" if r.get("diff") is None else f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"


def claim_decay_more_accurate(data: dict) -> dict:
    """Claim 2: decay has the higher full-mask token accuracy on the held-out split. The held-out
    split is a few sequences, so there is no prompt interval; the seeds are the evidence instead:
    decay-s and auf-s hold out the same split, and with two or more seeds the claim holds (or is
    contradicted) only when every seed agrees, and is noise otherwise. One seed is a point
    comparison and says so."""
    def per_seed(d: dict) -> dict:
        trains = d.get("trains") or [d.get("train") or {}]
        seeds = d.get("seeds") or list(range(len(trains)))
        return {s: train_metric(t, "heldout/token_accuracy") for s, t in zip(seeds, trains)}
    accs = {v: per_seed(data[v]) for v in ("decay", "auf") if v in data}
    seeds = sorted(set(accs.get("decay", {})) & set(accs.get("auf", {})))
    pairs = [(accs["decay"][s], accs["auf"][s]) for s in seeds]
    if not pairs or any(None in p for p in pairs):
        why = [v for v in ("decay", "auf") if v not in data]
        detail = f"variant(s) {', '.join(why)} not trained" if why else "heldout/token_accuracy missing from the training metrics"
        return {"status": UNMEASURED, "decay": None, "auf": None, "detail": detail}
    decay, auf = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
    wins = sum(d > a for d, a in pairs)
    status = HOLDS if wins == len(pairs) else FAILS if wins == 0 else NOT_SIGNIFICANT
    detail = f"held-out full-mask token accuracy: decay {decay:.3f}, auf {auf:.3f}" + (
        " (one seed: a point comparison, no spread measured)" if len(pairs) == 1 else
        f" (mean of {len(pairs)} seeds; decay ahead in {wins}: "
        + ", ".join(f"seed {s} {d:.3f} vs {a:.3f}" for s, (d, a) in zip(seeds, pairs)) + ")")
    return {"status": status, "decay": decay, "auf": auf, "seeds": seeds, "detail": detail}


def goals(data: dict) -> dict:
    """The issue's speed goals, judged on the fastest (variant, block size) of all overall results."""
    best = None
    for v, d in data.items():
        ov = d["eval"]["overall"]
        for k in block_sizes(ov):
            s = _stat(ov, k, "speedup")
            if s is not None and (best is None or s > best["speedup"]):
                best = {"variant": v, "block_size": k, "speedup": s}
    out = {"best": best, "over_plain": UNMEASURED, "over_peer": UNMEASURED, "peer": None, "ratio": None}
    if best is None:
        return out
    out["over_plain"] = MET if best["speedup"] >= GOAL_OVER_PLAIN else NOT_MET
    peer = best_peer(data[best["variant"]]["eval"])  # measured in the same run, under the same load
    if peer is not None:
        out["peer"] = {"name": peer[0], "speedup": peer[1]}
        out["ratio"] = best["speedup"] / peer[1]
        out["over_peer"] = MET if out["ratio"] >= GOAL_OVER_PEER else NOT_MET
    return out


# The report's claims in its order: (name, label, how it is judged).
CLAIMS = (
    ("auf_beats_decay", "auf tau > decay tau on every eval set", lambda g, r: claim_auf_beats_decay(g, r)),
    ("decay_more_accurate", "decay has the higher full-mask token accuracy (held-out)", lambda g, r: claim_decay_more_accurate(g)),
    ("auf_decay_matches_auf", "auf_decay ≈ auf", lambda g, r: claim_auf_decay_matches_auf(g, resamples=r)),
    ("auf_beats_dpace", "auf tau > dpace tau on every eval set (D-PACE, the field's default)", lambda g, r: claim_auf_beats_dpace(g, r)),
)


def named_claims(data: dict, resamples: int = evidence.RESAMPLES) -> dict[str, dict]:
    """{name: the claim's result with its "label"}, in the report's order, each over every seed of its variants."""
    grouped = by_variant(data)
    return {name: {**judge(grouped, resamples), "label": label} for name, label, judge in CLAIMS}
