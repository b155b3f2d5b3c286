"""llama.cpp exactness: does each speculative output equal llama.cpp's plain greedy one, with its
flash attention on and off?

On the eval's timed prompts (the serve stage's own, chat-template text) and the workspace's target
GGUFs (`data/target_gguf`: f32, and the original Q4_1 as `source`), runs llama-completion (plain
greedy) and llama-speculative-simple (draft-dflash with `data/export/<run>/drafter.gguf` at each
eval block size, and llama.cpp's n-gram speculation) under the project's flags
(`specauf.serve.llamacpp.RUN_FLAGS`) with `-fa on` and with `-fa off`, and counts the runs whose text
leaves plain greedy (the serve stage's test). One llama.cpp thread; tokens/s are medians.

    .venv/bin/python benchmarks/llamacpp_exactness.py --run auf-0    # ~10 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, median, print_header, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="auf-0", help="drafter: data/export/RUN/drafter.gguf")
    ap.add_argument("--workspace", default=str(ROOT), help="pipeline folder holding data/target_gguf, data/export, data/prompts")
    ap.add_argument("--json", help="also write the per-prompt rows here")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from specauf.serve import llamacpp
    from specauf.serve.gguf_export import TARGET_FILES
    from specauf.params_file import load_params
    from specauf.serve.run import timed_prompts

    ws = Path(args.workspace)
    params = load_params(ws / "params.yaml")
    ep, sp = params.eval, params.serve
    prompts = timed_prompts(AutoTokenizer.from_pretrained(ws / "data/target"), ws / "data/prompts", ep)
    drafter = ws / "data/export" / args.run / "drafter.gguf"
    contenders = [(f"b{b}", drafter, b - 1, "draft-dflash") for b in ep.speculative_block_sizes]
    contenders.append(("ngram", None, sp.ngram_n_max, sp.ngram or "ngram-simple"))
    n = ep.max_new_tokens
    longest = max(n_max for _, _, n_max, _ in contenders)
    base_flags = tuple(f for f in llamacpp.RUN_FLAGS if f not in ("-fa", "off", "on"))
    print_header(f"llama.cpp exactness by flash attention ({llamacpp.SDIST_COMMIT}, {args.run}, {len(prompts)} prompts)")
    table, rows = [], []
    for target in sp.targets:
        model = ws / "data/target_gguf" / TARGET_FILES[target]
        if not model.is_file():
            continue
        for fa in ("on", "off"):
            llamacpp.RUN_FLAGS = base_flags + ("-fa", fa)
            differ = {key: 0 for key, *_ in contenders}
            speed = {key: [] for key in ["plain", *differ]}
            for p in prompts:
                plain = llamacpp.decode_plain(model, p["text"], n + longest + 1, sp.threads)
                speed["plain"].append(plain.tokens_per_s)
                row = {"target": target, "fa": fa, "set": p["set"], "prompt_id": p["prompt_id"], "differs": []}
                for key, draft, n_max, kind in contenders:
                    spec = llamacpp.decode_speculative(model, draft, p["text"], n, n_max, sp.threads, kind)
                    speed[key].append(spec.tokens_per_s)
                    if not (plain.text.startswith(spec.text) and (spec.tokens > n or plain.text == spec.text)):
                        differ[key] += 1
                        row["differs"].append(key)
                rows.append(row)
            for key in differ:
                table.append([target, fa, key, f"{differ[key]}/{len(prompts)}", f"{median(speed[key]):.1f}",
                              f"{median(speed['plain']):.1f}"])
    print_table(["target", "flash attention", "contender", "outputs leaving plain greedy", "median tok/s",
                 "plain median tok/s"], table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
