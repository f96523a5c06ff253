"""Next-character language modelling with :class:`entrotrain.models.TinyGPT`."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.regularizers.composition import Regularizer, combine_regularizers
from entrotrain.regularizers.sigma_reparam import sigma_reparam as convert_to_sigma_reparam
from entrotrain.tasks._regularized import add_regularization, capturing

__all__ = ["LanguageModelingTask"]


class LanguageModelingTask(LightningModule):
    """Train a :class:`TinyGPT` with cross-entropy on ``(x, y)`` id batches.

    Attention modules are reachable as ``model.blocks.{i}.attn``.

    Args:
        vocab_size: number of token ids (128 for :class:`CharCorpusDataModule`).
        block_size: maximum context length.
        n_layer: transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        dropout: dropout probability.
        lr: peak learning rate of Adam/AdamW.
        weight_decay: decoupled weight decay (AdamW) on matrices; ``0`` -> plain Adam behaviour.
        betas: Adam betas.
        warmup_steps: linear warm-up steps from ``0`` to ``lr`` (``0`` disables warm-up).
        sigma_reparam: reparametrise every linear layer of the transformer blocks with σReparam
            (:func:`entrotrain.regularizers.sigma_reparam`; ``lm_head`` is tied to the embedding and stays plain).
        regularizers: attention-entropy regularisers added to the loss (summed); each named part is logged as
            ``reg/{name}``, and ``train/loss`` stays the cross-entropy alone.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        sigma_reparam: bool = False,
        regularizers: list[Regularizer] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["regularizers"])
        self.model = TinyGPT(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
        )
        if sigma_reparam:
            convert_to_sigma_reparam(self.model, include=["blocks.**"])
        self.regularizer: Regularizer | None = combine_regularizers(regularizers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` for ids ``(B, T)``."""
        return self.model(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with capturing(self.regularizer, self.model, self.global_step):
            loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return add_regularization(self, self.regularizer, loss)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's return type is a union
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        if self.regularizer is not None:  # learnable thresholds (entropy band): never decayed
            no_decay += [p for p in self.regularizer.parameters() if p.requires_grad]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
