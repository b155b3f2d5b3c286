"""How much of the drafter's first guess token statistics alone explain: an n-gram baseline.

Counts, over the training rollouts of a labels dir (the train stage's own held-out split), which
acceptance label follows each response token (bigram) and each pair of tokens (trigram), then
scores the most frequent follower against the held-out rollouts' labels: the accuracy a drafter
would get at block position 1 from the anchor token (and the token before it) with no target
features at all. Also a skip-bigram for block position 2. With --drafter, the same held-out
anchors scored by a trained drafter (its greedy guess at block positions 1 and 2, teacher-forced,
as the train stage's held-out evaluation runs it). Seconds to a minute on CPU.

    python benchmarks/ngram.py --labels data/labels --drafter data/drafters/auf-0
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import torch

from specauf.params_file import load_params
from specauf.data.dataset import LabelsDataset
from specauf.train.batches import split_heldout


def sequences(ds: LabelsDataset, rows: list[int]):
    for i in rows:
        item = ds[i]
        yield item["input_ids"].tolist(), item["acceptance_ids"].tolist(), item["response_start"]


def anchors(ids: list[int], start: int):
    """Anchor positions a whose first label (a+1) is in the response, as `sample_anchors`."""
    return range(max(start - 1, 1), len(ids) - 1)


def top(counter: Counter | None) -> int | None:
    return counter.most_common(1)[0][0] if counter else None


@torch.no_grad()
def drafter_accuracy(params, ds: LabelsDataset, target, manifest: dict, drafter_dir: str,
                     held: list[int]) -> tuple[float, float]:
    """Accuracy of the drafter's greedy guess at block positions 1 and 2 over every held-out
    anchor, with the true prefix (position 2 scored whether or not position 1 was right)."""
    from specauf.train.drafter import BlockDrafter
    from specauf.train.run import DrafterRun
    from specauf.train.batches import TrainData

    drafter = BlockDrafter.from_pretrained(drafter_dir).eval()
    train_params = params.train.model_copy(update={"block_size": drafter.block_size,
                                                   "draft_vocab_size": drafter.config.draft_vocab_size})
    cpu = torch.device("cpu")
    data = TrainData(train_params, ds, params.base.seed, manifest["mask_token_id"],
                     target.get_output_embeddings().weight.shape[0], target, cpu)
    t = DrafterRun(train_params, "full", target, manifest, data, params.base.seed, cpu)
    if getattr(drafter, "d2t", None) is not None and not torch.equal(drafter.d2t, t.drafter.d2t):
        raise SystemExit(f"error: --drafter {drafter_dir}: its draft vocabulary is not the one these labels give")
    t.drafter = drafter
    hits, counts = [0, 0], [0, 0]
    for b in range(0, len(held), 2):
        batch = data.batch(held[b: b + 2], None, 10**9)  # every anchor
        if batch is None:
            continue
        logits, labels, validity = t.forward(drafter, batch)
        right = logits.argmax(-1) == labels
        for k in (0, 1):
            hits[k] += int((right[:, k] & validity[:, k]).sum())
            counts[k] += int(validity[:, k].sum())
    return hits[0] / max(counts[0], 1), hits[1] / max(counts[1], 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--labels", default="data/labels")
    ap.add_argument("--target", default="data/target")
    ap.add_argument("--drafter", action="append", default=[], help="also score this drafter dir (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_params(args.params)
    ds = LabelsDataset(args.labels)
    train, held = split_heldout(ds, p.train.heldout_fraction, p.base.seed, p.train.max_seq_len)
    bigram, trigram, skip = defaultdict(Counter), defaultdict(Counter), defaultdict(Counter)
    for ids, labels, start in sequences(ds, train):
        for a in anchors(ids, start):
            bigram[ids[a]][labels[a + 1]] += 1
            trigram[ids[a - 1], ids[a]][labels[a + 1]] += 1
            if a + 2 < len(ids):
                skip[ids[a]][labels[a + 2]] += 1
    n = hit_bi = hit_tri = n_skip = hit_skip = 0
    for ids, labels, start in sequences(ds, held):
        for a in anchors(ids, start):
            n += 1
            guess_bi = top(bigram.get(ids[a]))
            hit_bi += guess_bi == labels[a + 1]
            guess_tri = top(trigram.get((ids[a - 1], ids[a]))) or guess_bi
            hit_tri += guess_tri == labels[a + 1]
            if a + 2 < len(ids):
                n_skip += 1
                hit_skip += top(skip.get(ids[a])) == labels[a + 2]
    print(f"{args.labels}: {len(train)} training rollouts, {len(held)} held out, {n} held-out anchors")
    print("| baseline | predicts | held-out accuracy |\n|---|---|---|")
    print(f"| bigram: most frequent label after the anchor token | block position 1 | {hit_bi / max(n, 1):.3f} |")
    print(f"| trigram (bigram backoff): after the token before the anchor and the anchor | block position 1 | {hit_tri / max(n, 1):.3f} |")
    print(f"| skip-bigram: two after the anchor token | block position 2 | {hit_skip / max(n_skip, 1):.3f} |")
    if args.drafter:
        from specauf.target.run import load_target

        target, _, manifest = load_target(args.target)
    for d in args.drafter:
        acc1, acc2 = drafter_accuracy(p, ds, target, manifest, d, held)
        print(f"| drafter {d}: greedy guess, teacher-forced | block position 1 | {acc1:.3f} |")
        print(f"| drafter {d}: greedy guess, teacher-forced | block position 2 | {acc2:.3f} |")


if __name__ == "__main__":
    main()
