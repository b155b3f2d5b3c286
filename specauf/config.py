"""Typed, validated params: one class per `params.yaml` section (the data stages' sections live in
specauf/config_data.py), the root `Params` with its cross-section checks, and what each stage
derives from them.

Every field carries a docstring (it becomes `docs/params.md`); unknown keys, wrong types and
out-of-range values are rejected before any compute with one line naming the key path.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from specauf.config_data import (BaseParams, LabelsParams, LaunchParams, ParamsError, PromptSource,  # noqa: F401
                                 PromptsParams, RandomTargetParams, RolloutsParams, SamplingTemperature, Section,
                                 Seed, TargetParams)

# The one list of loss variants: each loss has its weight function in specauf/train/losses.py
# (WEIGHTS, checked against this list when that module loads), each curriculum the losses it
# switches between. A new variant: its name here, its weights there, a line in docs/method.md.
LOSSES = ("full", "decay", "auf", "auf_decay", "dpace", "auf_dpace", "soft_auf")
CURRICULA = {"decay_then_auf": ("decay", "auf")}
LOSS_VARIANTS = (*LOSSES, *CURRICULA)


class DominoParams(Section):
    """The Domino backbone (arXiv 2605.29707): the DFlash drafter unchanged plus a small causal
    head that corrects each guess after the first with what the block's earlier tokens were."""
    gru_dim: int = Field(0, ge=0)
    """Hidden size G of `prefix_gru`, the GRU over the target embeddings of the block's earlier
    tokens. 0 = the target's hidden size / 4, as the reference (1024 at 4096)."""
    emb_dim: int = Field(0, ge=0)
    """Width E of `embed_proj` (Linear(hidden + G -> E), SiLU, Linear(E -> vocabulary)). 0 = the
    target's hidden size / 16, as the reference (256 at 4096)."""
    auf_support: Literal["base", "final"] = "base"
    """Where AUF-family losses take their support (the paper does not say): `base` = from the
    backbone's base logits, on the base branch only, the final branch with the full decayed mask
    (the one public implementation, speculators 23b23b8e, "B-AUF+D"); `final` = from the final
    logits, on both branches. decay and dpace use their own weights on each branch."""


