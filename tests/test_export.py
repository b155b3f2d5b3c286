"""`specauf export`: a trained drafter in the DFlash layout of tests/fixtures/dflash_layout.json
(read from z-lab/dflash, SGLang's and vLLM's loaders). Tiny random drafters, nothing trained."""
from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file

from specauf.artifacts import SCHEMA_VERSION, write_json
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.serve.export import export_drafter, reference_config
from tests.conftest import ROOT, dvc, git_dvc_workspace

LAYOUT = json.loads((ROOT / "tests/fixtures/dflash_layout.json").read_text())


def save_drafter(path, config: DrafterConfig, target_fingerprint: str = "f" * 64, seed: int = 0) -> BlockDrafter:
    """A random drafter saved as the train stage saves it (weights, config, manifest last).
    Every parameter random, norms included, so a swapped tensor cannot pass as equal."""
    torch.manual_seed(seed)
    drafter = BlockDrafter(config)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn_like(p))
    drafter.save_pretrained(path, safe_serialization=True)
    write_json(path / "manifest.json", {"schema_version": SCHEMA_VERSION, "kind": "drafter", "variant": "auf",
                                        "target_fingerprint": target_fingerprint})
    return drafter


def expected_shapes(cfg: dict, draft_vocab: int = 0) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the fixture's formulas give for an exported config.json."""
    env = {"hidden": cfg["hidden_size"], "heads": cfg["num_attention_heads"], "kv_heads": cfg["num_key_value_heads"],
           "head_dim": cfg["head_dim"], "intermediate": cfg["intermediate_size"],
           "n_features": len(cfg["dflash_config"]["target_layer_ids"]), "draft_vocab": draft_vocab}
    shape = lambda dims: tuple(eval(d, {"__builtins__": {}}, env) for d in dims)  # noqa: E731
    out = {}
    for name, dims in LAYOUT["weights"].items():
        for i in range(cfg["num_hidden_layers"]) if "{i}" in name else [None]:
            out[name.format(i=i)] = shape(dims)
    if draft_vocab:
        out.update({k: shape(v) for k, v in LAYOUT["draft_vocab_weights"].items() if k != "note"})
    return out


def dotted(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check_config(cfg: dict, config: DrafterConfig):
    assert cfg["architectures"] == [LAYOUT["architecture"]] and cfg["model_type"] == LAYOUT["model_type"]
    for key in LAYOUT["config_required"]:
        dotted(cfg, key)  # KeyError names the missing key
    assert cfg["block_size"] == config.block_size and cfg["num_target_layers"] == config.num_target_layers
    assert cfg["dflash_config"] == {"mask_token_id": config.mask_token_id, "target_layer_ids": config.target_layer_ids}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        assert cfg[key] == getattr(config, key), key
    assert cfg["layer_types"] == ["full_attention"] * config.num_hidden_layers and cfg["tie_word_embeddings"] is False


def test_export_matches_reference_layout_bit_for_bit(tmp_path):
    config = DrafterConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, block_size=4,
                           num_target_layers=6, rope_theta=5000.0,
                           dflash_config={"mask_token_id": 5, "target_layer_ids": [1, 2, 4]})
    drafter = save_drafter(tmp_path / "drafter", config)
    manifest = export_drafter(tmp_path / "drafter", tmp_path / "out")

    cfg = json.loads((tmp_path / "out/config.json").read_text())
    check_config(cfg, config)
    assert "draft_vocab_size" not in cfg and cfg["dtype"] == "float32"
    tensors = load_file(str(tmp_path / "out/model.safetensors"))
    shapes = expected_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert shapes["fc.weight"] == (32, 96) and shapes["layers.1.self_attn.k_proj.weight"] == (16, 32)
    assert not [k for k in tensors if k.startswith(tuple(LAYOUT["absent"]["prefixes"]))]
    source = drafter.state_dict()
    for name, t in tensors.items():
        assert t.dtype == source[name].dtype and torch.equal(t, source[name]), name
    assert manifest["kind"] == "export"
    # without a draft vocabulary every HF-layout engine runs exactly this drafter
    assert {e: v["exact"] for e, v in manifest["engines"].items()} == {
        "vllm": True, "sglang": True, "transformers_reference": True, "llama.cpp": False}
    assert (tmp_path / "out/manifest.json").is_file()

    # transformers reads it as the Qwen3Config the reference model is built on, RoPE included
    from transformers import AutoConfig
    qc = AutoConfig.from_pretrained(tmp_path / "out")
    assert type(qc).__name__ == "Qwen3Config" and qc.rope_parameters["rope_theta"] == 5000.0
    assert qc.block_size == 4 and qc.dflash_config["target_layer_ids"] == [1, 2, 4] and qc.head_dim == 8


