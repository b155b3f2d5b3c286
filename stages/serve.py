"""Stage `serve`: one trained drafter in llama.cpp (draft-dflash) on the eval's timed prompts."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.config import run_name
from specauf.serve.export import domino_export
from specauf.serve.run import check_exact, gguf_models, our_greedy_texts, serve_drafter, timed_prompts, write_served
from specauf.stage import add_run_args, stage_main, stage_run


def run(params, args):
    run = run_name(*stage_run(params, "serve", args.variant, args.seed))
    metrics_file = Path(args.metrics or f"metrics/serve/{run}.json")
    rows = []
    domino = domino_export(Path(args.export or f"data/export/{run}"))
    if params.serve.engine == "none" or domino:
        metrics = {"engine": "none", **({"reason": domino} if domino else {})}
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.target)
        prompts = timed_prompts(tokenizer, Path(args.prompts), params.eval)
        greedy = our_greedy_texts(tokenizer, Path(args.eval_rollouts), prompts, params.eval.max_new_tokens)
        metrics, rows = serve_drafter(params, run, gguf_models(Path(args.target_gguf), params.serve), Path(args.export or f"data/export/{run}"),
                                      prompts, Path(args.eval_prompts or f"metrics/eval/{run}.prompts.json"), greedy)
        check_exact(metrics, params.serve.exactness_gate)
    write_served(metrics_file, run, metrics, rows)


def add_args(p):
    add_run_args(p)
    p.add_argument("--target", default="data/target", help="its tokenizer renders the prompts")
    p.add_argument("--prompts", default="data/prompts")
    p.add_argument("--target-gguf", default="data/target_gguf")
    p.add_argument("--eval-rollouts", default="data/eval_rollouts", help="our target's greedy answers (llama.cpp's f32 must match)")
    p.add_argument("--export", help="default data/export/VARIANT-SEED (holds drafter.gguf)")
    p.add_argument("--eval-prompts", help="the eval's per-prompt rows (default metrics/eval/VARIANT-SEED.prompts.json)")
    p.add_argument("--metrics", help="default metrics/serve/VARIANT-SEED.json")


if __name__ == "__main__":
    stage_main("serve", run, add_args)
