"""Stage `labels`: one teacher-forced target pass per rollout -> acceptance labels (+ features).

The acceptance label of a response position is what greedy verification would accept there:
the target's argmax given the true prefix. For greedy fp32 rollouts it equals the response token;
for sampled or human-written responses it does not, and AUF's "first failure" should be measured
against it. Context features are the outputs of the chosen target layers for every position.
Labels are per sequence and batches form within a rollouts shard, so N ranks (specauf.launch),
rank r labelling shards i % N == r, write the very bytes one process would.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from specauf.errors import UserError
from specauf.artifacts import read_manifest, verify_shards, iter_shards
from specauf.config import LabelsParams
from specauf.launch import RankGroup, collect_entries, open_work
from specauf.runtime import progress
from specauf.target.access import context_features_from_hidden_states, default_target_layer_ids

log = logging.getLogger("specauf")

FEATURE_DTYPES = {  # storage dtype -> (torch dtype, Arrow value type; bf16 travels as raw uint16 bits)
    "float16": (torch.float16, pa.float16()),
    "bfloat16": (torch.bfloat16, pa.uint16()),
    "float32": (torch.float32, pa.float32()),
}


def resolve_layer_ids(params: LabelsParams, num_target_layers: int) -> list[int]:

    ids = params.layer_ids if params.layer_ids is not None else default_target_layer_ids(num_target_layers, params.num_feature_layers)
    for i in ids:
        if i >= num_target_layers:
            raise UserError(f"labels.layer_ids: layer {i} is beyond the target's depth ({num_target_layers} layers, ids 0..{num_target_layers - 1})")
    return list(ids)


def schema(params: LabelsParams, feature_width: int) -> pa.Schema:
    fields = [
        ("prompt_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("response_start", pa.int32()),
        ("acceptance_ids", pa.list_(pa.int32())),
    ]
    if params.top_k:
        fields += [("topk_ids", pa.list_(pa.list_(pa.int32(), params.top_k))),
                   ("topk_probs", pa.list_(pa.list_(pa.float32(), params.top_k)))]
    if params.features == "offline":
        fields.append(("features", pa.list_(pa.list_(FEATURE_DTYPES[params.feature_dtype][1], feature_width))))
    return pa.schema(fields)


def _feature_array(feats: list[np.ndarray], value_type: pa.DataType, width: int) -> pa.Array:
    """Rows of (S, width) arrays as list<fixed_size_list<value, width>> without a Python loop per value."""
    flat = pa.array(np.concatenate([f.reshape(-1) for f in feats]), type=value_type)
    inner = pa.FixedSizeListArray.from_arrays(flat, width)
    offsets = np.concatenate([[0], np.cumsum([f.shape[0] for f in feats])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


@torch.inference_mode()
def label_batch(model, seqs: list[list[int]], starts: list[int], layer_ids: list[int], params: LabelsParams,
                pad_id: int) -> list[dict]:
    """Teacher-forced pass over right-padded sequences (padding after a sequence cannot affect it)."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    want_features = params.features == "offline"
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=want_features, use_cache=False)
    logits = out.logits.float()
    torch_dtype = FEATURE_DTYPES[params.feature_dtype][0]
    if want_features:
        fp32 = context_features_from_hidden_states(out.hidden_states, layer_ids)
        feats = fp32.to(torch_dtype)
        if torch_dtype != fp32.dtype and not bool(torch.isfinite(feats).all()) and bool(torch.isfinite(fp32).all()):
            H = fp32.shape[-1] // len(layer_ids)
            peak = fp32.abs().amax(dim=(0, 1)).view(len(layer_ids), H).amax(-1)
            worst = int(peak.argmax())
            raise UserError(f"labels.feature_dtype: {params.feature_dtype} cannot hold the target's features (layer "
                            f"{layer_ids[worst]} reaches {float(peak[worst]):.0f}); set bfloat16 or float32")
    rows = []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        n = len(s)
        pred = logits[i, start - 1: n - 1]  # predictions for response positions start..n-1
        row = {"acceptance_ids": pred.argmax(-1).int().cpu().numpy()}
        if params.top_k:
            probs = torch.softmax(pred / params.verify_temperature, dim=-1)
            top = torch.topk(probs, params.top_k, dim=-1)
            row["topk_ids"] = top.indices.int().cpu().numpy()
            row["topk_probs"] = top.values.cpu().numpy()
        if want_features:
            f = feats[i, :n].cpu()
            row["features"] = (f.view(torch.uint16) if torch_dtype == torch.bfloat16 else f).numpy()
        rows.append(row)
    return rows


