"""Batch-1 speculative decoding with a block drafter (docs/method.md, section 1).

One cycle: the block is [anchor = last committed token, g_1..g_{b-1}] at positions p..p+b-1.
A proposer guesses g in one call; the target scores the whole block in one forward pass over
its KV cache; the longest agreeing prefix plus the target's bonus token is committed; the
target cache is cropped back to the committed tokens that have K/V (anchor + accepted guesses).
Block size 1 runs the same loop with no guesses, which makes it plain target decoding: the
speedup baseline is measured by this very code, not by a different generate().

Accounting conventions (one `GenerationResult` per prompt):
- the prefill's token (the first generated token) belongs to no cycle;
- a cycle's emitted length is the number of tokens it added to the output, bonus included, so
  1 + sum(cycle_lengths) == len(token_ids). Tokens cut by a stop token are not counted. The
  last cycle never drafts past max_new_tokens (it proposes min(b-1, remaining-1) guesses), so
  the length cap never cuts a cycle; with an always-right proposer every cycle emits b tokens
  except possibly the last, which emits what is left of the budget (or stops at a stop token);
- block position k (1..b-1) is *attempted* when its guess was proposed, every earlier guess
  of the cycle was accepted, and its output slot survived truncation; *accepted* when, in
  addition, the target agreed. accepted/attempted is P[k accepted | positions < k accepted].
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specauf.train.domino import chained_guesses, is_domino
from specauf.train.drafter import DrafterCache
from specauf.evaluate.cycles import close_cycle, guesses_per_block, pool_cycles
from specauf.sampling import SamplingParams, draft, verify
from specauf.target.access import cache_kwarg, rollback_cache, context_features_from_hidden_states, crop_cache


# ---------------------------------------------------------------- proposers

class Proposer:
    """Guesses the tokens after the anchor. Subclasses override `propose` (and, if they read the
    target's hidden states, set needs_features and override `add_context`)."""

    needs_features = False
    max_guesses: int | None = None  # longest block - 1 this proposer supports (None = any)

    def reset(self, prompt_ids: torch.Tensor) -> None:
        """Start a new prompt."""

    def add_context(self, hidden_states: tuple[torch.Tensor, ...]) -> None:
        """Target hidden states (HF tuple, embeddings first, each (1, m, H)) of the next m
        committed positions, in order; called only when needs_features."""

    def propose(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """(n, V) logits for the n tokens after tokens[-1] (the anchor); tokens = all committed."""
        raise NotImplementedError

    def draft(self, tokens: torch.Tensor, n: int, sp: SamplingParams, generator: torch.Generator | None = None):
        """(guesses (n,), their distributions q (n, V) or None when greedy): each position drawn
        from its logits on its own. A proposer whose later logits depend on the earlier guesses
        (Domino's head) draws inside its loop instead."""
        return draft(self.propose(tokens, n), sp, generator)


BLOCK_LAYOUTS = ("trained", "short")  # eval.block_layout: n guesses from the B-token block, or from an (n+1)-token one


class DrafterProposer(Proposer):
    """A BlockDrafter on the target's frozen embeddings and lm_head.

    n guesses come from the trained B-token block `[anchor, MASK x B-1]` (its first n; layout
    `trained`) or from an (n+1)-token block (`short`); docs/method.md, section 2.

    Context features are fed once: each call projects only the positions committed since the
    last call, appends their K/V to the drafter's cache, then crops the cache back to the
    context, so the block's K/V (built on guesses that may be rejected) never stays.
    """

    needs_features = True

    def __init__(self, drafter, target, layout: str = "trained"):
        if layout not in BLOCK_LAYOUTS:
            raise ValueError(f"block layout {layout!r} is not one of {BLOCK_LAYOUTS}")
        self.layout = layout
        if drafter.mask_token_id is None:
            raise ValueError("the drafter config has no mask_token_id")
        self.drafter = drafter
        self.embed = target.get_input_embeddings()
        lm_head = target.get_output_embeddings().weight
        self.head, self.vocab_size = drafter.draft_head(lm_head), lm_head.shape[0]
        self.layer_ids = drafter.target_layer_ids
        self.mask_id = drafter.mask_token_id
        self.max_guesses = drafter.block_size - 1
        self.domino = is_domino(drafter.config)
        self.d2t = drafter.d2t if drafter.config.draft_vocab_size else None

    def reset(self, prompt_ids):
        self.cache = DrafterCache()
        self.pending: list[torch.Tensor] = []

    def add_context(self, hidden_states):
        self.pending.append(context_features_from_hidden_states(hidden_states, self.layer_ids))

    def propose(self, tokens, n):
        slots = self._slots(tokens, n)
        # draft-vocabulary drafters give -inf outside their vocabulary: they never propose those ids
        if not self.domino:
            return self.drafter.target_logits(slots[0], self.head, self.vocab_size)
        _, final = chained_guesses(self.drafter, slots, self.drafter.draft_logits(slots, self.head), tokens[-1:],
                                   self.embed, self.d2t)
        return self.drafter.to_target_vocab(final[0], self.vocab_size)

    def draft(self, tokens, n, sp, generator=None):
        if not self.domino or sp.greedy:
            return super().draft(tokens, n, sp, generator)
        slots, qs = self._slots(tokens, n), []

        def sample(logits):  # (1, V_draft) -> (1,) target id, drawn as the decoder draws: q over the target's ids
            q = sp.probs(self.drafter.to_target_vocab(logits[0], self.vocab_size))
            qs.append(q)
            return torch.multinomial(q, 1, generator=generator)

        guesses, _ = chained_guesses(self.drafter, slots, self.drafter.draft_logits(slots, self.head), tokens[-1:],
                                     self.embed, self.d2t, pick=sample)
        return guesses[0], torch.stack(qs)

    def _slots(self, tokens, n):
        """The drafter's output (1, n, H) at the block's first n guess positions."""
        p = tokens.shape[0] - 1  # the anchor's position = number of context positions
        ctx = torch.cat(self.pending, dim=1) if self.pending else None
        self.pending = []
        c0 = self.cache.get_seq_length()
        if c0 + (0 if ctx is None else ctx.shape[1]) != p:
            raise RuntimeError(f"drafter context covers {c0} + new positions, anchor is at {p}")
        dev = tokens.device
        width = n + 1 if self.layout == "short" else self.max_guesses + 1
        block = torch.full((1, width), self.mask_id, dtype=torch.long, device=dev)
        block[0, 0] = tokens[-1]
        embeds = self.embed(block).to(self.drafter.dtype)
        hidden = self.drafter(
            embeds, ctx,
            block_position_ids=torch.arange(p, p + width, device=dev)[None],
            context_position_ids=torch.arange(c0, p, device=dev)[None],
            past_key_values=self.cache, use_cache=True)
        self.cache.crop(p)
        return hidden[:, 1:n + 1]


class OracleProposer(Proposer):
    """Knows a reference sequence (prompt + the target's continuation): proposes it, except that
    each guess is independently replaced by a wrong token with probability error_rate.

    error_rate 0 is an always-right drafter (tau = block size), 1 an always-wrong one (tau = 1),
    in between gives every accepted-prefix length, which exercises cache cropping. Past the end
    of the reference it proposes token 0. Useful for tests and as an upper bound.
    """

    def __init__(self, reference_ids, vocab_size: int, error_rate: float = 0.0, seed: int = 0):
        self.ref = torch.as_tensor(reference_ids, dtype=torch.long).flatten().cpu()
        self.vocab_size = vocab_size
        self.error_rate = error_rate
        self.rng = torch.Generator().manual_seed(seed)

    def propose(self, tokens, n):
        start = tokens.shape[0]
        guess = torch.zeros(n, dtype=torch.long)
        known = self.ref[start:start + n]
        guess[:known.shape[0]] = known
        wrong = torch.rand(n, generator=self.rng) < self.error_rate
        guess = torch.where(wrong, (guess + 1) % self.vocab_size, guess)
        logits = torch.full((n, self.vocab_size), float("-inf"))
        logits[torch.arange(n), guess] = 0.0
        return logits.to(tokens.device)


# ---------------------------------------------------------------- results

@dataclass
class GenerationResult:
    """One prompt's output and its per-cycle accounting (conventions in the module docstring)."""

    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    block_size: int
    cycle_lengths: list[int] = field(default_factory=list)
    attempted: list[int] = field(default_factory=list)  # per block position k = 1..b-1
    accepted: list[int] = field(default_factory=list)
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0  # all cycles; prefill excluded

    @property
    def num_cycles(self) -> int:
        return len(self.cycle_lengths)

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by the cycles (all but the prefill's)."""
        return sum(self.cycle_lengths)

    @property
    def tau(self) -> float:
        return self.decode_tokens / self.num_cycles if self.num_cycles else float("nan")

    @property
    def time_per_output_token(self) -> float:
        return self.decode_time_s / self.decode_tokens if self.decode_tokens else float("nan")


def summarize(results: list[GenerationResult]) -> dict:
    """Pool prompts: tau, emitted-length histogram, per-position acceptance, decode speed.

    Everything is pooled over cycles/tokens (not averaged per prompt), so long outputs weigh
    more, as they do in wall-clock time.
    """
    b = max(r.block_size for r in results)
    cycles = [n for r in results for n in r.cycle_lengths]
    att = [sum(r.attempted[k] for r in results if k < len(r.attempted)) for k in range(b - 1)]
    acc = [sum(r.accepted[k] for r in results if k < len(r.accepted)) for k in range(b - 1)]
    tokens = sum(r.decode_tokens for r in results)
    seconds = sum(r.decode_time_s for r in results)
    histogram = [cycles.count(n) for n in range(b + 1)]  # index = emitted length
    return {
        **pool_cycles(len(results), tokens, len(cycles), histogram, att, acc),
        "decode_time_s": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "time_per_output_token_s": seconds / tokens if tokens else float("nan"),
        "finish_reasons": {k: sum(r.finish_reason == k for r in results) for k in ("stop", "length")},
    }


# ---------------------------------------------------------------- engine

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def speculative_generate(target, prompt_ids, *, proposer: Proposer | None = None, block_size: int,
                         max_new_tokens: int, stop_token_ids=(), temperature: float = 0.0,
                         top_p: float = 1.0, top_k: int = 0,
                         generator: torch.Generator | None = None) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids (1-D ids) with draft-verify cycles.

    block_size 1 = plain decoding (no proposer needed). Output stops right after the first stop
    token. Greedy output equals the target's greedy decoding token for token; sampled output
    follows the target's distribution (lossless speculative sampling), drawing from `generator`
    (on the target's device) when given.
    """
    sp = SamplingParams(temperature, top_p, top_k)
    b = int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be >= 1, got {b}")
    if b > 1 and proposer is None:
        raise ValueError("block_size > 1 needs a proposer")
    if b > 1 and proposer.max_guesses is not None and b - 1 > proposer.max_guesses:
        raise ValueError(f"block_size {b} exceeds the proposer's {proposer.max_guesses + 1}")
    stops = {int(t) for t in stop_token_ids}
    device = next(target.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    P = prompt.shape[0]
    result = GenerationResult([], "length", b, attempted=[0] * (b - 1), accepted=[0] * (b - 1))
    if max_new_tokens <= 0:
        return result
    if P == 0:
        raise ValueError("empty prompt")
    features = b > 1 and proposer.needs_features
    cache = rollback_cache(target)
    fwd = {cache_kwarg(target): cache, "use_cache": True, "output_hidden_states": features}
    seq = torch.empty(P + max_new_tokens, dtype=torch.long, device=device)  # committed tokens
    seq[:P] = prompt
    if b > 1:
        proposer.reset(prompt)

    # Prefill: the prompt's K/V and features, and the first token (a "bonus" with no guesses).
    t0 = time.perf_counter()
    out = target(prompt[None], position_ids=torch.arange(P, device=device)[None], logits_to_keep=1, **fwd)
    if features:
        proposer.add_context(out.hidden_states)
    _, first, _ = verify(out.logits[0, -1:], prompt[:0], None, sp, generator)
    out = None
    seq[P] = first
    L = P + 1  # committed length; the anchor is seq[L-1] at position L-1
    result.token_ids.append(first)
    if first in stops:
        result.finish_reason = "stop"
    _sync(device)
    t1 = time.perf_counter()
    result.prefill_time_s = t1 - t0

    while result.finish_reason != "stop" and len(result.token_ids) < max_new_tokens:
        anchor_pos = L - 1
        n = guesses_per_block(b - 1, max_new_tokens, len(result.token_ids))
        if n > 0:
            guesses, q = proposer.draft(seq[:L], n, sp, generator)
            block = torch.cat([seq[anchor_pos:L], guesses])
        else:
            guesses, q, block = seq[:0], None, seq[anchor_pos:L]
        positions = torch.arange(anchor_pos, anchor_pos + n + 1, device=device)[None]
        out = target(block[None], position_ids=positions, **fwd)
        n_acc, bonus, g = verify(out.logits[0], guesses, q, sp, generator)
        crop_cache(cache, L + n_acc)  # anchor + accepted guesses have K/V; the bonus not yet
        if features:
            proposer.add_context(tuple(h[:, :n_acc + 1] for h in out.hidden_states))
        out = None

        emitted, stopped = close_cycle(g[:n_acc] + [bonus], n, n_acc, stops, result.attempted, result.accepted)
        if stopped:
            result.finish_reason = "stop"
        kept = len(emitted)
        seq[L:L + kept] = torch.tensor(emitted, dtype=torch.long, device=device)
        L += kept
        result.token_ids.extend(emitted)
        result.cycle_lengths.append(kept)

    _sync(device)
    result.decode_time_s = time.perf_counter() - t1
    if result.finish_reason != "stop":
        result.finish_reason = "length"
    return result
