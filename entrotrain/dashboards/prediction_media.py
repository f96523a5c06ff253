"""wandb media of :class:`~entrotrain.callbacks.prediction_monitor.PredictionEntropyMonitor`: the per-position
prediction-entropy profile of the probe set as a heatmap over time (positions × logging steps)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from entrotrain._imports import _PIL_AVAILABLE
from entrotrain.dashboards.wandb_media import time_grid_image

__all__ = ["position_profile_grid", "position_profile_over_time_image"]


def position_profile_grid(history: list[Tensor]) -> Tensor:
    """``(positions, steps)`` float32 grid: column ``j`` is ``history[j]`` (a ``(T_j,)`` profile); cells a shorter
    profile lacks are NaN (drawn grey)."""
    length = max((h.numel() for h in history), default=0)
    grid = torch.full((length, len(history)), float("nan"))
    for col, h in enumerate(history):
        grid[: h.numel(), col] = h.detach().float().cpu().reshape(-1)
    return grid


def position_profile_over_time_image(
    history: list[Tensor], steps: list[int], vmax: float | None = None
) -> Any | None:
    """A ``wandb.Image``: one row per sequence position (0 at the top), one column per logging step, coloured from 0
    to ``vmax`` nats (default: the largest finite value, at least 1e-6); ``None`` for an empty history or without
    pillow. Hyperfitting shows as the whole image going dark from the step fine-tuning starts."""
    if not history or not _PIL_AVAILABLE:
        return None
    grid = position_profile_grid(history)
    if grid.numel() == 0:
        return None
    if vmax is None:
        finite = grid[torch.isfinite(grid)]
        vmax = max(1e-6, float(finite.max())) if finite.numel() else 1.0
    caption = (
        f"probe prediction entropy per position over time: rows = positions 0..{grid.shape[0] - 1}, columns = logging "
        f"steps {steps[0]}..{steps[-1]}; colour 0..{vmax:.3g} nats, dark = confident"
    )
    return time_grid_image(grid, 0.0, vmax, caption)
