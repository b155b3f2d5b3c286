"""The drafter as a llama.cpp DFlash GGUF (specauf/serve/gguf_export.py), read back with llama.cpp's own
gguf-py: metadata its runtime reads, tensor names and shapes, bit-equal weights, d2t absolute."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from specauf.train.drafter import DrafterConfig
from specauf.serve.export import export_drafter
from specauf.serve.llamacpp import gguf_module
from tests.test_export import save_drafter


def read_gguf(path):
    with gguf_module() as gguf:
        r = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in r.fields.items()}
        tensors = {t.name: (t.tensor_type.name, [int(x) for x in reversed(t.shape)], np.array(t.data)) for t in r.tensors}
    return fields, tensors


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_gguf_drafter_round_trip(llama_target, tmp_path, draft_vocab):
    target_dir, target_gguf, tm = llama_target
    from specauf.target.run import load_target

    model = load_target(target_dir)[0]
    config = DrafterConfig.from_target_config(model.config, num_layers=2, block_size=4, mask_token_id=tm["mask_token_id"],
                                              target_layer_ids=[0, 2], draft_vocab_size=draft_vocab)
    drafter = save_drafter(tmp_path / "drafter", config, tm["fingerprint"])
    if draft_vocab:
        d2t = torch.randperm(tm["vocab_size"], generator=torch.Generator().manual_seed(3))[:draft_vocab].sort().values
        drafter.d2t.copy_(d2t)
        drafter.save_pretrained(tmp_path / "drafter", safe_serialization=True)
    m = export_drafter(tmp_path / "drafter", tmp_path / "out", target_dir, gguf_tokenizer=target_gguf)
    assert m["engines"]["llama.cpp"] == {"exact": True, "reason": None, "how": m["engines"]["llama.cpp"]["how"]}
    fields, tensors = read_gguf(tmp_path / "out/drafter.gguf")
    assert fields["general.architecture"] == "dflash"
    assert fields["dflash.block_size"] == 4 and fields["dflash.target_layers"] == [1, 3]  # layer inputs: ids + 1
    assert fields["dflash.attention.causal"] is False and fields["dflash.sample_from_anchor"] is True
    assert fields["dflash.block_count"] == 2 and fields["dflash.embedding_length"] == 64
    assert fields["dflash.rope.freq_base"] == 50000.0 and fields["dflash.hidden_activation"] == "silu"
    assert fields["tokenizer.ggml.mask_token_id"] == tm["mask_token_id"]
    tfields, _ = read_gguf(target_gguf)
    assert fields["tokenizer.ggml.tokens"] == tfields["tokenizer.ggml.tokens"]  # llama.cpp checks the vocabularies match
    state = drafter.state_dict()
    names = {"fc.weight": "fc.weight", "hidden_norm.weight": "enc.output_norm.weight", "norm.weight": "output_norm.weight",
             "layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight", "layers.0.self_attn.k_norm.weight": "blk.0.attn_k_norm.weight",
             "layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight", "layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
             "layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight"}
    for ours, theirs in names.items():
        kind, shape, data = tensors[theirs]
        assert kind == "F32" and shape == list(state[ours].shape), theirs
        assert np.array_equal(data.reshape(shape), state[ours].numpy()), theirs
    assert len([n for n in state if n != "d2t"]) == len([n for n in tensors if n not in ("d2t", "output.weight")]) == 2 * 11 + 3
    assert "token_embd.weight" not in tensors  # the target's embedding table is used
    if draft_vocab:
        kind, shape, data = tensors["d2t"]
        assert kind == "I64" and np.array_equal(data, d2t.numpy())  # ABSOLUTE target ids, not vLLM's offsets
        kind, shape, data = tensors["output.weight"]
        lm_head = model.get_output_embeddings().weight.detach()
        assert shape == [draft_vocab, 64] and np.array_equal(data.reshape(shape), lm_head[d2t].numpy())
    else:
        assert "d2t" not in tensors and "output.weight" not in tensors  # llama.cpp takes the target's output head
    assert m["gguf"]["tensors"] == {k: v[1] for k, v in sorted(tensors.items())}


def test_gguf_export_refuses_without_target(llama_target, tmp_path, capsys):
    from specauf.cli import main

    target_dir, target_gguf, tm = llama_target
    config = DrafterConfig(vocab_size=tm["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, block_size=4, num_target_layers=4,
                           dflash_config={"mask_token_id": tm["mask_token_id"], "target_layer_ids": [1, 2]})
    save_drafter(tmp_path / "drafter", config, tm["fingerprint"])
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "drafter"), str(tmp_path / "out"), "--gguf", str(target_gguf)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--target" in err, err
    assert not (tmp_path / "out").exists()
