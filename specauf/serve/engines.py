"""The serving-engine seam: what the serve stage needs from an engine, and the engines there are.

An engine decodes a target (a GGUF, a folder) greedily, plain or speculatively with a drafter at a
number of guesses per cycle (or with its own speculation, an n-gram peer), and says what it ran
(version, flags, numerics) for the metrics. The serve stages (specauf/serve/run.py) hand it the
prompts and contenders through this interface and do the rest once for every engine: the
exactness check against the engine's plain greedy, pooling, and the comparison with our decoded
tau. A new engine is a class like LlamaCppEngine plus its line in ENGINES.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class Served:
    """One engine run: the continuation as text, its token count and speed, and for a
    speculative run every cycle's accepted guesses (a multiset: the engines count, they do not
    log cycles in order)."""
    text: str
    tokens: int
    tokens_per_s: float
    accepted: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Contender:
    """One way of decoding a prompt: `plain`, our drafter at n_max guesses per cycle
    (`draft-dflash`, drafter = what engine.drafter_file names), or an engine's own speculation
    method (drafter None). `tokens`: how many tokens it decodes (plain decodes past the
    speculative runs, which may overshoot, so they can be checked as its prefixes)."""
    key: str
    drafter: Path | None
    n_max: int
    kind: str
    tokens: int


class Engine(Protocol):
    name: str

    def describe(self) -> dict:
        """What this engine ran, recorded in the serve metrics (version, flags, threads)."""

    def drafter_file(self, export_manifest: dict) -> str:
        """The path, inside an export folder, this engine loads as the drafter."""

    def peers(self, serve_params) -> list[Contender]:
        """The engine's own speculation methods measured beside the drafter (tokens = n)."""

    def decode(self, model: Path, prompts: list[dict], contenders: list[Contender], done=None) -> dict[str, list[Served]]:
        """Every prompt ({set, prompt_id, text, ids}: chat-template text and our token ids of it)
        decoded greedily by every contender: {contender key: one Served per prompt, in order}.
        `done(n)`, when given, hears of every n (prompt, contender) runs finished (a progress bar)."""


class LlamaCppEngine:
    """llama.cpp's tools, built from the pinned sdist (specauf/serve/llamacpp.py). One process per
    decode; contenders interleaved per prompt, so machine noise falls on all of them alike."""
    name = "llama.cpp"

    def __init__(self, threads: int):
        self.threads = threads

    def describe(self) -> dict:
        from specauf.serve import llamacpp

        return {"engine": self.name, "llama_cpp_commit": llamacpp.SDIST_COMMIT, "threads": self.threads,
                "run_flags": list(llamacpp.RUN_FLAGS)}

    def drafter_file(self, export_manifest: dict) -> str:
        return export_manifest.get("gguf", {}).get("file", "drafter.gguf")

    def peers(self, sp) -> list[Contender]:
        return [Contender("ngram", None, sp.ngram_n_max, sp.ngram, 0)] if sp.ngram else []

    def decode(self, model, prompts, contenders, done=None):
        out = {c.key: [] for c in contenders}
        for p in prompts:
            for c in contenders:
                out[c.key].append(self._one(model, p["text"], c))
                if done:
                    done(1)
        return out

    def _one(self, model, prompt: str, c: Contender) -> Served:
        """One run per contender: a speculative run's cycles come from its own coloured output,
        so the timed run is the counted one (no second, logged run)."""
        from specauf.serve import llamacpp

        if c.kind == "plain":
            d = llamacpp.decode_plain(model, prompt, c.tokens, self.threads)
        else:
            d = llamacpp.decode_speculative(model, c.drafter, prompt, c.tokens, c.n_max, self.threads, c.kind)
        return Served(d.text, d.tokens, d.tokens_per_s, d.accepted)


