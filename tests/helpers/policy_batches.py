"""Synthetic RL batches and a LightningModule whose training_step returns them, for PolicyEntropyMonitor tests."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

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
