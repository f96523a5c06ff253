"""Classification of scikit-learn's 8×8 digits with a small MLP (:class:`~entrotrain.models.MLPClassifier`).

The hidden representations ``model.layers.{i}`` are what
:class:`~entrotrain.callbacks.RepresentationEntropyMonitor` watches in ``recipes/classifier_representations.yaml``
(diffusion spectral entropy and mutual information with the labels, per layer, over training).
Use it with :class:`~entrotrain.tasks.image_classification.DigitsDataModule`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from entrotrain.models.mlp_classifier import MLPClassifier

__all__ = ["DigitsMLPTask"]

Batch = tuple[torch.Tensor, torch.Tensor]


class DigitsMLPTask(LightningModule):
    """Train an :class:`MLPClassifier` on digits with cross-entropy and Adam.

    Logs ``train/loss``, ``train/acc`` per step and ``val/loss``, ``val/acc`` per validation.

    Args:
        hidden: hidden-layer widths (``model.layers.{i}``).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        dropout: dropout after each hidden block.
    """

    def __init__(
        self, hidden: tuple[int, ...] = (128, 128, 64), lr: float = 1e-3, weight_decay: float = 0.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.model = MLPClassifier(in_features=64, hidden=tuple(hidden), num_classes=10, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)`` for images ``(B, 1, 8, 8)``."""
        return self.model(x)

    def _step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, acc = self._step(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, acc = self._step(batch)
        n = len(batch[1])
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
