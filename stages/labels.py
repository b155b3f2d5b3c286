"""Stage `labels`: teacher-forced target pass -> acceptance labels and context features."""
from specauf.artifacts import read_manifest, sha256_file
from specauf.cli import stage_main, stage_manifest_extra
from specauf.labels import run_labels
from specauf.runtime import setup
from specauf.target import check_fingerprint, load_target


def run(params, args):
    device = setup(params.base, "labels")
    rollouts = read_manifest(args.rollouts, kind="rollouts")
    model, tokenizer, target = load_target(args.target, device, trust_remote_code=params.target.trust_remote_code)
    check_fingerprint(rollouts["target_fingerprint"], target, f"rollouts in {args.rollouts}")
    extra = stage_manifest_extra(params, "base", "labels")
    extra |= {"target_fingerprint": target["fingerprint"],
              "rollouts_manifest_sha256": sha256_file(f"{args.rollouts}/manifest.json")}
    run_labels(model, args.rollouts, params.labels, out_dir=args.out, work_dir=args.work,
               pad_id=target["pad_token_id"] if target["pad_token_id"] is not None else 0, manifest_extra=extra)


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--rollouts", default="data/rollouts")
    p.add_argument("--out", default="data/labels")
    p.add_argument("--work", default="data/.work/labels")


if __name__ == "__main__":
    stage_main("labels", run, add_args)
