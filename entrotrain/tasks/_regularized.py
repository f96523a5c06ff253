"""What every recipe task does with its optional regulariser: capture attention around the forward, add the
penalty to the loss, log each named part as ``reg/{name}``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from lightning.pytorch import LightningModule
from torch import Tensor, nn

from entrotrain.regularizers.composition import Regularizer

__all__ = ["add_regularization", "capturing"]


def capturing(regularizer: Regularizer | None, model: nn.Module, step: int | None = None) -> AbstractContextManager:
    """``regularizer.capture(model, step=step)`` (no tap at a step of weight 0), or a no-op context when there is no
    regulariser."""
    return nullcontext() if regularizer is None else regularizer.capture(model, step=step)


def add_regularization(
    task: LightningModule, regularizer: Regularizer | None, loss: Tensor, batch_size: int | None = None
) -> Tensor:
    """``loss + regularizer(step).total`` with the parts logged as ``reg/{name}``; ``loss`` when there is none."""
    if regularizer is None:
        return loss
    reg = regularizer(step=task.global_step)
    task.log_dict(
        {f"reg/{name}": value for name, value in reg.parts.items()}, on_step=True, on_epoch=False, batch_size=batch_size
    )
    return loss + reg.total
