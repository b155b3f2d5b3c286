"""What a verify pass costs: the target scoring m tokens over its KV cache, m = 1 (a plain
decoding step) vs a block of m > 1, in fp32 and in bf16; and whether bf16 keeps greedy exactness.

Speculative decoding pays off when tau exceeds (verify pass + draft) / plain step. On a GPU the
verify of a small block costs about one step (memory-bound); on a CPU it need not, and that
ratio is the bar our drafters have to clear. Contenders, interleaved per round (--repeats rounds
after one warmup), 1 torch thread, medians:

- fp32 m=K / bf16 m=K: one forward of K tokens after a --context-token prompt (first ShareGPT
  prompts, chat template; the K tokens are the prompt's continuation ids), then the cache is
  cropped back, so every call sees the same cache. bf16 = a bf16 copy of the target.
- tuned m=K: an fp32 copy with the eval stage's calibrated linear kernels
  (`specauf.evaluate.linear_kernels`, `eval.linear_kernels: auto`), calibrated here for rows --sizes.

Exactness check (--blocks blocks of --block tokens taken from the prompts): the logits of a block
scored in one pass vs the same positions scored one token at a time, per dtype: max |diff| and
how many positions change their argmax. Any argmax change breaks the exactness contract of
greedy speculative decoding (plain decoding scores one token at a time).

    .venv/bin/python benchmarks/verify_cost.py          # about 2 min
"""
from __future__ import annotations

import argparse
import copy

from common import (interleave, load_bench_target, median, print_header, print_table, ratio, setup_threads,
                    sharegpt_encoded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context-tokens", type=int, default=200, help="cached tokens before the scored ones")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="tokens per forward")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--blocks", type=int, default=16, help="blocks for the exactness check")
    ap.add_argument("--block", type=int, default=4, help="tokens per block in the exactness check")
    ap.add_argument("--target", default=None)
    args = ap.parse_args()
    setup_threads(1)
    import torch
    from transformers import DynamicCache

    from specauf.target.access import cache_kwarg, crop_cache
    from specauf.evaluate.linear_kernels import tune_linears

    model, tok, manifest, tdir = load_bench_target(args.target)
    print_header("Verify cost: the target scoring a block of m tokens vs one token, fp32 and bf16")
    need = args.context_tokens + max(args.sizes)
    ids = []
    for row in sharegpt_encoded(tok, 64, 4096):
        ids += row["prompt_ids"]
        if len(ids) >= need + args.blocks * args.block:
            break
    ids = torch.tensor(ids)
    models = {"fp32": model, "tuned": copy.deepcopy(model), "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    plan = tune_linears(models["tuned"], args.sizes, "auto")["plan"]
    print("calibrated plan (rows -> kernel, F.linear where not listed):")
    for shape, by_rows in plan.items():
        print(f"  {shape}: " + ", ".join(f"{r}->{k}" for r, k in by_rows.items() if k != "linear"))
    kw = cache_kwarg(model)

    def prefilled(m, n):
        cache = DynamicCache(config=m.config)
        m(ids[None, :n], **{kw: cache}, use_cache=True)
        return cache

    contenders = {}
    with torch.inference_mode():
        caches = {name: prefilled(m, args.context_tokens) for name, m in models.items()}
        for name, m in models.items():
            for k in args.sizes:
                def step(m=m, cache=caches[name], k=k, P=args.context_tokens):
                    m(ids[None, P:P + k], position_ids=torch.arange(P, P + k)[None], **{kw: cache}, use_cache=True)
                    crop_cache(cache, P)
                contenders[f"{name} m={k}"] = step
        runs = interleave(contenders, repeats=args.repeats, warmup=1, log=None)
        med = {n: median(s for s, _ in r) for n, r in runs.items()}
        rows = []
        for name in models:
            base = med[f"{name} m=1"]
            for k in args.sizes:
                n = f"{name} m={k}"
                rows.append([n, 1000 * med[n], ratio(med[n], base), ratio(med[n], med["fp32 m=1"])])
        print(f"{tdir}: {args.context_tokens} cached tokens, {args.repeats} interleaved rounds, medians\n")
        print_table(["forward", "median ms", "x one step (same model)", "x fp32 one step"], rows)

        # exactness: a block in one pass vs one token at a time, from the same cache state
        checks = []
        for name, m in models.items():
            worst, flips, positions = 0.0, 0, 0
            cache = prefilled(m, args.context_tokens)  # the one-token steps below extend it block by block
            for b in range(args.blocks):
                P = args.context_tokens + b * args.block
                block = m(ids[None, P:P + args.block], position_ids=torch.arange(P, P + args.block)[None],
                          **{kw: cache}, use_cache=True).logits[0].float()
                crop_cache(cache, P)
                steps = torch.cat([m(ids[None, P + i:P + i + 1], position_ids=torch.tensor([[P + i]]),
                                     **{kw: cache}, use_cache=True).logits[0].float() for i in range(args.block)])
                worst = max(worst, float((block - steps).abs().max()))
                flips += int((block.argmax(-1) != steps.argmax(-1)).sum())
                positions += args.block
            checks.append([name, positions, f"{worst:.2e}", flips])
    print(f"\nexactness: {args.blocks} blocks of {args.block} tokens scored in one pass vs one token at a time\n")
    print_table(["dtype", "positions", "max |logit diff|", "argmax changed"], checks)


if __name__ == "__main__":
    main()
