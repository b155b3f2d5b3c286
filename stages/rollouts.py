"""Stage `rollouts`: the target answers each training prompt through its chat template."""
from specauf.cli import stage_main, stage_manifest_extra
from specauf.prompts import load_prompt_set
from specauf.rollouts import run_rollouts
from specauf.runtime import setup
from specauf.target import load_target


def run(params, args):
    device = setup(params.base, "rollouts")
    model, tokenizer, target = load_target(args.target, device, trust_remote_code=params.target.trust_remote_code)
    prompts = load_prompt_set(args.prompts, "train")
    extra = stage_manifest_extra(params, "base", "rollouts", target=target, prompts=args.prompts)
    run_rollouts(model, tokenizer, prompts, params.rollouts, out_dir=args.out, work_dir=args.work,
                 seed=params.base.seed, stop_ids=target["stop_token_ids"], manifest_extra=extra)


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--prompts", default="data/prompts")
    p.add_argument("--out", default="data/rollouts")
    p.add_argument("--work", default="data/.work/rollouts")


if __name__ == "__main__":
    stage_main("rollouts", run, add_args)
