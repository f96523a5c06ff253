"""The optimizer state some optimizers keep in their param groups, held and rolled back with the per-parameter state
(``EntropyCollapseGuard(action="rollback")``, :class:`~entrotrain.callbacks.rollback_state.RollbackState`).

Most optimizers keep their state per parameter (``optimizer.state[p]``), but some keep a running estimate in each
param group, beside the hyperparameters: Prodigy (``prodigyopt``) its step-size estimate ``d``, ``d_max``,
``d_numerator``, ``d_denom``, ``d_hat`` and step count ``k``; D-Adaptation (``dadaptation``, untested here) ``d``,
``k`` and its weighted sums; the schedule-free optimizers (``schedulefree``) ``k``, ``weight_sum``, ``lr_max`` and
``scheduled_lr``. Left at the bad steps' values, a rollback would not be the run resumed from the held step.

**The rule** (a deny-list, so that an optimizer not named here is rolled back too): in each param group, every entry
whose value is a number (``int`` or ``float``, not ``bool``) or a tensor is held and restored, except

- ``params``;
- the rates and bounds the guard and the schedulers own, since neither the schedulers' position nor the guard's
  reduction is rolled back: ``lr``, every ``initial_*`` entry (``initial_lr``, which every torch scheduler writes),
  ``max_lr`` / ``min_lr`` / ``max_momentum`` / ``base_momentum`` (``OneCycleLR``), ``momentum`` (``OneCycleLR`` /
  ``CyclicLR`` with ``cycle_momentum``; their ``betas`` are a tuple, not held), ``swa_lr`` (``SWALR``).

Flags (``bool``: ``foreach``, ``amsgrad``, schedule-free's ``train_mode``), strings, tuples and ``None`` are
configuration and are left as they are. The hyperparameters held (``eps``, ``weight_decay``, Prodigy's ``d0``) are
constants in a run, so restoring them changes nothing; one you change by hand between a good observation and a
rollback goes back with it. An entry of a held kind that appeared since the take (Prodigy's ``d_hat`` after its first
step) is removed. Groups are matched by position and must hold the same parameters: a group added since the take
(``add_param_group``) is left as it is; a group gone, or holding other parameters, is refused before anything is
copied. A ``ZeroRedundancyOptimizer``'s groups are its own (it copies them into its local optimizer's at each step,
and back after it).

**Schedule-free's modes.** A schedule-free optimizer's parameters hold ``y`` in train mode and ``x`` in eval mode
(``optimizer.eval()`` around validation, the Lightning pattern), and a group's ``train_mode`` says which (the
optimizer's own ``train_mode`` attribute for ``schedulefree.ScheduleFreeWrapper``). A state taken
in one mode and restored in the other is copied back as it was held and then switched with the optimizer's own
``train()`` / ``eval()``, as the run would have switched at that point: the parameters then hold what that run holds
in the current mode (bit for bit: the same conversion from the same values). An optimizer with ``train_mode`` in its
groups but no ``train()`` / ``eval()`` to switch with is refused when the modes differ, before anything is copied.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from entrotrain.errors import EntrotrainError

__all__ = ["HeldGroups", "check_groups", "group_tensors", "hold_groups", "modes", "restore_groups", "switch_modes"]

#: The group entries the guard and the schedulers own (besides ``params`` and every ``initial_*``): never rolled back.
OWNED = frozenset({"params", "lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "momentum", "swa_lr"})
#: Schedule-free's mode flag (whether the parameters hold ``y`` or ``x``).
MODE = "train_mode"


@dataclass
class HeldGroups:
    """One optimizer's held group state."""

    #: Per group: the ids of its parameters, the held entries, its ``train_mode`` (``None``: none) and every key it had.
    groups: list[tuple[tuple[int, ...], dict[str, Any], bool | None, frozenset[str]]]
    #: The optimizer's own ``train_mode`` attribute (``schedulefree.ScheduleFreeWrapper`` keeps it there, not in its
    #: groups); ``None``: it has none.
    mode: bool | None


def is_held(key: str, value: Any) -> bool:
    """Whether the group entry ``key`` = ``value`` is optimizer state that rolls back (see the module docstring)."""
    if key in OWNED or key.startswith("initial_"):
        return False
    return isinstance(value, torch.Tensor) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def group_tensors(optimizers: Sequence[Any]) -> list[torch.Tensor]:
    """The tensor entries of the ``optimizers``' groups that are held (judged with the rest of the state: never a
    non-finite one)."""
    return [value for opt in optimizers for group in _groups(opt) for key, value in group.items()
            if isinstance(value, torch.Tensor) and is_held(key, value)]


