"""`dvc exp run -S ...` on the smoke pipeline: an eval-only experiment and its metrics in exp show."""
from __future__ import annotations

import json
import re

from tests.conftest import copy_workspace, dvc


def test_exp_run_eval_param_reports_tau_in_exp_show(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    run = dvc(ws, "exp", "run", "-n", "short-eval", "-S", "eval.max_new_tokens=6")
    assert "Running stage 'eval@auf'" in run.stdout and "Running stage 'train@auf'" not in run.stdout, run.stdout
    shown = json.loads(dvc(ws, "exp", "show", "--json").stdout)
    exps = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                exps[exp.get("name") or rev.get("name")] = rev
    assert "short-eval" in exps, json.dumps(shown)[:2000]
    data = exps["short-eval"]["data"]
    assert data["params"]["params.yaml"]["data"]["eval"]["max_new_tokens"] == 6
    for variant in ("decay", "auf"):
        overall = data["metrics"][f"metrics/eval/{variant}.json"]["data"]["overall"]
        blocks = [k for k in overall if re.fullmatch(r"b\d+", k)]
        assert blocks and all(overall[b]["tau"] >= 1.0 for b in blocks), overall
        assert overall["decoded_prompts"] == 4 and overall["prompts"] == 6  # decoded 2 per set, replayed all
