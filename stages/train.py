"""Stage `train`: one drafter per loss variant (DeepSpeed; single CPU process or any launcher)."""
from specauf.artifacts import read_manifest, sha256_file
from specauf.config import LOSS_VARIANTS
from specauf.cli import stage_main, stage_manifest_extra
from specauf.runtime import setup
from specauf.target import check_fingerprint, load_target
from specauf.train import train_variant


def run(params, args):
    if args.variant not in LOSS_VARIANTS:
        raise ValueError(f"--variant: unknown loss variant {args.variant!r}; allowed: {', '.join(LOSS_VARIANTS)}")
    device = setup(params.base, f"train {args.variant}")
    labels = read_manifest(args.labels, kind="labels")
    target, _, target_manifest = load_target(args.target, device, trust_remote_code=params.target.trust_remote_code)
    check_fingerprint(labels["target_fingerprint"], target_manifest, f"labels in {args.labels}")
    extra = stage_manifest_extra(params, "base", "train")
    extra |= {"target_fingerprint": target_manifest["fingerprint"],
              "labels_manifest_sha256": sha256_file(f"{args.labels}/manifest.json")}
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
