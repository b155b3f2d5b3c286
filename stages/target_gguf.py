"""Stage `target_gguf`: the target as llama.cpp runs it (f32 converted from data/target, and the original GGUF)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.gguf_export import build_target_ggufs
from specauf.stage import stage_main
from specauf.gguf_source import gguf_path


def run(params, args):
    source = gguf_path(params.target) if params.target.source == "gguf" and "source" in params.serve.targets else None
    build_target_ggufs(params, Path(args.target), source, Path(args.out))


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--out", default="data/target_gguf")


if __name__ == "__main__":
    stage_main("target_gguf", run, add_args)
