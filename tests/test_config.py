"""The typed params: one-line errors naming the key, nothing written; defaults, provenance and DVC in sync."""
from __future__ import annotations

import json

import pytest
import yaml

from specauf.stage import stage_main
from specauf.config import NOT_PROVENANCE, Params, ParamsError
from specauf.params_file import load_params
from tests.conftest import ROOT

BAD = [
    ("base:\n  seed: -1\n", "base.seed", "greater than or equal to 0"),
    ("rollouts:\n  batch_size: 0\n", "rollouts.batch_size", "greater than or equal to 1"),
    ("rollouts:\n  batch_size: many\n", "rollouts.batch_size", "valid integer"),
    ("rollouts:\n  temperature: -0.5\n", "rollouts.temperature", "greater than or equal to 0"),
    ("nonsense: 1\n", "nonsense", "unknown key"),
    ("train:\n  lr_typo: 1\n", "train.lr_typo", "unknown key"),
    ("train:\n  block_size: 1\n", "train.block_size", "greater than or equal to 2"),
    ("train:\n  variants: [decay, magic]\n", "train", "unknown loss variant 'magic'"),
    ("target:\n  source: ftp\n", "target.source", "'gguf', 'local', 'hub' or 'random'"),
    ("target:\n  source: local\n", "target", "target.path is required"),
    ("prompts:\n  train:\n    - {source: sharegpt}\n", "prompts.train.0.count", "Field required"),
    ("prompts:\n  train:\n    - {source: jsonl, count: 3}\n", "prompts.train.0", "path is required"),
    ("labels:\n  layer_ids: [1, 1]\n", "labels", "must not repeat"),
    ("eval:\n  block_sizes: [32]\n", "", "exceed train.block_size"),
    ("base: [1, 2]\n", "base", "valid dictionary"),
    ("train:\n  seeds: []\n", "train.seeds", "list at least one training seed"),
    ("train:\n  seeds: [0, 1, 0]\n", "train.seeds", "seeds must not repeat, got [0, 1, 0]"),
    ("train:\n  seeds: [-1]\n", "train.seeds", "Input should be greater than or equal to 0"),
    ("train:\n  dpace_alpha: 1.5\n", "train.dpace_alpha", "less than or equal to 1"),
    ("train:\n  dpace_alpha: -0.1\n", "train.dpace_alpha", "greater than or equal to 0"),
    ("eval:\n  bootstrap_resamples: 50\n", "eval.bootstrap_resamples", "greater than or equal to 100"),
    # numbers a computation cannot survive (they used to end in a traceback or NaN artifacts)
    ("base:\n  seed: 100000000000000000000\n", "base.seed", "less than or equal to 4294967295"),
    ("train:\n  seeds: [4294967296]\n", "train.seeds.0", "less than or equal to 4294967295"),
    ("labels:\n  verify_temperature: 1.0e-300\n", "labels.verify_temperature", "must be at least 0.01: logits"),
    ("eval:\n  temperature: 1.0e-300\n", "eval.temperature", "must be 0 (greedy) or at least 0.01"),
    ("rollouts:\n  temperature: 0.001\n", "rollouts.temperature", "must be 0 (greedy) or at least 0.01"),
    ("train:\n  soft_auf_temperature: 1.0e-9\n", "train.soft_auf_temperature", "must be 0 (greedy) or at least 0.01"),
    ("eval:\n  bootstrap_resamples: 1000000000000\n", "eval.bootstrap_resamples", "less than or equal to 1000000"),
    # YAML 1.1 reads 1e9 (no dot) as text: say so, not "a valid integer"
    ("train:\n  steps: 1e9\n", "train.steps", "'1e9' is text to YAML, not a number: write 1000000000 (without quotes)"),
    ("train:\n  lr: 3e-3\n", "train.lr", "'3e-3' is text to YAML, not a number: write 0.003 (without quotes)"),
]

