"""Run vLLM's `speculators` trainer (0.9.0) on a CPU, in its own venv (benchmarks/peer_trainers.py).

    <speculators venv>/bin/python benchmarks/peer_speculators_run.py --threads 1 -- <speculators train flags>
    <speculators venv>/bin/python benchmarks/peer_speculators_run.py --logits CHECKPOINT VERIFIER HS_FILE OUT

The second form is the conversion check: the peer's own model, loaded from its checkpoint, runs its
own training forward (anchored blocks, its masks) on one stored sequence and writes its draft logits
and the anchors it drew (safetensors), for benchmarks/peer_trainers.py to put our converted
drafter's logits beside.

speculators trains on one accelerator and never on a CPU build of torch; three calls stop it there,
and they are replaced here, nothing else:
- `Trainer` moves the model and every batch to `get_local_rank()` (the int 0, i.e. cuda:0): it gets
  the device "cpu" instead;
- its timers call `torch.accelerator.synchronize()`, which raises without an accelerator: a no-op;
- `torch.accelerator.current_accelerator()` is None, so its autocast would be "cuda": "cpu";
- its DataLoader pins memory, which needs an accelerator: not pinned.
And `--max-steps` stops an epoch but not the loop over `--epochs` (each later epoch then runs one
step): the epochs are set to just cover the steps.
The training itself (model, masks, anchors, losses, optimizer, schedule, checkpoints) is theirs.
This file runs inside the peer's venv: it imports nothing of ours.
"""
from __future__ import annotations

import argparse
import os
import sys


def patch_for_cpu() -> None:
    import torch

    import speculators.train.dataloader as dataloader
    import speculators.train.trainer as trainer

    trainer.get_local_rank = lambda: "cpu"
    torch.accelerator.synchronize = lambda *a, **k: None
    real_current = torch.accelerator.current_accelerator
    torch.accelerator.current_accelerator = lambda *a, **k: real_current(*a, **k) or torch.device("cpu")
    torch.accelerator.is_available = lambda: False  # what it was before the line above
    loader = dataloader.DataLoader
    dataloader.DataLoader = lambda *a, **k: loader(*a, **{**k, "pin_memory": False})
    init = trainer.Trainer.__init__

    def init_with_epochs(self, *a, **k):
        init(self, *a, **k)
        if self.config.max_steps:
            self.config = self.config._replace(num_epochs=-(-self.config.max_steps // len(self.train_loader)))

    trainer.Trainer.__init__ = init_with_epochs
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None


def dump_logits(checkpoint: str, verifier: str, hs_file: str, out: str, anchors: int = 16) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from speculators.model import SpeculatorModel

    config_cls = SpeculatorModel.registry["dflash"].config_class
    config = config_cls.from_pretrained(checkpoint)
    config.transformer_layer_config._attn_implementation = "sdpa"  # noqa: SLF001
    # its checkpoints hold bf16 weights (what it ships); computed in fp32, as our replay computes
    model = SpeculatorModel.registry["dflash"].from_pretrained(checkpoint, config=config, verifier=verifier,
                                                               dtype=torch.float32).float().eval()
    row = load_file(hs_file)
    hs, ids = row["hidden_states"].float(), row["token_ids"]
    S = ids.shape[0]
    torch.manual_seed(0)
    with torch.no_grad():
        hidden, logits, _, _, idx = model._backbone_forward(  # noqa: SLF001
            hs[None, :, :-1].flatten(2), ids[None], torch.ones(1, S, dtype=torch.long), hs[None, :, -1],
            torch.zeros(1, S, dtype=torch.long), torch.arange(S)[None], max_anchors=anchors)
    save_file({"logits": logits[0].float().contiguous(), "hidden": hidden[0].float().contiguous(),
               "anchors": idx[:: model.block_size].contiguous()}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--logits", nargs=4, metavar=("CHECKPOINT", "VERIFIER", "HS_FILE", "OUT"))
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the speculators train flags")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    patch_for_cpu()
    if args.logits:
        return dump_logits(*args.logits)
    from speculators.train.config import TrainConfig  # noqa: PLC0415
    from speculators.train.cli import main as train_main  # noqa: PLC0415

    flags = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    train_main(TrainConfig.resolve(flags))


if __name__ == "__main__":
    sys.exit(main())
