"""llama.cpp's tools from the pinned sdist (specauf/serve/llamacpp.py), and our GGUF drafter in them: the
build is cached, a damaged download is refused, and draft-dflash with our drafter is lossless and
drafts what our own decoder drafts."""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

from specauf.serve import llamacpp
from specauf.artifacts import write_json
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.errors import UserError
from specauf.serve.export import export_drafter
from tests.test_export import save_drafter


def test_install_is_cached(monkeypatch):
    if not llamacpp.installed():
        pytest.skip("llama.cpp tools not built: run `specauf llamacpp install`")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"a cached install ran {a[0][:3]}"))
    assert llamacpp.install() == llamacpp.home() / "build" / "bin"


def test_damaged_sdist_is_refused_and_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECAUF_LLAMACPP_HOME", str(tmp_path))
    (tmp_path / "dl").mkdir()
    bad = tmp_path / "dl" / llamacpp.SDIST_FILE
    bad.write_bytes(b"not the sdist")
    monkeypatch.setattr(llamacpp, "_build_tools_present", lambda: None)
    with pytest.raises(UserError, match="is not the pinned 832db069"):
        llamacpp.install()
    assert not bad.exists() and not (tmp_path / "build").exists()


def test_missing_tool_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECAUF_LLAMACPP_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"llama-server is not built .*`specauf llamacpp install --server`"):
        llamacpp.tool("llama-server")


def test_a_build_with_other_kernels_is_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECAUF_LLAMACPP_HOME", str(tmp_path))
    (tmp_path / "build" / "bin").mkdir(parents=True)
    for t in llamacpp.TOOLS:
        (tmp_path / "build" / "bin" / t).write_text("")
    stamp = {"sdist_sha256": llamacpp.SDIST_SHA256, "tools": list(llamacpp.TOOLS)}
    write_json(tmp_path / "stamp.json", {**stamp, "cmake_flags": list(llamacpp.CMAKE_FLAGS)})
    assert llamacpp.installed() and llamacpp.tool("llama-completion").is_file()
    older = [f for f in llamacpp.CMAKE_FLAGS if "LLAMAFILE" not in f]  # llamafile's sgemm kernels on
    write_json(tmp_path / "stamp.json", {**stamp, "cmake_flags": older})
    assert not llamacpp.installed()
    with pytest.raises(UserError, match=r"not with today's cmake flags\): run `specauf llamacpp install`"):
        llamacpp.tool("llama-completion")


def first_llamacpp_draft(log: str, n: int) -> list[int]:
    """Token ids of llama.cpp's first DFlash draft, from llama-speculative-simple -v."""
    found = {}
    for pos, tok in re.findall(r"draft candidate\s+0, pos\s+(\d+):\s+(\d+)", log):
        found.setdefault(int(pos), int(tok))
        if len(found) == n:
            break
    return [found[i] for i in range(n)]


@pytest.mark.parametrize("draft_vocab", [0, 300])
def test_llamacpp_runs_our_drafter_losslessly_and_drafts_what_we_draft(llama_target, tmp_path, draft_vocab):
    from specauf.evaluate.decode import DrafterProposer
    from specauf.data.generation import encode_chat
    from specauf.target.run import load_target

    target_dir, target_gguf, tm = llama_target
    model, tok, _ = load_target(target_dir)
    n_max, n = 3, 24
    config = DrafterConfig.from_target_config(model.config, num_layers=1, block_size=n_max + 1,
                                              mask_token_id=tm["mask_token_id"], target_layer_ids=[1, 2],
                                              draft_vocab_size=draft_vocab)
    save_drafter(tmp_path / "drafter", config, tm["fingerprint"], seed=5)
    drafter = BlockDrafter.from_pretrained(tmp_path / "drafter").eval()
    if draft_vocab:  # a draft vocabulary holding the tokens this prompt's greedy answer uses, and more
        d2t = torch.randperm(tm["vocab_size"], generator=torch.Generator().manual_seed(2))[:draft_vocab].sort().values
        drafter.d2t.copy_(d2t)
        drafter.save_pretrained(tmp_path / "drafter", safe_serialization=True)
    export_drafter(tmp_path / "drafter", tmp_path / "out", target_dir, gguf_tokenizer=target_gguf)

    turn = "Write two sentences about rivers."
    text = tok.apply_chat_template([{"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True)
    ids = encode_chat(tok, [turn])
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=n + n_max + 1, do_sample=False)[0, len(ids):]
    plain = llamacpp.decode_plain(target_gguf, text, n + n_max + 1)
    assert plain.text == tok.decode(greedy)  # llama.cpp's f32 target is our target, token for token

    spec = llamacpp.decode_speculative(target_gguf, tmp_path / "out/drafter.gguf", text, n, n_max)
    loud = llamacpp.decode_speculative(target_gguf, tmp_path / "out/drafter.gguf", text, n, n_max, verbose=True)
    assert spec.tokens > n and plain.text.startswith(spec.text) and loud.text == spec.text  # lossless
    drafted = [d for _, d in loud.logged]
    assert max(drafted) == n_max and drafted.count(n_max) >= len(drafted) - 3  # shorter only near n
    # the cycles read from the coloured output are llama.cpp's own -v account of them
    assert sorted(spec.accepted) == sorted(loud.accepted) == sorted(a for a, _ in loud.logged)
    assert sum(spec.accepted) > 0 or draft_vocab  # the full-vocabulary drafter gets guesses accepted: coloured runs are read
    assert sum(spec.accepted) + len(spec.accepted) == spec.tokens  # tau's bookkeeping: 1 + accepted per cycle

    # its first draft is ours: anchor = the last prompt token, context = the prompt before it,
    # an (n_max + 1)-token block (our `short` layout)
    res = subprocess.run([str(llamacpp.tool("llama-speculative-simple")), *llamacpp._common(target_gguf, text, 4, 1),
                          "--spec-type", "draft-dflash", "--spec-draft-n-max", str(n_max), "-md",
                          str(tmp_path / "out/drafter.gguf"), *llamacpp.F32_DRAFT_CACHE, "-v"], capture_output=True, text=True, check=True)
    theirs = first_llamacpp_draft(res.stderr + res.stdout, n_max)
    proposer = DrafterProposer(drafter, model, "short")
    proposer.reset(ids)
    with torch.no_grad():
        proposer.add_context(model(torch.tensor([ids[:-1]]), output_hidden_states=True).hidden_states)
        ours = proposer.propose(torch.tensor(ids), n_max).argmax(-1).tolist()
    assert theirs == ours
    if draft_vocab:
        assert set(ours) <= set(d2t.tolist())
