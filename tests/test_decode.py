"""Speculative decoding engine: exactness against HF greedy, accounting, lossless sampling.

Tiny random-init targets (specauf.target.tiny) give varied, decisive greedy outputs in milliseconds,
so every check runs the real engine end to end; nothing under test is mocked.
"""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from specauf.evaluate.decode import (
    DrafterProposer, OracleProposer, Proposer, speculative_generate, summarize,
)
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.target.access import context_features_from_hidden_states
from specauf.sampling import SamplingParams
from tests.test_sampling import chi2, chi2_bound
from specauf.target.tiny import build_tiny_target

MASK_ID = 3  # reserved <|mask|> in the tiny tokenizer
MAX_NEW = 33
ATTN_SCALE = 5.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a second thread competing with other work on
    a busy 2-core machine can make each forward 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Tiny targets whose next token really depends on the context.

    At the default init (std 0.02) attention barely moves the residual stream, so the tiny
    target acts almost like a bigram model and a stale or misplaced K/V entry rarely changes
    its argmax: a cache bug could pass the exactness checks. Attention weights x5 fix that.
    """
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for arch, seed in (("llama", 0), ("qwen3", 1)):
        model = AutoModelForCausalLM.from_pretrained(build_tiny_target(root / arch, arch=arch, seed=seed))
        with torch.no_grad():
            for name, w in model.named_parameters():
                if ".self_attn." in name and name.endswith("_proj.weight"):
                    w.mul_(ATTN_SCALE)
        out[arch] = model.eval()
    return out


def random_drafter(target, seed=0, block_size=16):
    torch.manual_seed(seed)
    cfg = DrafterConfig.from_target_config(target.config, num_layers=2, block_size=block_size,
                                           mask_token_id=MASK_ID, initializer_range=0.2)
    return BlockDrafter(cfg).eval()


def random_prompt(target, seed):
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(3, 30, (1,), generator=g))
    return torch.randint(4, target.config.vocab_size, (length,), generator=g)


def hf_greedy(target, prompt, max_new_tokens, stop=None):
    """transformers' own greedy generate, cut right after the first stop token."""
    out = target.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
    if stop is not None and stop in out:
        out = out[:out.index(stop) + 1]
    return out


def check_accounting(r, b):
    assert 1 + sum(r.cycle_lengths) == len(r.token_ids)
    assert all(1 <= n <= b for n in r.cycle_lengths)
    assert all(0 <= a <= t for a, t in zip(r.accepted, r.attempted))


# ---------------------------------------------------------------- greedy exactness

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_exact_for_every_block_size(targets, arch):
    """Drafter and noisy-oracle speculation == plain (b=1) == HF generate, for b = 2..16."""
    target = targets[arch]
    V = target.config.vocab_size
    drafter = DrafterProposer(random_drafter(target), target)
    lengths_seen = set()
    for b in range(2, 17):
        prompt = random_prompt(target, seed=100 * b)
        ref = hf_greedy(target, prompt, MAX_NEW)
        assert len(ref) == MAX_NEW
        plain = speculative_generate(target, prompt, block_size=1, max_new_tokens=MAX_NEW)
        assert plain.token_ids == ref
        oracle = OracleProposer(torch.cat([prompt, torch.tensor(ref)]), V, error_rate=0.3, seed=b)
        for proposer in (drafter, oracle):
            r = speculative_generate(target, prompt, proposer=proposer, block_size=b,
                                     max_new_tokens=MAX_NEW)
            assert r.token_ids == ref, (b, type(proposer).__name__)
            assert r.finish_reason == "length"
            check_accounting(r, b)
        lengths_seen.update(r.cycle_lengths)
    assert len(lengths_seen) >= 6  # the noisy oracle really produced partial acceptances


