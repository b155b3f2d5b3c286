"""Stage `train`: one drafter per loss variant (DeepSpeed; single CPU process or any launcher)."""
from specauf.config import LOSS_VARIANTS
from specauf.cli import stage_main, stage_manifest_extra
from specauf.launch import rank_device, relaunch_if_needed


def run(params, args):
    if args.variant not in LOSS_VARIANTS:
        raise ValueError(f"--variant: unknown loss variant {args.variant!r}; allowed: {', '.join(LOSS_VARIANTS)}")
    # train.processes ranks under launch.launcher; each rank then runs the body below.
    launch = params.launch.model_copy(update={"processes": params.train.processes})
    relaunch_if_needed(launch, f"train {args.variant}", {args.target: "target", args.labels: "labels"})
    from specauf.runtime import setup
    from specauf.target import load_target_for
    from specauf.train import train_variant

    device = rank_device(setup(params.base, f"train {args.variant}"))
    target, _, target_manifest = load_target_for(args.target, args.labels, "labels", device, params.target.trust_remote_code)
    extra = stage_manifest_extra(params, "base", "train", target=target_manifest, labels=args.labels)
    train_variant(params.train, args.variant, target=target, target_manifest=target_manifest, labels_dir=args.labels,
                  out_dir=args.out or f"data/drafters/{args.variant}",
                  work_dir=args.work or f"data/.work/train/{args.variant}",
                  metrics_dir=args.metrics or f"metrics/train/{args.variant}", seed=params.base.seed,
                  device=device, manifest_extra=extra)


def add_args(p):
    p.add_argument("--variant", required=True)
    p.add_argument("--target", default="data/target")
    p.add_argument("--labels", default="data/labels")
    p.add_argument("--out")
    p.add_argument("--work")
    p.add_argument("--metrics")


if __name__ == "__main__":
    stage_main("train", run, add_args)
