"""Bad input as a user meets it: plain `dvc repro` (not the README's wrapper, not a stage run by
hand) in a copy of a built smoke workspace. DVC deletes a stage's outputs before it runs the
stage's command, unless they are `persist: true`: every output in dvc.yaml is, so a stage that
refuses its params, or is interrupted, leaves what was built byte for byte (docs/bad-input.md).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT, copy_workspace, dvc
from tests.stage_runner import snapshot


def edit_params(ws: Path, edit) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    edit(params)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def built_outputs(ws: Path) -> dict:
    """Every byte DVC's stages built (data/ without its scratch, metrics/, reports/)."""
    return {rel: snapshot(ws / rel) for rel in ("data/drafters", "data/rollouts", "data/labels", "metrics", "reports")}


def test_every_output_in_dvc_yaml_persists():
    """The mechanism: DVC leaves a `persist: true` output in place while its stage runs; the
    stage itself replaces it whole, and only on success (artifacts.atomic_dir)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        for key in ("outs", "metrics", "plots"):
            for out in spec.get(key, []):
                assert isinstance(out, dict) and next(iter(out.values())).get("persist") is True, (name, out)


def test_a_param_value_never_names_a_path_dvc_deletes(built_smoke, tmp_path):
    """A seed or variant spelled as a path: DVC builds `data/drafters/<variant>-<seed>` from it.
    `dvc repro -s 'train@auf-0/../../../precious'` once deleted the user's precious/ before the
    stage refused the seed; now the stage refuses and every folder is as it was."""
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    for rel in ("precious", "precious-0", "data/precious"):
        (ws / rel).mkdir()
        (ws / rel / "thesis.tex").write_text("years of work")
    before = {rel: snapshot(ws / rel) for rel in ("precious", "precious-0", "data/precious")}
    built = built_outputs(ws)
    cases = [  # (params edit, the stage a user would name)
        (lambda p: p["train"].update(seeds=["0/../../../precious"]), "train@auf-0/../../../precious"),
        (lambda p: p["train"].update(variants=["../../precious"], seeds=[0]), "train@../../precious-0"),
        (lambda p: p["train"].update(variants=["auf"], seeds=["0/../../precious"]), "eval@auf-0/../../precious"),
        (lambda p: p["train"].update(variants=["auf"], seeds=["0/../../../precious"]), "export@auf-0/../../../precious"),
    ]
    for edit, stage in cases:
        subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=ws, check=True)
        edit_params(ws, edit)
        for args in (("repro", "-s", stage), ("repro",)):
            proc = dvc(ws, *args, check=False)
            out = proc.stdout + proc.stderr
            assert proc.returncode != 0, out
            assert re.search(r"error: params\.yaml: train\.(seeds\.0: Input should be a valid integer|variants: "
                             r"unknown loss variant)", out) or "ERROR" in out, out
            for rel, snap in before.items():
                assert snapshot(ws / rel) == snap, (stage, args, rel, out)
            assert built_outputs(ws) == built, (stage, args)


def test_bad_params_under_plain_dvc_repro_lose_nothing(built_smoke, tmp_path):
    """A key DVC tracks missing from params.yaml (DVC refuses it after its stage's outputs are
    gone, unless they persist), and a value the stage refuses: every drafter and metric stays."""
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    built = built_outputs(ws)
    edit_params(ws, lambda p: p["train"].pop("gamma"))
    proc = dvc(ws, "repro", "train@auf-0", check=False)
    assert proc.returncode != 0 and "Parameters 'train.gamma' are missing from 'params.yaml'" in proc.stderr, proc.stderr
    assert built_outputs(ws) == built
    cases = [  # (section, key, value, the stage's line): values that once passed, crashed or poisoned
        ("train", "block_size", 1, "error: params.yaml: train.block_size: Input should be greater than or equal to 2 (got 1)"),
        ("labels", "verify_temperature", 1e-300, "error: params.yaml: labels.verify_temperature: must be at least 0.01"),
        ("eval", "temperature", 1e-300, "error: params.yaml: eval.temperature: must be 0 (greedy) or at least 0.01"),
        ("base", "seed", 10**20, "error: params.yaml: base.seed: Input should be less than or equal to 4294967295"),
        ("eval", "bootstrap_resamples", 10**12, "error: params.yaml: eval.bootstrap_resamples: Input should be less than "
                                                "or equal to 1000000"),
        ("train", "steps", "1e9", "error: params.yaml: train.steps: '1e9' is text to YAML, not a number: write 1000000000"),
        ("train", "block_size", 32, "error: train.block_size: 32 guesses 31 tokens past an anchor, but the longest training "
                                    "response has "),
    ]
    for section, key, value, line in cases:
        subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=ws, check=True)
        edit_params(ws, lambda p: p[section].update({key: value}))
        proc = dvc(ws, "repro", "train@auf-0", check=False)
        assert proc.returncode != 0 and line in proc.stderr, (key, proc.stderr[-2000:])
        assert built_outputs(ws) == built, key


def test_ctrl_c_during_rollouts_under_dvc_repro_loses_nothing(built_smoke, tmp_path):
    """Ctrl-C while `dvc repro` regenerates the rollouts: data/rollouts is the one it had, and the
    stage's line says so truthfully; the rerun resumes from the finished shards."""
    ws = copy_workspace(built_smoke, tmp_path / "ws")
    before = snapshot(ws / "data/rollouts")
    # the rollouts must be made again, over several seconds, so the interrupt lands inside the stage
    edit_params(ws, lambda p: p["rollouts"].update(max_new_tokens=96))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).parent / "dvc")
    # SIGINT as a terminal's foreground job has it: a suite started in the background by a
    # non-interactive shell runs with SIGINT ignored, which dvc and the stage would inherit
    proc = subprocess.Popen([exe, "repro", "rollouts"], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    work = ws / "data/.work/rollouts"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(work.glob("shard-*.arrow.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the rollouts finished before a shard could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends: the whole foreground group
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out
    assert "error: interrupted; finished outputs are untouched and a rerun resumes" in out, out
    assert snapshot(ws / "data/rollouts") == before
    kept = sorted(work.glob("shard-*.arrow"))
    assert kept and all(Path(f"{k}.json").is_file() for k in kept), "the finished shards were kept for the rerun"

    # A finished shard whose bytes changed after the interruption (same size): the resume makes
    # it again, by content, instead of publishing it into data/rollouts and DVC's cache.
    data = bytearray(kept[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    kept[0].write_bytes(bytes(data))
    rerun = dvc(ws, "repro", "rollouts")
    log = rerun.stdout + rerun.stderr
    assert f"{kept[0].name}: changed since it was written" in log, log
    assert ("resumed: kept" in log) == (len(kept) > 1), log
    from specauf.artifacts import read_manifest, verify_shards

    verify_shards(ws / "data/rollouts", read_manifest(ws / "data/rollouts", kind="rollouts"))
    dvc(ws, "repro", "labels")  # and the next stage reads them


def test_params_edited_during_a_repro_are_never_mixed_into_it(tmp_path, monkeypatch, capsys):
    """`dvc exp run -S train.lr=0.003` issued while a `dvc repro` runs is refused, but leaves
    params.yaml edited; the running repro used to record one variant at lr 0.002 and the next at
    0.003 in one dvc.lock. Now (1) a stage of the same repro that starts after the edit refuses it
    (the repro's first stage left its params in .dvc/tmp/specauf-repro/), and (2) a stage running
    while the file changes fails instead of letting DVC record the new value beside old outputs."""
    from tests.conftest import git_dvc_workspace

    ws = git_dvc_workspace(tmp_path / "ws")
    # this test process stands in for `dvc repro`: the stages' nearest ancestor without DVC_STAGE
    env = {**os.environ, "DVC_ROOT": str(ws), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = lambda stage: subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=ws, capture_output=True, text=True,
                                       env={**env, "DVC_STAGE": stage})
    first = run("inputs")
    assert first.returncode == 0, first.stderr
    assert len(list((ws / ".dvc/tmp/specauf-repro").glob("*.json"))) == 1
    assert run("inputs").returncode == 0  # same file: fine
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(text.replace("lr: 0.001", "lr: 0.003"))
    second = run("inputs")
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: train.lr changed while this `dvc repro` ran (earlier stages read the old value) "
        "(0.001 -> 0.003); nothing was recorded for this stage, whose outputs would mix two settings: "
        "rerun `dvc repro` to make them with the file as it is now")

    from specauf.stage import stage_main

    def edits_mid_run(params, args):  # what a `dvc exp run -S` in another terminal does
        (ws / "params.yaml").write_text(text.replace("lr: 0.001", "lr: 0.004"))

    (ws / "params.yaml").write_text(text)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    try:
        stage_main("inputs", edits_mid_run, argv=["--params", str(ws / "params.yaml")])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {ws / 'params.yaml'}: train.lr changed while this stage ran (0.001 -> 0.004); "
                              "nothing was recorded for this stage"), err