def test_stop_token_inside_accepted_block(targets):
    """A stop token that is an accepted guess (not the bonus) ends the output right there."""
    target = targets["llama"]
    b = 8
    for seed in range(20):
        prompt = random_prompt(target, seed)
        ref = hf_greedy(target, prompt, MAX_NEW)
        # generated index j is an accepted guess of an always-right cycle unless j % b == 0
        firsts = {t: ref.index(t) for t in ref}
        picks = [(j, t) for t, j in firsts.items() if j > b and j % b not in (0, b - 1)]
        if picks:
            break
    j, stop = picks[0]
    expected = ref[:j + 1]
    assert hf_greedy(target, prompt, MAX_NEW, stop=stop) == expected
    full = torch.cat([prompt, torch.tensor(ref)])
    for proposer, bs in ((None, 1), (OracleProposer(full, target.config.vocab_size), b),
                         (DrafterProposer(random_drafter(target), target), b)):
        r = speculative_generate(target, prompt, proposer=proposer, block_size=bs,
                                 max_new_tokens=MAX_NEW, stop_token_ids={stop, 10**6})
        assert r.token_ids == expected and r.finish_reason == "stop"
        check_accounting(r, bs)
    # The oracle's last cycle was cut after the stop token (guess position s = j % b): s tokens
    # kept, and positions after s, though verified, are not counted as attempted.
    r = speculative_generate(target, prompt, proposer=OracleProposer(full, target.config.vocab_size),
                             block_size=b, max_new_tokens=MAX_NEW, stop_token_ids=[stop])
    s, full_cycles = j % b, r.num_cycles - 1
    assert r.cycle_lengths == [b] * full_cycles + [s]
    assert r.attempted == r.accepted == [full_cycles + 1] * s + [full_cycles] * (b - 1 - s)
    # A stop token produced by the prefill ends generation before any cycle.
    r = speculative_generate(target, prompt, proposer=OracleProposer(full, target.config.vocab_size),
                             block_size=b, max_new_tokens=MAX_NEW, stop_token_ids=[ref[0]])
    assert r.token_ids == [ref[0]] and r.num_cycles == 0 and r.finish_reason == "stop"