class TrainParams(Section):
    variants: list[str] = ["decay", "dpace", "auf"]
    """Loss variants to train, each its own drafter on identical data, seed and steps: full, decay,
    auf, auf_decay, dpace and auf_dpace (D-PACE, the DFlash default of vLLM speculators), soft_auf
    (extension beyond the paper), decay_then_auf (labelled curriculum)."""
    seeds: list[Seed] = [0]
    """Training seeds: every variant is trained (and evaluated) once per seed, on the same data
    (the seed sets the drafter's init, batch order, anchors and held-out split). With more than
    one, the report's intervals resample seeds as well as prompts (docs/method.md, section 4)."""
    block_size: int = Field(8, ge=2, le=64)
    """Block length B: anchor + B-1 masked guesses (paper: 16)."""
    gamma: float | None = Field(None, gt=0.0)
    """Decay constant of `decay`/`auf_decay` weights exp(-(k-1)/gamma); None = paper default for B."""
    label_source: Literal["response", "acceptance"] = "acceptance"
    """Train against the response tokens or the target's acceptance labels (its argmax)."""
    dpace_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """D-PACE confidence smoothing alpha of `dpace`/`auf_dpace` (q~ = (1 - alpha) q + alpha; 0.5 is
    speculators' default; 1 = every valid position's weight counts the valid positions after it)."""
    soft_auf_temperature: SamplingTemperature = 1.0
    """Temperature of soft_auf's acceptance probabilities (0 = hard AUF support)."""
    soft_auf_acceptance: Literal["label", "tv"] = "label"
    """How soft_auf scores acceptance at temperature > 0: `label` = q_T(label), exact only for a
    one-hot (greedy) verifier; `tv` = sum_x min(p_T(x), q_T(x)) = 1 - TV(p_T, q_T), speculative
    sampling's acceptance probability, with p_T the target's stored top-k (needs labels.top_k > 0
    and labels.verify_temperature = soft_auf_temperature; mass outside the top-k counts as rejected)."""
    loss_normalization: Literal["batch", "block"] = "batch"
    """How a micro batch's weighted CE is averaged: `batch` = sum(w CE) / sum(w) over all blocks
    (under AUF a block weighs in proportion to its support: one failing at k=1 counts 1/7 of a fully
    accepted one at B=8); `block` = the mean over blocks of each block's sum(w CE) / sum(w), every
    block with any weight counting the same."""
    distill_weight: float = Field(0.0, ge=0.0, le=1.0)
    """EXTENSION beyond the paper: weight of the CE against the target's top-k distribution (needs labels.top_k > 0), blended with the one-hot CE under every loss variant (0 = off)."""
    domino: DominoParams | None = None
    """Train the Domino backbone (DFlash + a causal GRU correction head; docs/method.md, 2b) with
    these settings (`domino: {}` for the defaults); null = plain DFlash, which leaves a run's
    provenance hash as it was before this key existed (OPT_IN). Loss: (1 - lambda) CE_final + lambda CE_base, lambda falling linearly from
    1 to 0 over train.steps (each branch normalised by its own weight sum)."""
    curriculum_switch: float = Field(0.3, ge=0.0, le=1.0)
    """decay_then_auf: fraction of steps trained with `decay` before switching to `auf`."""
    num_layers: int = Field(1, ge=1)
    """Drafter decoder layers."""
    init_from_target: bool = False
    """Initialise drafter layers from the target's top decoder layers instead of random init."""
    draft_vocab_size: int = Field(8192, ge=0)
    """Score only the most frequent N response tokens (0 = full vocabulary): a smaller lm_head
    makes CPU steps much cheaper; a label outside it ends its block (it can never be guessed)."""
    anchors_per_token: float = Field(0.0, ge=0.0, le=1.0)
    """Anchors per response token (speculators' per-document anchors, PR #1071): each training
    sequence gets max(1, round(anchors_per_token x its response tokens)) anchors instead of a fixed
    `anchors_per_seq`, so long answers are covered as densely as short ones. 0 = off. The held-out
    blocks stay 2 x anchors_per_seq per sequence, comparable across settings."""
    anchors_per_seq: int = Field(32, ge=1)
    """Anchors (blocks) sampled per sequence per step, resampled every step."""
    max_seq_len: int = Field(512, ge=8)
    """Sequences are cut to this many tokens."""
    micro_batch_size: int = Field(2, ge=1)
    """Sequences per micro batch per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro batches per optimizer step."""
    processes: int = Field(1, ge=1)
    """Data-parallel DeepSpeed ranks per machine (GPUs, or CPU processes), started by
    launch.launcher (and launch.hostfile for several machines) when > 1; the effective batch is
    micro_batch_size x grad_accum x ranks, so unlike the data stages the result depends on it."""
    torch_threads: int | None = Field(2, ge=1)
    """torch intra-op threads of each training rank (null: base.torch_threads). Training times
    nothing, and with one rank on a 2-core machine the second core would idle: 2 threads run more
    steps per second than 1 (docs/benchmarks.md, "Training"). The drafter's bytes depend on it."""
    steps: int = Field(1600, ge=1)
    """Optimizer steps."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """`adamw`, or `muon`: DeepSpeed's Muon (Newton-Schulz-orthogonalised momentum) on the drafter's
    2-D weights at `muon_lr` and AdamW on the rest (norms) at `lr`, vLLM speculators' default for
    drafters; fp32 masters, checkpoints and exact resume as with AdamW (the logged `lr` is then Muon's)."""
    muon_lr: float = Field(1e-2, gt=0.0)
    """Peak Muon learning rate (optimizer `muon`; about 10x `lr`, as speculators sets it). The
    warmup-cosine schedule scales it like `lr`."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak AdamW learning rate (with optimizer `muon`: of the parameters Muon does not take)."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = Field(30, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient norm clip (0 = off)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision. bf16 keeps fp32 master weights (the saved drafter is fp32) and runs
    the drafter's matmuls in bf16: faster than fp32 on a CPU with native bf16 (AVX512-BF16/AMX),
    many times slower on one without (AVX2); docs/benchmarks.md has the measurements
    (`benchmarks/train.py`). auto = bf16 on a GPU that supports it and on such a CPU, else fp32;
    the drafter's manifest records it."""
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Rollouts held out from training to measure the offline tau estimate."""
    eval_every: int = Field(400, ge=1)
    """Steps between held-out evaluations."""
    checkpoint_every: int = Field(200, ge=1)
    """Steps between checkpoints (resume after a kill restarts from the last one)."""
    log_every: int = Field(10, ge=1)
    """Steps between logged training metrics."""

    @model_validator(mode="after")
    def _variants(self):
        if not self.variants:
            raise ValueError("variants must list at least one loss variant")
        for v in self.variants:
            if v not in LOSS_VARIANTS:
                raise ValueError(f"unknown loss variant {v!r}; allowed: {', '.join(LOSS_VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must not repeat")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("list at least one training seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must not repeat, got {seeds}")
        return seeds


class EvalParams(Section):
    sets: list[str] | None = None
    """Evaluation sets to decode (None = every set the prompts stage built)."""
    prompts_per_set: int = Field(2, ge=1)
    """Prompts decoded per evaluation set (the first ones by id)."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per timed prompt (decoded prompts; at most replay_max_new_tokens)."""
    replay_max_new_tokens: int = Field(128, ge=1)
    """Length of the target's greedy answer to EVERY eval prompt (stages `eval_rollouts`,
    `eval_labels`) over which each drafter's tau is replayed without decoding (docs/method.md, section 5)."""
    block_layout: Literal["trained", "short"] = "trained"
    """How a cycle with n < B-1 guesses runs the drafter: `trained` = the B-token block training
    shows, keeping its first n guesses; `short` = an (n+1)-token block. Decode and replay use the
    same layout; docs/benchmarks.md has the measurement that chose the default."""
    block_sizes: list[int] = [2, 4, 8]
    """Inference block sizes to measure (each <= the trained block size); 1 = plain decoding."""
    temperature: SamplingTemperature = 0.0
    """0 = greedy verification (exactness gate on); > 0 = lossless speculative sampling."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass for sampling (temperature > 0)."""
    top_k: int = Field(0, ge=0)
    """Top-k for sampling (0 = off; temperature > 0)."""
    repeats: int = Field(1, ge=1)
    """Timed repeats per prompt; medians are reported."""
    bootstrap_resamples: int = Field(2000, ge=100, le=1_000_000)
    """Resamples of every bootstrap interval (prompts, and seeds when there are several); the
    percentile interval's Monte Carlo error at the default is in docs/method.md, section 4.
    A count whose draws would not fit in half the free memory is refused when the intervals are computed."""
    exactness_gate: bool = True
    """At temperature 0, fail the stage if speculative output differs from plain greedy decoding, or
    if replayed tau differs from decoded tau on the decoded prompts (both hold exactly in fp32 on a
    CPU; on a GPU, batched kernels sum in another order and can flip a near-tie: off there, the
    differences are still recorded)."""
    prompt_lookup_num_tokens: int = Field(10, ge=0)
    """Peer: transformers prompt-lookup decoding with this many tokens (0 = skip)."""
    assistant_model: str | None = None
    """Peer: a local HF folder of a small draft model for transformers assisted generation (None = skip)."""
    linear_kernels: Literal["auto", "stock"] = "auto"
    """auto: on a CPU, time candidate matmul kernels for each of the target's linear shapes at every
    decode row count (plain steps, verify blocks, prompt lookup's) and use the fastest, for every
    contender alike (MKL's 2-8 row GEMMs can cost far more than one row's; a kernel that stores a
    transposed weight copy competes only where memory allows); stock: torch's F.linear. Ignored on CUDA."""

    @property
    def speculative_block_sizes(self) -> list[int]:
        """The block sizes that speculate (1 is plain decoding, measured anyway), ascending."""
        return sorted(set(self.block_sizes) - {1})

    @model_validator(mode="after")
    def _block_sizes(self):
        if not self.block_sizes or any(b < 1 for b in self.block_sizes):
            raise ValueError("block_sizes must be a non-empty list of sizes >= 1")
        if self.sets is not None and not self.sets:
            raise ValueError("sets: an empty list evaluates nothing (null = every set)")
        if self.max_new_tokens > self.replay_max_new_tokens:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) exceeds replay_max_new_tokens "
                             f"({self.replay_max_new_tokens}): the replay of the decoded prompts checks them")
        return self


