"""Stage `eval`: tau, acceptance by position, speedup and exactness for one trained drafter."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.artifacts import loading, read_manifest, write_json
from specauf.config import run_name
from specauf.stage import add_run_args, stage_main, stage_run
from specauf.errors import UserError
from specauf.evaluate.run import check_exactness, evaluate_drafter, headline, without_headline
from specauf.target.access import check_drafter_fits
from specauf.evaluate.replay import check_replay
from specauf.data.prompts import load_eval_prompts
from specauf.runtime import setup
from specauf.target.run import load_target_for


def run(params, args):
    device = setup(params.base, f"eval {args.run}")
    from specauf.train.drafter import BlockDrafter

    target, tokenizer, target_manifest = load_target_for(args.target, args.drafter, "drafter", device,
                                                         params.target.trust_remote_code)
    with loading(args.drafter):
        drafter = BlockDrafter.from_pretrained(args.drafter).to(device).eval()
    check_drafter_fits(drafter, target, args.drafter)
    too_big = [b for b in params.eval.block_sizes if b > drafter.block_size]
    if too_big:
        raise UserError(f"eval.block_sizes {too_big} exceed the drafter's trained block size {drafter.block_size}")
    sets = load_eval_prompts(args.prompts, params.eval.sets)
    answers = read_manifest(args.eval_labels, kind="labels")
    if answers.get("target_fingerprint") != target_manifest["fingerprint"]:
        raise UserError(f"{args.eval_labels}: the eval answers are another target's (rebuild eval_rollouts and eval_labels)")
    assistant = None
    if params.eval.assistant_model:
        from transformers import AutoModelForCausalLM
        path = params.eval.assistant_model
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"eval.assistant_model: {path} is not a Hugging Face model folder (no config.json)")
        try:
            assistant = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"eval.assistant_model: cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    metrics = evaluate_drafter(target, tokenizer, drafter, sets, params.eval, stop_ids=target_manifest["stop_token_ids"],
                               pad_id=target_manifest["pad_token_id"], seed=params.base.seed, labels_dir=args.eval_labels,
                               assistant=assistant)
    metrics["variant"], metrics["seed"] = args.variant, args.seed
    check_exactness(metrics, params.eval.exactness_gate)
    if "replay_check" in metrics:
        check_replay(metrics["replay_check"], params.eval.exactness_gate)
    # DVC's metrics file holds the headline numbers; the rest (per-prompt rows, histograms, settings,
    # machine, kernel plan, cost model) go to plain JSON outputs beside it
    top = headline(metrics, params.eval.bootstrap_resamples)
    check_rows = metrics["replay_check"].pop("rows") if "replay_check" in metrics else None
    write_json(args.prompts_out, {"variant": args.variant, "seed": args.seed, "replayed": metrics.pop("replay_prompts"),
                                  "decoded": metrics.pop("prompts"), "replay_check": check_rows})
    write_json(args.details, without_headline(metrics, top))
    write_json(args.metrics, top)  # last: DVC records the stage only when all outputs exist


def add_args(p):
    add_run_args(p)
    p.add_argument("--target", default="data/target")
    p.add_argument("--prompts", default="data/prompts")
    p.add_argument("--eval-labels", default="data/eval_labels", help="greedy eval answers with features (the replay's input)")
    p.add_argument("--drafter")
    p.add_argument("--metrics")
    p.add_argument("--prompts-out", help="per-prompt replayed and decoded rows (default: beside --metrics, .prompts.json)")
    p.add_argument("--details", help="everything but the headline (default: beside --metrics, .details.json)")


def main():
    def fill(params, args):
        args.variant, args.seed = stage_run(params, "eval", args.variant, args.seed)
        args.run = run_name(args.variant, args.seed)
        args.drafter = args.drafter or f"data/drafters/{args.run}"
        args.metrics = args.metrics or f"metrics/eval/{args.run}.json"
        args.prompts_out = args.prompts_out or str(Path(args.metrics).with_suffix(".prompts.json"))
        args.details = args.details or str(Path(args.metrics).with_suffix(".details.json"))
        run(params, args)
    stage_main("eval", fill, add_args)


if __name__ == "__main__":
    main()