@pytest.mark.parametrize("max_new", [1, 2, 13, 17])
def test_max_new_tokens_inside_block(targets, max_new):
    target = targets["qwen3"]
    prompt = random_prompt(target, seed=7)
    ref = hf_greedy(target, prompt, max_new)
    oracle = OracleProposer(torch.cat([prompt, torch.tensor(ref)]), target.config.vocab_size)
    r = speculative_generate(target, prompt, proposer=oracle, block_size=8, max_new_tokens=max_new)
    assert r.token_ids == ref and len(ref) == max_new and r.finish_reason == "length"
    # Full cycles of 8, then the rest of the budget: the cap never cuts a drafted block.
    rest = (max_new - 1) % 8
    assert r.cycle_lengths == [8] * ((max_new - 1) // 8) + ([rest] if rest else [])


# ---------------------------------------------------------------- accounting

def test_tau_always_right_and_always_wrong(targets):
    target = targets["llama"]
    V = target.config.vocab_size
    for b in (2, 5, 16):
        right, wrong = [], []
        for seed in range(3):
            prompt = random_prompt(target, seed)
            full = torch.cat([prompt, torch.tensor(hf_greedy(target, prompt, MAX_NEW))])
            right.append(speculative_generate(target, prompt, proposer=OracleProposer(full, V),
                                              block_size=b, max_new_tokens=MAX_NEW))
            wrong.append(speculative_generate(target, prompt, proposer=OracleProposer(full, V, 1.0),
                                              block_size=b, max_new_tokens=MAX_NEW))
        for r in right:  # every cycle full except the last, which gets what is left of the budget
            assert r.cycle_lengths[:-1] == [b] * (r.num_cycles - 1)
            assert r.cycle_lengths[-1] == (MAX_NEW - 2) % b + 1
        s = summarize(right)
        assert s["acceptance_per_position"] == [1.0] * (b - 1)
        assert s["length_histogram"][b] == 3 * ((MAX_NEW - 1) // b)
        assert s["tau"] == (MAX_NEW - 1) / math.ceil((MAX_NEW - 1) / b)
        w = summarize(wrong)
        assert w["tau"] == 1.0 and w["cycles"] == 3 * (MAX_NEW - 1)
        assert w["acceptance_per_position"][0] == 0.0 and w["attempted"][1:] == [0] * (b - 2)
        assert w["length_histogram"][1] == w["cycles"]
        assert w["tokens_per_s"] > 0 and w["finish_reasons"] == {"stop": 0, "length": 3}


def test_block_size_one_never_calls_the_proposer(targets):
    class Exploding(Proposer):
        def propose(self, tokens, n):
            raise AssertionError("plain decoding must not draft")

    target = targets["llama"]
    prompt = random_prompt(target, 3)
    r = speculative_generate(target, prompt, proposer=Exploding(), block_size=1, max_new_tokens=9)
    assert r.cycle_lengths == [1] * 8 and r.attempted == [] and r.tau == 1.0
    assert r.time_per_output_token > 0
    short = DrafterProposer(random_drafter(target, block_size=4), target)
    with pytest.raises(ValueError):  # a drafter cannot be asked for more than it was trained for
        speculative_generate(target, prompt, proposer=short, block_size=5, max_new_tokens=9)


@pytest.mark.parametrize("layout", ["trained", "short"])
def test_drafter_cache_matches_full_recompute(targets, layout):
    """Every incremental proposal (features fed once, block K/V cropped) equals a drafter pass
    over the whole context recomputed from scratch, in either block layout (eval.block_layout:
    the trained B-token block keeping its first n guesses, or an (n+1)-token block)."""
    target = targets["qwen3"]
    V = target.config.vocab_size
    prompt = random_prompt(target, 11)
    full = torch.cat([prompt, torch.tensor(hf_greedy(target, prompt, MAX_NEW))])
    oracle = OracleProposer(full, V, error_rate=0.3, seed=5)
    drafter = random_drafter(target, seed=3)
    seen = []

    class Recording(DrafterProposer):
        """Runs and records the drafter, but lets a noisy oracle decide the guesses, so the
        context grows by 1..b positions per cycle as it does with a good drafter."""

        def propose(self, tokens, n):
            seen.append((tokens.clone(), n, super().propose(tokens, n)))
            return oracle.propose(tokens, n)

    r = speculative_generate(target, prompt, proposer=Recording(drafter, target, layout), block_size=6,
                             max_new_tokens=MAX_NEW)
    assert r.token_ids == full[len(prompt):].tolist()
    assert len(set(r.cycle_lengths)) >= 3 and len(seen) == r.num_cycles
    with torch.no_grad():
        for tokens, n, logits in seen:
            p = len(tokens) - 1
            hs = target(tokens[None, :p], output_hidden_states=True).hidden_states
            ctx = context_features_from_hidden_states(hs, drafter.target_layer_ids)
            width = n + 1 if layout == "short" else drafter.block_size
            block = torch.full((1, width), MASK_ID)
            block[0, 0] = tokens[-1]
            h = drafter(target.get_input_embeddings()(block), ctx,
                        block_position_ids=torch.arange(p, p + width)[None],
                        context_position_ids=torch.arange(p)[None])
            torch.testing.assert_close(logits, target.lm_head(h[0, 1:n + 1]), atol=1e-4, rtol=1e-4)


def test_broken_target_crop_is_caught(targets, monkeypatch):
    """With the target-cache crop disabled, rejected guesses' K/V stay and every output drifts."""
    target = targets["llama"]
    V = target.config.vocab_size
    cases = []
    for seed in range(4):
        prompt = random_prompt(target, seed)
        ref = hf_greedy(target, prompt, MAX_NEW)
        cases.append((prompt, ref, OracleProposer(torch.cat([prompt, torch.tensor(ref)]), V, 0.5, seed)))
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: None)
    differs = 0
    for prompt, ref, oracle in cases:
        plain = speculative_generate(target, prompt, block_size=1, max_new_tokens=MAX_NEW)
        assert plain.token_ids == ref  # plain decoding never crops, so it is unaffected
        spec = speculative_generate(target, prompt, proposer=oracle, block_size=4, max_new_tokens=MAX_NEW)
        differs += spec.token_ids != ref
    assert differs == len(cases)


# ---------------------------------------------------------------- sampling is lossless

class SkewedProposer(Proposer):
    """Deliberately mismatched: block position k gets the target's logits after the target's own
    greedy look-ahead a_1..a_{k-1}, damped and offset by fixed noise, so q overlaps p only partly
    (and position 2 is conditioned on a_1, not on the sampled token). Memoised per prefix to
    keep the test fast."""

    def __init__(self, target, damp=0.5, noise=1.0):
        self.target, self.damp = target, damp
        self.noise = noise * torch.randn(target.config.vocab_size, generator=torch.Generator().manual_seed(0))
        self.memo = {}

    def next_logits(self, ids):
        key = tuple(ids.tolist())
        if key not in self.memo:
            self.memo[key] = self.target(ids[None]).logits[0, -1]
        return self.memo[key]

    def propose(self, tokens, n):
        rows, ids = [], tokens
        for _ in range(n):
            logits = self.next_logits(ids)
            rows.append(self.damp * logits + self.noise)
            ids = torch.cat([ids, logits.argmax()[None]])
        return torch.stack(rows)


def target_joint(target, prompt, sp, depth):
    """Exact probability of every first-`depth`-token continuation under plain sampling."""
    out = {(): 1.0}
    with torch.no_grad():
        for _ in range(depth):
            nxt = {}
            for prefix, pr in out.items():
                ids = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long)])
                probs = sp.probs(target(ids[None]).logits[0, -1])
                for t in torch.nonzero(probs).flatten().tolist():
                    nxt[prefix + (t,)] = pr * float(probs[t])
            out = nxt
    return out


