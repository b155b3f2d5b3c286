"""Labels-stage throughput: `specauf.data.labels.label_batch` vs a bare teacher-forced forward, and the
bytes per token a labels shard really takes on disk.

Short greedy rollouts are made first with `generate_batch` (untimed). The sequences
(prompt + response) are then batched exactly as `label_shard` batches them (sorted by length,
`LabelsParams().batch_size` per forward). A = `label_batch` with `LabelsParams()` defaults
(offline features from 5 target layers, float16); B = `model(input_ids, attention_mask,
use_cache=False).logits` on the same right-padded batches and nothing else. Interleaved A, B
over --repeats rounds, 1 torch thread; tokens/s counts every sequence token (prompt + response),
as the stage's manifest does. Then `label_shard` writes one Arrow shard of those rows and its
file size is divided by the tokens it holds, next to the manifest's formula
n_layers * hidden * bytes.

    .venv/bin/python benchmarks/labels.py            # ~2-3 min on 2 cores
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (CACHE, goal_line, interleave, load_bench_target, median, print_header, print_table, ratio,
                    rel, setup_threads, sharegpt_encoded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="sequences (ShareGPT prompts answered greedily)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="response cap of the rollouts made first")
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", default=None)
    args = ap.parse_args()
    setup_threads(1)
    import pyarrow as pa
    import torch
    from specauf.artifacts import write_table
    from specauf.config import LabelsParams
    from specauf.data.generation import generate_batch
    from specauf.data.labels import FEATURE_DTYPES, label_batch, label_shard, resolve_layer_ids
    from specauf.data.rollouts import SCHEMA as ROLLOUTS_SCHEMA

    params = LabelsParams()
    model, tok, manifest, tdir = load_bench_target(args.target)
    stops, pad = manifest["stop_token_ids"], manifest["pad_token_id"]
    rows = sharegpt_encoded(tok, args.n, args.max_prompt_tokens)
    print_header("Labels: label_batch vs bare teacher-forced forward")

    # Rollouts to label (untimed): greedy, short.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    responses: dict[int, list[int]] = {}
    for b in range(0, len(order), 16):
        idx = order[b: b + 16]
        outs = generate_batch(model, [rows[i]["prompt_ids"] for i in idx], max_new_tokens=args.max_new_tokens,
                              stop_ids=stops, pad_id=pad)
        responses.update((i, r) for i, (r, _) in zip(idx, outs))
    rollouts = pa.table({
        "prompt_id": [r["prompt_id"] for r in rows], "source": [r["source"] for r in rows],
        "prompt_ids": [r["prompt_ids"] for r in rows], "response_ids": [responses[i] for i in range(len(rows))],
        "finish_reason": ["?"] * len(rows)}, schema=ROLLOUTS_SCHEMA)

    # The batches label_shard would make.
    seqs = [r["prompt_ids"] + responses[i] for i, r in enumerate(rows)]
    starts = [len(r["prompt_ids"]) for r in rows]
    by_len = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    batches = [[i for i in by_len[b: b + params.batch_size] if len(responses[i]) > 0]
               for b in range(0, len(by_len), params.batch_size)]
    batches = [b for b in batches if b]
    tokens = sum(len(seqs[i]) for b in batches for i in b)
    padded = sum(len(b) * max(len(seqs[i]) for i in b) for b in batches)
    layer_ids = resolve_layer_ids(params, model.config.num_hidden_layers)
    hidden = model.config.hidden_size
    print(f"target {rel(tdir)} ({manifest['source']}); "
          f"{len(seqs)} sequences, {tokens} tokens ({padded} with padding) in {len(batches)} batches of "
          f"<= {params.batch_size}; features {params.features}, layers {layer_ids}, {params.feature_dtype}; "
          f"{args.repeats} rounds\n", flush=True)

    def labels():
        for b in batches:
            label_batch(model, [seqs[i] for i in b], [starts[i] for i in b], layer_ids, params, pad)

    @torch.inference_mode()
    def bare():
        for b in batches:
            width = max(len(seqs[i]) for i in b)
            ids = torch.full((len(b), width), pad, dtype=torch.long)
            mask = torch.zeros((len(b), width), dtype=torch.long)
            for j, i in enumerate(b):
                ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[j, : len(seqs[i])] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    runs = interleave({"label_batch": labels, "bare_forward": bare}, repeats=args.repeats, warmup=1)
    ta, tb = median(s for s, _ in runs["label_batch"]), median(s for s, _ in runs["bare_forward"])
    print()
    print_table(["method", "tokens", "median s", "tokens/s"], [
        ["label_batch (LabelsParams defaults)", tokens, ta, tokens / ta],
        ["bare forward (logits only)", tokens, tb, tokens / tb],
    ])
    frac = ratio(tokens / ta, tokens / tb)
    print(f"- labels / bare throughput (ratio of medians): {frac:.3f}")
    print(goal_line("labels/bare", frac, ">=", 0.9))

    # Bytes per token of a real shard.
    table, agree, total = label_shard(model, rollouts, params, layer_ids, hidden * len(layer_ids), pad)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        entry = write_table(Path(tmp) / "shard-00000.arrow", table)
    shard_tokens = sum(len(x) for x in table.column("input_ids").to_pylist())
    value_bytes = torch.empty((), dtype=FEATURE_DTYPES[params.feature_dtype][0]).element_size()
    formula = len(layer_ids) * hidden * value_bytes
    feat_bytes = table.column("features").nbytes
    print()
    print_table(["bytes per token", "value"], [
        [f"manifest formula {len(layer_ids)} layers x {hidden} x {value_bytes} B", formula],
        ["Arrow shard file / tokens", f"{entry['bytes'] / shard_tokens:.1f}"],
        ["  of which the features column", f"{feat_bytes / shard_tokens:.1f}"],
        ["  everything else (ids, labels, logprobs, mask, offsets, IPC framing)",
         f"{(entry['bytes'] - feat_bytes) / shard_tokens:.1f}"],
    ])
    print(f"- shard: {table.num_rows} rows, {shard_tokens} tokens, {entry['bytes']} bytes; "
          f"file / formula = {entry['bytes'] / shard_tokens / formula:.4f}")
    print(f"- acceptance labels agree with the greedy responses at {agree}/{total} positions")


if __name__ == "__main__":
    main()
