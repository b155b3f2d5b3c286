"""Stage `target`: materialise the target as a local HF folder with a fingerprinted manifest."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import stage_main, stage_manifest_extra
from specauf.runtime import setup
from specauf.target.run import materialize_target


def run(params, args):
    setup(params.base, "target")
    extra = stage_manifest_extra(params, "base", "target")
    materialize_target(params.target, args.out, seed=params.base.seed, params_hash=extra["params_hash"])


if __name__ == "__main__":
    stage_main("target", run, lambda p: p.add_argument("--out", default="data/target"))
