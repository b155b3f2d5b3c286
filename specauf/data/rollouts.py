"""Stage `rollouts`: the target answers every training prompt; Arrow shards + manifest.

Shards are the unit of resume: a killed run keeps its finished shards (in a work dir outside
the DVC output) and redoes only the rest, so no row is lost or duplicated. They are also the unit
of parallelism: with N ranks (specauf.launch) rank r answers shards i % N == r, and since a shard's
rows, batches and per-row generators do not depend on N, the bytes equal a one-process run's.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path

import pyarrow as pa
import torch

from specauf.errors import UserError
from specauf.artifacts import MANIFEST, read_manifest, sha256_file, verify_shards, iter_shards
from specauf.config import RolloutsParams
from specauf.data.generation import encode_chat, generate_batch
from specauf.sampling import SamplingParams
from specauf.launch import RankGroup, collect_entries, open_work
from specauf.runtime import pick_precision, progress
from specauf.data.vllm_backend import VllmGenerator, count_disagreements

log = logging.getLogger("specauf")

SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("source", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("finish_reason", pa.string()),
])


def row_seed(seed: int, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def row_generator(seed: int, prompt_id: str) -> torch.Generator:
    """Per-row sampling stream: a row's sample does not depend on its batch or shard."""
    return torch.Generator().manual_seed(row_seed(seed, prompt_id))


def encode_prompts(tokenizer, rows: list[dict], params: RolloutsParams) -> tuple[list[dict], int]:
    """Tokenise each prompt's first turn through the chat template (later turns are asked by
    generate_shard); drop those over max_prompt_tokens."""
    kept, skipped = [], 0
    for row in rows:
        ids = encode_chat(tokenizer, row["turns"][:1])
        if len(ids) > params.max_prompt_tokens:
            skipped += 1
            continue
        kept.append({**row, "prompt_ids": ids})
    if params.num_prompts:
        kept = kept[: params.num_prompts]
    return kept, skipped


def turn_key(prompt_id: str, turn: int) -> str:
    """What seeds a row's sampling at one turn: the first turn keeps the prompt id (single-turn
    rows sample as they always did); later turns draw their own streams."""
    return prompt_id if turn == 0 else f"{prompt_id}#turn{turn + 1}"


def answer_turn(model, rows: list[dict], params: RolloutsParams, *, turn: int, seed: int, stop_ids: list[int],
                pad_id: int, bar=None) -> dict[int, tuple[list[int], str]]:
    """Each row's `prompt_ids` answered by the transformers target (batched by length) or by vLLM
    (`model` a specauf.data.vllm_backend.VllmGenerator)."""
    if isinstance(model, VllmGenerator):
        seeds = [row_seed(seed, turn_key(r["prompt_id"], turn)) % 2**31 for r in rows] if params.temperature > 0 else None
        results = dict(enumerate(model.answer(rows, params, row_seeds=seeds, stop_ids=stop_ids)))
        if bar is not None:
            bar.update(sum(len(r[0]) for r in results.values()))
        return results
    return answer_rows(model, rows, params, seed=seed, stop_ids=stop_ids, pad_id=pad_id, bar=bar, turn=turn)


def reply_text(tokenizer, response_ids: list[int], stop_ids: list[int]) -> str:
    """An answer as the next turn's history holds it: its text, without the stop token."""
    if response_ids and response_ids[-1] in stop_ids:
        response_ids = response_ids[:-1]
    return tokenizer.decode(response_ids, skip_special_tokens=True)