def hold_groups(optimizer: Any) -> HeldGroups:
    """Each group's held entries (a tensor as a host copy, with the device it came from), its parameters' ids, its
    mode and its keys; and the optimizer's own mode."""
    held = []
    for group in _groups(optimizer):
        entries = {key: (value.detach().to("cpu", copy=True), value.device) if isinstance(value, torch.Tensor)
                   else copy.copy(value) for key, value in group.items() if is_held(key, value)}
        held.append((_ids(group), entries, _flag(group.get(MODE)), frozenset(group)))
    return HeldGroups(held, _flag(getattr(optimizer, MODE, None)))


def check_groups(optimizer: Any, held: HeldGroups) -> None:
    """Refuse, before anything is copied, an ``optimizer`` whose groups cannot take ``held``: a group gone, one
    holding other parameters, or a mode to switch that it has no ``train()`` / ``eval()`` for.

    Raises:
        EntrotrainError: naming the group and what to do.
    """
    where = "EntropyCollapseGuard(action='rollback')"
    name = type(optimizer).__name__
    groups = _groups(optimizer)
    if len(groups) < len(held.groups):
        raise EntrotrainError(
            f"{where}: the optimizer {name} had {len(held.groups)} param groups when the good state was taken and has "
            f"{len(groups)} now; an optimizer whose groups are removed during training cannot be rolled back in "
            "memory. Use action='reduce_lr' or 'stop'."
        )
    for index, (group, (ids, _, _, _)) in enumerate(zip(groups, held.groups)):
        if _ids(group) != ids:
            raise EntrotrainError(
                f"{where}: param group {index} of the optimizer {name} holds other parameters than when the good "
                "state was taken; an optimizer whose groups change during training cannot be rolled back in memory "
                "(add_param_group, which appends a group, can). Use action='reduce_lr' or 'stop'."
            )
    then = [mode for _, _, mode, _ in held.groups] + [held.mode]
    for was, now in zip(then, modes(optimizer)):
        if was is not None and now is not None and was != now and not _can_switch(optimizer):
            raise EntrotrainError(
                f"{where}: the optimizer {name} was in {_mode(was)} mode when the good state was taken and is in "
                f"{_mode(now)} mode now, and has no train() / eval() to switch the restored parameters with. Take "
                "and roll back in the same mode (call optimizer.train() before the guard observes)."
            )


def restore_groups(optimizer: Any, held: HeldGroups) -> None:
    """Put the held entries back into the ``optimizer``'s groups (checked by :func:`check_groups`), remove the
    entries of a held kind that a group did not have then, and set each mode back to the held one: :func:`switch_modes`
    then switches to the current mode, once the parameters and their state are restored. A group added since is left
    as it is."""
    for group, (_, entries, mode, keys) in zip(_groups(optimizer), held.groups):
        for key in [k for k, v in group.items() if k not in keys and is_held(k, v)]:
            del group[key]
        for key, value in entries.items():
            if isinstance(value, tuple):  # a tensor: a new one (entries may alias each other: never copied into)
                tensor, device = value
                now = group.get(key)
                group[key] = tensor.to(now.device if isinstance(now, torch.Tensor) else device, copy=True)
            else:
                group[key] = value
        if mode is not None and _flag(group.get(MODE)) is not None:
            group[MODE] = mode
    if held.mode is not None and _flag(getattr(optimizer, MODE, None)) is not None:
        setattr(optimizer, MODE, held.mode)


def modes(optimizer: Any) -> list[bool | None]:
    """Each group's mode now, then the optimizer's own (``None``: none)."""
    return [_flag(group.get(MODE)) for group in _groups(optimizer)] + [_flag(getattr(optimizer, MODE, None))]


def switch_modes(optimizer: Any, wanted: Sequence[bool | None]) -> None:
    """Switch what is now in another mode than ``wanted`` (the modes before the restore, :func:`modes`) with the
    optimizer's own ``train()`` / ``eval()``, which convert the parameters between ``y`` and ``x`` (schedule-free)."""
    for want in (True, False):
        if any(w is want and m is not want for w, m in zip(wanted, modes(optimizer)) if m is not None):
            getattr(optimizer, "train" if want else "eval")()


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    return list(getattr(optimizer, "param_groups", None) or [])


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _can_switch(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _mode(train: bool) -> str:
    return "train" if train else "eval"


def _ids(group: dict[str, Any]) -> tuple[int, ...]:
    params: Iterable[Any] = group.get("params", ())
    return tuple(id(p) for p in params)
