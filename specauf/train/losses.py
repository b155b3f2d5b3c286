"""Block losses (docs/method.md): full, decay, auf, auf_decay, dpace, auf_dpace, and soft_auf (an extension).

Every loss takes logits (N,K,V) for block positions k = 1..K (K = B-1), labels (N,K) and a
monotone validity mask (N,K), and is a weighted mean of per-position cross-entropy:
loss = sum(w * CE) / sum(w) over the micro batch (or per block, then averaged:
`train.loss_normalization`). They differ only in w. AUF's point: a block's guesses after the
first failure are never used at verification, so training on them spends capacity on tokens
that cannot raise the acceptance length. All weights are detached; gradient flows through CE.

Distillation (an EXTENSION, `train.distill_weight`) changes only the CE, never the weights: it
blends the one-hot CE with the CE against the target's stored top-k distribution, a denser
signal per position for a drafter that has little data. The AUF support still comes from the
one-hot labels, since greedy verification accepts exactly those.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from specauf.config import LOSSES
from specauf.errors import UserError

# (block size, gamma) pairs from the DFlash recipe; other sizes interpolate linearly between
# them and extrapolate with the slope of the nearest segment, never below 1.0.
_GAMMA_POINTS = [(8, 4.0), (10, 5.0), (16, 7.0)]
# D-PACE's confidence smoothing: speculators' default (`dpace_alpha`, 0.5), read in its losses module.
DPACE_ALPHA = 0.5


def default_gamma(block_size: int) -> float:
    """Decay constant: 7 for B=16, 5 for B=10, 4 for B=8; linear in between and beyond
    (slope 1/2 below 10, 1/3 above 10), floored at 1.0. E.g. B=4 -> 2.0, B=32 -> 12.33."""
    pts = _GAMMA_POINTS
    if block_size <= pts[1][0]:
        (b0, g0), (b1, g1) = pts[0], pts[1]
    else:
        (b0, g0), (b1, g1) = pts[1], pts[2]
    gamma = g0 + (block_size - b0) * (g1 - g0) / (b1 - b0)
    return max(1.0, gamma)


def decay_weights(K: int, gamma: float, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 1..K: early positions matter most for acceptance."""
    k = torch.arange(1, K + 1, device=device, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


def per_position_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,K) cross-entropy in float32 (labels at invalid positions only need to be in range)."""
    N, K, V = logits.shape
    return F.cross_entropy(logits.float().reshape(N * K, V), labels.reshape(N * K),
                           reduction="none").view(N, K)


def distill_ce(logits: torch.Tensor, soft_ids: torch.Tensor, soft_probs: torch.Tensor) -> torch.Tensor:
    """(N,K) cross-entropy against a sparse target distribution: -sum_j p_j log q(id_j).

    soft_ids/soft_probs (N,K,k): ids in the logits' vocabulary, probabilities summing to 1 (or
    to 0 where nothing of the target's top-k is in the vocabulary: that position adds 0).
    """
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, soft_ids)
    return -(soft_probs.to(logq.dtype) * logq).sum(-1)


def blended_ce(logits: torch.Tensor, labels: torch.Tensor, soft: tuple[torch.Tensor, torch.Tensor] | None = None,
               distill_weight: float = 0.0, ce: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - a) * one-hot CE + a * CE against the target's top-k (a = distill_weight); `ce` is
    the one-hot CE when the caller has it already."""
    ce = per_position_ce(logits, labels) if ce is None else ce
    if not distill_weight:
        return ce
    if soft is None:
        raise UserError("distill_weight > 0 needs the target's top-k distribution (labels.top_k > 0)")
    return (1.0 - distill_weight) * ce + distill_weight * distill_ce(logits, *soft)


NORMALIZATIONS = ("batch", "block")