class VllmEngine:
    """vLLM (specauf/vllm.py: its own venv, a worker process) over the target folder in its dtype
    (target.dtype: the eval's numerics). One worker runs every contender as its own engine (vLLM fixes the number of
    guesses when an engine starts: num_speculative_tokens = n_max, a block of n_max + 1 tokens),
    on our token ids, requests one at a time (per-request time and draft counters); `batch`, when
    given, is a second phase per engine: those requests all at once, answers in self.batches."""
    name = "vllm"

    def __init__(self, threads: int, tokenizer, stop_ids: list[int], dtype: str = "float32", batch: dict | None = None,
                 trust_remote_code: bool = False, keep_going: bool = False):
        self.threads, self.tokenizer, self.stop_ids = threads, tokenizer, [int(t) for t in stop_ids]
        self.dtype, self.batch, self.trust_remote_code, self.keep_going = dtype, batch, trust_remote_code, keep_going
        self.version, self.batches, self.engine_start_s, self.failed = None, {}, {}, {}

    def describe(self) -> dict:
        from specauf import vllm

        return {"engine": self.name, "vllm_version": self.version, "package": vllm.package(), "threads": self.threads,
                "dtype": self.dtype, "settings": {"enforce_eager": True, "enable_prefix_caching": False,
                                                 "kv_cache_gib": vllm.KV_CACHE_GIB}}

    def drafter_file(self, export_manifest: dict) -> str:
        return "."  # the export folder itself: the DFlash layout

    def peers(self, sp) -> list[Contender]:
        return []

    def decode(self, model, prompts, contenders, done=None):
        from specauf import vllm

        def phase(name, ids, tokens, one_at_a_time):
            return {"name": name, "one_at_a_time": one_at_a_time, "prompts": ids,
                    "sampling": {"temperature": 0.0, "max_tokens": tokens, "stop_token_ids": self.stop_ids}}

        engines = []
        for c in contenders:
            phases = [phase("timed", [p["ids"] for p in prompts], c.tokens, True)]
            if self.batch:
                phases.append(phase("batch", self.batch["ids"], self.batch["max_new_tokens"], False))
            spec = {"drafter": str(Path(c.drafter).resolve()), "num_speculative_tokens": c.n_max} if c.kind != "plain" else None
            engines.append({"key": c.key, "speculative": spec, "phases": phases})
        # the longest request, plus a block of slack: a speculative step may verify past max_tokens
        longest = max([len(p["ids"]) for p in prompts] + [len(ids) for ids in (self.batch or {}).get("ids", [])]) + \
            max([c.tokens for c in contenders] + [(self.batch or {}).get("max_new_tokens", 0)]) + \
            max(c.n_max for c in contenders) + 1
        job = {"common": {"model": str(Path(model).resolve()), "dtype": self.dtype, "seed": 0, "max_model_len": longest,
                          "max_num_seqs": len(self.batch["ids"]) if self.batch else 1,
                          "trust_remote_code": self.trust_remote_code},
               "engines": engines}
        answer = vllm.run_job(job, self.threads)
        self.version = answer["vllm_version"]
        out = {}
        for c in contenders:
            e = answer["engines"][c.key]
            if "error" in e:  # vLLM could not serve this drafter: a broken export can crash it
                self.failed[c.key] = e["error"]
                if self.keep_going:
                    continue
                from specauf.errors import ExactnessError

                raise ExactnessError(f"vLLM failed serving {c.drafter} at num_speculative_tokens {c.n_max}: "
                                     f"{e['error'].splitlines()[0][:300]} (a broken export? the vLLM gate, "
                                     "specauf/serve/vllm_gate.py, lists the usual causes)")
            self.engine_start_s[c.key] = e["engine_start_s"]
            out[c.key] = [self._served(r, c.n_max) for r in e["phases"]["timed"]["requests"]]
            if "batch" in e["phases"]:
                self.batches[c.key] = e["phases"]["batch"]
        if done:  # one worker ran them all
            done(len(prompts) * len(contenders))
        return out

    def _served(self, r: dict, n_max: int) -> Served:
        ids = r["token_ids"]
        accepted = cycles_from_counters(r["counters"], n_max) if "counters" in r else []
        return Served(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids), len(ids) / r["seconds"], accepted)


def cycles_from_counters(counters: dict, n_max: int) -> list[int]:
    """vLLM's counters as accepted guesses per cycle (a multiset, in no order). A cycle accepts a
    prefix of its guesses, so `accepted_per_position[i]` counts the cycles that accepted more than
    i, and a cycle that accepted exactly j is one of per_position[j-1] - per_position[j]."""
    at_least = [counters["drafts"], *counters["accepted_per_position"][:n_max], 0]
    return [j for j in range(n_max + 1) for _ in range(at_least[j] - at_least[j + 1])]


ENGINES = {"llama.cpp": LlamaCppEngine, "vllm": VllmEngine}


def engine_for(serve_params) -> Engine:
    """The engine serve.engine names (`none` never reaches the serve stage's decoding)."""
    return ENGINES[serve_params.engine](serve_params.threads)
