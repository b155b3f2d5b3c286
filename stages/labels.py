"""Stage `labels`: teacher-forced target pass -> acceptance labels and context features.

With launch.processes > 1 this script re-executes itself under the launcher (specauf.launch) and
each rank labels its share of the rollouts shards.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import stage_main, stage_manifest_extra
from specauf.launch import RankGroup, rank_device, relaunch_if_needed


def run(params, args):
    # Before the heavy imports: the launching process only checks its inputs and execs.
    relaunch_if_needed(params.launch, "labels", {args.target: "target", args.rollouts: "rollouts"})
    from specauf.labels import run_labels
    from specauf.runtime import setup
    from specauf.target import load_target_for

    group = RankGroup()
    try:
        device = rank_device(setup(params.base, "labels"))
        model, _, target = load_target_for(args.target, args.rollouts, "rollouts", device, params.target.trust_remote_code)
        extra = stage_manifest_extra(params, "base", "labels", target=target, rollouts=args.rollouts)
        run_labels(model, args.rollouts, params.labels, out_dir=args.out, work_dir=args.work,
                   pad_id=target["pad_token_id"] if target["pad_token_id"] is not None else 0, manifest_extra=extra,
                   group=group)
    finally:
        group.close()


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--rollouts", default="data/rollouts")
    p.add_argument("--out", default="data/labels")
    p.add_argument("--work", default="data/.work/labels")


if __name__ == "__main__":
    stage_main("labels", run, add_args)