def label_shard(model, rollouts: pa.Table, params: LabelsParams, layer_ids: list[int], feature_width: int,
                pad_id: int, bar=None) -> tuple[pa.Table, int, int]:
    prompts = rollouts.column("prompt_ids").to_pylist()
    responses = rollouts.column("response_ids").to_pylist()
    seqs = [p + r for p, r in zip(prompts, responses)]
    starts = [len(p) for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    results: dict[int, dict] = {}
    for b in range(0, len(order), params.batch_size):
        idx = [i for i in order[b: b + params.batch_size] if len(responses[i]) > 0]
        if idx:
            out = label_batch(model, [seqs[i] for i in idx], [starts[i] for i in idx], layer_ids, params, pad_id)
            results.update(zip(idx, out))
            if bar is not None:
                bar.update(sum(len(seqs[i]) for i in idx))
    keep = [i for i in range(len(seqs)) if i in results]
    agree = sum(int((results[i]["acceptance_ids"] == np.asarray(responses[i])).sum()) for i in keep)
    total = sum(len(responses[i]) for i in keep)
    sch = schema(params, feature_width)
    cols = {
        "prompt_id": pa.array([rollouts.column("prompt_id")[i].as_py() for i in keep], pa.string()),
        "input_ids": pa.array([seqs[i] for i in keep], pa.list_(pa.int32())),
        "response_start": pa.array([starts[i] for i in keep], pa.int32()),
        "acceptance_ids": pa.array([results[i]["acceptance_ids"] for i in keep], pa.list_(pa.int32())),
    }
    if params.top_k:
        for name, typ in (("topk_ids", pa.int32()), ("topk_probs", pa.float32())):
            cols[name] = _feature_array([results[i][name] for i in keep], typ, params.top_k)
    if params.features == "offline":
        cols["features"] = _feature_array([results[i]["features"] for i in keep], sch.field("features").type.value_type.value_type, feature_width)
    return pa.table(cols, schema=sch), agree, total


def run_labels(model, rollouts_dir: str | Path, params: LabelsParams, *, out_dir, work_dir, pad_id: int,
               manifest_extra: dict, group: RankGroup | None = None) -> dict | None:
    """Label every rollouts shard; rank 0 returns the manifest, other ranks None."""
    group = group or RankGroup()
    rollouts_manifest = read_manifest(rollouts_dir, kind="rollouts")
    verify_shards(rollouts_dir, rollouts_manifest)
    layer_ids = resolve_layer_ids(params, model.config.num_hidden_layers)
    hidden = model.config.hidden_size
    width = hidden * len(layer_ids)
    bytes_per_value = torch.empty((), dtype=FEATURE_DTYPES[params.feature_dtype][0]).element_size()
    bytes_per_token = width * bytes_per_value if params.features == "offline" else 0
    log.info("read %s: %d rollouts, %d response tokens; layers %s, %s features (%d bytes/token)",
             rollouts_dir, rollouts_manifest["rows"], rollouts_manifest["response_tokens"], layer_ids,
             params.features, bytes_per_token)
    work = open_work(group, work_dir, {"params": params.model_dump(), "layer_ids": layer_ids, **manifest_extra})
    resumed = 0
    total_tokens = rollouts_manifest["prompt_tokens"] + rollouts_manifest["response_tokens"]
    t0, tokens_done = time.perf_counter(), 0
    with progress(total=total_tokens, desc="labels", unit="tok") as bar:
        for index, table in enumerate(iter_shards(rollouts_dir, rollouts_manifest, verify=False)):
            if not group.owns(index):
                continue
            entry = work.done(index)
            if entry is None:
                out, a, t = label_shard(model, table, params, layer_ids, width, pad_id, bar)
                entry = work.write(index, out, agree=a, response_tokens=t,
                                   tokens=sum(len(x) for x in table.column("prompt_ids").to_pylist()) + t)
                tokens_done += entry["tokens"]
            else:
                resumed += 1
                bar.update(entry["tokens"])
    group.barrier()  # every rank's shards are in the work dir
    elapsed = time.perf_counter() - t0
    resumed, tokens_done = int(group.sum(resumed)), int(group.sum(tokens_done))
    if not group.is_main:
        return None
    entries = collect_entries(work, len(rollouts_manifest["shards"]))
    agree = sum(e["agree"] for e in entries)
    total = sum(e["response_tokens"] for e in entries)
    if resumed:
        log.info("resumed: kept %d finished shards", resumed)
    greedy = rollouts_manifest.get("sampling", {}).get("temperature", 0) == 0
    rate = agree / total if total else 1.0
    if total and agree != total:
        msg = f"acceptance labels disagree with the response tokens at {total - agree} of {total} positions ({rate:.4%} agree)"
        log.warning("%s%s", msg, " although rollouts are greedy (dtype or batching changed the argmax)" if greedy else "")
    else:
        log.info("acceptance labels agree with the response tokens at all %d positions", total)
    rows = sum(e["rows"] for e in entries)
    tokens = sum(e["tokens"] for e in entries)
    manifest = {
        "kind": "labels", "rows": rows, "tokens": tokens, "response_tokens": total,
        "features": params.features, "layer_ids": layer_ids, "hidden_size": hidden,
        "feature_dtype": params.feature_dtype if params.features == "offline" else None,
        "feature_bytes_per_token": bytes_per_token, "feature_bytes_total": bytes_per_token * tokens,
        "top_k": params.top_k, "verify_temperature": params.verify_temperature,
        "label_agreement": {"agree": agree, "total": total, "rate": rate, "greedy_rollouts": greedy},
        **manifest_extra,  # params hash, versions, target fingerprint, rollouts_manifest_sha256
    }  # no timings: a manifest's bytes must depend only on its inputs (downstream stages hash it)
    manifest = work.finish(out_dir, entries, manifest)
    log.info("wrote %s: %d sequences, %d tokens, %.1f MB of features; %.1f tokens/s", out_dir, rows, tokens,
             bytes_per_token * tokens / 1e6, tokens_done / elapsed if elapsed else 0.0)
    return manifest