def generate_shard(model, rows: list[dict], params: RolloutsParams, *, seed: int, stop_ids: list[int],
                   pad_id: int, bar=None, tokenizer=None) -> tuple[pa.Table, int]:
    """Answer one shard's prompts; rows come back in their original order. Returns the table and
    the count of conversations cut short.

    A row with several user turns is a conversation, answered turn by turn: each later turn is
    asked after the target's own answers to the earlier ones, and the row keeps the last answer
    as its response and the conversation before it as its prompt. A conversation whose next
    prompt would pass max_prompt_tokens ends at the last turn that fits (cut short, counted).
    """
    rows = [dict(r) for r in rows]
    results = answer_turn(model, rows, params, turn=0, seed=seed, stop_ids=stop_ids, pad_id=pad_id, bar=bar)
    replies: dict[int, list[str]] = {i: [] for i in range(len(rows))}
    going, cut = set(range(len(rows))), 0
    for turn in range(1, max((len(r["turns"]) for r in rows), default=1)):
        asked: list[tuple[int, list[int]]] = []
        for i in sorted(going):
            if len(rows[i]["turns"]) <= turn:
                going.discard(i)
                continue
            replies[i].append(reply_text(tokenizer, results[i][0], stop_ids))
            ids = encode_chat(tokenizer, rows[i]["turns"][: turn + 1], replies[i])
            if len(ids) > params.max_prompt_tokens:
                going.discard(i)
                cut += 1
                continue
            asked.append((i, ids))
        answers = answer_turn(model, [{**rows[i], "prompt_ids": ids} for i, ids in asked], params, turn=turn,
                              seed=seed, stop_ids=stop_ids, pad_id=pad_id, bar=bar) if asked else {}
        for j, (i, ids) in enumerate(asked):
            rows[i]["prompt_ids"], results[i] = ids, answers[j]
    table = pa.table({
        "prompt_id": [r["prompt_id"] for r in rows],
        "source": [r["source"] for r in rows],
        "prompt_ids": [r["prompt_ids"] for r in rows],
        "response_ids": [results[i][0] for i in range(len(rows))],
        "finish_reason": [results[i][1] for i in range(len(rows))],
    }, schema=SCHEMA)
    return table, cut


def answer_rows(model, rows: list[dict], params: RolloutsParams, *, seed: int, stop_ids: list[int], pad_id: int,
                bar=None, turn: int = 0) -> dict[int, tuple[list[int], str]]:
    """The transformers backend: batches formed by prompt length within the given rows only."""
    sampling = SamplingParams(params.temperature, params.top_p, params.top_k)
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["prompt_ids"]), i))
    results: dict[int, tuple[list[int], str]] = {}
    for start in range(0, len(order), params.batch_size):
        idx = order[start: start + params.batch_size]
        gens = [row_generator(seed, turn_key(rows[i]["prompt_id"], turn)) for i in idx] if params.temperature > 0 else None
        outs = generate_batch(model, [rows[i]["prompt_ids"] for i in idx], max_new_tokens=params.max_new_tokens,
                              stop_ids=stop_ids, pad_id=pad_id, sampling=sampling, generators=gens,
                              on_tokens=(bar.update if bar is not None else None))
        results.update(zip(idx, outs))
    return results


