"""Stages `rollouts` and `eval_rollouts`: the target answers each training prompt (`--split train`)
or, greedily, each evaluation prompt (`--split eval`, the replay's reference text) through its chat template.

With launch.processes > 1 this script re-executes itself under the launcher (specauf.launch) and
each rank answers its share of the shards; backend `vllm` always runs as one process.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.stage import split_stage_main, stage_manifest_extra
from specauf.errors import UserError
from specauf.launch import RankGroup, rank_device, relaunch_if_needed
from specauf.data.vllm_backend import require_backend


def run(params, args):
    # Heavy imports (torch, transformers) only after the relaunch: the launching process only execs.
    backend = params.rollouts.backend if args.split == "train" else "transformers"  # eval: the decode's numerics
    require_backend(backend)
    if backend == "transformers":
        relaunch_if_needed(params.launch, args.stage, {args.target: "target", args.prompts: "prompts"})
    from specauf.data.prompts import load_eval_prompts, load_prompt_set
    from specauf.data.rollouts import run_rollouts
    from specauf.runtime import setup
    from specauf.target.run import load_target
    from specauf.config import eval_rollouts_params

    if args.split == "eval":
        rollouts_params, sections = eval_rollouts_params(params), ("base",)
        prompts = [row for rows in load_eval_prompts(args.prompts, params.eval.sets).values() for row in rows]
    else:
        rollouts_params, sections = params.rollouts, ("base", "rollouts")
        prompts = load_prompt_set(args.prompts, "train")

    group, model = RankGroup(), None
    try:
        if group.world > 1 and backend != "transformers":
            raise UserError(f"rollouts.backend={backend} runs as one process: "
                             "start the stage without a launcher")
        device = rank_device(setup(params.base, args.stage))
        if rollouts_params.backend == "vllm":
            from specauf.data.rollouts import start_vllm

            import torch

            model, tokenizer, target = start_vllm(args.target, device, prompts, rollouts_params, seed=params.base.seed,
                                                  threads=torch.get_num_threads(),  # base.torch_threads
                                                  trust_remote_code=params.target.trust_remote_code)
        else:
            model, tokenizer, target = load_target(args.target, device, trust_remote_code=params.target.trust_remote_code)
        extra = stage_manifest_extra(params, *sections, target=target, prompts=args.prompts)
        if args.split == "eval":  # what the eval answers were generated with (derived from params)
            extra["rollouts_params"] = rollouts_params.model_dump()
        run_rollouts(model, tokenizer, prompts, rollouts_params, out_dir=args.out, work_dir=args.work,
                     seed=params.base.seed, stop_ids=target["stop_token_ids"], manifest_extra=extra, group=group)
    finally:
        if hasattr(model, "close"):  # the vLLM worker process
            model.close()
        group.close()


def add_args(p):
    p.add_argument("--target", default="data/target")
    p.add_argument("--prompts", default="data/prompts")


def main(argv=None):
    split_stage_main("rollouts", run, add_args, argv=argv)


if __name__ == "__main__":
    main()
