"""Stage `target_gguf`: the target as llama.cpp runs it (f32 converted from data/target, and the original GGUF)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.serve.gguf_export import build_target_ggufs, served_source_gguf
from specauf.stage import stage_main


def run(params, args):
    build_target_ggufs(params, Path(args.target), served_source_gguf(params), Path(args.out))


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--out", default="data/target_gguf")


if __name__ == "__main__":
    stage_main("target_gguf", run, add_args)
