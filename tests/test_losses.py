"""Losses: AUF support against a brute-force loop, gradients, decay weights, soft AUF, guards."""
import math

import pytest
import torch

from specauf.train.losses import (
    LossOptions, auf_support, blended_ce, compute_loss, decay_weights, default_gamma, diagnostics, distill_ce,
    per_position_ce, soft_auf_weights,
)

V = 7


def brute_support(logits, labels, validity):
    """docs/method.md section 3 word for word, one block at a time."""
    N, K, _ = logits.shape
    m = torch.zeros(N, K, dtype=torch.bool)
    for n in range(N):
        valid = [k for k in range(K) if validity[n, k]]
        if not valid:
            continue
        guess = logits[n].argmax(-1)
        fails = [k for k in valid if guess[k] != labels[n, k]]
        f = fails[0] if fails else valid[-1]
        for k in valid:
            m[n, k] = k <= f
    return m


def make_case(kind, K=6, gen=None):
    """One block whose greedy guesses are right/wrong in a controlled pattern."""
    labels = torch.randint(0, V, (K,), generator=gen)
    correct = torch.ones(K, dtype=torch.bool)
    validity = torch.ones(K, dtype=torch.bool)
    if kind == "first_wrong":
        correct[0] = False
    elif kind == "middle":
        correct[K // 2] = False
        correct[-1] = False
    elif kind == "invalid_tail":
        validity[K - 2:] = False
        correct[-1] = False  # a wrong guess in the invalid tail must not matter
    elif kind == "all_invalid":
        validity[:] = False
    elif kind == "random":
        correct = torch.rand(K, generator=gen) < 0.6
        validity[int(torch.randint(0, K + 1, (1,), generator=gen)):] = False
    guesses = torch.where(correct, labels, (labels + 1) % V)
    logits = torch.randn(K, V, generator=gen)
    logits[torch.arange(K), guesses] += 10.0
    return logits, labels, validity


@pytest.mark.parametrize("kind", ["all_correct", "first_wrong", "middle", "invalid_tail", "all_invalid"])
def test_auf_support_named_cases(kind):
    gen = torch.Generator().manual_seed(1)
    logits, labels, validity = (t[None] for t in make_case(kind, gen=gen))
    m = auf_support(logits, labels, validity)
    assert torch.equal(m, brute_support(logits, labels, validity))
    expected = {"all_correct": 6, "first_wrong": 1, "middle": 4, "invalid_tail": 4, "all_invalid": 0}
    assert int(m.sum()) == expected[kind]


def test_auf_support_matches_brute_force_on_many_random_batches():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        cases = [make_case("random", K=5, gen=gen) for _ in range(16)]
        logits, labels, validity = (torch.stack(t) for t in zip(*cases))
        assert torch.equal(auf_support(logits, labels, validity), brute_support(logits, labels, validity))
    # fully random logits (ties impossible in practice) and non-monotone validity too
    for _ in range(20):
        logits = torch.randn(8, 5, V, generator=gen)
        labels = torch.randint(0, V, (8, 5), generator=gen)
        validity = torch.rand(8, 5, generator=gen) < 0.8
        assert torch.equal(auf_support(logits, labels, validity), brute_support(logits, labels, validity))


def test_default_gamma_and_decay_weights():
    assert default_gamma(16) == 7 and default_gamma(10) == 5 and default_gamma(8) == 4
    assert default_gamma(4) == 2 and default_gamma(13) == pytest.approx(6.0)
    assert default_gamma(2) == 1.0  # floor
    w = decay_weights(5, 3.0)
    assert torch.allclose(w, torch.tensor([math.exp(-(k - 1) / 3.0) for k in range(1, 6)]))


def test_losses_match_their_formulas():
    gen = torch.Generator().manual_seed(3)
    cases = [make_case(k, gen=gen) for k in ["all_correct", "middle", "invalid_tail", "random", "first_wrong"]]
    logits, labels, validity = (torch.stack(t) for t in zip(*cases))
    ce = per_position_ce(logits, labels)
    v = validity.float()
    w = decay_weights(6, 2.5)[None]
    m = brute_support(logits, labels, validity).float()
    expect = {
        "full": (v * ce).sum() / v.sum(),
        "decay": (v * w * ce).sum() / (v * w).sum(),
        "auf": (m * ce).sum() / m.sum(),
        "auf_decay": (m * w * ce).sum() / (m * w).sum(),
    }
    for name, value in expect.items():
        loss, _ = compute_loss(name, logits, labels, validity, LossOptions(gamma=2.5))
        assert torch.allclose(loss, value), name
    assert not torch.allclose(expect["full"], expect["auf"])  # the cases really differ


def test_auf_gradient_is_zero_after_the_first_failure():
    gen = torch.Generator().manual_seed(5)
    logits, labels, validity = make_case("middle", K=6, gen=gen)  # failure at k index 3
    logits = logits[None].clone().requires_grad_(True)
    loss, _ = compute_loss("auf", logits, labels[None], validity[None])
    loss.backward()
    per_pos = logits.grad[0].abs().sum(-1)
    assert torch.all(per_pos[4:] == 0)
    assert per_pos[3] > 0 and torch.all(per_pos[:3] > 0)
    # the decay baseline, by contrast, trains the tail
    logits.grad = None
    compute_loss("decay", logits, labels[None], validity[None])[0].backward()
    assert torch.all(logits.grad[0, 4:].abs().sum(-1) > 0)


def test_distillation_blends_the_ce_and_leaves_the_weights_alone():
    gen = torch.Generator().manual_seed(11)
    cases = [make_case(k, gen=gen) for k in ["all_correct", "middle", "invalid_tail", "random", "first_wrong"]]
    logits, labels, validity = (torch.stack(t) for t in zip(*cases))
    N, K, _ = logits.shape
    # a sparse target distribution over 3 ids per position (ids may repeat the label)
    soft_ids = torch.randint(0, V, (N, K, 3), generator=gen)
    soft_probs = torch.softmax(torch.randn(N, K, 3, generator=gen), -1)
    logq = torch.log_softmax(logits, -1)
    by_hand = torch.zeros(N, K)
    for n in range(N):
        for k in range(K):
            by_hand[n, k] = -sum(float(soft_probs[n, k, j]) * float(logq[n, k, soft_ids[n, k, j]]) for j in range(3))
    assert torch.allclose(distill_ce(logits, soft_ids, soft_probs), by_hand, atol=1e-6)
    # a one-hot target distribution on the label is the plain CE, whatever the blend
    one_hot = (labels[..., None], torch.ones(N, K, 1))
    assert torch.allclose(blended_ce(logits, labels, one_hot, 0.7), per_position_ce(logits, labels), atol=1e-6)
    # weight 0 is the plain loss bit for bit; weight a blends the CE under unchanged AUF weights
    soft = (soft_ids, soft_probs)
    m = brute_support(logits, labels, validity).float()
    ce = 0.6 * per_position_ce(logits, labels) + 0.4 * by_hand
    for name in ["auf", "decay"]:
        assert torch.equal(compute_loss(name, logits, labels, validity, LossOptions(distill_weight=0.0), soft=soft)[0],
                           compute_loss(name, logits, labels, validity)[0])
    loss, _ = compute_loss("auf", logits, labels, validity, LossOptions(distill_weight=0.4), soft=soft)
    assert torch.allclose(loss, (m * ce).sum() / m.sum(), atol=1e-6)
    # AUF with distillation still sends no gradient past the first failure
    x = logits[1:2].clone().requires_grad_(True)  # "middle": failure at k index 3
    compute_loss("auf", x, labels[1:2], validity[1:2], LossOptions(distill_weight=0.5),
                 soft=(soft_ids[1:2], soft_probs[1:2]))[0].backward()
    per_pos = x.grad[0].abs().sum(-1)
    assert torch.all(per_pos[4:] == 0) and torch.all(per_pos[:4] > 0)
    with pytest.raises(ValueError, match="labels.top_k"):
        compute_loss("auf", logits, labels, validity, LossOptions(distill_weight=0.5))


def test_soft_auf_at_temperature_zero_equals_auf():
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        logits = torch.randn(12, 5, V, generator=gen)
        labels = torch.randint(0, V, (12, 5), generator=gen)
        validity = (torch.rand(12, 5, generator=gen) < 0.85).long().cummin(1).values.bool()
        assert torch.equal(soft_auf_weights(logits, labels, validity, 0.0),
                           auf_support(logits, labels, validity).float())
        a, _ = compute_loss("auf", logits, labels, validity)
        s, _ = compute_loss("soft_auf", logits, labels, validity, LossOptions(temperature=0.0))
        assert torch.equal(a, s)


def test_soft_auf_weights_at_positive_temperature():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    labels = torch.tensor([[0, 1, 0]])
    w = soft_auf_weights(logits, labels, torch.ones(1, 3, dtype=torch.bool), temperature=1.0)
    assert torch.allclose(w, torch.tensor([[1.0, 0.5, 0.375]]))


@pytest.mark.parametrize("name", ["full", "decay", "auf", "auf_decay", "soft_auf"])
def test_all_invalid_batch_gives_zero_loss_with_grad_path(name):
    logits = torch.randn(3, 4, V, requires_grad=True)
    labels = torch.zeros(3, 4, dtype=torch.long)
    loss, diag = compute_loss(name, logits, labels, torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)
    assert all(torch.isfinite(t).all() for t in diag.values())


def test_diagnostics_values():
    # block 0: correct, correct, wrong, correct ; block 1: correct, then invalid ; block 2: all invalid
    labels = torch.tensor([[1, 2, 3, 4], [1, 0, 0, 0], [0, 0, 0, 0]])
    guesses = torch.tensor([[1, 2, 0, 4], [1, 5, 5, 5], [0, 0, 0, 0]])
    validity = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    logits = torch.nn.functional.one_hot(guesses, V).float() * 5
    d = diagnostics(logits, labels, validity)
    assert d["token_accuracy"].item() == pytest.approx(4 / 5)
    assert d["auf_support_len"].item() == pytest.approx((3 + 1) / 2)
    assert torch.equal(d["acceptance_lengths"], torch.tensor([3.0, 2.0, 1.0]))
    assert d["acceptance_length"].item() == pytest.approx(2.5)
    assert torch.allclose(d["position_accuracy"], torch.tensor([1.0, 1.0, 0.0, 1.0]))


def test_unknown_loss_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss 'aufx'.*full"):
        compute_loss("aufx", torch.randn(1, 2, V), torch.zeros(1, 2, dtype=torch.long),
                     torch.ones(1, 2, dtype=torch.bool))


def brute_dpace(logits, labels, validity, alpha):
    """D-PACE weights by the definition, one block and position at a time: w_k = sum over valid
    t >= k of prod_{j <= t} q~_j, q~_j = (1 - alpha) p_j(label_j) + alpha if valid else 1."""
    N, K, _ = logits.shape
    p = torch.softmax(logits.double(), -1)
    w = torch.zeros(N, K, dtype=torch.float64)
    for n in range(N):
        qt = [(1 - alpha) * float(p[n, j, labels[n, j]]) + alpha if validity[n, j] else 1.0 for j in range(K)]
        for k in range(K):
            if not validity[n, k]:
                continue
            w[n, k] = sum(math.prod(qt[: t + 1]) for t in range(k, K) if validity[n, t])
    return w


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_dpace_weights_and_losses_match_the_definition(alpha):
    from specauf.train.losses import dpace_weights

    gen = torch.Generator().manual_seed(17)
    cases = [make_case(k, gen=gen) for k in ["all_correct", "middle", "invalid_tail", "random", "first_wrong"]]
    logits, labels, validity = (torch.stack(t) for t in zip(*cases))
    w = brute_dpace(logits, labels, validity, alpha)
    ce = per_position_ce(logits, labels)
    assert torch.allclose(dpace_weights(ce, validity, alpha).double(), w, atol=1e-5)
    if alpha == 1.0:  # every q~ = 1: w_k counts the valid positions from k on
        assert torch.equal(w, torch.flip(torch.cumsum(torch.flip(validity.double(), [1]), 1), [1]) * validity)
    m = brute_support(logits, labels, validity).double()
    for name, weights in [("dpace", w), ("auf_dpace", w * m)]:
        loss, _ = compute_loss(name, logits, labels, validity, LossOptions(dpace_alpha=alpha))
        expect = (weights * ce.double()).sum() / weights.sum()
        assert torch.allclose(loss.double(), expect, atol=1e-6), name


def test_dpace_weights_are_detached_and_auf_dpace_trains_no_tail():
    gen = torch.Generator().manual_seed(19)
    logits, labels, validity = make_case("middle", K=6, gen=gen)  # first failure at index 3
    logits = logits[None].clone().requires_grad_(True)
    loss, _ = compute_loss("dpace", logits, labels[None], validity[None])
    # detached weights: the gradient is that of sum(w * CE) / sum(w) with w held constant
    from specauf.train.losses import dpace_weights

    ce = per_position_ce(logits, labels[None])
    w = dpace_weights(ce, validity[None])
    (g_expect,) = torch.autograd.grad((w * ce).sum() / w.sum(), logits, retain_graph=True)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(g, g_expect, atol=1e-7)
    assert torch.all(g[0, 4:].abs().sum(-1) > 0)  # plain D-PACE trains every valid position
    loss, _ = compute_loss("auf_dpace", logits, labels[None], validity[None])
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.all(g[0, 4:] == 0) and torch.all(g[0, :4].abs().sum(-1) > 0)


def test_tv_acceptance_is_speculative_samplings_acceptance_probability():
    """Brute force: a draft token x ~ q_T is accepted with probability min(1, p_T(x) / q_T(x));
    summed over x that is what tv_acceptance computes from the target's distribution."""
    from specauf.train.losses import tv_acceptance

    g = torch.Generator().manual_seed(0)
    V, T = 11, 0.7
    logits = torch.randn(3, 4, V, generator=g) * 2
    p = torch.softmax(torch.randn(3, 4, V, generator=g) * 2, dim=-1)
    q = torch.softmax(logits / T, dim=-1)
    brute = torch.zeros(3, 4)
    for x in range(V):
        brute += q[..., x] * torch.clamp(p[..., x] / q[..., x], max=1.0)
    ids = torch.argsort(p, dim=-1, descending=True)  # the whole vocabulary as the "top-k", any order
    got = tv_acceptance(logits, T, ids, p.gather(-1, ids))
    assert torch.allclose(got, brute, atol=1e-6)
    assert torch.allclose(got, 1 - 0.5 * (p - q).abs().sum(-1), atol=1e-6)  # = 1 - TV(p, q)
    # a stored top-k: mass outside it counts as rejected, a lower bound of the brute force
    top = torch.topk(p, 3, dim=-1)
    lower = tv_acceptance(logits, T, top.indices, top.values)
    assert torch.all(lower <= brute + 1e-6) and torch.all(lower < brute)
    # a one-hot verifier: tv is q_T(label), soft_auf's `label` scoring, exactly
    label = p.argmax(-1)
    one_hot = tv_acceptance(logits, T, label[..., None], torch.ones(3, 4, 1))
    assert torch.allclose(one_hot, q.gather(-1, label[..., None]).squeeze(-1), atol=1e-7)


def test_soft_auf_with_the_targets_distribution_multiplies_tv_acceptances():
    from specauf.train.losses import soft_auf_weights, tv_acceptance

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g)
    p = torch.softmax(torch.randn(2, 4, 9, generator=g), dim=-1)
    ids = torch.arange(9).expand(2, 4, 9)
    labels = p.argmax(-1)
    validity = torch.tensor([[True, True, True, True], [True, True, False, False]])
    w = soft_auf_weights(logits, labels, validity, 1.0, (ids, p))
    a = tv_acceptance(logits, 1.0, ids, p)
    assert torch.allclose(w[0], torch.stack([torch.tensor(1.0), a[0, 0], a[0, 0] * a[0, 1], a[0, :3].prod()]))
    assert torch.allclose(w[1], torch.tensor([1.0, float(a[1, 0]), 0.0, 0.0]))
    loss, _ = compute_loss("soft_auf", logits, labels, validity, LossOptions(temperature=1.0, tv_acceptance=True), target_topk=(ids, p))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), reduction="none").view(2, 4)
    assert torch.allclose(loss, (w * ce).sum() / w.sum())