class ServeParams(Section):
    engine: Literal["llama.cpp", "none"] = "llama.cpp"
    """Serving engine the `serve` stage measures each drafter in (and `export` writes a GGUF
    drafter for): llama.cpp's draft-dflash, built from a pinned sdist (`specauf llamacpp install`);
    none = skip (no GGUF, no build; the smoke preset's random target has no tokenizer llama.cpp reads)."""
    threads: int = Field(1, ge=1)
    """llama.cpp threads for every measured run (one: comparable across machines and with the eval)."""
    targets: list[Literal["f32", "source"]] = ["f32", "source"]
    """Target GGUFs to serve: f32 = converted from data/target (the eval's numerics: its tau should
    equal ours), source = the target's original GGUF, the quantised model a CPU user runs (only when
    target.source is gguf; other targets serve f32 alone, and the metrics say so)."""
    ngram: Literal["ngram-simple", "ngram-map-k", "ngram-mod"] | None = "ngram-simple"
    """llama.cpp's own n-gram speculation, measured beside the drafter as a peer (null = skip)."""
    ngram_n_max: int = Field(3, ge=1)
    """Draft tokens per cycle of the n-gram peer."""
    exactness_gate: bool = True
    """Fail the serve stage when a llama.cpp speculative output differs from its plain greedy output
    (every difference and where it starts is recorded either way). Holds on a CPU with llama.cpp's
    flash attention off (specauf.serve.llamacpp.RUN_FLAGS; with it on, a one-token step and a verified
    block sum in different orders and greedy flipped at near-ties: docs/benchmarks.md). Our own
    decoder's gate is eval.exactness_gate."""

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("targets: a non-empty list without repeats (f32, source)")
        return v


