"""Batched target generation with a KV cache, for rollouts.

Our own loop rather than `model.generate`: finished rows leave the batch (responses vary from a
few tokens to the cap, so compaction roughly halves the work), the progress bar counts tokens,
and each row samples from its own seeded generator, so a row's text does not depend on which
other rows shared its batch.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from specauf.errors import UserError
from specauf.sampling import SamplingParams, filter_logits
from specauf.target.access import cache_kwarg


def encode_chat(tokenizer, turns: list[str], replies: list[str] | None = None) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the assistant prompt.

    The template's markup is parsed for special tokens; the messages' text never is: a prompt
    holding `<|im_start|>assistant` or the MASK token's string must not forge a turn or put MASK
    into the context. A conversation whose text holds no special token's string is tokenized
    whole (the ids every artifact so far was made with); one that does is tokenized piece by
    piece, its text with the special tokens split into ordinary ones."""
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if replies and i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    specials = [t for t in special_token_strings(tokenizer) if any(t in m["content"] for m in messages)]
    if not specials:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, at = [], 0
    for m in messages:
        start = text.find(m["content"], at)
        if start < 0:
            raise UserError(f"a prompt holds the special token {specials[0]!r}, and the chat template rewrites the "
                            "prompt's text, so it cannot be kept apart from the markup; remove it from the prompt")
        ids += tokenizer(text[at:start], add_special_tokens=False)["input_ids"]
        ids += tokenizer(m["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = start + len(m["content"])
    return ids + tokenizer(text[at:], add_special_tokens=False)["input_ids"]


def special_token_strings(tokenizer) -> list[str]:
    """The strings a tokenizer turns into one special token wherever they appear in text."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted({*tokenizer.all_special_tokens, *added} - {""})


def _next_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits, sampling.temperature, sampling.top_p, sampling.top_k).cpu()
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)]).to(logits.device)


# Prompts prefilled together: the prefill is compute-bound on a CPU, so padding every prompt of a
# batch to the longest one wastes up to half of it (ShareGPT prompts of 33-101 tokens: 3232
# padded vs 1660 real tokens); groups of similar length keep batching's gain without the waste.
PREFILL_GROUP = 8


def prefill(model, prompts: list[list[int]], pad_id: int, device) -> tuple[DynamicCache, torch.Tensor]:
    """KV cache of the whole batch, left-padded to its longest prompt, and each row's next-token
    logits. Rows are prefilled in groups of similar length, then their caches are left-padded to
    the batch width and stacked; the batch attention mask hides every pad slot."""
    n, width = len(prompts), max(len(p) for p in prompts)
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    layers: list[tuple[list, list]] = []
    logits = [None] * n
    for start in range(0, n, PREFILL_GROUP):
        group = order[start: start + PREFILL_GROUP]
        w = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), w), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), w), dtype=torch.long)
        for j, i in enumerate(group):
            ids[j, w - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[j, w - len(prompts[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        # logits_to_keep=1: only the last position's logits are needed, not the LM head over
        # every prompt token (a seventh of the prefill on SmolLM2's 49k vocabulary).
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=1, use_cache=True, **{cache_kwarg(model): cache})
        for j, i in enumerate(group):
            logits[i] = out.logits[j, -1]
        for li, layer in enumerate(cache.layers):
            if len(layers) <= li:
                layers.append(([], []))
            pad = width - w
            layers[li][0].append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
            layers[li][1].append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
    back = torch.tensor(order, device=device).argsort()  # batch row -> its row in the stacked (length-sorted) cache
    merged = DynamicCache()
    for li, (keys, values) in enumerate(layers):
        merged.update(torch.cat(keys)[back], torch.cat(values)[back], li)
    return merged, torch.stack(logits)


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int],
                   pad_id: int, sampling: SamplingParams = SamplingParams(),
                   generators: list[torch.Generator] | None = None, on_tokens=None) -> list[tuple[list[int], str]]:
    """Generate for a batch of prompts (left-padded); return (response ids, finish reason) per prompt.

    The response includes the stop token when one ends it (finish reason "stop"), else it has
    exactly max_new_tokens tokens (finish reason "length").
    """
    device = next(model.parameters()).device
    n = len(prompts)
    width = max(len(p) for p in prompts)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1
    mask = mask.to(device)
    cache, logits = prefill(model, prompts, pad_id, device)
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    kw = {cache_kwarg(model): cache, "use_cache": True}

    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    responses: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    active = torch.arange(n, device=device)  # original row index of each live batch row
    for step in range(max_new_tokens):
        gens = [generators[i] for i in active.tolist()] if generators else None
        tokens = _next_tokens(logits, sampling, gens)
        for row, tok in zip(active.tolist(), tokens.tolist()):
            responses[row].append(tok)
        if on_tokens:
            on_tokens(len(active))
        done = torch.isin(tokens, stops)
        for row in active[done].tolist():
            finish[row] = "stop"
        if step == max_new_tokens - 1:
            break
        keep = ~done
        if not keep.all():
            if not keep.any():
                break
            idx = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(idx)
            active, tokens, mask, next_pos = active[idx], tokens[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None], **kw)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return [(r, f) for r, f in zip(responses, finish)]
