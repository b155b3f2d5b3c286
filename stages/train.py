"""Stage `train`: one drafter per loss variant (DeepSpeed; single CPU process or any launcher)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.config import run_name
from specauf.stage import add_run_args, stage_main, stage_manifest_extra, stage_run
from specauf.launch import rank_device, relaunch_if_needed


def run(params, args):
    args.variant, args.seed = stage_run(params, "train", args.variant, args.seed)
    run = run_name(args.variant, args.seed)
    # train.processes ranks under launch.launcher; each rank then runs the body below.
    launch = params.launch.model_copy(update={"processes": params.train.processes})
    relaunch_if_needed(launch, f"train {run}", {args.target: "target", args.labels: "labels"})
    from specauf.runtime import setup
    from specauf.target.run import load_target_for
    from specauf.train.run import train_variant

    threads = params.train.torch_threads or params.base.torch_threads
    device = rank_device(setup(params.base.model_copy(update={"torch_threads": threads}), f"train {run}"))
    target, _, target_manifest = load_target_for(args.target, args.labels, "labels", device, params.target.trust_remote_code)
    extra = stage_manifest_extra(params, "base", "train", target=target_manifest, labels=args.labels)
    train_variant(params.train, args.variant, target=target, target_manifest=target_manifest, labels_dir=args.labels,
                  out_dir=args.out or f"data/drafters/{run}",
                  work_dir=args.work or f"data/.work/train/{run}",
                  metrics_dir=args.metrics or f"metrics/train/{run}", seed=args.seed,
                  device=device, manifest_extra=extra)


def add_args(p):
    add_run_args(p)
    p.add_argument("--target", default="data/target")
    p.add_argument("--labels", default="data/labels")
    p.add_argument("--out")
    p.add_argument("--work")
    p.add_argument("--metrics")


if __name__ == "__main__":
    stage_main("train", run, add_args)
