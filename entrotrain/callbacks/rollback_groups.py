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
copied.

**Schedule-free's modes.** A schedule-free optimizer's parameters hold ``y`` in train mode and ``x`` in eval mode
(``optimizer.eval()`` around validation, the Lightning pattern), and a group's ``train_mode`` says which. A state taken
in one mode and restored in the other is copied back as it was held and then switched with the optimizer's own
``train()`` / ``eval()``, as the run would have switched at that point: the parameters then hold what that run holds
in the current mode (bit for bit: the same conversion from the same values). An optimizer with ``train_mode`` in its
groups but no ``train()`` / ``eval()`` to switch with is refused when the modes differ, before anything is copied.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from entrotrain.errors import EntrotrainError

__all__ = ["HeldGroups", "check_groups", "group_tensors", "hold_groups", "restore_groups", "switch_modes"]

#: The group entries the guard and the schedulers own (besides ``params`` and every ``initial_*``): never rolled back.
OWNED = frozenset({"params", "lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "momentum", "swa_lr"})
#: Schedule-free's mode flag (whether the parameters hold ``y`` or ``x``).
MODE = "train_mode"

#: One optimizer's held groups: per group, the ids of its parameters, the held entries, its ``train_mode`` (``None``:
#: the group has none), and every key it had.
HeldGroups = list[tuple[tuple[int, ...], dict[str, Any], "bool | None", frozenset[str]]]


def is_held(key: str, value: Any) -> bool:
    """Whether the group entry ``key`` = ``value`` is optimizer state that rolls back (see the module docstring)."""
    if key in OWNED or key.startswith("initial_"):
        return False
    return isinstance(value, torch.Tensor) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def group_tensors(groups: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """The tensor entries of ``groups`` that are held (judged with the rest of the state: never a non-finite one)."""
    return [value for group in groups for key, value in group.items()
            if isinstance(value, torch.Tensor) and is_held(key, value)]


def hold_groups(groups: Sequence[dict[str, Any]]) -> HeldGroups:
    """Each group's held entries (a tensor as a host copy; its device is restored from the live entry's, or from the
    group's parameters), its parameters' ids and its mode."""
    held: HeldGroups = []
    for group in groups:
        entries = {key: (value.detach().to("cpu", copy=True), value.device) if isinstance(value, torch.Tensor)
                   else copy.copy(value) for key, value in group.items() if is_held(key, value)}
        mode = group.get(MODE)
        held.append((_ids(group), entries, mode if isinstance(mode, bool) else None, frozenset(group)))
    return held


def check_groups(optimizer: Any, groups: Sequence[dict[str, Any]], held: HeldGroups) -> None:
    """Refuse, before anything is copied, groups that cannot take ``held``: one gone, one holding other parameters,
    or a mode to switch that ``optimizer`` has no ``train()`` / ``eval()`` for.

    Raises:
        EntrotrainError: naming the group and what to do.
    """
    where = "EntropyCollapseGuard(action='rollback')"
    if len(groups) < len(held):
        raise EntrotrainError(
            f"{where}: the optimizer {type(optimizer).__name__} had {len(held)} param groups when the good state was "
            f"taken and has {len(groups)} now; an optimizer whose groups are removed during training cannot be rolled "
            "back in memory. Use action='reduce_lr' or 'stop'."
        )
    for index, (group, (ids, _, mode, _)) in enumerate(zip(groups, held)):
        if _ids(group) != ids:
            raise EntrotrainError(
                f"{where}: param group {index} of the optimizer {type(optimizer).__name__} holds other parameters "
                "than when the good state was taken; an optimizer whose groups change during training cannot be "
                "rolled back in memory (add_param_group, which appends a group, can). Use action='reduce_lr' or "
                "'stop'."
            )
        now = group.get(MODE)
        if mode is not None and isinstance(now, bool) and now != mode and not _can_switch(optimizer):
            raise EntrotrainError(
                f"{where}: the optimizer {type(optimizer).__name__} was in {_mode(mode)} mode when the good state was "
                f"taken and is in {_mode(now)} mode now, and has no train() / eval() to switch the restored "
                "parameters with. Take and roll back in the same mode (call optimizer.train() before the guard "
                "observes)."
            )


def restore_groups(groups: Sequence[dict[str, Any]], held: HeldGroups) -> None:
    """Put the held entries back into ``groups`` (checked by :func:`check_groups`), remove the entries of a held
    kind that the group did not have then, and set each group's mode back to the held one: :func:`switch_modes` then switches
    to the current mode, once the parameters and their state are restored. A group added since is left as it
    is."""
    for group, (_, entries, mode, keys) in zip(groups, held):
        for key in [k for k, v in group.items() if k not in keys and is_held(k, v)]:
            del group[key]
        for key, value in entries.items():
            if isinstance(value, tuple):  # a tensor: a new one (entries may alias each other: never copied into)
                tensor, device = value
                now = group.get(key)
                group[key] = tensor.to(now.device if isinstance(now, torch.Tensor) else device, copy=True)
            else:
                group[key] = value
        if mode is not None and isinstance(group.get(MODE), bool):
            group[MODE] = mode


def modes(groups: Sequence[dict[str, Any]]) -> list[bool | None]:
    """Each group's mode now (``None``: it has none)."""
    return [group.get(MODE) if isinstance(group.get(MODE), bool) else None for group in groups]


def switch_modes(optimizer: Any, groups: Sequence[dict[str, Any]], wanted: Sequence[bool | None]) -> None:
    """Switch the groups whose mode differs from ``wanted`` (their mode before the restore) with the optimizer's own
    ``train()`` / ``eval()``, which convert the parameters between ``y`` and ``x`` (schedule-free)."""
    for want in (True, False):
        if any(w is want and m is not want for w, m in zip(wanted, modes(groups))):
            getattr(optimizer, "train" if want else "eval")()


def _can_switch(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _mode(train: bool) -> str:
    return "train" if train else "eval"


def _ids(group: dict[str, Any]) -> tuple[int, ...]:
    params: Iterable[Any] = group.get("params", ())
    return tuple(id(p) for p in params)
