"""`dvc exp run -S ...` on the smoke pipeline: an eval-only experiment and its metrics in exp show."""
from __future__ import annotations

import json
import re

from tests.conftest import copy_workspace, dvc


def _experiments(ws) -> dict:
    shown = json.loads(dvc(ws, "exp", "show", "--json").stdout)
    exps = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                exps[exp.get("name") or rev.get("name")] = rev
    return exps


def test_exp_run_more_seeds_trains_and_evaluates_every_pair(built_smoke, tmp_path):
    """`dvc exp run -S 'train.seeds=[0,1]'`: the matrix adds train/eval/export/serve/serve_vllm of seed 1 for every
    variant, leaves seed 0's runs alone, and the report resamples both seeds."""
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    run = dvc(ws, "exp", "run", "-n", "two-seeds", "-S", "train.seeds=[0,1]")
    stages = sorted(set(re.findall(r"Running stage '([^']+)'", run.stdout)))
    assert stages == sorted(["inputs", "report", *(f"{s}@{v}-1" for s in ("train", "eval", "export", "serve", "serve_vllm")
                                               for v in ("decay", "auf"))]), run.stdout
    data = _experiments(ws)["two-seeds"]["data"]
    for run_name in ("decay-0", "decay-1", "auf-0", "auf-1"):
        assert data["metrics"][f"metrics/eval/{run_name}.json"]["data"]["seed"] == int(run_name[-1])
    report = (ws / "reports" / "report.md").read_text()
    assert "2 training seeds (0, 1), resampled as well as the prompts: two levels" in report
    assert "| auf-1 |" in report and "| decay-0 |" in report


def test_exp_run_eval_param_reports_tau_in_exp_show(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    run = dvc(ws, "exp", "run", "-n", "short-eval", "-S", "eval.max_new_tokens=6")
    assert "Running stage 'eval@auf-0'" in run.stdout and "Running stage 'train@auf-0'" not in run.stdout, run.stdout
    exps = _experiments(ws)
    assert "short-eval" in exps, json.dumps(exps)[:2000]
    data = exps["short-eval"]["data"]
    assert data["params"]["params.yaml"]["data"]["eval"]["max_new_tokens"] == 6
    for variant in ("decay", "auf"):
        overall = data["metrics"][f"metrics/eval/{variant}-0.json"]["data"]["overall"]
        blocks = [k for k in overall if re.fullmatch(r"b\d+", k)]
        assert blocks and all(overall[b]["tau"] >= 1.0 for b in blocks), overall
        assert overall["decoded_prompts"] == 4 and overall["prompts"] == 6  # decoded 2 per set, replayed all
