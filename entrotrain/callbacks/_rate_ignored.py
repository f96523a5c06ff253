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
it is below ``1/√step``; a firing whose lowered ``lr`` is not says so in its message (:func:`capped_note`).

Not on ``transformers.Adafactor(relative_step=True)`` (its default): the step size is ``min(1e-2, 1/√step)`` (or the
warm-up ``1e-6 · step``) and ``lr`` is ``None`` and never read (an ``AdafactorSchedule`` writes the computed rate back
into ``lr`` for logging only). The guard skips a group whose ``lr`` is not a number and warns once, at the start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import math

from entrotrain.callbacks.rollback_state import stepped_optimizer

__all__ = ["capped_note", "rate_ignored"]


def rate_ignored(optimizers: Sequence[Any]) -> str | None:
    """Why lowering ``lr`` would not lower the step of one of ``optimizers`` (``None``: it would everywhere)."""
    for inner in map(stepped_optimizer, optimizers):
        groups = getattr(inner, "param_groups", None) or []
        if type(inner).__name__ == "Adafactor" and any(group.get("relative_step") for group in groups):
            return ("the optimizer is transformers.Adafactor(relative_step=True), which computes its own step size "
                    "(min(1e-2, 1/sqrt(step))) and never reads lr")
    return None


def capped_note(optimizers: Sequence[Any]) -> str:
    """`` (torch.optim.Adafactor ...: its step size is unchanged)`` after a reduction when a ``torch.optim.Adafactor``
    group's lowered ``lr`` is still not below ``1/√step`` (its step is ``min(lr, 1/√step)``); ``""`` otherwise."""
    for inner in map(stepped_optimizer, optimizers):
        if type(inner).__name__ != "Adafactor" or type(inner).__module__.split(".")[0] != "torch":
            continue
        for group in inner.param_groups:
            steps = [float(s["step"]) for p in group["params"] if "step" in (s := inner.state.get(p, {}))]
            lr = group.get("lr")
            if steps and isinstance(lr, (int, float)) and max(steps) > 0 and lr >= 1 / math.sqrt(max(steps)):
                cap = 1 / math.sqrt(max(steps))
                return (f" (torch.optim.Adafactor steps by min(lr, 1/sqrt(step)): at its step {max(steps):.0f}, "
                        f"1/sqrt(step) = {cap:.3g} is not above the lowered lr, so its step size is unchanged)")
    return ""
