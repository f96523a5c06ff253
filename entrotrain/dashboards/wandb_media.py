"""Turn reduced statistics into wandb media: a layer × head heatmap image and a histogram.

wandb and pillow are imported lazily, only when a wandb logger is attached; the colormap is applied in torch so a
heatmap costs ~2 ms (a matplotlib figure costs ~140 ms).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from entrotrain._imports import _PIL_AVAILABLE, _WANDB_AVAILABLE

__all__ = ["colorize", "heatmap_image", "histogram", "wandb_loggers"]

# viridis at 0, 1/4, 1/2, 3/4, 1; NaN cells are drawn mid-grey.
_VIRIDIS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
)
_MISSING = torch.tensor([128.0, 128.0, 128.0])


def colorize(values: Tensor, vmin: float = 0.0, vmax: float = 1.0, cell: int | None = None) -> np.ndarray:
    """``(rows, cols)`` values → ``(rows·cell, cols·cell, 3)`` uint8 RGB with the viridis colormap.

    ``cell`` (pixels per value) defaults to what makes the longer side about 512 px (8 to 48 px per cell).
    """
    x = values.detach().to(torch.float32).cpu()
    if cell is None:
        cell = max(8, min(48, 512 // max(x.shape)))
    missing = ~torch.isfinite(x)
    t = ((x - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1).nan_to_num(0.0) * (len(_VIRIDIS) - 1)
    lo = t.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (t - lo).unsqueeze(-1)
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    rgb[missing] = _MISSING
    rgb = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return rgb.round().to(torch.uint8).numpy()


def wandb_loggers(loggers: list[Logger]) -> list[Any]:
    """The :class:`~lightning.pytorch.loggers.WandbLogger` instances among ``loggers``."""
    if not _WANDB_AVAILABLE:
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


_warned_no_pil = False


def heatmap_image(values: Tensor, caption: str, vmin: float = 0.0, vmax: float = 1.0) -> Any | None:
    """A ``wandb.Image`` of ``values`` (rows = layers, columns = heads), or ``None`` without pillow (warned once)."""
    global _warned_no_pil
    if not _PIL_AVAILABLE:
        if not _warned_no_pil:
            rank_zero_warn("entrotrain: heatmap images need pillow: `pip install 'entrotrain[media]'`. Logging histograms only.")
            _warned_no_pil = True
        return None
    import wandb

    return wandb.Image(colorize(values, vmin, vmax), caption=caption)


def histogram(values: Tensor, bins: int = 20, range_: tuple[float, float] = (0.0, 1.0)) -> Any:
    """A pre-binned ``wandb.Histogram`` of the finite entries of ``values``."""
    import wandb

    x = values.detach().flatten().double().cpu().numpy()
    x = x[np.isfinite(x)]
    return wandb.Histogram(np_histogram=np.histogram(x, bins=bins, range=range_))
