"""A small multilayer perceptron classifier whose hidden layers are easy to tap by name.

``layers.{i}`` is the ``i``-th hidden block (``Linear → ReLU``, whose output is the layer's representation) and
``head`` the linear classifier, so ``include=["model.layers.*"]`` monitors every hidden representation.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLPClassifier"]


class MLPClassifier(nn.Module):
    """Flatten → ``len(hidden)`` blocks ``Linear → ReLU`` (``layers.{i}``) → ``Linear`` head.

    Args:
        in_features: values per input sample (64 for 8×8 digits).
        hidden: widths of the hidden blocks.
        num_classes: number of classes ``K``.
        dropout: dropout after every hidden block (``0`` = none).

    Shapes:
        ``forward(x)``: ``x`` ``(B, ...)`` with ``in_features`` values per sample; returns logits ``(B, K)``.
    """

    def __init__(
        self, in_features: int = 64, hidden: tuple[int, ...] = (128, 128, 64), num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden!r}")
        widths = [in_features, *hidden]
        self.in_features = in_features
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(), *([nn.Dropout(dropout)] if dropout > 0 else []))
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)``."""
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} values per sample, got {x.shape[1]}")
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
