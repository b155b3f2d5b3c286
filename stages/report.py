"""Stage `report`: reports/report.md and reports/acceptance.png comparing every loss variant (every seed)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import stage_main
from specauf.artifacts import read_manifest
from specauf.report.run import write_report


def run(params, args):
    result = write_report(args.eval_metrics, args.train_metrics, list(params.train.variants), args.out,
                          seeds=list(params.train.seeds), resamples=params.eval.bootstrap_resamples,
                          serve_dir=args.serve_metrics, target_manifest=read_manifest(args.target, kind="target"),
                          serve_vllm_dir=args.serve_vllm_metrics)
    for claim in result["claims"].values():
        print(f"{claim['label']}: {claim['status']}")
    print(f"wrote {args.out}/report.md and {args.out}/acceptance.png")


def add_args(p):
    p.add_argument("--out", default="reports")
    p.add_argument("--target", default="data/target", help="the target stage's output (its manifest names the verifier)")
    p.add_argument("--eval-metrics", default="metrics/eval")
    p.add_argument("--train-metrics", default="metrics/train")
    p.add_argument("--serve-metrics", default="metrics/serve", help="the serve stages' metrics (a table when present)")
    p.add_argument("--serve-vllm-metrics", default="metrics/serve_vllm", help="the serve_vllm stages' metrics (a table when present)")


def main():
    stage_main("report", run, add_args)


if __name__ == "__main__":
    main()