def test_published_qwen3_8b_config_is_what_we_write():
    """Our config for a Qwen3-8B target, 5 layers, B=16 has the published drafter's values."""
    from transformers import Qwen3Config

    target = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                         max_position_embeddings=40960, rms_norm_eps=1e-6)
    config = DrafterConfig.from_target_config(target, num_layers=5, block_size=16, mask_token_id=151669)
    cfg = reference_config(config)
    for key, value in LAYOUT["published_example"].items():
        assert cfg[key] == value, key
    assert expected_shapes(cfg)["fc.weight"] == (4096, 5 * 4096)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`specauf export ...` in process: (exit status, stdout, stderr)."""
    from specauf.cli import main

    capsys.readouterr()  # drop what came before
    code = 0
    try:
        main(["export", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_draft_vocab_and_which_engines_run_it(tiny_target, tiny_model, tmp_path, capsys, caplog):
    """A draft vocabulary is exported in vLLM's form (offsets + the target's lm_head rows, which
    need --target); the manifest says which engines ignore it, and --strict ENGINE refuses those."""
    target_dir, tm = tiny_target
    model = tiny_model[0]
    config = DrafterConfig.from_target_config(model.config, num_layers=1, block_size=4, mask_token_id=tm["mask_token_id"],
                                              target_layer_ids=[0, 2], draft_vocab_size=10)
    drafter = save_drafter(tmp_path / "drafter", config, tm["fingerprint"])
    d2t = torch.randperm(tm["vocab_size"], generator=torch.Generator().manual_seed(1))[:10]
    drafter.d2t.copy_(d2t)
    drafter.save_pretrained(tmp_path / "drafter", safe_serialization=True)

    cli = [tmp_path / "drafter", tmp_path / "out"]
    code, _, err = run_cli(capsys, *cli)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "--target" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, *cli, "--target", target_dir, "--strict", "sglang")
    assert code == 2 and err.count("\n") == 1 and "sglang would not run the evaluated drafter: ignores the draft vocabulary" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, *cli, "--target", target_dir, "--strict", "tgi")
    assert code == 2 and "--strict: no engine 'tgi' (have: vllm, sglang, transformers_reference, llama.cpp)" in err, err

    code, out, err = run_cli(capsys, *cli, "--target", target_dir, "--strict", "vllm")
    assert code == 0 and "exactly the evaluated drafter in: vllm\n" in out, (out, err)
    assert "transformers_reference would not run the evaluated drafter: ignores the draft vocabulary" in caplog.text
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    check_config(cfg, config)
    assert cfg["draft_vocab_size"] == 10
    tensors = load_file(str(tmp_path / "out/model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_shapes(cfg, draft_vocab=10)
    assert torch.equal(tensors["d2t"] + torch.arange(10), d2t)  # vLLM: target id = draft id + d2t[draft id]
    lm_head = model.get_output_embeddings().weight.detach()
    assert torch.equal(tensors["lm_head.weight"], lm_head[d2t].to(tensors["lm_head.weight"].dtype))
    source = drafter.state_dict()
    for name in set(tensors) - {"d2t", "lm_head.weight"}:
        assert torch.equal(tensors[name], source[name]), name
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert {e: v["exact"] for e, v in m["engines"].items()} == {
        "vllm": True, "sglang": False, "transformers_reference": False, "llama.cpp": False}
    assert m["engines"]["transformers_reference"]["how"].startswith("measured") and m["target_fingerprint"] == tm["fingerprint"]

    # the speculators format of that export (vLLM reads it as the same drafter: tests/test_vllm_gate.py)
    from specauf.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["export-speculators", str(tmp_path / "out"), str(tmp_path / "spec"), "--verifier", "my/target", "--block-size", "5"])
    assert refused.value.code == 2 and "--block-size 5: from 2 to the drafter's block size 4" in capsys.readouterr().err
    main(["export-speculators", str(tmp_path / "out"), str(tmp_path / "spec"), "--verifier", "my/target", "--block-size", "3"])
    spec = json.loads((tmp_path / "spec/config.json").read_text())
    assert spec["speculators_model_type"] == "dflash" and spec["aux_hidden_state_layer_ids"] == [1, 3]  # ours + 1
    assert spec["mask_token_id"] == tm["mask_token_id"] and spec["draft_vocab_size"] == 10
    assert spec["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2
    assert spec["speculators_config"]["verifier"]["name_or_path"] == "my/target"
    assert spec["transformer_layer_config"] == {k: v for k, v in cfg.items() if k not in ("architectures", "dflash_config")}
    assert (tmp_path / "spec/model.safetensors").read_bytes() == (tmp_path / "out/model.safetensors").read_bytes()

    # a target other than the drafter's is refused
    write_json(tmp_path / "drafter/manifest.json", {"schema_version": SCHEMA_VERSION, "kind": "drafter",
                                                    "target_fingerprint": "0" * 64})
    code, _, err = run_cli(capsys, *cli, "--target", target_dir)
    assert code == 2 and "target changed" in err, err


def test_export_stage_follows_train_in_the_dag(tmp_path):
    ws = git_dvc_workspace(tmp_path / "ws")
    stages = dvc(ws, "stage", "list", "--name-only").stdout.split()
    assert {"export@decay-0", "export@auf-0"} <= set(stages), stages
    dot = dvc(ws, "dag", "--dot", "export@auf-0").stdout
    assert '"train@auf-0" -> "export@auf-0"' in dot and '"target" -> "export@auf-0"' in dot, dot
    assert "decay" not in dot


def test_llamacpp_row_of_the_engine_table(tiny_target, tmp_path, capsys):
    """llama.cpp runs the evaluated drafter only from drafter.gguf, and only for a target whose graph
    hands a DFlash draft its layer inputs; --strict llama.cpp refuses an export without the GGUF."""
    from specauf.serve.export import LLAMACPP_DFLASH_TARGETS, engine_table

    for draft_vocab in (0, 64):
        assert engine_table(draft_vocab, "llama", gguf=True)["llama.cpp"]["exact"] is True  # d2t included
        no_gguf = engine_table(draft_vocab, "llama", gguf=False)["llama.cpp"]
        assert not no_gguf["exact"] and "needs drafter.gguf" in no_gguf["reason"]
        gemma3 = engine_table(draft_vocab, "gemma3_text", gguf=True)["llama.cpp"]
        assert not gemma3["exact"] and "exposes no layer inputs" in gemma3["reason"]
    assert {"llama", "qwen3", "gemma4"} <= set(LLAMACPP_DFLASH_TARGETS) and "gemma3" not in LLAMACPP_DFLASH_TARGETS

    target_dir, tm = tiny_target
    config = DrafterConfig(vocab_size=tm["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, block_size=4, num_target_layers=4,
                           dflash_config={"mask_token_id": tm["mask_token_id"], "target_layer_ids": [1, 2]})
    save_drafter(tmp_path / "drafter", config, tm["fingerprint"])
    code, _, err = run_cli(capsys, tmp_path / "drafter", tmp_path / "out", "--target", target_dir, "--strict", "llama.cpp")
    assert code == 2 and err.count("\n") == 1 and "llama.cpp would not run the evaluated drafter: needs drafter.gguf" in err, err
    assert not (tmp_path / "out").exists()
