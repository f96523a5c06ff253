"""Synthetic RL batches and a LightningModule whose training_step returns them, for PolicyEntropyMonitor tests; the
per-rank parts of those batches for the 2-rank DDP run scripts, and their union for the one-process reference."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn

from tests.helpers.ddp_trainer import ddp_trainer
from tests.helpers.lightning_models import quiet_trainer

B, T = 6, 9


def rl_batch(seed: int, b: int = B, t: int = T, token_advantages: bool = False) -> dict[str, torch.Tensor]:
    """A random batch in the shape GRPO produces: ragged response masks, group advantages, rewards in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    entropy = torch.rand(b, t, generator=g) * 2.0
    logprobs = -torch.rand(b, t, generator=g) * 3.0
    advantages = torch.randn(b, t, generator=g) if token_advantages else torch.randn(b, generator=g)
    rewards = torch.rand(b, generator=g)
    return {
        "token_entropy": entropy,
        "logprobs": logprobs,
        "advantages": advantages,
        "response_mask": mask,
        "rewards": rewards,
        "temperature": 1.0,
    }


class ReturnsBatches(L.LightningModule):
    """training_step returns ``batches[i]`` (plus a real loss on a tiny linear layer so the optimizer steps)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        out = dict(self.batches[self.trainer.fit_loop.epoch_loop.total_batch_idx])
        out["loss"] = self.layer(batch[0]).pow(2).mean()
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int) -> torch.utils.data.DataLoader:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)


def fit_batches(batches: list[dict], monitor: L.Callback, *callbacks: L.Callback, logger=None):
    """One process, one step per batch of ``batches`` (returned by :class:`ReturnsBatches`); returns
    ``(trainer, model)``."""
    model = ReturnsBatches(batches)
    trainer = quiet_trainer(max_steps=len(batches), callbacks=[monitor, *callbacks], logger=logger or False)
    trainer.fit(model, loader(len(batches)))
    return trainer, model


def rank_batches(rank: int, n: int, make: Callable[[int], dict] = rl_batch) -> list[dict]:
    """This rank's rows of the union batches ``make(100 + s)``, ``s < n``: rank 0 holds rows 0..3 of each,
    truncated to 7 tokens; rank 1 rows 4..5, all 9 tokens."""
    out = []
    for s in range(n):
        union = make(100 + s)
        rows = slice(0, 4) if rank == 0 else slice(4, 6)
        part = {k: (v[rows] if hasattr(v, "dim") else v) for k, v in union.items()}
        if rank == 0:
            part = {k: (v[:, :7] if hasattr(v, "dim") and v.dim() == 2 else v) for k, v in part.items()}
        out.append(part)
    return out


def union_of_ranks(n: int, make: Callable[[int], dict] = rl_batch) -> list[dict]:
    """What one process sees of the two ranks' :func:`rank_batches`: rank 0's rows, padded back to 9 tokens with
    zeros (masked out), then rank 1's."""
    union = []
    for r0, r1 in zip(rank_batches(0, n, make), rank_batches(1, n, make)):
        merged = {}
        for k in r0:
            if hasattr(r0[k], "dim") and r0[k].dim() == 2:  # pad rank 0's 7 tokens to 9 (masked)
                pad = torch.zeros(r0[k].shape[0], 2, dtype=r0[k].dtype)
                merged[k] = torch.cat([torch.cat([r0[k], pad], 1), r1[k]])
            elif hasattr(r0[k], "dim"):
                merged[k] = torch.cat([r0[k], r1[k]])
            else:
                merged[k] = r0[k]
        union.append(merged)
    return union


def fit_rank_batches(monitor: L.Callback, out: Path, n: int = 3, make: Callable[[int], dict] = rl_batch) -> None:
    """In a 2-rank DDP run script: ``n`` steps, each rank returning its :func:`rank_batches`; rank 0 writes what
    ``monitor`` logged last to ``out`` (JSON)."""
    trainer = ddp_trainer(callbacks=[monitor], max_steps=n)
    rank = trainer.strategy.cluster_environment.global_rank()
    trainer.fit(ReturnsBatches(rank_batches(rank, n, make)), loader(2 * n))  # Lightning's sampler: n rows per rank
    if trainer.is_global_zero:
        out.write_text(json.dumps(monitor.last_logged))
