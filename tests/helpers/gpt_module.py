"""A TinyGPT LightningModule (optionally σReparam-converted) and a loss recorder, shared by callback and DDP tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from entrotrain.models import TinyGPT
from entrotrain.regularizers.sigma_reparam import sigma_reparam

VOCAB, SEQ, HEADS = 50, 16, 2


class GPTModule(L.LightningModule):
    def __init__(self, convert: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.model = TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=HEADS, n_embd=32, dropout=dropout)
        if convert:
            sigma_reparam(self.model, exclude=("lm_head",))

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        logits = self.model(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class LossRecorder(L.Callback):
    """Keeps every training step's loss (a detached copy)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())
