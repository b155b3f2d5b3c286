"""The "Across verifiers" table: the same claims on each target's committed pipeline results.

Reads each target's metrics folder (the eval and train stages' outputs, as committed) and prints,
per target and eval set at one inference block size: tau per variant with its 95% interval, the
paired auf - decay and auf - dpace differences with theirs, the verdicts, the held-out full-mask
token accuracy, and the best decoded speedup. The figures are the report's own functions
(specauf/report/claims.py, specauf/evidence.py) on the same files: nothing is recomputed differently.

    python benchmarks/across_verifiers.py --target SmolLM2-135M-Instruct=metrics \
        --target gemma-3-270m=results/gemma3-270m/metrics --block-size 4
"""
from __future__ import annotations

import argparse
from pathlib import Path

from specauf import evidence
from specauf.report.claims import by_variant, claim_auf_beats_decay, claim_auf_beats_dpace, claim_decay_more_accurate, goals
from specauf.report.run import load_inputs

VARIANTS = ["decay", "dpace", "auf"]


def seeds_in(eval_dir: Path) -> list[int]:
    return sorted({int(p.name.split(".")[0].rsplit("-", 1)[1]) for p in eval_dir.glob("auf-*.json")
                   if p.name.count(".") == 1})


def tau_ci(d: dict, k: int, set_name: str | None) -> str:
    rows = [r for r in d["prompts"] if f"b{k}" in r and (set_name is None or r["set"] == set_name)]
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r)
    seeds = sorted(by_seed)
    num = [[r[f"b{k}"]["emitted"] for r in by_seed[s]] for s in seeds]
    den = [[r[f"b{k}"]["cycles"] for r in by_seed[s]] for s in seeds]
    c = evidence.ratio_ci(num, den)
    return f"{c['value']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def diff(claim: dict, set_name: str, k: int) -> str:
    r = next((r for r in claim["rows"] if r["set"] == set_name and r["block_size"] == k), None)
    if r is None or r["diff"] is None:
        return "–"
    return f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] {evidence.verdict({'lo': r['lo'], 'hi': r['hi']})}"


def target_rows(name: str, metrics: Path, k: int) -> list[str]:
    seeds = seeds_in(metrics / "eval")
    data = load_inputs(metrics / "eval", metrics / "train", VARIANTS, seeds)
    grouped = by_variant(data)
    c1, c4 = claim_auf_beats_decay(grouped), claim_auf_beats_dpace(grouped)
    sets = sorted({r["set"] for r in grouped["auf"]["prompts"]})
    lines = []
    for s in [*sets, None]:
        label = s or "**overall**"
        taus = " | ".join(tau_ci(grouped[v], k, s) for v in VARIANTS)
        lines.append(f"| {name} | {label} | {taus} | {diff(c1, s or 'overall', k)} | {diff(c4, s or 'overall', k)} |")
    best = goals(data)["best"]
    c2 = claim_decay_more_accurate(grouped)
    summary = (f"{name}: {len(seeds)} training seed(s) {seeds}; decay more accurate: {c2['status']}, {c2['detail']}"
               + "; best decoded speedup "
               + (f"{best['speedup']:.2f}x ({best['variant']}, B={best['block_size']})" if best else "not measured")
               + f"; auf > decay: {c1['status']} ({c1['detail']}); auf > dpace: {c4['status']} ({c4['detail']})")
    return lines + ["", summary]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", required=True, metavar="NAME=METRICS_DIR",
                    help="a target's name and its metrics folder (eval/ and train/ inside)")
    ap.add_argument("--block-size", type=int, default=4)
    args = ap.parse_args()
    k = args.block_size
    print(f"| target | set | tau decay (B={k}) | tau dpace | tau auf | auf - decay | auf - dpace |")
    print("|---|---|---|---|---|---|---|")
    summaries = []
    for spec in args.target:
        name, _, folder = spec.partition("=")
        rows = target_rows(name, Path(folder), k)
        print("\n".join(rows[:-2]))
        summaries.append(rows[-1])
    print()
    print("\n\n".join(summaries))


if __name__ == "__main__":
    main()
