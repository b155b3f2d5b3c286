"""The report's figures: the PNG for offline readers (reports/acceptance.png) and the data behind
dvc.yaml's top-level plots, which overlay every run on one chart (`dvc plots show`; templates in
.dvc/plots/). Both show the same numbers as reports/report.md.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from specauf import evidence
from specauf.report.claims import _num, block_sizes, by_variant
from specauf.config import run_name

TRAINING_CURVES = {"loss": "loss.tsv", "heldout_acceptance_length": "heldout/acceptance_length.tsv"}  # DVCLive's files


def tau_interval(d: dict, k: int, set_name: str | None, resamples: int) -> dict | None:
    """One variant's tau at block size k on a set (None: pooled) with its interval over prompts (and seeds)."""
    rows = [r for r in d.get("prompts") or [] if f"b{k}" in r and (set_name is None or r["set"] == set_name)]
    if not rows:
        return None
    cols = evidence.paired_rows(rows, rows, f"b{k}")
    return evidence.ratio_ci(cols[0], cols[1], resamples=resamples)


def overlay_rows(data: dict, train_dir: str | Path, resamples: int) -> dict[str, list[dict]]:
    """{file stem: rows} for reports/plots/: acceptance by block position per run (its largest
    inference block size), tau per eval set per variant with its 95% interval (pooled over seeds),
    and the training curves per run (DVCLive's logged loss and held-out acceptance length)."""
    acceptance, tau = [], []
    curves: dict[str, list[dict]] = {field: [] for field in TRAINING_CURVES}
    for label, d in data.items():
        sizes = block_sizes(d["eval"]["overall"])
        if sizes:
            rates = d["eval"]["overall"][f"b{sizes[-1]}"].get("acceptance_per_position") or []
            acceptance += [{"run": label, "block_size": sizes[-1], "position": i, "acceptance": r}
                           for i, x in enumerate(rates, start=1) if (r := _num(x)) is not None]
        folder = Path(train_dir) / run_name(d["variant"], d["seed"]) / "plots" / "metrics"
        for field, name in TRAINING_CURVES.items():
            if (folder / name).is_file():
                with open(folder / name, newline="") as f:
                    curves[field] += [{"run": label, "step": int(r["step"]), "value": float(r[Path(name).stem])}
                                      for r in csv.DictReader(f, delimiter="\t")]
    set_names = sorted({n for d in data.values() for n in (d["eval"].get("sets") or {})})
    for v, d in by_variant(data).items():
        sizes = block_sizes(d["eval"]["overall"])
        for name in [*set_names, None] if sizes else []:
            ci = tau_interval(d, sizes[-1], name, resamples)
            if ci is not None:
                tau.append({"variant": v, "set": name or "overall", "block_size": sizes[-1],
                            "tau": ci["value"], "lo": ci["lo"], "hi": ci["hi"]})
    return {"acceptance": acceptance, "tau": tau, **curves}


def plot_acceptance(data: dict, tau_rows: list[dict]) -> bytes:
    """PNG bytes: acceptance rate by block position (overall, each run's largest inference block
    size) and tau per eval set per variant at that size with its 95% interval (error bars): the
    `tau` rows of overlay_rows, so the bootstrap runs once for both figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    longest = 1
    for v, d in data.items():
        ov = d["eval"]["overall"]
        sizes = block_sizes(ov)
        if not sizes:
            continue
        rates = ov[f"b{sizes[-1]}"].get("acceptance_per_position") or []
        ys = [r if (r := _num(x)) is not None else float("nan") for x in rates]
        ax1.plot(range(1, len(ys) + 1), ys, marker="o", label=f"{v} (B={sizes[-1]})")
        longest = max(longest, len(ys))
    ax1.set_xticks(range(1, longest + 1))
    ax1.set_xlim(0.5, longest + 0.5)
    ax1.set_xlabel("block position k")
    ax1.set_ylabel("P[k accepted | earlier accepted]")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title("Acceptance by block position (overall)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    set_names = sorted({n for d in data.values() for n in (d["eval"].get("sets") or {})})
    grouped = by_variant(data)
    width = 0.8 / max(len(grouped), 1)
    top = 0.0
    by_key = {(r["variant"], r["set"]): r for r in tau_rows}
    for i, v in enumerate(grouped):
        cis = [by_key.get((v, n)) for n in [*set_names, "overall"]]
        cis = [{"value": c["tau"], "lo": c["lo"], "hi": c["hi"]} if c else None for c in cis]
        vals = [c["value"] if c else 0.0 for c in cis]
        err = [[c["value"] - c["lo"] if c else 0.0 for c in cis], [c["hi"] - c["value"] if c else 0.0 for c in cis]]
        ax2.bar([j + i * width for j in range(len(cis))], vals, width=width, yerr=err, capsize=3, label=v)
        top = max([top, *(c["hi"] for c in cis if c)])
    set_names = [*set_names, "overall"]
    ax2.set_ylim(0, max(top, 1.0) * 1.25)  # headroom for the legend
    ax2.set_xticks([j + width * (len(grouped) - 1) / 2 for j in range(len(set_names))])
    ax2.set_xticklabels(set_names, rotation=20, fontsize=8)
    ax2.set_ylabel("tau (tokens per target forward)")
    ax2.set_title("tau per eval set, 95% interval (largest inference block size)")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper center", ncol=max(len(grouped), 1))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
