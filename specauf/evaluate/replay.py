"""Tau by replay: every eval prompt's tau without decoding it (docs/method.md, section 5).

At temperature 0 speculative decoding emits the target's greedy text, and a cycle anchored at
position a keeps exactly the drafter's guesses that match that text, plus one. So a prompt's
cycles follow from its greedy answer (stage `eval_rollouts`), the target's context features over
it (stage `eval_labels`, one teacher-forced pass) and the drafter's guesses at every anchor, which
one batched forward per sequence gives: every anchor's block laid end to end, each block seeing
its own keys and the context strictly before its anchor, as in training (specauf/train/blocks.py).
The walk (anchor -> anchor + accepted + 1) then reproduces the decode loop's accounting
(specauf/evaluate/decode.py) cycle for cycle; the eval stage checks that on the prompts it also decodes.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from specauf.data.dataset import LabelsDataset
from specauf.evaluate.cycles import close_cycle, guesses_per_block, pool_cycles
from specauf.train.blocks import block_attention_mask
from specauf.train.domino import chained_guesses, is_domino
from specauf.evaluate.decode import BLOCK_LAYOUTS
from specauf.artifacts import ArtifactError
from specauf.errors import ExactnessError
from specauf.runtime import progress

log = logging.getLogger("specauf")

ANCHORS_PER_FORWARD = 64  # blocks per drafter forward: attention is (A*W)^2, so chunks keep it small


@torch.inference_mode()
def anchor_guesses(drafter, embed, head, input_ids: torch.Tensor, features: torch.Tensor, anchors: list[int],
                   widths: list[int], keep: int) -> np.ndarray:
    """Greedy guesses (A, keep) at each anchor of ONE sequence, block i being `widths[i]` tokens
    `[token[a], MASK...]` at positions a.. (a block narrower than the widest is masked out of the
    keys past its width, which makes it exactly that narrower block). `features` (S, n*H) are the
    drafter's context features of the sequence; `head` = drafter.draft_head(lm_head)."""
    out = np.zeros((len(anchors), keep), dtype=np.int64)
    d2t = drafter.d2t if drafter.config.draft_vocab_size else None
    domino = is_domino(drafter.config)
    for lo in range(0, len(anchors), ANCHORS_PER_FORWARD):
        a = torch.tensor(anchors[lo: lo + ANCHORS_PER_FORWARD], dtype=torch.long)
        w = torch.tensor(widths[lo: lo + ANCHORS_PER_FORWARD], dtype=torch.long)
        A, W, C = len(a), int(w.max()), int(a.max())
        slots = torch.arange(W)
        ids = torch.full((A, W), drafter.mask_token_id, dtype=torch.long)
        ids[:, 0] = input_ids[a]
        mask = block_attention_mask(a, W, C, widths=w)  # the training mask, each block cut to its width
        dev = head.device
        hidden = drafter(embed(ids.to(dev)).to(drafter.dtype).view(1, A * W, -1), features[None, :C].to(dev),
                         block_position_ids=(a[:, None] + slots[None]).view(1, -1).to(dev),
                         context_position_ids=torch.arange(C, device=dev)[None],
                         attention_mask=mask[None, None].to(dev))
        slots = hidden.view(A, W, -1)[:, 1:keep + 1]
        logits = drafter.draft_logits(slots, head)
        if domino:  # each guess fed back through the head, as the decode drafts
            best = chained_guesses(drafter, slots, logits, ids[:, 0].to(dev), embed, d2t)[0]
        else:
            best = logits.argmax(-1)
            best = d2t[best] if d2t is not None else best
        out[lo: lo + A, : best.shape[1]] = best.cpu().numpy()  # W - 1 may be < keep
    return out


def walk(response: list[int], guesses, block_size: int, max_new_tokens: int, stops: set[int]) -> dict:
    """One prompt's decode cycles, replayed. `guesses(c, n)` gives the n guesses proposed with c
    tokens committed (anchor = response[c-1]). Same conventions as specauf.evaluate.decode: the prefill's
    token belongs to no cycle, tokens past a stop token are cut, block position k is attempted when
    proposed with every earlier guess accepted and its slot kept."""
    b = block_size
    attempted, accepted, lengths = [0] * (b - 1), [0] * (b - 1), [0] * (b + 1)
    emitted_total, cycles, c = 0, 0, 1
    stopped = not response or response[0] in stops
    while not stopped and c < max_new_tokens:
        n = guesses_per_block(b - 1, max_new_tokens, c)
        g = guesses(c, n) if n > 0 else []
        n_acc = 0
        while n_acc < n and c + n_acc < len(response) and g[n_acc] == response[c + n_acc]:
            n_acc += 1
        emitted = response[c: c + n_acc + 1]  # the accepted guesses and the bonus (the target's own token)
        if not emitted:
            raise ArtifactError(f"replay: the greedy answer ends after {len(response)} tokens, before "
                                f"max_new_tokens={max_new_tokens} and without a stop token")
        emitted, stopped = close_cycle(emitted, n, n_acc, stops, attempted, accepted)
        kept = len(emitted)
        emitted_total, cycles, c = emitted_total + kept, cycles + 1, c + kept
        lengths[kept] += 1
    return {"emitted": emitted_total, "cycles": cycles, "attempted": attempted, "accepted": accepted,
            "lengths": lengths}


