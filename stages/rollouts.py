"""Stage `rollouts`: the target answers each training prompt through its chat template.

With launch.processes > 1 this script re-executes itself under the launcher (specauf.launch) and
each rank answers its share of the shards; backend `vllm` always runs as one process.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import stage_main, stage_manifest_extra
from specauf.errors import UserError
from specauf.launch import RankGroup, rank_device, relaunch_if_needed
from specauf.serving import require_backend


def run(params, args):
    # Heavy imports (torch, transformers) only after the relaunch: the launching process only execs.
    require_backend(params.rollouts.backend)
    if params.rollouts.backend == "transformers":
        relaunch_if_needed(params.launch, "rollouts", {args.target: "target", args.prompts: "prompts"})
    from specauf.prompts import load_prompt_set
    from specauf.rollouts import run_rollouts
    from specauf.runtime import setup
    from specauf.target import load_target

    group = RankGroup()
    try:
        if group.world > 1 and params.rollouts.backend != "transformers":
            raise UserError(f"rollouts.backend={params.rollouts.backend} runs as one process: "
                             "start the stage without a launcher")
        device = rank_device(setup(params.base, "rollouts"))
        prompts = load_prompt_set(args.prompts, "train")
        if params.rollouts.backend == "vllm":
            from specauf.serving import start_vllm

            model, tokenizer, target = start_vllm(args.target, device, prompts, params.rollouts, seed=params.base.seed,
                                                  trust_remote_code=params.target.trust_remote_code)
        else:
            model, tokenizer, target = load_target(args.target, device, trust_remote_code=params.target.trust_remote_code)
        extra = stage_manifest_extra(params, "base", "rollouts", target=target, prompts=args.prompts)
        run_rollouts(model, tokenizer, prompts, params.rollouts, out_dir=args.out, work_dir=args.work,
                     seed=params.base.seed, stop_ids=target["stop_token_ids"], manifest_extra=extra, group=group)
    finally:
        group.close()


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--prompts", default="data/prompts")
    p.add_argument("--out", default="data/rollouts")
    p.add_argument("--work", default="data/.work/rollouts")


if __name__ == "__main__":
    stage_main("rollouts", run, add_args)