def weighted_mean(ce: torch.Tensor, weights: torch.Tensor, normalization: str = "batch") -> torch.Tensor:
    """`batch`: sum(w*CE)/sum(w) over the micro batch; `block`: the mean over blocks with any
    weight of each block's sum_k(w*CE)/sum_k(w). An all-zero weight batch gives 0 with the graph
    intact (no NaN)."""
    weights = weights.detach().to(ce.dtype)
    if normalization == "batch":
        return (weights * ce).sum() / weights.sum().clamp_min(1e-6)
    if normalization != "block":
        raise ValueError(f"unknown loss normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    per_block_w = weights.sum(1)
    per_block = (weights * ce).sum(1) / per_block_w.clamp_min(1e-6)
    has = (per_block_w > 0).to(ce.dtype)
    return (per_block * has).sum() / has.sum().clamp_min(1.0)


@torch.no_grad()
def auf_support(logits: torch.Tensor, labels: torch.Tensor, validity: torch.Tensor) -> torch.Tensor:
    """Accept-Until-Fail support m (N,K) bool: the accepted prefix plus the first failure.

    f = smallest valid k where the greedy guess misses its label (or the last valid k if none);
    m_k = v_k * [k <= f], i.e. valid and no valid failure strictly before k.
    """
    wrong = (logits.argmax(-1) != labels) & validity
    failures_before = wrong.long().cumsum(1) - wrong.long()
    return validity & (failures_before == 0)


@torch.no_grad()
def tv_acceptance(logits: torch.Tensor, temperature: float, target_ids: torch.Tensor,
                  target_probs: torch.Tensor) -> torch.Tensor:
    """(N,K) speculative sampling's acceptance probability of a token drawn from the drafter at
    temperature T against the target's p_T: sum_x min(p_T(x), q_T(x)) = 1 - TV(p_T, q_T).

    p_T is known on its stored top-k only (ids in the logits' vocabulary, probabilities; 0 where a
    top-k id is outside a draft vocabulary); the mass outside it counts as rejected, so this is a
    lower bound, exact when the top-k holds all of p_T's support."""
    q = torch.softmax(logits.float() / temperature, dim=-1).gather(-1, target_ids)
    return torch.minimum(q, target_probs.to(q.dtype)).sum(-1).clamp(0.0, 1.0)


@torch.no_grad()
def soft_auf_weights(logits: torch.Tensor, labels: torch.Tensor, validity: torch.Tensor,
                     temperature: float = 0.0, target_topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Soft support (N,K) float: v_k * prod_{j<k} p_accept_j.

    p_accept_j = q_T(label_j): with a one-hot verifier (greedy target), a draft token sampled from
    the drafter at temperature T is accepted with probability q_T(label). With `target_topk` (the
    target's stored distribution at the same T), p_accept_j = 1 - TV(p_T, q_T) (`tv_acceptance`),
    what speculative sampling accepts. At T = 0 the greedy guess is accepted iff it equals the
    label, so the weights equal `auf_support` exactly. Invalid positions count as accepted in the
    product, matching AUF's "first VALID failure".
    """
    if temperature > 0 and target_topk is not None:
        p = tv_acceptance(logits, temperature, *target_topk)
    elif temperature > 0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        p = probs.gather(-1, labels[..., None]).squeeze(-1)
    else:
        p = (logits.argmax(-1) == labels).float()
    p = torch.where(validity, p, torch.ones_like(p))
    prefix = torch.cumprod(torch.cat([torch.ones_like(p[:, :1]), p[:, :-1]], dim=1), dim=1)
    return prefix * validity.float()


@torch.no_grad()
def dpace_weights(ce: torch.Tensor, validity: torch.Tensor, alpha: float = DPACE_ALPHA) -> torch.Tensor:
    """D-PACE (arXiv 2605.18810) weights (N,K), detached: with the drafter's confidence in the label
    q_k = exp(-CE_k), smoothed q~_k = (1 - alpha) q_k + alpha on valid positions (1 elsewhere), and
    survival S_t = prod_{j<=t} q~_j, w_k = sum_{t>=k} v_t S_t: the derivative of the expected
    accepted length sum_t S_t with respect to log q_k. Early positions, on which every later
    acceptance depends, weigh most; a confidently wrong prefix shrinks the weight of what follows."""
    v = validity.float()
    q = torch.exp(-ce.detach().float())
    smooth = torch.where(validity, (1.0 - alpha) * q + alpha, torch.ones_like(q))
    survival = torch.cumprod(smooth, dim=1)
    return torch.flip(torch.cumsum(torch.flip(survival * v, dims=[1]), dim=1), dims=[1]) * v


# One weight function per loss variant: (logits, labels, validity, one-hot CE, LossOptions, the
# batch's target top-k or None) -> (N,K) detached weights. Every loss is sum(w * CE) / sum(w) over the micro batch (weighted_mean):
# D-PACE included, so that one train.lr means the same step size under every variant
# (speculators divides D-PACE's sum by the count of valid positions instead, which scales its
# loss, and so its effective learning rate, by the mean weight).
WEIGHTS = {
    "full": lambda lg, lb, v, ce, o, topk: v.float(),
    "decay": lambda lg, lb, v, ce, o, topk: decay_weights(lb.shape[1], o.gamma, lg.device)[None, :] * v.float(),
    "auf": lambda lg, lb, v, ce, o, topk: auf_support(lg, lb, v).float(),
    # the paper finds the decay "inert" on top of AUF
    "auf_decay": lambda lg, lb, v, ce, o, topk: auf_support(lg, lb, v).float() * decay_weights(lb.shape[1], o.gamma, lg.device)[None, :],
    "dpace": lambda lg, lb, v, ce, o, topk: dpace_weights(ce, v, o.dpace_alpha),
    "auf_dpace": lambda lg, lb, v, ce, o, topk: dpace_weights(ce, v, o.dpace_alpha) * auf_support(lg, lb, v).float(),
    # EXTENSION beyond the AUF paper (soft_auf_weights); equals auf at temperature 0
    "soft_auf": lambda lg, lb, v, ce, o, topk: soft_auf_weights(lg, lb, v, o.temperature, topk if o.tv_acceptance else None),
}
LOSS_NAMES = tuple(WEIGHTS)
if LOSS_NAMES != LOSSES:  # the list params validate against (specauf/config.py) and these weights are one
    raise ImportError(f"specauf.train.losses.WEIGHTS {LOSS_NAMES} != specauf.config.LOSSES {LOSSES}")


@torch.no_grad()
def diagnostics(logits: torch.Tensor, labels: torch.Tensor, validity: torch.Tensor) -> dict:
    """The paper's two findings, measured on the full valid mask (all detached tensors).

    token_accuracy: argmax == label over valid positions. auf_support_len: mean sum(m) per block
    with any valid position. acceptance_length: teacher-forced 1 + all-correct valid prefix
    length, mean over those blocks (an offline tau estimate); acceptance_lengths is per block.
    position_accuracy (K,): accuracy at each k, 0 where no block is valid there
    (position_count says how many were).
    """
    v = validity
    correct = (logits.argmax(-1) == labels) & v
    vf = v.float()
    has_valid = v.any(1)
    n_blocks = has_valid.float().sum().clamp_min(1.0)
    support = auf_support(logits, labels, v).float().sum(1)
    accept = 1.0 + correct.long().cumprod(1).sum(1).float()
    count = vf.sum(0)
    return {
        "token_accuracy": correct.float().sum() / vf.sum().clamp_min(1.0),
        "auf_support_len": (support * has_valid).sum() / n_blocks,
        "acceptance_length": (accept * has_valid).sum() / n_blocks,
        "acceptance_lengths": accept,
        "position_accuracy": correct.float().sum(0) / count.clamp_min(1.0),
        "position_count": count,
        "num_valid": vf.sum(),
    }


@dataclass(frozen=True)
class LossOptions:
    """What a loss variant reads besides the batch, built once per run (from_params)."""
    gamma: float | None = None      # decay constant of decay/auf_decay; None: default_gamma(B)
    dpace_alpha: float = DPACE_ALPHA
    temperature: float = 0.0        # soft_auf's
    tv_acceptance: bool = False     # soft_auf scores acceptance against the target's top-k (tv_acceptance)
    distill_weight: float = 0.0     # CE blended with the target's top-k distribution (blended_ce)
    normalization: str = "batch"    # weighted_mean's

    @classmethod
    def from_params(cls, p) -> "LossOptions":
        """From TrainParams (train.gamma unset: the paper's default for train.block_size)."""
        return cls(gamma=p.gamma or default_gamma(p.block_size), dpace_alpha=p.dpace_alpha,
                   temperature=p.soft_auf_temperature, tv_acceptance=p.soft_auf_acceptance == "tv",
                   distill_weight=p.distill_weight, normalization=p.loss_normalization)


def compute_loss(name: str, logits: torch.Tensor, labels: torch.Tensor, validity: torch.Tensor,
                 options: LossOptions = LossOptions(), soft: tuple[torch.Tensor, torch.Tensor] | None = None,
                 target_topk: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The variant's weights (WEIGHTS) applied to the CE, normalised per `options.normalization`
    (`weighted_mean`); returns (loss, diagnostics).

    "auf+decay" is accepted for "auf_decay". The batch's `soft` (the target's top-k renormalised
    in the draft vocabulary) blends into the CE by options.distill_weight (`blended_ce`), which
    changes the CE only: every other weight reads the one-hot CE of the acceptance label;
    `target_topk` (the top-k as the target gave it) is what soft_auf scores acceptance against when
    options.tv_acceptance (`tv_acceptance`), else q_T(label).
    """
    name = "auf_decay" if name == "auf+decay" else name
    if name not in WEIGHTS:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
    validity = validity.bool()
    K = labels.shape[1]
    gamma = default_gamma(K + 1) if options.gamma is None else options.gamma
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    if gamma != options.gamma:
        options = replace(options, gamma=gamma)
    one_hot = per_position_ce(logits, labels)
    ce = blended_ce(logits, labels, soft, options.distill_weight, ce=one_hot)
    w = WEIGHTS[name](logits, labels, validity, one_hot, options, target_topk)
    return weighted_mean(ce, w, options.normalization), diagnostics(logits, labels, validity)


# Losses whose weights come from an AUF support (the Domino head asks where that support is taken).
AUF_FAMILY = ("auf", "auf_decay", "auf_dpace", "soft_auf")


def base_weight(step: int, steps: int) -> float:
    """Domino's lambda at `step` (0-based): 1 -> 0 linearly over training (SpecForge's
    `linear_lambda_base`): the backbone learns alone first, the head takes over."""
    return 1.0 - step / steps


def domino_loss(name: str, base: torch.Tensor, final: torch.Tensor, labels: torch.Tensor, validity: torch.Tensor,
                options: LossOptions, lam: float, auf_support: str = "base",
                soft: tuple[torch.Tensor, torch.Tensor] | None = None,
                target_topk: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(1 - lam) * loss(final logits) + lam * loss(base logits), each branch a weighted mean
    normalised by its own weights; diagnostics of the final logits (what drafting uses).

    The variant's weights apply on each branch from that branch's logits, except for the AUF
    family, whose support comes from `auf_support`: `base` = the base branch's own, with the final
    branch under the full decayed mask (speculators' "B-AUF+D"); `final` = the final logits'
    weights on both branches."""
    name = "auf_decay" if name == "auf+decay" else name
    if name not in WEIGHTS:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
    validity = validity.bool()
    if options.gamma is None:
        options = replace(options, gamma=default_gamma(labels.shape[1] + 1))
    ce, one_hot, weights = {}, {}, {}
    for branch, logits in (("base", base), ("final", final)):
        one_hot[branch] = per_position_ce(logits, labels)
        ce[branch] = blended_ce(logits, labels, soft, options.distill_weight, ce=one_hot[branch])
        own = "decay" if name in AUF_FAMILY and auf_support == "base" and branch == "final" else name
        weights[branch] = WEIGHTS[own](logits, labels, validity, one_hot[branch], options, target_topk)
    if name in AUF_FAMILY and auf_support == "final":
        weights["base"] = weights["final"]
    loss = ((1.0 - lam) * weighted_mean(ce["final"], weights["final"], options.normalization)
            + lam * weighted_mean(ce["base"], weights["base"], options.normalization))
    return loss, diagnostics(final, labels, validity)
