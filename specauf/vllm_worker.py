"""Runs in vLLM's own venv (specauf/vllm.py made it), never imported by the project.

vLLM pins a transformers our venv cannot share, so the project hands vLLM its work as a JSON job
and reads a JSON answer: `python -I vllm_worker.py JOB.json ANSWER.json`. Standard library and
vLLM only. A job is `common` engine settings (the target, dtype, seed, lengths) and a list of
`engines`, each a key, an optional DFlash drafter with its num_speculative_tokens, and phases of
token-id prompts; the engines run one after another in this process, each given its phases:
  one_at_a_time: true   requests one after another: per-request time and, for a speculative
                        engine, per-request draft counters (the difference of vLLM's own counters
                        around the request);
  one_at_a_time: false  all requests at once (continuous batching): wall time and pooled counters.
vLLM may spawn processes (an engine core, workers), hence the `__main__` guard.
"""
import json
import os
import sys
import time
import traceback

SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def counters(llm, k: int) -> dict:
    """vLLM's speculative counters now: drafts (verification steps that carried a draft), draft
    tokens, accepted tokens, and accepted tokens by draft position (k of them)."""
    out = {v: 0 for v in SPEC_COUNTERS.values()}
    out["accepted_per_position"] = [0] * k
    for m in llm.get_metrics():
        if m.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[m.name]] += int(m.value)
        elif m.name == PER_POSITION:
            for i, v in enumerate(m.values[:k]):
                out["accepted_per_position"][i] += int(v)
    return out


def minus(after: dict, before: dict) -> dict:
    return {key: ([a - b for a, b in zip(v, before[key])] if isinstance(v, list) else v - before[key])
            for key, v in after.items()}


def answer(out) -> dict:
    c = out.outputs[0]
    stop = c.stop_reason if isinstance(c.stop_reason, int) else None
    return {"token_ids": list(c.token_ids), "finish_reason": c.finish_reason, "stop_token": stop}


def run_phase(llm, phase: dict, k: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    s = phase["sampling"]
    seeds = phase.get("seeds") or [None] * len(phase["prompts"])
    sampling = [SamplingParams(temperature=s["temperature"], top_p=s.get("top_p", 1.0), top_k=s.get("top_k", 0) or -1,
                               max_tokens=s["max_tokens"], stop_token_ids=s.get("stop_token_ids", []),
                               ignore_eos=s.get("ignore_eos", True), seed=seed, detokenize=False) for seed in seeds]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in phase["prompts"]]
    if phase["one_at_a_time"]:
        rows = []
        for prompt, sp in zip(prompts, sampling):
            before = counters(llm, k)
            t0 = time.perf_counter()
            out = llm.generate([prompt], [sp], use_tqdm=False)[0]
            seconds = time.perf_counter() - t0
            rows.append({**answer(out), "seconds": seconds, **({"counters": minus(counters(llm, k), before)} if k else {})})
        return {"requests": rows}
    before = counters(llm, k)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {"requests": [answer(o) for o in outs], "seconds": seconds,
            **({"counters": minus(counters(llm, k), before)} if k else {})}


def warm_up(llm, phases: list[dict]) -> None:
    """One short untimed request first: an engine's first requests pay one-off costs (kernel
    selection, allocations) that would otherwise land on whichever contender runs first."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    first = next((p["prompts"][0] for p in phases if p["prompts"]), None)
    if first is not None:
        llm.generate([TokensPrompt(prompt_token_ids=first)], [SamplingParams(temperature=0.0, max_tokens=8)], use_tqdm=False)


KEPT = {"config": None, "llm": None}  # --loop: the last engine, kept for a next job with the same one


def start_engine(common: dict, spec: dict | None, phases: list[dict]):
    from vllm import LLM

    kwargs = dict(model=common["model"], dtype=common["dtype"], seed=common["seed"], enforce_eager=True,
                  enable_prefix_caching=False, disable_log_stats=False, max_model_len=common["max_model_len"],
                  max_num_seqs=common["max_num_seqs"], trust_remote_code=common.get("trust_remote_code", False))
    if spec:
        kwargs["speculative_config"] = {"method": "dflash", "model": spec["drafter"],
                                        "num_speculative_tokens": spec["num_speculative_tokens"]}
    llm = LLM(**kwargs)
    warm_up(llm, phases)
    return llm


def stop_engine(llm) -> None:
    import gc

    shutdown = getattr(llm.llm_engine, "shutdown", None)
    if shutdown:
        shutdown()
    del llm
    gc.collect()


def run_engine(common: dict, engine: dict, keep: bool = False) -> dict:
    spec = engine.get("speculative")
    k = spec["num_speculative_tokens"] if spec else 0
    config = json.dumps([common, spec], sort_keys=True)
    t0 = time.perf_counter()
    if KEPT["config"] == config:
        llm = KEPT["llm"]
    else:
        if KEPT["llm"] is not None:
            stop_engine(KEPT.pop("llm"))
            KEPT.update(config=None, llm=None)
        llm = start_engine(common, spec, engine["phases"])
    started = time.perf_counter() - t0
    try:
        return {"engine_start_s": started, "phases": {p["name"]: run_phase(llm, p, k) for p in engine["phases"]}}
    finally:
        if keep:
            KEPT.update(config=config, llm=llm)
        else:
            KEPT.update(config=None, llm=None)
            stop_engine(llm)


def answer_job(job: dict, keep: bool = False) -> dict:
    """Every engine of the job in turn, in this one process (vLLM is imported once)."""
    import vllm

    answers = {}
    for e in job["engines"]:
        try:
            answers[e["key"]] = run_engine(job["common"], e, keep)
        except Exception as err:  # a drafter vLLM cannot serve fails its engine, not the job
            if not e.get("speculative"):
                raise
            traceback.print_exc()
            answers[e["key"]] = {"error": f"{type(err).__name__}: {err}"}
    return {"vllm_version": vllm.__version__, "engines": answers}


def write_answer(answer: dict, answer_file: str) -> None:
    with open(answer_file + ".tmp", "w") as f:
        json.dump(answer, f)
    os.replace(answer_file + ".tmp", answer_file)  # whole or absent: the caller waits for it


def main(argv: list[str]) -> None:
    """`JOB ANSWER`: one job. `--loop`: a job per stdin line `JOB ANSWER`, keeping the engine between
    jobs that use the same one (the rollouts backend: one engine for every shard)."""
    if argv[0] != "--loop":
        write_answer(answer_job(json.load(open(argv[0]))), argv[1])
        return
    for line in sys.stdin:
        job_file, answer_file = line.split()
        write_answer(answer_job(json.load(open(job_file)), keep=True), answer_file)


if __name__ == "__main__":
    main(sys.argv[1:])