# Every params value that reaches a path, spelled as a way out of its folder.
ESCAPES = ["..", "../../precious", "/etc/passwd", "a/b", "a\\b", "nul\x00byte", ".hidden", "-rf", ""]
PATH_FIELDS = {  # field -> params (as data) holding the value
    "train.variants": lambda v: {"train": {"variants": [v]}},
    "train.seeds": lambda v: {"train": {"seeds": [v]}},
    "prompts.eval (a set's name)": lambda v: {"prompts": {"eval": {v: [{"source": "mtbench", "count": 3}]}}},
    "eval.sets": lambda v: {"eval": {"sets": [v]}},
    "target.gguf_file": lambda v: {"target": {"gguf_file": v}},
    "target.gguf_package": lambda v: {"target": {"gguf_package": v}},
    "target.gguf_chunks": lambda v: {"target": {"gguf_chunks": [f"pkg/{v}"]}},
}


@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_no_params_value_names_a_path_outside_its_folder(field):
    """`..`, absolute paths, separators and NUL in every field that becomes (part of) a path: each is
    refused with one line naming the field, before any stage (and, with every output persisting,
    before DVC deletes anything: tests/test_bad_input_dvc.py)."""
    from specauf.params_file import parse_params

    for value in ESCAPES:
        if field == "target.gguf_chunks" and value in ("a/b", "-rf", ".hidden"):
            continue  # a chunk is `package/path inside it`: sub-folders and such names are what it holds
        with pytest.raises(ParamsError) as err:
            parse_params(PATH_FIELDS[field](value), "P")
        line = str(err.value)
        assert "\n" not in line and line.startswith("P: "), line
        section = field.split(".")[0].split()[0]
        assert section in line, (value, line)


