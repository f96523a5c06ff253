"""Run by test_representation_regularizers.py as a script: 2 gloo CPU ranks compute MMCRLoss on their half of the
samples (projections ``z = x @ W`` of a shared weight), average the weight's gradient as DDP does, and write
``OUT/rank{r}.pt`` with the loss and the averaged gradient."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.regularizers.representation import MMCRLoss  # noqa: E402
from tests.helpers.gloo import spawn_gloo  # noqa: E402

WORLD, N_PER_RANK, K, IN, D, LAM = 2, 4, 3, 5, 6, 0.5


def make_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * N_PER_RANK, K, IN, generator=g, dtype=torch.float64)
    w = torch.randn(IN, D, generator=g, dtype=torch.float64)
    return x, w


def _worker(rank: int, out: str) -> None:
    x, w0 = make_batch()
    w = w0.clone().requires_grad_()
    local = x[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
    loss = MMCRLoss(1.0, LAM)(local @ w).total
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= WORLD
    torch.save({"loss": loss.detach(), "grad": grad}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    spawn_gloo(_worker, sys.argv[1], world=WORLD)
