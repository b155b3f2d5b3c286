"""The serving-engine seam: what the serve stage needs from an engine, and the engines there are.

An engine decodes a target GGUF/folder greedily, plain or speculatively with a drafter at a number
of guesses per cycle (or with its own n-gram speculation), and says what it ran (version, flags,
numerics) for the metrics. The serve stage (specauf/serve/run.py) loops over prompts and contenders
through this interface and does the rest once for every engine: the exactness check against the
engine's plain greedy, pooling, and the comparison with our decoded tau. A new engine is one
module with a class like LlamaCppEngine plus its line in ENGINES (and its name in
ServeParams.engine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class Served:
    """One engine run: the continuation as text, its token count and speed, and for a
    speculative run every cycle's accepted guesses and whether the engine's repeated runs of it
    agreed (a timed run and a logged one, say)."""
    text: str
    tokens: int
    tokens_per_s: float
    accepted: list[int] = field(default_factory=list)
    runs_agree: bool = True


class Engine(Protocol):
    name: str

    def describe(self) -> dict:
        """What this engine ran, recorded in the serve metrics (version, flags, threads)."""

    def drafter_file(self, export_manifest: dict) -> str:
        """The file of an export folder this engine loads as the drafter."""

    def plain(self, model: Path, prompt: str, n: int) -> Served:
        """Greedy decoding of n tokens of `prompt` (chat-template text)."""

    def speculative(self, model: Path, drafter: Path | None, prompt: str, n: int, n_max: int, kind: str) -> Served:
        """Greedy speculative decoding with up to n_max guesses per cycle; `kind` is the drafter
        kind (`draft-dflash`) or one of the engine's own speculation methods (then drafter is None)."""


class LlamaCppEngine:
    """llama.cpp's tools, built from the pinned sdist (specauf/serve/llamacpp.py)."""
    name = "llama.cpp"

    def __init__(self, threads: int):
        self.threads = threads

    def describe(self) -> dict:
        from specauf.serve import llamacpp

        return {"engine": self.name, "llama_cpp_commit": llamacpp.SDIST_COMMIT, "threads": self.threads,
                "run_flags": list(llamacpp.RUN_FLAGS)}

    def drafter_file(self, export_manifest: dict) -> str:
        return export_manifest.get("gguf", {}).get("file", "drafter.gguf")

    def plain(self, model, prompt, n):
        from specauf.serve import llamacpp

        d = llamacpp.decode_plain(model, prompt, n, self.threads)
        return Served(d.text, d.tokens, d.tokens_per_s)

    def speculative(self, model, drafter, prompt, n, n_max, kind):
        """The timed run is quiet; a second, logged run gives the cycles (logging costs time)."""
        from specauf.serve import llamacpp

        quiet = llamacpp.decode_speculative(model, drafter, prompt, n, n_max, self.threads, kind)
        loud = llamacpp.decode_speculative(model, drafter, prompt, n, n_max, self.threads, kind, verbose=True)
        return Served(quiet.text, quiet.tokens, quiet.tokens_per_s, loud.accepted, runs_agree=quiet.text == loud.text)


ENGINES = {"llama.cpp": LlamaCppEngine}


def engine_for(serve_params) -> Engine:
    """The engine serve.engine names (`none` never reaches the serve stage's decoding)."""
    return ENGINES[serve_params.engine](serve_params.threads)
