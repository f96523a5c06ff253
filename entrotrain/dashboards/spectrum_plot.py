"""An eigenvalue spectrum as a wandb line chart: ``log10`` of each eigenvalue's share of the trace, by rank.

A rank collapse shows as a spectrum that drops off a cliff after a few eigenvalues; a healthy representation as a
slow decay. Plotted natively by wandb (a ``wandb.Table`` + ``wandb.plot.line``): no matplotlib, no image.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["spectrum_shares", "spectrum_plot"]

#: Shares below this are drawn at ``log10(_FLOOR)`` (a zero eigenvalue has no logarithm).
_FLOOR = 1e-16


def spectrum_shares(eigenvalues: Tensor, top: int | None = None) -> Tensor:
    """``λ_k / Σλ`` sorted descending (negative round-off clamped to 0), the first ``top`` of them, float64 CPU."""
    lam = eigenvalues.detach().double().cpu().flatten().clamp_min(0.0).sort(descending=True).values
    total = float(lam.sum())
    shares = lam / total if total > 0 else lam
    return shares[:top] if top is not None else shares


def spectrum_plot(eigenvalues: Tensor, title: str, top: int | None = 256) -> Any:
    """A ``wandb`` line chart of ``log10(λ_k / Σλ)`` against ``k = 1, 2, ...`` (at most ``top`` points)."""
    import wandb

    shares = spectrum_shares(eigenvalues, top)
    data = [[k + 1, math.log10(max(float(s), _FLOOR))] for k, s in enumerate(shares)]
    table = wandb.Table(columns=["k", "log10 share"], data=data)
    return wandb.plot.line(table, "k", "log10 share", title=title)
