"""RepresentationEntropyMonitor under 2-process CPU DDP (gloo), one logging step; rank 0 writes what it logged.

Also holds the small LightningModule the monitor's tests use (token outputs ``(B, T, C)``, pooled ``(B, C)``,
dropout, labels), so the script and the tests train the same model. Run by test_representation_monitor.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

IN, TOK, FEAT, SEQ, CLASSES = 6, 10, 8, 5, 3


class ReprNet(L.LightningModule):
    """``tokens`` (B, T, 10) → mean over T → ``encoder`` (B, 8) → ``head`` (B, 3); cross-entropy on labels."""

    def __init__(self, dropout: float = 0.0, lr: float = 0.05) -> None:
        super().__init__()
        self.tokens = nn.Linear(IN, TOK)
        self.encoder = nn.Sequential(nn.Linear(TOK, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, FEAT))
        self.head = nn.Linear(FEAT, CLASSES)
        self.lr = lr
        self.fail_at: int | None = None
        self.hooked_steps: list[tuple[int, bool]] = []  # (global_step, any forward hook installed during the step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x).mean(1)
        return self.head(self.encoder(h))

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        self.hooked_steps.append((self.global_step, any(m._forward_hooks for m in self.modules())))
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n: int = 48, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ, IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loader(n: int = 48, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data(n, seed), batch_size=batch_size, shuffle=False)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from entrotrain.callbacks import RepresentationEntropyMonitor
    from tests.helpers.ddp_trainer import count_collectives, ddp_trainer, rank_loader

    out = Path(sys.argv[1])
    accumulate = int(sys.argv[2])
    L.seed_everything(3)
    model = ReprNet()
    monitor = RepresentationEntropyMonitor(
        include=["tokens", "encoder"],
        measures=["rankme", "effective_rank", "vendi", "matrix_entropy"],
        every_n_steps=100,
        max_tokens=None,
        max_samples=64,
        log_spectrum=False,
    )
    trainer = ddp_trainer(
        callbacks=[monitor], max_steps=1, accumulate_grad_batches=accumulate, use_distributed_sampler=False
    )
    # every torch.distributed collective issued while it flushes
    collectives = count_collectives(monitor, "_flush")
    trainer.fit(model, rank_loader(trainer, data(), batch_size=8))
    if trainer.is_global_zero:
        out.write_text(json.dumps({"logged": monitor.last_logged, "collectives": collectives}))
