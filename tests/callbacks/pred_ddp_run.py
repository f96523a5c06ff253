"""PredictionEntropyMonitor under 2-process CPU DDP (gloo); rank 0 writes the logged history.

Also holds the small TinyGPT LightningModule and data the monitor's tests use, so the script and the tests train the
same model. Run by test_prediction_monitor.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

VOCAB, SEQ = 19, 10


class PredLM(L.LightningModule):
    """TinyGPT (1 layer, width 16); ``training_step`` returns ``{"loss", "logits"}`` when ``return_logits``."""

    def __init__(self, block_size: int = SEQ, dropout: float = 0.0, lr: float = 0.05, return_logits: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        from entrotrain.models.tiny_gpt import TinyGPT

        self.model = TinyGPT(vocab_size=VOCAB, block_size=block_size, n_layer=1, n_head=2, n_embd=16, dropout=dropout)
        self.nan_rows: list[int] = []  # rows of the returned logits to poison (non-finite data tests)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
        if not self.hparams.return_logits:
            return loss
        out = logits.detach()
        if self.nan_rows:
            out = out.clone()
            out[self.nan_rows, 0, 0] = float("nan")
        return {"loss": loss, "logits": out}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def data(n: int = 32, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Random ids; every odd row has its last 3 labels padded with -100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (n, SEQ), generator=g)
    y = torch.randint(VOCAB, (n, SEQ), generator=g)
    y[1::2, -3:] = -100
    return torch.utils.data.TensorDataset(x, y)


def probe(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data(6, seed).tensors
    return x, y


MONITOR = dict(every_n_steps=1, floor=2.9, positions=[0, 4, 9], generation_prompts=[[1, 2, 3], [4, 5, 6], [7]],
               max_new_tokens=6, log_media=False, print_summary=False)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from tests.helpers.ddp_trainer import ddp_trainer, rank_loader

    out = Path(sys.argv[1])
    source = sys.argv[2]
    L.seed_everything(3)
    model = PredLM(lr=0.0)
    monitor = PredictionEntropyMonitor(source=source, head="model.lm_head", probe=probe(), **MONITOR)
    trainer = ddp_trainer(callbacks=[monitor], max_steps=2, use_distributed_sampler=False)
    trainer.fit(model, rank_loader(trainer, data(), batch_size=8))
    if trainer.is_global_zero:
        out.write_text(json.dumps({"history": [[s, r] for s, r in monitor.history]}))