def serving_walk(response: list[int], guesses, n_max: int, max_new_tokens: int, stops: set[int]) -> dict:
    """One prompt's cycles in a serving engine's books (vLLM's counters): every cycle drafts n_max
    guesses, also in the last one, and counts every guess it accepts, also those past
    max_new_tokens that the engine then cuts; tau = 1 + accepted / cycles. Our walk above never
    drafts past the end, so on short answers with good acceptance the two differ by up to n_max
    per prompt: the gate compares like with like. `response` must run n_max tokens past
    max_new_tokens (or end with a stop token)."""
    accepted, cycles, c = [0] * n_max, 0, 1
    stopped = not response or response[0] in stops
    while not stopped and c < max_new_tokens:
        g = guesses(c, n_max)
        n_acc = 0
        while n_acc < n_max and c + n_acc < len(response) and g[n_acc] == response[c + n_acc]:
            n_acc += 1
        if n_acc < n_max and c + n_acc >= len(response) and response[-1] not in stops:
            raise ArtifactError(f"replay: the greedy answer ends after {len(response)} tokens, before the guesses of a "
                                f"cycle at {c} with {n_max} guesses were checked")
        for i in range(n_acc):
            accepted[i] += 1
        emitted = response[c: c + n_acc + 1]
        stop_at = next((i for i, t in enumerate(emitted) if t in stops), None)
        stopped = stop_at is not None
        c, cycles = c + (stop_at + 1 if stopped else len(emitted)), cycles + 1
    return {"cycles": cycles, "accepted": accepted}


def _feature_columns(drafter, layer_ids: list[int], hidden_size: int, where: str) -> torch.Tensor | None:
    """Columns of the stored features the drafter reads (None: all of them, in order)."""
    want = drafter.target_layer_ids
    if want == list(layer_ids):
        return None
    missing = [i for i in want if i not in layer_ids]
    if missing:
        raise ArtifactError(f"{where}: features of target layers {layer_ids}, the drafter reads {want} "
                            "(rebuild eval_labels with the drafter's labels params)")
    return torch.cat([torch.arange(layer_ids.index(i) * hidden_size, (layer_ids.index(i) + 1) * hidden_size) for i in want])


def replay_drafter(drafter, target, answers: LabelsDataset | str, prompt_set: dict[str, str], block_sizes: list[int], layout: str,
                   max_new_tokens: int, stop_ids: list[int], desc: str = "replay", served: bool = False) -> list[dict]:
    """Per prompt of `prompt_set` ({prompt_id: set name}) and block size: emitted, cycles, attempted,
    accepted, emitted-length histogram, over the first max_new_tokens of its greedy answer.
    `answers`: stage eval_labels' output, opened (its checksums verified once per stage) or a path.
    served: in a serving engine's books instead (serving_walk: cycles, accepted by position)."""
    if layout not in BLOCK_LAYOUTS:
        raise ValueError(f"block layout {layout!r} is not one of {BLOCK_LAYOUTS}")
    data = answers if isinstance(answers, LabelsDataset) else LabelsDataset(answers)
    labels_dir = data.dir
    if not data.offline:
        raise ArtifactError(f"{labels_dir}: no context features (features: online); the replay needs them")
    cols = _feature_columns(drafter, data.manifest["layer_ids"], data.manifest["hidden_size"], str(labels_dir))
    by_id = {data[i]["prompt_id"]: i for i in range(len(data))} if len(data) else {}
    absent = [p for p in prompt_set if p not in by_id]
    if absent:
        raise ArtifactError(f"{labels_dir}: no answer for eval prompt {absent[0]!r} ({len(absent)} missing; "
                            "rebuild eval_rollouts and eval_labels)")
    embed = target.get_input_embeddings()
    head = drafter.draft_head(target.get_output_embeddings().weight)
    stops, B = {int(t) for t in stop_ids}, drafter.block_size
    rows = []
    with progress(total=len(prompt_set), desc=desc, unit="prompt") as bar:
        for pid, set_name in prompt_set.items():
            item = data[by_id[pid]]
            ids, P = item["input_ids"], int(item["response_start"])
            response = ids[P:].tolist()
            feats = item["features"] if cols is None else item["features"][:, cols]
            M = max_new_tokens
            row = {"set": set_name, "prompt_id": pid, "max_new_tokens": M}
            trained = None
            for b in block_sizes:
                if b == 1:
                    continue
                if served:  # every cycle drafts b - 1 guesses, the last one too
                    table = _table(drafter, embed, head, ids, feats, P, len(response), M, b - 1,
                                   (lambda n: B) if layout == "trained" else (lambda n: n + 1), full=True)
                    row[f"b{b}"] = serving_walk(response, lambda c, n: table[c][:n], b - 1, M, stops)
                    continue
                if layout == "trained":  # one forward serves every block size: the first n of B - 1 guesses
                    if trained is None:
                        trained = _table(drafter, embed, head, ids, feats, P, len(response), M, B - 1, lambda n: B)
                    table = trained
                else:
                    table = _table(drafter, embed, head, ids, feats, P, len(response), M, b - 1, lambda n: n + 1)
                row[f"b{b}"] = walk(response, lambda c, n: table[c][:n], b, M, stops)
            rows.append(row)
            bar.update(1)
    return rows


