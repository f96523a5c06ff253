r"""A SimSiam-style self-supervised network for 8×8 grayscale images (scikit-learn's digits).

Chen & He (2021), "Exploring Simple Siamese Representation Learning": two augmented views ``x₁, x₂`` go through the
same encoder ``f`` (backbone + projector) giving ``z₁, z₂``, a predictor ``h`` gives ``p₁ = h(z₁)``, ``p₂ = h(z₂)``,
and the loss is the symmetrised negative cosine similarity

.. math::

    \mathcal{L} = \tfrac12 D(p_1, \mathrm{sg}(z_2)) + \tfrac12 D(p_2, \mathrm{sg}(z_1)),\qquad
    D(p, z) = -\frac{p}{\lVert p\rVert_2}\cdot\frac{z}{\lVert z\rVert_2}

where ``sg`` is the stop-gradient. Without it (``stop_gradient=False``) the representation collapses: its rank
(RankMe, effective rank) falls several-fold — the failure :mod:`recipes/ssl_rank_collapse.yaml` shows.

Module names: ``backbone`` (``backbone.{0..5}``: Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d, ReLU),
``projector`` and ``predictor`` (``nn.Sequential``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimSiam", "negative_cosine"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-cos(p_i, z_i)`` for ``(B, D)`` inputs (SimSiam's ``D``)."""
    return -F.cosine_similarity(p, z, dim=-1).mean()


class SimSiam(nn.Module):
    """Backbone MLP + projector + predictor; ``stop_gradient`` switches SimSiam's stop-gradient on or off.

    Args:
        in_features: flattened input size (64 for 8×8 digits).
        hidden_dim: backbone width; the backbone output (the representation) has this many features.
        feature_dim: projector output size ``D`` (``z``).
        pred_dim: predictor bottleneck width (SimSiam uses ``D / 4``).
        stop_gradient: detach the targets ``z`` in the loss (SimSiam). ``False`` reproduces the collapse.

    Shapes:
        ``forward(x)``: ``x`` ``(B, ...)`` with ``in_features`` values per sample; returns ``(z, p)``, each ``(B, D)``.
        ``loss(x1, x2)``: scalar symmetrised negative cosine similarity.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden_dim: int = 128,
        feature_dim: int = 64,
        pred_dim: int = 16,
        stop_gradient: bool = True,
    ) -> None:
        super().__init__()
        if min(in_features, hidden_dim, feature_dim, pred_dim) < 1:
            raise ValueError("in_features, hidden_dim, feature_dim and pred_dim must be positive")
        self.in_features = in_features
        self.stop_gradient = stop_gradient
        self.backbone = nn.Sequential(
            nn.Linear(in_features, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
        )
        self.projector = nn.Sequential(
            nn.Linear(hidden_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(),
            nn.Linear(feature_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(feature_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(),
            nn.Linear(pred_dim, feature_dim),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation ``(B, hidden_dim)`` of ``x`` ``(B, ...)``."""
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} values per sample, got {x.shape[1]}")
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, p)``: projection and prediction, each ``(B, feature_dim)``."""
        z = self.projector(self.encode(x))
        return z, self.predictor(z)

    def loss(
        self, x1: torch.Tensor, x2: torch.Tensor, *, return_projections: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Symmetrised negative cosine similarity of two views (both views in one batch: BatchNorm sees both).

        ``return_projections=True`` also returns ``z`` ``(2B, feature_dim)`` of both views, view-major
        (``[z₁; z₂]``), with its graph (not stop-gradiented), e.g. for a representation regulariser.
        """
        z, p = self(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        if self.stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return (loss, z) if return_projections else loss
