"""How much of what verification accepts a trained drafter's draft vocabulary can propose.

The draft vocabulary is the train.draft_vocab_size most frequent acceptance labels of the training
rollouts; a label outside it can never be guessed, so its block ends there. The train stage logs the
coverage of the TRAINING labels (100% when they hold fewer distinct tokens than the vocabulary);
what matters is the eval answers' coverage, per eval set, which this prints from a workspace's
data/drafters/<run> (d2t), data/eval_labels and data/prompts (set membership).

    python benchmarks/draft_vocab_coverage.py --workspace /tmp/gemma-run --run auf-0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.ipc as ipc

from specauf.data.dataset import LabelsDataset
from specauf.train.drafter import BlockDrafter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=Path("."))
    ap.add_argument("--run", default="auf-0")
    args = ap.parse_args()
    ws = args.workspace
    drafter = BlockDrafter.from_pretrained(ws / "data" / "drafters" / args.run)
    # the drafter's d2t holds the absolute target ids it scores (specauf/train/drafter.py)
    vocab = set(drafter.d2t.tolist()) if drafter.config.draft_vocab_size else None
    sets = {}
    for f in sorted((ws / "data" / "prompts").glob("eval-*.arrow")):
        with ipc.open_file(f) as r:
            for pid in r.read_all().column("prompt_id").to_pylist():
                sets[pid] = f.stem[len("eval-"):]
    data = LabelsDataset(ws / "data" / "eval_labels")
    counts: dict[str, list[int]] = {}
    for i in range(len(data)):
        item = data[i]
        labels = item["acceptance_ids"][item["response_start"]:].tolist()
        c = counts.setdefault(sets.get(item["prompt_id"], "?"), [0, 0])
        c[0] += sum(t in vocab for t in labels) if vocab is not None else len(labels)
        c[1] += len(labels)
    size = "full" if vocab is None else len(vocab)
    print(f"draft vocabulary of {args.run}: {size} of {drafter.config.vocab_size:,} target tokens")
    print("| eval set | acceptance labels | in the draft vocabulary |")
    print("|---|---|---|")
    for name, (inside, total) in sorted(counts.items()):
        print(f"| {name} | {total} | {inside / total:.2%} |")
    inside, total = (sum(c[k] for c in counts.values()) for k in (0, 1))
    print(f"| **all** | {total} | {inside / total:.2%} |")


if __name__ == "__main__":
    main()
