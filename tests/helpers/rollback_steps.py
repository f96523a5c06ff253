"""Rollback tests whose weights say which state came back: each observation's weights are filled with its step."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard


def at_step(model: nn.Module, step: int) -> None:
    """The weights the model has when step ``step`` is observed: every parameter filled with ``step``."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))


def weights_step(model: nn.Module) -> float:
    """The step whose weights the model holds (:func:`at_step`)."""
    values = {float(v) for p in model.parameters() for v in p.detach().flatten()}
    assert len(values) == 1, values
    return values.pop()


def observe(guard: EntropyCollapseGuard, optimizer: torch.optim.Optimizer, step: int, good: bool) -> str | None:
    """The guard judges a good (0.9) or bad (0.1) value at ``step``; a firing acts on ``optimizer`` and returns its
    message (warnings silenced)."""
    reason = guard.observe(0.9 if good else 0.1, step)
    if reason is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return guard.fire(reason, step, [optimizer])