class VllmParams(Section):
    serve: bool = True
    """Run stage `serve_vllm`: each trained drafter served by vLLM's own DFlash (`bash scripts/run.sh
    vllm` installs vLLM into a venv of its own, once per machine), its tau from vLLM's counters
    checked against our replay on the same prompts (the served-equals-evaluated gate). false = skip
    (no install; the stage writes `{"engine": "none"}`)."""
    batch_prompts_per_set: int = Field(4, ge=1)
    """The first this many eval prompts of each set are served all at once (continuous batching,
    the regime vLLM is for), eval.replay_max_new_tokens each: throughput plain vs DFlash, and the
    prompts the gate compares vLLM's tau with our replay's on."""
    tau_tolerance: float = Field(0.005, gt=0.0, le=1.0)
    """The gate: |vLLM's tau - our replay's tau| over the batch prompts, at every block size, at
    most this (pooled, both counting the bonus token, in vLLM's books). Measured on the default
    runs: 0.000 to 0.002 (fp32 numerics of two engines); the subtlest broken export measured, layer
    ids shifted by one, was off by 0.025 (docs/benchmarks.md, "Served by vLLM")."""
    gate: bool = True
    """Fail the stage when the gate fails or a vLLM DFlash output differs from vLLM's plain greedy
    (recorded either way)."""


