"""Batched generation (specauf/data/generation.py): batched greedy == unbatched == HF generate, finished rows
leave the batch, a sampled row does not depend on its batch, grouped prefill == one padded batch."""
from __future__ import annotations

import pytest
import torch

from specauf.data.generation import PREFILL_GROUP, encode_chat, generate_batch, prefill
from specauf.data import rollouts as rollouts_mod
from specauf.sampling import SamplingParams
from tests.conftest import prompt_rows


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_greedy_equals_unbatched_and_hf_generate(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from specauf.target.tiny import build_tiny_target

    path = build_tiny_target(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(19)]  # unsorted, 3 prefill groups
    assert len({len(p) for p in prompts}) > 3 and len(prompts) > 2 * PREFILL_GROUP  # real padding, merged groups
    stop = [tok.eos_token_id]
    batched = generate_batch(model, prompts, max_new_tokens=20, stop_ids=stop, pad_id=tok.pad_token_id)
    for p, (resp, finish) in zip(prompts, batched):
        alone = generate_batch(model, [p], max_new_tokens=20, stop_ids=stop, pad_id=tok.pad_token_id)[0]
        assert (resp, finish) == alone
        hf = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=stop[0],
                            pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert resp == hf


def test_stop_token_ends_row_and_batch_compacts(tiny_model):
    model, tok, manifest = tiny_model
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(4)]
    ref = generate_batch(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=tok.pad_token_id)
    stop = ref[1][0][5]  # make row 1 stop at its 6th token
    out = generate_batch(model, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=tok.pad_token_id)
    first = ref[1][0].index(stop)
    assert out[1] == (ref[1][0][: first + 1], "stop")
    for (r, f), (rr, _) in zip(out, ref):  # other rows unaffected by the compaction
        cut = rr.index(stop) + 1 if stop in rr else len(rr)
        assert r == rr[:cut]
        assert f == ("stop" if stop in rr else "length")


def test_sampled_rows_do_not_depend_on_batch(tiny_model):
    model, tok, _ = tiny_model
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(3)]
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=20)
    gens = lambda: [rollouts_mod.row_generator(0, f"p{i}") for i in range(3)]
    together = generate_batch(model, prompts, max_new_tokens=10, stop_ids=[], pad_id=0, sampling=sampling, generators=gens())
    alone = [generate_batch(model, [p], max_new_tokens=10, stop_ids=[], pad_id=0, sampling=sampling,
                            generators=[gens()[i]])[0] for i, p in enumerate(prompts)]
    assert together == alone
    greedy = generate_batch(model, prompts, max_new_tokens=10, stop_ids=[], pad_id=0)
    assert together != greedy


def test_grouped_prefill_equals_one_padded_batch(tiny_model):
    """The stacked cache of length groups holds the same keys/values at every real position as
    one forward of the whole left-padded batch (pad slots differ and are masked), and the same
    next-token logits."""
    from transformers import DynamicCache

    model, tok, _ = tiny_model
    prompts = [encode_chat(tok, r["turns"]) for r in prompt_rows(2 * PREFILL_GROUP + 3, seed=5)]
    n, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        ref_cache = DynamicCache()
        ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=ref_cache, use_cache=True)
        cache, logits = prefill(model, prompts, 0, torch.device("cpu"))
    torch.testing.assert_close(logits, ref.logits[:, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(logits.argmax(-1), ref.logits[:, -1].argmax(-1))
    real = mask.bool()[:, None, :, None]
    for got, want in zip(cache.layers, ref_cache.layers):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys * real, want.keys * real, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.values * real, want.values * real, rtol=1e-4, atol=1e-5)
