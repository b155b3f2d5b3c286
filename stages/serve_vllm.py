"""Stage `serve_vllm`: one trained drafter served by vLLM's own DFlash, its tau checked against our replay."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.config import run_name
from specauf.serve.export import domino_export
from specauf.serve.run import write_served
from specauf.stage import add_run_args, stage_main, stage_run


def run(params, args):
    run = run_name(*stage_run(params, "serve_vllm", args.variant, args.seed))
    metrics_file = Path(args.metrics or f"metrics/serve_vllm/{run}.json")
    rows = []
    domino = domino_export(Path(args.export or f"data/export/{run}"))
    if not params.vllm.serve or domino:
        metrics = {"engine": "none", **({"reason": domino} if domino else {})}
    else:
        from specauf.serve.vllm_gate import check_served, serve_with_vllm

        metrics, rows = serve_with_vllm(params, run, Path(args.target), Path(args.prompts), Path(args.eval_rollouts),
                                        Path(args.eval_labels), Path(args.drafter or f"data/drafters/{run}"),
                                        Path(args.export or f"data/export/{run}"),
                                        Path(args.eval_prompts or f"metrics/eval/{run}.prompts.json"))
        check_served(run, metrics["batch"], metrics["exactness"]["mismatches"], params.vllm.gate)
    write_served(metrics_file, run, metrics, rows)


def add_args(p):
    add_run_args(p)
    p.add_argument("--target", default="data/target", help="the target folder vLLM serves (and its tokenizer)")
    p.add_argument("--prompts", default="data/prompts")
    p.add_argument("--eval-rollouts", default="data/eval_rollouts", help="our target's greedy answers")
    p.add_argument("--eval-labels", default="data/eval_labels", help="their features: our replay at vLLM's layout")
    p.add_argument("--drafter", help="the drafter as trained (default data/drafters/VARIANT-SEED): the replay's")
    p.add_argument("--export", help="the exported drafter vLLM loads (default data/export/VARIANT-SEED)")
    p.add_argument("--eval-prompts", help="the eval's per-prompt rows (default metrics/eval/VARIANT-SEED.prompts.json)")
    p.add_argument("--metrics", help="default metrics/serve_vllm/VARIANT-SEED.json")


if __name__ == "__main__":
    stage_main("serve_vllm", run, add_args)