@pytest.mark.parametrize("text,key,message", BAD)
def test_bad_params_one_line_error(tmp_path, text, key, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: {key}") and message in line, line


def test_stage_exits_2_and_writes_nothing(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("rollouts:\n  batch_size: -3\n")
    out = tmp_path / "target"

    def run(p, args):  # never reached: validation fails first
        out.mkdir()

    with pytest.raises(SystemExit) as code:
        stage_main("target", run, argv=["--params", str(params)])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {params}: rollouts.batch_size: Input should be greater than or equal to 1 (got -3)"]
    assert not out.exists()


def test_typed_defaults_are_the_shipped_params_yaml():
    """One source per default: the code's defaults are what params.yaml runs, so docs/params.md
    (generated from the code) documents the values that run."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert json.loads(Params().model_dump_json()) == shipped


def test_dvc_yaml_declares_exactly_the_keys_each_stage_reads():
    from specauf.config import EVAL_LABELS_KEYS, EVAL_ROLLOUTS_KEYS

    assert EVAL_ROLLOUTS_KEYS == ("batch_size", "shard_size") and EVAL_LABELS_KEYS == ("num_feature_layers", "layer_ids",
                                                                                        "batch_size")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # which runs exist (variants x seeds: the matrix) is not what one run computes
    train_keys = {f"train.{k}" for k in Params.model_fields["train"].annotation.model_fields
                  if k not in NOT_PROVENANCE["train"]}
    # launch.* is absent: the process count and launcher never change bytes (tests/test_sharded.py)
    expected = {
        "inputs": {"target.source", "target.path", "target.gguf_package", "target.gguf_file", "target.gguf_chunks", "prompts",
                   "eval.assistant_model"},
        "target": {"base", "target"},
        "prompts": {"base", "prompts"},
        "rollouts": {"base", "rollouts", "target.trust_remote_code"},
        "labels": {"base", "labels", "target.trust_remote_code"},
        # the eval answers fix sampling, length, backend and precision (eval_rollouts_params, eval_labels_params)
        "eval_rollouts": {"base", *(f"rollouts.{k}" for k in EVAL_ROLLOUTS_KEYS), "eval.replay_max_new_tokens",
                          "eval.sets", "target.trust_remote_code"},
        "eval_labels": {"base", *(f"labels.{k}" for k in EVAL_LABELS_KEYS), "target.trust_remote_code"},
        "train": {"base", "target.trust_remote_code"} | train_keys,
        "eval": {"base", "eval", "target.trust_remote_code"},
        "export": {"target.trust_remote_code", "serve.engine"},  # serve.engine: whether drafter.gguf is written
        "target_gguf": {"target.source", "target.gguf_package", "target.gguf_file", "serve.engine", "serve.targets"},
        # llama.cpp decodes the eval's timed prompts, at the eval's lengths and block sizes
        "serve": {"serve", "eval.sets", "eval.prompts_per_set", "eval.max_new_tokens", "eval.block_sizes"},
        # vLLM serves the timed prompts and the batch; the replay it is checked against
        "serve_vllm": {"vllm", "serve.threads", "target.trust_remote_code", "eval.sets", "eval.prompts_per_set",
                       "eval.max_new_tokens", "eval.replay_max_new_tokens", "eval.block_sizes"},
        "report": {"train.variants", "train.seeds", "eval.bootstrap_resamples"},
    }
    assert set(dvc) == set(expected)
    for stage, want in expected.items():
        spec = dvc[stage].get("do", dvc[stage])
        assert set(spec.get("params", [])) == want, stage


def test_the_variant_list_is_not_a_drafters_provenance():
    """Adding a variant must not change what an existing drafter's manifest says made it."""
    from specauf.config import section_dict
    from specauf.params_file import parse_params

    one, two = parse_params({"train": {"variants": ["auf"]}}), parse_params({"train": {"variants": ["auf", "dpace"]}})
    assert section_dict(one, "base", "train") == section_dict(two, "base", "train")
    assert "variants" not in section_dict(one, "train")["train"]
    assert section_dict(parse_params({"train": {"variants": ["auf"], "lr": 0.002}}), "train") != section_dict(one, "train")


def test_eval_answers_read_only_the_keys_dvc_tracks():
    """eval_rollouts/eval_labels settings change with exactly the keys dvc.yaml lists for them."""
    from specauf.config import eval_labels_params, eval_rollouts_params
    from specauf.params_file import parse_params

    base = parse_params({})
    untracked = {"rollouts": {"num_prompts": 3, "max_prompt_tokens": 100, "max_new_tokens": 7, "temperature": 0.7,
                              "top_p": 0.9, "top_k": 5, "backend": "vllm", "precision": "bf16", "crosscheck_prompts": 1},
                 "labels": {"features": "online", "feature_dtype": "bfloat16", "top_k": 4, "verify_temperature": 0.5},
                 "eval": {"max_new_tokens": 16, "prompts_per_set": 2, "block_layout": "short"}}
    other = parse_params(untracked)
    assert eval_rollouts_params(other) == eval_rollouts_params(base) and eval_labels_params(other) == eval_labels_params(base)
    for section, key, value, fn in (("rollouts", "batch_size", 3, eval_rollouts_params),
                                    ("rollouts", "shard_size", 5, eval_rollouts_params),
                                    ("eval", "replay_max_new_tokens", 200, eval_rollouts_params),
                                    ("labels", "num_feature_layers", 2, eval_labels_params),
                                    ("labels", "layer_ids", [1, 2], eval_labels_params),
                                    ("labels", "batch_size", 3, eval_labels_params)):
        assert fn(parse_params({section: {key: value}})) != fn(base), (section, key)
    assert eval_rollouts_params(base).temperature == 0.0 and eval_labels_params(base).feature_dtype == "float32"


def test_speculative_block_sizes_drop_plain_decoding_and_repeats():
    from specauf.config import EvalParams

    assert EvalParams(block_sizes=[8, 1, 2, 8, 4]).speculative_block_sizes == [2, 4, 8]
    assert EvalParams(block_sizes=[1]).speculative_block_sizes == []
