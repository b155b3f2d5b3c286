"""Stage `prompts`: training prompts and named evaluation sets, disjoint, as Arrow."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import stage_main, stage_manifest_extra
from specauf.data.prompts import build_prompt_sets, write_prompt_sets
from specauf.runtime import setup


def run(params, args):
    setup(params.base, "prompts")
    train, eval_sets, stats = build_prompt_sets(params.prompts, params.base.seed)
    write_prompt_sets(args.out, train, eval_sets, stage_manifest_extra(params, "base", "prompts"), stats=stats)


if __name__ == "__main__":
    stage_main("prompts", run, lambda p: p.add_argument("--out", default="data/prompts"))