class Params(Section):
    base: BaseParams = BaseParams()
    """Shared settings."""
    target: TargetParams = TargetParams()
    """Stage `target`."""
    prompts: PromptsParams = PromptsParams()
    """Stage `prompts`."""
    rollouts: RolloutsParams = RolloutsParams()
    """Stage `rollouts`."""
    labels: LabelsParams = LabelsParams()
    """Stage `labels`."""
    launch: LaunchParams = LaunchParams()
    """How many processes run `rollouts` and `labels`, and what starts them (never changes their bytes)."""
    train: TrainParams = TrainParams()
    """Stage `train` (one per loss variant)."""
    eval: EvalParams = EvalParams()
    """Stage `eval` (one per trained drafter)."""
    serve: ServeParams = ServeParams()
    """Stages `target_gguf` and `serve` (each trained drafter in a serving engine) and the GGUF export."""
    vllm: VllmParams = VllmParams()
    """Stage `serve_vllm` (each trained drafter served by vLLM, checked against the replay)."""

    @model_validator(mode="after")
    def _cross(self):
        too_big = [b for b in self.eval.block_sizes if b > self.train.block_size]
        if too_big:
            raise ValueError(f"eval.block_sizes {too_big} exceed train.block_size {self.train.block_size}")
        if sum(s.count for s in self.prompts.train) == 0:
            raise ValueError("prompts.train: no training prompts (every source has count 0)")
        if not self.prompts.eval:
            raise ValueError("prompts.eval: no evaluation set (name at least one)")
        empty = [n for n, sources in self.prompts.eval.items() if sum(s.count for s in sources) == 0]
        if empty:
            raise ValueError(f"prompts.eval.{empty[0]}: no prompts (its sources' counts add up to 0)")
        unknown = [s for s in self.eval.sets or [] if s not in self.prompts.eval]
        if unknown:
            raise ValueError(f"eval.sets: no evaluation set {unknown[0]!r} in prompts.eval "
                             f"(have: {', '.join(sorted(self.prompts.eval))})")
        return self


# The eval answers are the decode's reference text: greedy, fp32, our transformers loop (the
# decode engine's numerics), every prompt kept. Only their batching comes from `rollouts`.
EVAL_MAX_PROMPT_TOKENS = 1 << 20


# What the eval stages take from `rollouts` and `labels`: an allow-list, so a key added to either
# section reaches the eval answers only when named here (and in dvc.yaml's eval_* params, which
# tests/test_config.py ties to these lists); every other setting is fixed below or its default.
EVAL_ROLLOUTS_KEYS = ("batch_size", "shard_size")
EVAL_LABELS_KEYS = ("num_feature_layers", "layer_ids", "batch_size")


def eval_rollouts_params(params: Params) -> RolloutsParams:
    """What stage `eval_rollouts` generates with: the target's greedy answer to every eval prompt."""
    return RolloutsParams(**{k: getattr(params.rollouts, k) for k in EVAL_ROLLOUTS_KEYS},
                          num_prompts=0, max_prompt_tokens=EVAL_MAX_PROMPT_TOKENS,
                          max_new_tokens=params.eval.replay_max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                          backend="transformers", precision="fp32", crosscheck_prompts=0)


def eval_labels_params(params: Params) -> LabelsParams:
    """What stage `eval_labels` stores: fp32 context features of the training layers (the decode's
    own precision), no top-k."""
    return LabelsParams(**{k: getattr(params.labels, k) for k in EVAL_LABELS_KEYS},
                        features="offline", feature_dtype="float32", top_k=0, verify_temperature=1.0)


# Keys that choose which stage instances run, not what one computes: a drafter's provenance must
# not change when another variant is added to the list (dvc.yaml does not track them either).
NOT_PROVENANCE = {"train": ("variants", "seeds")}
# Opt-in blocks (None = not used): unset, they are left out of provenance hashes, so the outputs
# of runs that do not use one keep the bytes they had before the block existed.
OPT_IN = {"train": ("domino",)}


def provenance(section: str, values: dict) -> dict:
    """A section's params as its outputs' provenance records them: without NOT_PROVENANCE keys and
    without unset OPT_IN blocks."""
    return {k: v for k, v in values.items()
            if k not in NOT_PROVENANCE.get(section, ()) and not (k in OPT_IN.get(section, ()) and v is None)}


def run_name(variant: str, seed: int) -> str:
    """One trained drafter's name along the flow: `auf-0` is variant auf, seed 0 (dvc.yaml's
    matrix names its stages `train@auf-0` and its paths `data/drafters/auf-0`)."""
    return f"{variant}-{seed}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """(variant, seed) of a run name, or None when it is not one (variants never hold a '-')."""
    variant, sep, seed = name.rpartition("-")
    return (variant, int(seed)) if sep and variant and seed.isdigit() else None


def section_dict(params: Params, *sections: str) -> dict:
    """The sections a stage reads, as plain data (for the params hash in its manifest)."""
    return {s: provenance(s, json.loads(getattr(params, s).model_dump_json())) for s in sections}