def test_speculative_sampling_is_lossless(targets):
    """End to end: with a mismatched proposer and block size 3, the first three tokens (the
    prefill's, then block positions 1 and 2 of the first cycle) follow the target's exact
    sampling distribution (chi-square, fixed seed, 0.1% bound). The same samples are far from
    the proposer's own distribution, so the check has power."""
    target = targets["llama"]
    # The tiny target's logits are deliberately peaked; temperature 4 spreads its top 3.
    sp = SamplingParams(temperature=4.0, top_k=3)
    prompt = random_prompt(target, 2)
    proposer = SkewedProposer(target)
    g = torch.Generator().manual_seed(0)
    n, counts, results = 1000, {}, []
    for _ in range(n):
        r = speculative_generate(target, prompt, proposer=proposer, block_size=3, max_new_tokens=4,
                                 temperature=sp.temperature, top_k=sp.top_k, generator=g)
        key = tuple(r.token_ids[:3])
        counts[key] = counts.get(key, 0) + 1
        results.append(r)
    exact = target_joint(target, prompt, sp, 3)
    stat, df = chi2(counts, exact, n)
    assert stat < chi2_bound(df), (stat, df)
    rate = summarize(results)["acceptance_per_position"]
    assert 0.2 < rate[0] < 0.8 and 0.05 < rate[1] < 0.8  # both positions accept and reject
    # Power: the proposer alone (prefill token from p, then its own q_1, q_2) is far from the
    # target, so matching `exact` is not automatic, and the samples sit much closer to exact.
    naive = {}
    with torch.no_grad():
        for t1 in {k[0] for k in exact}:
            p1 = sum(pr for k, pr in exact.items() if k[0] == t1)
            q = sp.probs(proposer.propose(torch.cat([prompt, torch.tensor([t1])]), 2))
            for t2 in torch.nonzero(q[0]).flatten().tolist():
                for t3 in torch.nonzero(q[1]).flatten().tolist():
                    naive[(t1, t2, t3)] = p1 * float(q[0, t2] * q[1, t3])
    tv = lambda a, b: 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
    empirical = {k: c / n for k, c in counts.items()}
    assert tv(naive, exact) > 0.3 and tv(empirical, exact) < 0.1


def test_sampling_is_reproducible(targets):
    target = targets["qwen3"]
    prompt = random_prompt(target, 4)
    runs = [speculative_generate(target, prompt, proposer=SkewedProposer(target), block_size=4,
                                 max_new_tokens=20, temperature=1.0, top_p=0.9,
                                 generator=torch.Generator().manual_seed(s)).token_ids
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20
