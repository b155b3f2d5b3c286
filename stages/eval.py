"""Stage `eval`: tau, acceptance by position, speedup and exactness for one trained drafter."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.artifacts import loading, read_manifest, write_json
from specauf.stage import stage_main, stage_variant
from specauf.errors import UserError
from specauf.evaluate import check_drafter_fits, check_exactness, evaluate_drafter, plot_rows
from specauf.prompts import load_prompt_set
from specauf.runtime import setup
from specauf.target import load_target_for


def run(params, args):
    device = setup(params.base, f"eval {args.variant}")
    from specauf.drafter import BlockDrafter

    target, tokenizer, target_manifest = load_target_for(args.target, args.drafter, "drafter", device,
                                                         params.target.trust_remote_code)
    with loading(args.drafter):
        drafter = BlockDrafter.from_pretrained(args.drafter).to(device).eval()
    check_drafter_fits(drafter, target, args.drafter)
    too_big = [b for b in params.eval.block_sizes if b > drafter.block_size]
    if too_big:
        raise UserError(f"eval.block_sizes {too_big} exceed the drafter's trained block size {drafter.block_size}")
    available = read_manifest(args.prompts, kind="prompts")["eval_sets"]
    names = params.eval.sets if params.eval.sets is not None else sorted(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserError(f"eval.sets: no evaluation set {unknown[0]!r} (have: {', '.join(sorted(available))})")
    sets = {n: load_prompt_set(args.prompts, n)[: params.eval.prompts_per_set] for n in names}
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
                               pad_id=target_manifest["pad_token_id"], seed=params.base.seed, assistant=assistant)
    metrics["variant"] = args.variant
    check_exactness(metrics, params.eval.exactness_gate)
    acceptance, emitted = plot_rows(metrics)
    write_json(Path(args.plots) / "acceptance.json", acceptance)
    write_json(Path(args.plots) / "emitted.json", emitted)
    # per-prompt rows (the report's intervals) in a plain JSON beside the metrics, not in them
    write_json(args.prompts_out, {"variant": args.variant, "prompts": metrics.pop("prompts")})
    write_json(args.metrics, metrics)  # last: DVC records the stage only when all outputs exist


def add_args(p):
    p.add_argument("--variant", help="a loss variant of train.variants (under DVC: from the stage name)")
    p.add_argument("--target", default="data/target")
    p.add_argument("--prompts", default="data/prompts")
    p.add_argument("--drafter")
    p.add_argument("--metrics")
    p.add_argument("--plots")
    p.add_argument("--prompts-out", help="per-prompt emitted/cycles/time (default: beside --metrics, .prompts.json)")


def main():
    def fill(params, args):
        args.variant = stage_variant(params, "eval", args.variant)
        args.drafter = args.drafter or f"data/drafters/{args.variant}"
        args.metrics = args.metrics or f"metrics/eval/{args.variant}.json"
        args.plots = args.plots or f"plots/eval/{args.variant}"
        args.prompts_out = args.prompts_out or str(Path(args.metrics).with_suffix(".prompts.json"))
        run(params, args)
    stage_main("eval", fill, add_args)


if __name__ == "__main__":
    main()