def _table(drafter, embed, head, ids, feats, P: int, R: int, M: int, n_max: int, width,
           full: bool = False) -> dict[int, np.ndarray]:
    """{committed c: guesses} for every c the walk can reach with guesses to propose (full: n_max
    guesses at every c, as a serving engine drafts)."""
    n_at = (lambda c: n_max) if full else (lambda c: guesses_per_block(n_max, M, c))
    cs = [c for c in range(1, min(R, M)) if n_at(c) > 0]
    if not cs:
        return {}
    widths = [width(n_at(c)) for c in cs]
    g = anchor_guesses(drafter, embed, head, ids, feats, [P + c - 1 for c in cs], widths, n_max)
    return dict(zip(cs, g))


def summarize_replay(rows: list[dict], key: str) -> dict:
    """Pooled over prompts, as specauf.evaluate.decode.summarize: tau (ratio of sums), acceptance by position."""
    runs = [r[key] for r in rows if key in r]
    total = lambda field: [int(v) for v in np.sum([x[field] for x in runs], axis=0)] if runs else []
    return pool_cycles(len(runs), sum(x["emitted"] for x in runs), sum(x["cycles"] for x in runs),
                       total("lengths"), total("attempted"), total("accepted"))


# Replay and decoding agree cycle for cycle up to fp32 noise: batched and cached drafter passes can
# flip an argmax at a near-tie, which moves one cycle. Beyond this (pooled over the decoded prompts,
# per block size) the replay is not measuring what decoding does, and the eval stage fails.
REPLAY_TOLERANCE = 0.02


def replay_check(decoded: list[dict], replayed: list[dict]) -> dict:
    """Decoded against replayed tau on the same prompts and max_new_tokens: per prompt and pooled."""
    index = {(r["set"], r["prompt_id"]): r for r in replayed}
    rows, pooled = [], {}
    for d in decoded:
        r = index[(d["set"], d["prompt_id"])]
        row = {"set": d["set"], "prompt_id": d["prompt_id"]}
        for key in (k for k in d if k.startswith("b") and k[1:].isdigit()):
            dt, rt = d[key]["emitted"] / max(d[key]["cycles"], 1), r[key]["emitted"] / max(r[key]["cycles"], 1)
            row[key] = {"decoded": [d[key]["emitted"], d[key]["cycles"]], "replayed": [r[key]["emitted"], r[key]["cycles"]],
                        "tau_difference": rt - dt}
            p = pooled.setdefault(key, [0, 0, 0, 0])
            p[0] += d[key]["emitted"]; p[1] += d[key]["cycles"]; p[2] += r[key]["emitted"]; p[3] += r[key]["cycles"]
        rows.append(row)
    per_size = {k: {"decoded_tau": p[0] / max(p[1], 1), "replayed_tau": p[2] / max(p[3], 1),
                    "difference": p[2] / max(p[3], 1) - p[0] / max(p[1], 1)} for k, p in pooled.items()}
    diffs = [abs(v["tau_difference"]) for row in rows for k, v in row.items() if isinstance(v, dict)]
    return {"prompts": len(rows), "tolerance": REPLAY_TOLERANCE, "pooled": per_size,
            "max_abs_prompt_difference": max(diffs, default=0.0),
            "prompts_differing": sum(any(isinstance(v, dict) and v["tau_difference"] for v in row.values()) for row in rows),
            "rows": rows}


def check_replay(check: dict, gate: bool) -> None:
    """Fail the stage (warn, without the gate) when replay and decoding disagree beyond fp32 noise."""
    bad = {k: v for k, v in check["pooled"].items() if abs(v["difference"]) > check["tolerance"]}
    if bad and not gate:
        log.warning("replay differs from decoding beyond %s at block sizes %s (eval.exactness_gate off)",
                    check["tolerance"], ", ".join(k[1:] for k in bad))
    elif bad:
        k, v = next(iter(bad.items()))
        raise ExactnessError(f"replay disagrees with decoding at block size {k[1:]}: replayed tau {v['replayed_tau']:.4f}, "
                          f"decoded {v['decoded_tau']:.4f} over {check['prompts']} decoded prompts (tolerance "
                          f"{check['tolerance']}); the eval answers are not this target's greedy text, or the "
                          "drafter runs differently in the two")

