"""Deterministic sampling budgets: which batch rows and query positions a tap scores.

Evenly spaced indices, never random: a tap must not consume the training RNG (monitoring never changes training),
and the same positions are scored at every logging step, so values are comparable over time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError

__all__ = ["evenly_spaced", "check_budget"]


def check_budget(value: int | None, name: str) -> int | None:
    """Validate a budget: ``None`` (everything) or a positive count."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise EntrotrainError(f"{name} must be None (no limit) or a positive integer, got {value!r}.")
    return value


def evenly_spaced(n: int, budget: int | None, device: torch.device | None = None) -> Tensor | None:
    """``budget`` evenly spaced indices in ``[0, n)`` including both ends, or ``None`` when ``n <= budget``."""
    if budget is None or n <= budget:
        return None
    if budget == 1:
        return torch.tensor([n - 1], device=device)
    return torch.linspace(0, n - 1, budget, device=device).round().long()
