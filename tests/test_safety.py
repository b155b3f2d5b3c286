"""Nothing a user owns is destroyed, no param reaches a shell, and the DAG tells the truth.

One test per hazard found by a bad-input campaign (the safety issue); docs/bad-input.md lists
each with its message. The stage-level cases run the real stage scripts in this process
(tests/stage_runner.py); the DVC-level ones run `dvc repro` in smoke workspaces.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from specauf import artifacts
from specauf.artifacts import ArtifactError, atomic_dir, claim_work_dir
from tests.conftest import ROOT, dvc, git_dvc_workspace
from tests.stage_runner import built_workspace, expect_error, prompts_jsonl, save_drafter, snapshot, train_on_labels


@pytest.fixture(scope="module")
def ws(tiny_target, tmp_path_factory):
    return built_workspace(tmp_path_factory.mktemp("safety"), tiny_target[0])


def export_cli(*args) -> tuple[int, str]:
    from specauf.cli import main

    try:
        main(["export", *map(str, args)])
    except SystemExit as e:
        return e.code, ""
    return 0, ""


# -------------------------------------------------------------------------------- data loss

def test_export_refuses_a_folder_it_did_not_make(ws, tmp_path, capsys):
    """1. `specauf export DRAFTER data` once wiped a workspace's data/; now OUT must be absent,
    empty or an earlier export."""
    precious = tmp_path / "data"
    (precious / "target").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    before = snapshot(precious)
    code, _ = export_cli(ws / "data/drafters/auf", precious, "--target", ws / "data/target")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.match(r"error: .*/data: is not a spec-auf output \(no manifest\.json\), "
                                                    r"not an earlier 'export' output; refusing to replace it", err[0]), err
    assert snapshot(precious) == before

    out = tmp_path / "export"
    assert export_cli(ws / "data/drafters/auf", out, "--target", ws / "data/target")[0] == 0
    assert export_cli(ws / "data/drafters/auf", out, "--target", ws / "data/target")[0] == 0  # an earlier export: replaced
    assert export_cli(ws / "data/drafters/auf", precious, "--target", ws / "data/target", "--force")[0] == 0
    assert (precious / "notes.txt").read_text() == "mine" and (precious / "config.json").is_file()  # kept, even forced


def test_re_export_never_deletes_a_file_it_did_not_write(ws, tmp_path, capsys):
    """Exporting over an earlier export replaced the folder whole: a NOTES.md the user added there
    was gone, rc 0. Now every file and folder an export does not write stays byte for byte; a
    user's file holding an export's name (in a folder that is no export) is refused, not replaced."""
    out = tmp_path / "export"
    assert export_cli(ws / "data/drafters/auf", out, "--target", ws / "data/target")[0] == 0
    (out / "NOTES.md").write_text("served on host A since June")
    (out / "scripts").mkdir()
    (out / "scripts" / "serve.sh").write_text("vllm serve ...")
    mine = {rel: snapshot(out / rel) for rel in ("NOTES.md", "scripts")}
    weights = (out / "model.safetensors").read_bytes()
    assert export_cli(ws / "data/drafters/auf", out, "--target", ws / "data/target")[0] == 0
    assert {rel: snapshot(out / rel) for rel in ("NOTES.md", "scripts")} == mine
    assert (out / "model.safetensors").read_bytes() == weights and not list(tmp_path.glob(".export.*"))

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    before = snapshot(folder)
    code, _ = export_cli(ws / "data/drafters/auf", folder, "--target", ws / "data/target", "--force")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.match(r"error: .*/folder/config\.json: not written by an export, and an "
                                                    r"export writes that name; refusing to replace it", err[0]), err
    assert snapshot(folder) == before


def test_every_atomic_output_refuses_a_foreign_folder(tmp_path):
    """1. The same rule for every atomic_dir output: a prompts folder is not replaced by a target."""
    final = tmp_path / "out"
    final.mkdir()
    artifacts.write_json(final / "manifest.json", {"schema_version": 1, "kind": "prompts"})
    with pytest.raises(ArtifactError, match=r"is a 'prompts' output, not an earlier 'target' output"):
        with atomic_dir(final, "target"):
            raise AssertionError("the body must not run")
    assert json.loads((final / "manifest.json").read_text())["kind"] == "prompts"
    with atomic_dir(final, "prompts") as tmp:  # its own kind: replaced whole
        artifacts.write_json(tmp / "manifest.json", {"schema_version": 1, "kind": "prompts", "new": True})
    assert json.loads((final / "manifest.json").read_text())["new"] is True
    skeleton = tmp_path / "metrics-train-auf"  # what DVC leaves of metrics/train/<v> after deleting its outs
    (skeleton / "plots" / "metrics").mkdir(parents=True)
    with atomic_dir(skeleton, "train-metrics") as tmp:
        artifacts.write_json(tmp / "manifest.json", {"schema_version": 1, "kind": "train-metrics"})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        with atomic_dir(tmp_path / "afile", "target"):
            pass


def test_work_dir_without_stamp_is_never_deleted(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="holds files but no work.json"):
        claim_work_dir(work, "k1")
    assert (work / "thesis.tex").read_text() == "years of work"
    assert claim_work_dir(tmp_path / "fresh", "k1") is False
    assert claim_work_dir(tmp_path / "fresh", "k1") is True  # same work: resume
    (tmp_path / "fresh" / "shard").write_text("old")
    assert claim_work_dir(tmp_path / "fresh", "k2") is False and not (tmp_path / "fresh" / "shard").exists()


CHECK = [  # (case, params text edit, message) — each refused by check-params AND by the stages
    ("empty file", "", r"empty params file"),
    ("duplicate key", "train:\n  lr: 0.001\n  lr: 0.002\n", r"line \d+: malformed YAML \(duplicate key 'lr'\)"),
    ("lr inf", {"train": {"lr": float("inf")}}, r"train\.lr: Input should be a finite number"),
    ("temperature inf", {"eval": {"temperature": float("inf")}}, r"eval\.temperature: Input should be a finite number"),
    ("steps true", {"train": {"steps": True}}, r"train\.steps: Input should be a valid integer \(got True\)"),
    # plain `dvc repro` fails on this one in DVC's own dvc.yaml parsing ("unexpected error - 'Value' object is
    # not iterable"), before any project code runs: the pipeline command's check-params names it
    ("variants a string", {"train": {"variants": "auf"}}, r"train\.variants: Input should be a valid list \(got 'auf'\)"),
]


def _edited(base: dict, edit: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, kv in edit.items():
        out[section].update(kv)
    return out


@pytest.mark.parametrize("case,edit,message", CHECK, ids=[c[0] for c in CHECK])
def test_check_params_refuses_what_the_pipeline_refuses(tmp_path, case, edit, message):
    """2. check-params accepts exactly what `dvc repro` accepts (the README's pipeline command
    runs it before DVC, which deletes a stage's outputs before the stage can refuse its params)."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(edit if isinstance(edit, str) else yaml.safe_dump(_edited(shipped, edit), sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "specauf.cli", "check-params", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml")],
                          capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and re.search(message, err[0]), (proc.returncode, err)


def test_check_params_names_a_key_dvc_tracks_but_the_file_lacks(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    del data["train"]["gamma"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    from specauf.config import ParamsError
    from specauf.params_file import check_pipeline_params, fill_params_file, load_params

    load_params(path)  # fine for a stage run by hand: the typed default fills it
    with pytest.raises(ParamsError, match=r"train\.gamma: missing \(stage 'train' tracks it; `specauf fill-params"):
        check_pipeline_params(path, ROOT / "dvc.yaml")
    check_pipeline_params(ROOT / "params.yaml", ROOT / "dvc.yaml")
    for preset in sorted((ROOT / "presets").glob("*.yaml")):  # as `specauf new` writes it: filled
        filled = tmp_path / preset.name
        filled.write_text(preset.read_text())
        fill_params_file(filled, backup=False)
        check_pipeline_params(filled, ROOT / "dvc.yaml")


def fake_venv(ws: Path) -> Path:
    """ws/.venv whose commands run this test run's environment, stamped as installed, and whose
    python refuses `-m pip`: run.sh must never reinstall (it would repoint the real venv)."""
    import hashlib

    venv = ws / ".venv"
    (venv / "bin").mkdir(parents=True)
    real = Path(sys.executable).parent
    for name in ("python", "specauf", "dvc"):
        guard = 'case "$1 $2" in "-m pip") echo "refusing to install" >&2; exit 99;; esac\n' if name == "python" else ""
        (venv / "bin" / name).write_text(f'#!/bin/sh\n{guard}exec "{real / name}" "$@"\n')
        (venv / "bin" / name).chmod(0o755)
    stamp = hashlib.sha256((ws / "pyproject.toml").read_bytes() + (ws / "scripts/run.sh").read_bytes()).hexdigest()
    (venv / ".specauf-stamp").write_text(stamp + "\n")
    return venv


def test_pipeline_command_validates_before_dvc_runs_anything(tmp_path):
    """2. `bash scripts/run.sh pipeline` in a workspace with bad params: one line, exit 2, no
    stage started (no dvc.lock, nothing under data/)."""
    ws = git_dvc_workspace(tmp_path / "ws")
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("lr: 0.001", "lr: .inf"))
    fake_venv(ws)
    env = {k: v for k, v in os.environ.items() if k != "SPECAUF_VENV"}
    proc = subprocess.run(["bash", "scripts/run.sh", "pipeline"], cwd=ws, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: train.lr: Input should be a finite number")
    assert "Running stage" not in proc.stdout and not (ws / "dvc.lock").exists() and not (ws / "data").exists()


def test_non_finite_loss_stops_and_writes_no_drafter(ws):
    """3. lr 1e30 (finite, so params accept it) diverges: one line naming the step and train.lr,
    no drafter, no metrics."""
    params = ws.params({"train": {"lr": 1e30, "grad_clip": 0.0, "steps": 6}})
    out, metrics = ws / "data/drafters/diverged", ws / "metrics/train/diverged"
    code, err = ws.run("train", params, out=str(out), metrics=str(metrics), work=str(ws / "work/diverged"))
    assert code == 2, err
    assert len(err) == 1 and re.match(r"error: train: the (loss|gradient norm) is (nan|inf|-inf) at step \d+: "
                                      r"training diverged, no drafter written; lower train\.lr \(now 1e\+30\)", err[0]), err
    assert not out.exists() and not metrics.exists()


def test_data_is_ignored_by_a_committed_rule(tmp_path):
    """4. With DVC's data/.gitignore gone (an interrupted run), `git add -A` still adds no artifact."""
    ws = git_dvc_workspace(tmp_path / "ws")
    (ws / "data/target").mkdir(parents=True)
    (ws / "data/target/model.safetensors").write_bytes(b"weights")
    assert not (ws / "data/.gitignore").exists()
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=ws, capture_output=True, text=True).stdout
    assert "data/" not in staged
    readme = (ROOT / "README.md").read_text()
    assert "git add -A" not in readme and "git add dvc.lock" in readme


# ------------------------------------------------------------------------------ no shell

def test_a_variant_name_cannot_run_a_command(tmp_path):
    """5. `train.variants: ["auf;touch ../PWNED;#"]` through `dvc repro` runs nothing."""
    ws = git_dvc_workspace(tmp_path / "ws")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["variants"] = ["auf;touch ../PWNED;#", "decay$(touch PWNED2)"]
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(ws, "repro", check=False)
    assert proc.returncode != 0
    assert "unknown loss variant" in proc.stdout + proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (ws / "PWNED").exists() and not (ws / "PWNED2").exists()
    assert not list(tmp_path.rglob("PWNED*"))


def test_export_never_takes_trust_remote_code_from_an_artifact(ws, tmp_path, monkeypatch):
    """6. A target manifest saying trust_remote_code: true turns nothing on; the flag does."""
    import specauf.serve.export as export

    target = tmp_path / "target"
    import shutil

    shutil.copytree(ws / "data/target", target)
    m = json.loads((target / "manifest.json").read_text())
    m["trust_remote_code"] = True
    (target / "manifest.json").write_text(json.dumps(m))
    drafter = tmp_path / "drafter"
    save_drafter(drafter, target)
    from safetensors.torch import load_file, save_file

    state = load_file(str(drafter / "model.safetensors"))
    import torch

    state["d2t"] = torch.arange(16, dtype=torch.long)  # a draft vocabulary: the export reads the target's lm_head
    save_file(state, str(drafter / "model.safetensors"))
    seen = []
    real = export._target_lm_head

    def spy(target_dir, trust_remote_code):
        seen.append(trust_remote_code)
        return real(target_dir, trust_remote_code)

    monkeypatch.setattr(export, "_target_lm_head", spy)
    try:
        export.export_drafter(drafter, tmp_path / "out", target)
    except ArtifactError:
        pass  # the hand-made vocabulary may not fit the config; what matters is the flag read first
    assert seen and seen[0] is False
    seen.clear()
    try:
        export.export_drafter(drafter, tmp_path / "out2", target, trust_remote_code=True)
    except ArtifactError:
        pass
    assert seen == [True]


# ------------------------------------------------------------------------------ stale results

def _ran(out: str) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", out))


def test_workspace_runs_the_code_dvc_hashes(tmp_path):
    """7. Editing a workspace module reruns its stage, and the run uses the edited code."""
    ws = git_dvc_workspace(tmp_path / "ws")
    assert _ran(dvc(ws, "repro", "prompts").stdout) == ["inputs", "prompts"]
    module = ws / "specauf/data/prompts.py"
    module.write_text(module.read_text().replace(
        "def build_prompt_sets(", 'log.warning("workspace copy of specauf.data.prompts")\n\n\ndef build_prompt_sets(', 1))
    assert "prompts" in dvc(ws, "status").stdout
    proc = dvc(ws, "repro", "prompts")
    assert _ran(proc.stdout) == ["inputs", "prompts"]
    assert "workspace copy of specauf.data.prompts" in proc.stdout + proc.stderr


def test_inputs_outside_the_workspace_are_dependencies(tmp_path, tiny_target):
    """9. An edited JSONL prompt file, an edited local target folder: their stages rerun; an
    untouched one: only the `inputs` hash stage runs."""
    import shutil

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(tiny_target[0], outside / "target")
    (outside / "target" / "manifest.json").unlink()  # a plain HF folder, as a user has it
    prompts_jsonl(outside / "train.jsonl", 6, "t")
    ws = git_dvc_workspace(tmp_path / "ws")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["target"].update(source="local", path=str(outside / "target"))
    params["prompts"]["train"] = [{**params["prompts"]["train"][0], "source": "jsonl", "count": 6,
                                   "path": str(outside / "train.jsonl")}]
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(dvc(ws, "repro", "target", "prompts").stdout) == ["inputs", "prompts", "target"]
    assert _ran(dvc(ws, "repro", "target", "prompts").stdout) == ["inputs"]
    prompts_jsonl(outside / "train.jsonl", 6, "u")
    assert _ran(dvc(ws, "repro", "target", "prompts").stdout) == ["inputs", "prompts"]
    cfg = json.loads((outside / "target/generation_config.json").read_text())
    cfg["max_length"] = 1234
    (outside / "target/generation_config.json").write_text(json.dumps(cfg))
    assert _ran(dvc(ws, "repro", "target", "prompts").stdout) == ["inputs", "target"]
    recorded = json.loads((ws / "data/inputs/target.json").read_text())["inputs"]
    assert [r["param"] for r in recorded] == ["target.path"]


def test_hand_edited_layer_ids_are_caught(ws, tmp_path):
    """10. A labels manifest naming other layers than its features were taken from."""
    import shutil

    labels = tmp_path / "labels"
    shutil.copytree(ws / "data/labels", labels)
    m = json.loads((labels / "manifest.json").read_text())
    assert m["layer_ids"] == [0, 2]
    m["layer_ids"] = [0, 3]
    (labels / "manifest.json").write_text(json.dumps(m))
    code, err, out = train_on_labels(ws, labels, tmp_path)
    assert code == 2 and len(err) == 1, err
    assert re.match(r"error: .*labels/manifest\.json: layer_ids \[0, 3\] do not describe the stored features "
                    r"\(layer 3: relative difference [0-9.e+-]+ from the target's own\)", err[0]), err
    assert not out.exists()


# ------------------------------------------------------------------------------ one line

def test_damaged_drafter_files_are_one_line(ws, tmp_path):
    """12. Truncated or random-byte model.safetensors; a broken config.json."""
    import shutil

    for case, damage in [("truncated", lambda p: p.write_bytes(p.read_bytes()[:100])),
                         ("random bytes", lambda p: p.write_bytes(os.urandom(4096)))]:
        drafter = tmp_path / case.replace(" ", "-")
        shutil.copytree(ws / "data/drafters/auf", drafter)
        damage(drafter / "model.safetensors")
        expect_error(ws, "eval", rf"^error: {re.escape(str(drafter))}: cannot be loaded, a file is damaged", drafter=str(drafter))
        code, _ = export_cli(drafter, tmp_path / f"out-{drafter.name}", "--target", ws / "data/target")
        assert code == 2
    drafter = tmp_path / "broken-config"
    shutil.copytree(ws / "data/drafters/auf", drafter)
    (drafter / "config.json").write_text('{"model_type": "specauf_dflash", ')
    expect_error(ws, "eval", rf"^error: {re.escape(str(drafter))}: cannot be loaded", drafter=str(drafter))


def test_interrupt_and_sigterm_are_one_line(tmp_path, capsys):
    from specauf.stage import stage_main

    params = tmp_path / "params.yaml"
    params.write_text("base:\n  seed: 0\n")

    def interrupted(p, args):
        raise KeyboardInterrupt

    def terminated(p, args):
        os.kill(os.getpid(), signal.SIGTERM)

    for run in (interrupted, terminated):
        with pytest.raises(SystemExit) as code:
            stage_main("prompts", run, argv=["--params", str(params)])
        assert code.value.code == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: interrupted; finished outputs are untouched and a rerun resumes"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_bug_keeps_its_traceback(tmp_path):
    """12. Only UserError is one line: a ValueError from a bug propagates."""
    from specauf.stage import stage_main

    params = tmp_path / "params.yaml"
    params.write_text("base:\n  seed: 0\n")

    def buggy(p, args):
        raise ValueError("an internal bug")

    with pytest.raises(ValueError, match="an internal bug"):
        stage_main("prompts", buggy, argv=["--params", str(params)])


def test_unwritable_output_is_one_line(ws, monkeypatch):
    """12. A read-only output folder (simulated: this suite runs as root, which ignores modes)."""
    import errno

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(ws / "data"))

    monkeypatch.setattr(artifacts.tempfile, "mkdtemp", denied)
    expect_error(ws, "prompts", rf"^error: cannot write {re.escape(str(ws / 'data'))}: Permission denied$")


@pytest.mark.parametrize("case,over,message", [
    ("eval.sets empty", {"eval": {"sets": []}}, r"eval: sets: an empty list evaluates nothing"),
    ("prompts.eval empty", {"prompts": {"eval": {}}}, r"prompts\.eval: no evaluation set"),
    ("eval set of count 0", {"prompts": {"eval": {"chat": [{"source": "jsonl", "count": 0, "path": "x.jsonl"}]}}},
     r"prompts\.eval\.chat: no prompts"),
    ("train count 0", {"prompts": {"train": [{"source": "jsonl", "count": 0, "path": "x.jsonl"}]}},
     r"prompts\.train: no training prompts"),
    ("unknown eval set", {"eval": {"sets": ["nope"]}}, r"eval\.sets: no evaluation set 'nope' in prompts\.eval"),
])
def test_empty_sets_name_the_key(ws, case, over, message):
    good = json.loads(json.dumps(ws.good))
    for section, values in over.items():
        good[section].update(values)  # replaces a whole key (ws.params would merge prompts.eval into the good one)
    params = ws.params(text=yaml.safe_dump(good))
    expect_error(ws, "prompts", "^error: " + re.escape(str(params)) + ": " + message, params)


def test_prompt_file_not_utf8_or_a_directory(ws, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    params = ws.params({"prompts": {"train": [{"source": "jsonl", "count": 2, "path": str(bad)}]}})
    expect_error(ws, "prompts", rf"^error: {re.escape(str(bad))}:2: not UTF-8 \(byte 0xe9 at column 27\)$", params)
    params = ws.params({"prompts": {"train": [{"source": "jsonl", "count": 2, "path": str(tmp_path)}]}})
    expect_error(ws, "prompts", rf"^error: {re.escape(str(tmp_path))}: is a directory, not a JSONL prompts file$", params)


def test_max_seq_len_cutting_every_response_names_it(ws):
    params = ws.params({"train": {"max_seq_len": 8}})
    expect_error(ws, "train", r"^error: train\.max_seq_len: 8 tokens cut off every response", params)


# ------------------------------------------------------------------------------ tidy

def test_fill_params_keeps_comments_and_a_backup(tmp_path, capsys):
    from specauf.cli import main

    path = tmp_path / "params.yaml"
    text = "# my experiment\ntrain:\n  lr: 0.002  # tuned by hand\n"
    path.write_text(text)
    main(["fill-params", str(path)])
    new = path.read_text()
    assert "# my experiment" in new and "lr: 0.002  # tuned by hand" in new
    assert (tmp_path / "params.yaml.bak").read_text() == text
    from specauf.config import Params
    from specauf.params_file import check_pipeline_params

    assert check_pipeline_params(path, ROOT / "dvc.yaml").train.lr == 0.002
    assert yaml.safe_load(new)["train"]["steps"] == Params().train.steps
    assert "missing keys written" in capsys.readouterr().out


def test_random_target_leaves_no_temp_folder(tmp_path):
    from specauf.config import TargetParams
    from specauf.target.run import materialize_target

    before = set(Path(tempfile.gettempdir()).glob("specauf-random-target-*"))
    materialize_target(TargetParams(source="random"), tmp_path / "t", seed=0, params_hash="x")
    assert set(Path(tempfile.gettempdir()).glob("specauf-random-target-*")) == before


def test_a_nan_from_damaged_labels_blames_the_labels_not_the_lr():
    """A NaN loss once always said 'lower train.lr'; when the batch's stored features already hold
    NaN, the labels are named (and the rebuild command), and a NaN from finite inputs still names the lr."""
    import torch

    from specauf.config import TrainParams
    from specauf.errors import UserError
    from specauf.train.run import Diverged, check_finite

    class B:
        soft_probs = soft_mass = None
        context_features = torch.ones(1, 3, 4)

    nan = torch.tensor(float("nan"))
    with pytest.raises(Diverged, match=r"lower train\.lr"):
        check_finite(4, nan, None, TrainParams(), B())
    B.context_features = torch.tensor([[[1.0, float("nan")]]])
    with pytest.raises(UserError, match=r"^train: the loss is nan at step 5 because the labels' context_features hold NaN "
                                        r"or inf: the labels are damaged, not train\.lr; rebuild them with `dvc repro -f labels`"):
        check_finite(4, nan, None, TrainParams(), B())
