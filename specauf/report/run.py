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
from specauf.report.claims import goals, named_claims
from specauf.config import run_name
from specauf.errors import UserError
from specauf.report.figures import overlay_rows, plot_acceptance
from specauf.report.render import render_markdown, served_lines, vllm_lines


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
    file) joined back: tau per set and block size (pooled, and the mean of per-prompt tau), the overall speedup."""
    if not isinstance(top, dict) or not isinstance(top.get("overall"), dict):
        raise ArtifactError(f"{where}: no 'overall' section (not an eval stage headline)")

    def section(detail: dict, head: dict) -> dict:
        return {k: ({**v, **{f: x for f, x in head[k].items() if f in ("tau", "tau_prompt_mean", "speedup")}}
                    if isinstance(head.get(k), dict) and isinstance(v, dict) else v) for k, v in detail.items()}

    return {**details, "overall": section(details["overall"], top["overall"]),
            "sets": {n: section(s, (top.get("sets") or {}).get(n, {})) for n, s in (details.get("sets") or {}).items()}}


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
                 target_manifest: dict | None = None, serve_vllm_dir: str | Path | None = None) -> dict:
    """Read every run's metrics, write out_dir/report.md and out_dir/acceptance.png (whole or not
    at all); return the claims and goals."""
    data = load_inputs(eval_dir, train_dir, variants, seeds)
    text = render_markdown(data, resamples)
    if target_manifest is not None:
        text = text.replace("# spec-auf report\n\n", f"# spec-auf report\n\n{target_line(target_manifest)}\n\n", 1)
    served = (served_lines(serve_dir, data) if serve_dir is not None else []) + \
        (vllm_lines(serve_vllm_dir, data) if serve_vllm_dir is not None else [])
    if served:
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
    return {"claims": named_claims(data, resamples), "goals": goals(data)}
