"""Stages `labels` and `eval_labels`: teacher-forced target pass -> acceptance labels and context
features, over the training rollouts (`--split train`) or over the greedy eval answers (`--split eval`:
fp32 features for the replay, specauf.config.eval_labels_params).

With launch.processes > 1 this script re-executes itself under the launcher (specauf.launch) and
each rank labels its share of the rollouts shards.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import split_stage_main, stage_manifest_extra
from specauf.launch import RankGroup, rank_device, relaunch_if_needed


def run(params, args):
    # Before the heavy imports: the launching process only checks its inputs and execs.
    relaunch_if_needed(params.launch, args.stage, {args.target: "target", args.rollouts: "rollouts"})
    from specauf.config import eval_labels_params
    from specauf.data.labels import run_labels
    from specauf.runtime import setup
    from specauf.target.run import load_target_for

    labels_params = params.labels if args.split == "train" else eval_labels_params(params)
    group = RankGroup()
    try:
        device = rank_device(setup(params.base, args.stage))
        model, _, target = load_target_for(args.target, args.rollouts, "rollouts", device, params.target.trust_remote_code)
        extra = stage_manifest_extra(params, "base", *(("labels",) if args.split == "train" else ()),
                                     target=target, rollouts=args.rollouts)
        if args.split == "eval":  # what the eval features were made with (derived from params)
            extra["labels_params"] = labels_params.model_dump()
        run_labels(model, args.rollouts, labels_params, out_dir=args.out, work_dir=args.work,
                   pad_id=target["pad_token_id"] if target["pad_token_id"] is not None else 0, manifest_extra=extra,
                   group=group)
    finally:
        group.close()


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--rollouts", help="default data/rollouts (train) or data/eval_rollouts (eval)")


def main(argv=None):
    split_stage_main("labels", run, add_args, argv=argv, upstream="rollouts")


if __name__ == "__main__":
    main()
