"""The DVC pipeline on the smoke preset in a fresh git repo: reruns exactly what a change touches."""
from __future__ import annotations

import re

import yaml

from tests.conftest import built_smoke_repro_log, copy_workspace, dvc


# stage -> stages it reads from; DVC may run independent stages in any order
UPSTREAM = {"target": {"inputs"}, "prompts": {"inputs"}, "rollouts": {"target", "prompts"}, "labels": {"rollouts"}, "train": {"labels"},
            "eval_rollouts": {"target", "prompts"}, "eval_labels": {"eval_rollouts"},
            "eval": {"train", "eval_labels"}, "target_gguf": {"target"}, "export": {"train", "target_gguf"},
            "serve": {"export", "eval", "target_gguf", "eval_rollouts"}, "report": {"eval", "serve"}}


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran (sorted), checked to have run in an order the DAG allows."""
    stages = re.findall(r"Running stage '([^']+)'", output)
    for i, stage in enumerate(stages):
        name, _, item = stage.partition("@")
        for later in stages[i + 1:]:
            later_name, _, later_item = later.partition("@")
            same_chain = not item or not later_item or item == later_item
            assert not (later_name in UPSTREAM.get(name, set()) and same_chain), \
                f"{stage} ran before its input {later}: {stages}"
    return sorted(stages)


def edit(ws, section: str, key: str, value):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params[section][key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_status_and_param_edits_rerun_exactly(built_smoke, tmp_path):
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    status = dvc(ws, "status", "labels").stdout
    assert "up to date" in status.lower(), status

    edit(ws, "rollouts", "max_new_tokens", 20)
    out = dvc(ws, "repro", "labels").stdout
    assert ran(out) == ["inputs", "labels", "rollouts"], out  # prompts and target are not rerun

    edit(ws, "labels", "feature_dtype", "float32")
    out = dvc(ws, "repro", "labels").stdout
    assert ran(out) == ["inputs", "labels"], out
    assert "up to date" in dvc(ws, "status", "labels").stdout.lower()


def test_whole_dag_through_report_and_metrics_show(built_smoke, tmp_path):
    """`dvc repro` of the smoke preset runs every stage; metrics list tau per variant; an
    eval-only change reruns only eval and report."""
    import json

    ws = copy_workspace(built_smoke, tmp_path / "ws")
    out = built_smoke_repro_log(built_smoke)  # the fixture's first `dvc repro` of the whole DAG
    assert ran(out) == sorted(["inputs", "target", "prompts", "rollouts", "labels", "train@decay-0", "train@auf-0",
                               "eval_rollouts", "eval_labels", "eval@decay-0", "eval@auf-0", "target_gguf",
                               "export@decay-0", "export@auf-0", "serve@decay-0", "serve@auf-0", "serve_vllm@decay-0",
                               "serve_vllm@auf-0", "report"]), out
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    flat = json.dumps(shown)
    for variant in ("decay", "auf"):
        assert f"metrics/eval/{variant}-0.json" in flat
    assert '"tau"' in flat
    assert (ws / "reports/report.md").is_file() and (ws / "reports/acceptance.png").is_file()
    exported = json.loads((ws / "data/export/auf-0/config.json").read_text())
    assert exported["architectures"] == ["DFlashDraftModel"] and (ws / "data/export/auf-0/model.safetensors").is_file()
    # the top-level plots overlay both runs on one chart each, through the shipped templates
    plots = json.loads(dvc(ws, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    overlays = [next(iter(p)) for p in yaml.safe_load((ws / "dvc.yaml").read_text())["plots"]]
    assert len(overlays) == 4 and set(overlays) <= set(plots["data"]), sorted(plots["data"])
    for name in overlays:
        values = plots["data"][name][0]["content"]["data"]["values"]
        key = "variant" if name.startswith("tau") else "run"
        assert {row[key] for row in values} == {"decay", "auf"}, name
        if name.startswith("tau"):
            assert all(row["lo"] <= row["tau"] <= row["hi"] for row in values)
    assert json.loads(dvc(ws, "status", "--json").stdout) == {"inputs": ["always changed"]}

    edit(ws, "eval", "max_new_tokens", 10)
    out = dvc(ws, "repro").stdout
    # the eval answers are max_new_tokens-free; both serve stages decode the eval's timed prompts at its length
    assert ran(out) == ["eval@auf-0", "eval@decay-0", "inputs", "report", "serve@auf-0", "serve@decay-0",
                        "serve_vllm@auf-0", "serve_vllm@decay-0"], out
