r"""Attention-entropy collapse and its cure in a plain PyTorch training loop: no Lightning ``Trainer``, no HF.

The README's main job (``recipes/attention_collapse.yaml``: a 4-layer, 4-head pre-LN character GPT on the Python
standard library's source, AdamW at lr 1e-2 without warmup, 400 steps, seed 0) written as the loop you would write
yourself, with entrotrain in four places:

- :class:`~entrotrain.integrations.loop.EntropyMonitors` around the loop (``watch``) and around each optimizer step
  (``step``): the attention monitor every 25 steps, the representation monitor (RankMe, effective rank, matrix
  entropy of the last block's output) every 100, and a collapse guard;
- ``--cure floor``: :class:`~entrotrain.regularizers.EntropyFloorRegularizer` (weight 1, floor 0.2) inside the step;
- ``--record DIR``: ``EntropyMonitors(record=...)`` writes the run record ``entrotrain report`` reads (scalars, heatmaps,
  spectra, thresholds, the guard's firings, how the run ended), with the loss through ``monitors.record``;
- ``--wandb``: wandb (offline unless you set ``WANDB_MODE``), images included, through
  :func:`~entrotrain.dashboards.wandb_media.wandb_log` (``wandb.log(..., step=)`` would drop the rows of a loop resumed
  into the same wandb run: this logs them after the run's step, plotted at their ``trainer/global_step``);
- the monitors' ``state_dict()`` saved in the checkpoint beside the model's (``--checkpoint PATH``).

Same model initialisation, data order and optimizer as the recipe, so the same numbers (the guard fires at step 75,
normalised entropy min / mean 0.006 / 0.040 at step 375):

    OMP_NUM_THREADS=2 python examples/plain_loop.py                  # the collapse (about 1-2 min on 2 CPU cores)
    OMP_NUM_THREADS=2 python examples/plain_loop.py --cure floor     # the entropy floor keeps every head above 0.1
    python examples/plain_loop.py --steps 30 --record runs           # a smoke run, then: entrotrain report runs/...
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard, RepresentationEntropyMonitor
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.models import TinyGPT
from entrotrain.regularizers import EntropyFloorRegularizer
from entrotrain.tasks import CharCorpusDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--cure", choices=["none", "floor"], default="none")
    parser.add_argument("--record", default=None, help="write a run record under this folder (entrotrain report)")
    parser.add_argument("--wandb", action="store_true", help="log to wandb (WANDB_MODE=offline unless set)")
    parser.add_argument("--checkpoint", default=None, help="save model, optimizer and monitor state here at the end")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = CharCorpusDataModule(block_size=64, batch_size=32, seed=0)
    model = TinyGPT(vocab_size=data.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.0}, {"params": vectors, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    floor = EntropyFloorRegularizer(weight=1.0, floor=0.2) if args.cure == "floor" else None

    record = None
    if args.record:
        from entrotrain.dashboards import RunRecordLogger

        record = RunRecordLogger(args.record, name="plain_loop", run_name=f"plain_loop_{args.cure}")
        record.log_hyperparams(vars(args))
    loggers = []
    if args.wandb:
        import os

        import wandb

        from entrotrain.dashboards.wandb_media import wandb_log

        os.environ.setdefault("WANDB_MODE", "offline")
        wandb.init(project="entrotrain", name=f"plain_loop_{args.cure}", config=vars(args))
        loggers.append(wandb_log())  # not wandb.log: that drops rows below the run's step (a resume)

    def log(metrics: dict, step: int) -> None:  # the monitors' numbers (through log=) and the loop's own
        for sink in loggers:
            sink(metrics, step=step)

    monitors = EntropyMonitors(
        [
            AttentionEntropyMonitor(every_n_steps=25, max_rows=4, max_queries=256),
            RepresentationEntropyMonitor(include=["blocks.3"], every_n_steps=100, stage="train"),
        ],
        guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05, action="warn")],
        log=log,
        record=record,  # the monitors' scalars, arrays, thresholds and events; status at the end of watch
    )
    loader = data.train_dataloader()  # one loader: each epoch continues its sampler's generator
    batches = iter(loader)
    with monitors.watch(model, optimizer):
        for step in range(args.steps):
            try:
                x, y = next(batches)
            except StopIteration:  # the next epoch (100 batches each)
                batches = iter(loader)
                x, y = next(batches)
            with monitors.step(step):
                with floor.capture(model) if floor is not None else contextlib.nullcontext():
                    logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                total = loss if floor is None else loss + floor(step=step).total
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                monitors.observe(loss=loss)
            if step % 10 == 0:
                log({"train/loss": loss.item()}, step=step)
                if monitors.record is not None:
                    monitors.record.log_metrics({"train/loss": loss.item()}, step=step)
            if monitors.should_stop:
                break
        val = evaluate(model, data)
        print(f"final train / val loss {loss.item():.4f} / {val:.4f}")
        log({"val/loss": val}, step=step)
        if monitors.record is not None:
            monitors.record.log_metrics({"val/loss": val}, step=step)
    if args.checkpoint:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "entrotrain": monitors.state_dict(), "step": step}, args.checkpoint)  # fmt: skip
    if args.wandb:
        wandb.finish()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: CharCorpusDataModule, batches: int = 8) -> float:
    """Mean cross-entropy over the first ``batches`` validation batches (the recipe's ``limit_val_batches``)."""
    model.eval()
    losses = []
    for i, (x, y) in enumerate(data.val_dataloader()):
        if i == batches:
            break
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses) if losses else math.nan


if __name__ == "__main__":
    main()