def start_vllm(target_dir, device, prompt_rows: list[dict], params, *, seed: int, threads: int,
               trust_remote_code: bool = False):
    """(engine, tokenizer, target manifest). Greedy: first answer the first `crosscheck_prompts`
    prompts with the transformers backend and warn with the count of rows vLLM answers otherwise.

    The transformers model is freed before vLLM starts: vLLM reserves most of the GPU's memory.
    """
    import gc

    import torch
    from transformers import AutoTokenizer

    from specauf.target.run import load_target, read_target_manifest

    check = params.crosscheck_prompts if params.temperature == 0 else 0
    if check:
        model, tokenizer, manifest = load_target(target_dir, device, trust_remote_code=trust_remote_code)
        rows = encode_prompts(tokenizer, prompt_rows, params)[0][:check]
        stop_ids = manifest["stop_token_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        reference = answer_rows(model, rows, params, seed=seed, stop_ids=stop_ids, pad_id=pad_id)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        manifest = read_target_manifest(target_dir)
        tokenizer = AutoTokenizer.from_pretrained(target_dir, trust_remote_code=trust_remote_code)
    engine = VllmGenerator(target_dir, seed=seed, dtype=manifest["dtype"], threads=threads, trust_remote_code=trust_remote_code)
    if check and rows:
        got = engine.answer(rows, params, row_seeds=None, stop_ids=manifest["stop_token_ids"])
        differ = count_disagreements([reference[i] for i in range(len(rows))], got)
        if differ:
            log.warning("vLLM and transformers greedy answers differ on %d of the first %d prompts "
                        "(kernels and reduction order differ across engines, most in bf16/fp16: exact "
                        "agreement is not guaranteed)", differ, len(rows))
        else:
            log.info("vLLM and transformers greedy answers agree on the first %d prompts", len(rows))
    return engine, tokenizer, manifest


def run_rollouts(model, tokenizer, prompt_rows: list[dict], params: RolloutsParams, *, out_dir: str | Path,
                 work_dir: str | Path, seed: int, stop_ids: list[int], manifest_extra: dict,
                 group: RankGroup | None = None) -> dict | None:
    """Answer every prompt into shards; rank 0 returns the manifest, other ranks None."""
    group = group or RankGroup()
    if not isinstance(model, VllmGenerator):
        if pick_precision(params.precision, model.device) == "bf16" and model.dtype != torch.bfloat16:
            model = copy.deepcopy(model).to(torch.bfloat16)  # a copy: the caller's target stays as it was
        manifest_extra = {**manifest_extra, "generation_dtype": str(model.dtype).removeprefix("torch.")}
    rows, skipped = encode_prompts(tokenizer, prompt_rows, params)
    if not rows:
        raise UserError("rollouts: no prompt fits rollouts.max_prompt_tokens "
                         f"({params.max_prompt_tokens}); raise it or add prompts")
    log.info("read %d prompts; skipped %d longer than %d tokens; answering %d",
             len(prompt_rows), skipped, params.max_prompt_tokens, len(rows))
    work = open_work(group, work_dir, {"params": params.model_dump(), "seed": seed, **manifest_extra})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    shards = [rows[i: i + params.shard_size] for i in range(0, len(rows), params.shard_size)]
    resumed = 0
    t0, new_tokens = time.perf_counter(), 0
    with progress(desc="rollouts", unit="tok") as bar:
        for index, shard_rows in enumerate(shards):
            if not group.owns(index):
                continue
            if work.done(index) is not None:
                resumed += 1
            else:
                table, cut = generate_shard(model, shard_rows, params, seed=seed, stop_ids=stop_ids, pad_id=pad_id,
                                            bar=bar, tokenizer=tokenizer)
                tokens = sum(len(r) for r in table.column("response_ids").to_pylist())
                new_tokens += tokens
                if cut:
                    log.info("shard %d: %d conversations ended before their last turn (rollouts.max_prompt_tokens)", index, cut)
                work.write(index, table, response_tokens=tokens)
                bar.set_postfix(shard=f"{index + 1}/{len(shards)}")
    group.barrier()  # every rank's shards are in the work dir
    elapsed = time.perf_counter() - t0
    resumed, new_tokens = int(group.sum(resumed)), int(group.sum(new_tokens))
    if not group.is_main:
        return None
    entries = collect_entries(work, len(shards))
    if resumed:
        log.info("resumed: kept %d finished shards, generated %d", resumed, len(shards) - resumed)
    stats = summarize(entries, work.dir)
    manifest = {"kind": "rollouts", **stats, "skipped_long_prompts": skipped,
                "sampling": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k},
                "backend": params.backend, **manifest_extra}  # no timings: a manifest's bytes must depend only on its inputs
    manifest = work.finish(out_dir, entries, manifest)
    log.info("wrote %s: %d rows, %d response tokens in %d shards (%s); %.1f new tokens/s", out_dir, stats["rows"],
             stats["response_tokens"], len(entries), stats["finish_reasons"], new_tokens / elapsed if elapsed else 0.0)
    return manifest


def summarize(entries: list[dict], directory: Path) -> dict:
    rows, prompt_tokens, response_tokens, finish = 0, 0, 0, {}
    for e in entries:
        t = pa.ipc.open_file(pa.memory_map(str(directory / e["file"]))).read_all()
        rows += t.num_rows
        prompt_tokens += sum(len(x) for x in t.column("prompt_ids").to_pylist())
        response_tokens += sum(len(x) for x in t.column("response_ids").to_pylist())
        for f in t.column("finish_reason").to_pylist():
            finish[f] = finish.get(f, 0) + 1
    return {"rows": rows, "prompt_tokens": prompt_tokens, "response_tokens": response_tokens,
            "finish_reasons": dict(sorted(finish.items()))}


def load_rollouts(directory: str | Path, verify: bool = True) -> tuple[dict, list[pa.Table]]:
    """The rollouts manifest and its shards (memory-mapped), checked against the manifest."""
    manifest = read_manifest(directory, kind="rollouts")
    if verify:
        verify_shards(directory, manifest)
    return manifest, list(iter_shards(directory, manifest, verify=False))


def manifest_hash(directory: str | Path) -> str:
    return sha256_file(Path(directory) / MANIFEST)
