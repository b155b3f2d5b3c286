"""Stage `inputs`: hash the inputs that live outside the workspace (see specauf/target/inputs.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import stage_main
from specauf.target.inputs import write_inputs
from specauf.runtime import setup_logging


def run(params, args):
    setup_logging("inputs")
    write_inputs(params, args.out, args.cache)


def add_args(p):
    p.add_argument("--out", default="data/inputs")
    p.add_argument("--cache", default="data/.work/inputs/sha256-cache.json")


if __name__ == "__main__":
    stage_main("inputs", run, add_args)
