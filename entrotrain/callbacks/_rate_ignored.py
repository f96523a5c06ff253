"""Optimizers on which a guard's rate action does nothing: checked once when the guard first sees the optimizers
(:meth:`EntropyCollapseGuard.track`, which Lightning's ``on_train_start``, the HF callback's ``on_train_begin`` and
``EntropyMonitors.watch`` all call).

``action="reduce_lr"`` and ``"rollback"`` multiply each param group's ``lr`` by ``lr_factor``. That lowers the step
wherever ``lr`` is the step size or a factor of it: the torch optimizers, ``transformers.Adafactor`` with
``relative_step=False`` (``scale_parameter=True`` multiplies ``lr`` by the parameter's RMS: the step still falls by
``lr_factor``), and Prodigy / D-Adaptation, whose step is ``d · lr``: ``lr`` multiplies the step-size estimate ``d``,
so a lower ``lr`` lowers the step by the same factor, and ``d`` then grows more slowly (its numerator accumulates
``d · lr``-sized steps). The schedule-free optimizers scale both their sequences' steps by ``lr``.
``torch.optim.Adafactor`` steps by ``min(lr, 1/√step)`` (times the parameter's RMS): a lowered ``lr`` acts only while
it is below ``1/√step``.

Not on ``transformers.Adafactor(relative_step=True)`` (its default): the step size is ``min(1e-2, 1/√step)`` (or the
warm-up ``1e-6 · step``) and ``lr`` is ``None`` and never read (an ``AdafactorSchedule`` writes the computed rate back
into ``lr`` for logging only). The guard skips a group whose ``lr`` is not a number and warns once, at the start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["rate_ignored"]


def rate_ignored(optimizers: Sequence[Any]) -> str | None:
    """Why lowering ``lr`` would not lower the step of one of ``optimizers`` (``None``: it would everywhere)."""
    for optimizer in optimizers:
        inner = optimizer
        while getattr(inner, "optimizer", None) is not None and getattr(inner, "optimizer") is not inner:
            inner = inner.optimizer  # LightningOptimizer, AcceleratedOptimizer
        groups = getattr(inner, "param_groups", None) or []
        name = type(inner).__name__
        if name == "Adafactor" and any(group.get("relative_step") for group in groups):
            return ("the optimizer is transformers.Adafactor(relative_step=True), which computes its own step size "
                    "(min(1e-2, 1/sqrt(step))) and never reads lr")
    return None