def test_block_normalization_weighs_every_block_the_same():
    from specauf.train.losses import weighted_mean

    ce = torch.tensor([[1.0, 3.0, 7.0], [5.0, 9.0, 9.0], [4.0, 4.0, 4.0]], requires_grad=True)
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # AUF supports 2, 1 and none
    assert weighted_mean(ce, w, "batch").item() == pytest.approx((1 + 3 + 5) / 3)  # blocks weigh by support
    block = weighted_mean(ce, w, "block")
    assert block.item() == pytest.approx((2.0 + 5.0) / 2)  # each block with support counts once
    block.backward()
    assert torch.allclose(ce.grad, torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert weighted_mean(ce, torch.zeros(3, 3), "block").item() == 0.0
    with pytest.raises(ValueError, match="unknown loss normalization 'sequence'"):
        weighted_mean(ce, w, "sequence")


def test_one_list_of_loss_variants():
    """params validate against specauf.config.LOSS_VARIANTS; every loss there has its weights here
    and every curriculum switches between two of them (the list was kept twice, untied)."""
    from specauf.config import CURRICULA, LOSS_VARIANTS, LOSSES
    from specauf.train.losses import WEIGHTS

    assert tuple(WEIGHTS) == LOSSES and LOSS_VARIANTS == (*LOSSES, *CURRICULA)
    assert all(set(pair) <= set(LOSSES) for pair in CURRICULA.values())
