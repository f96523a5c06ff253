"""The good states a rollback guard can go back to, and which one a firing goes back to
(``EntropyCollapseGuard(action="rollback", rollback_states=k)``).

A guard catches a collapse at the first observation on the bad side of its threshold, but the fall can be under way
at the last good one already: rolled back to that state, at a lower learning rate, the run falls again a few
observations later (the recipe ``attention_collapse`` at the default threshold 0.05 does: the heads sit at 0.07 at
steps 25 and 50 and are one-hot by step 75, and the state of step 50 falls again after each of three rollbacks).
The state to come back to must be from before the fall started (PaLM restarted "roughly 100 steps before the spike
started", Chowdhery et al., 2022, §5.1), and a guard cannot know in advance how far back that is. The rule here:

- the guard holds the states of its last ``k`` good observations (``k`` × the host memory of one state, see
  :mod:`~entrotrain.callbacks.rollback_state`; the buffers are re-used, so holding costs one copy per good
  observation whatever ``k``);
- a firing rolls back to the newest held state, **unless the fall came back fewer than ``k`` good observations after
  the last rollback**: it is then the same fall, and the rollback goes one held state further back than the last one
  went. The states after the one it goes back to are dropped: they descend from a state that fell again.
- with no older state held, it goes back to the state the last rollback went to, again (with ``k = 1``: the newest):
  with ``k - 1`` good observations since, the oldest held states were replaced by theirs, which descend from it.

Each held state carries the step it was taken at. Along the trajectory that was kept, these steps increase: a
rollback drops the states after the one it goes back to, and when another rollback guard on the same model rolls
back, this history drops its states taken after the state that guard went back to (they are of the trajectory it
left) and holds that state, with its step (:meth:`RollbackHistory.rehold`). So "further back" compares steps: the
held states before the step the last rollback went to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from entrotrain.callbacks.rollback_memory import host_memory_verdict
from entrotrain.callbacks.rollback_state import RollbackState

__all__ = ["HeldState", "HeldTogether", "RollbackHistory", "held_module"]


@dataclass
class HeldState:
    """One held state: the model's and optimizers' tensors, and what the caller holds with it (``extra``: the guard's
    ``max_drop`` history at that observation)."""

    state: RollbackState
    extra: Any = None

    @property
    def step(self) -> int:
        """The step the state was taken at."""
        assert self.state.step is not None  # a held state always has one
        return self.state.step


class RollbackHistory:
    """The states of the last ``size`` good observations (oldest first), in re-used host buffers.

    Example::

        history = RollbackHistory(size=3)
        history.take(model, [optimizer], step=50)          # each good observation
        held = history.pick(further_back=True)             # a firing: the newest, or one further back than last time
        history.restore(model, [optimizer], held)          # back to held.step; the states after it are dropped
    """

    def __init__(self, size: int = 1, trainable_only: bool = False) -> None:
        self.size = int(size)
        self.trainable_only = trainable_only  # frozen parameters are not copied (:mod:`.rollback_frozen`)
        #: The training processes on this machine, each holding its own states (``None``: ``LOCAL_WORLD_SIZE``).
        self.processes: int | None = None
        self._held: list[HeldState] = []
        self._spares: list[RollbackState] = []  # buffers of dropped states, re-used by the next takes
        #: The step of the state the last :meth:`restore` went back to (``None``: none since :meth:`clear`).
        self.restored_step: int | None = None

    @property
    def step(self) -> int | None:
        """The step of the newest held state (``None``: nothing held)."""
        return self._held[-1].step if self._held else None

    @property
    def steps(self) -> list[int]:
        """The steps of the held states, oldest first."""
        return [held.step for held in self._held]

    def take(self, model: nn.Module, optimizers: Sequence[Any], step: int, extra: Any = None) -> bool:
        """Hold the state of ``model`` and ``optimizers`` now as the newest, dropping the oldest beyond ``size``;
        whether it was held (a non-finite state is not: see :meth:`RollbackState.take`; the held ones stay)."""
        full = len(self._held) >= self.size
        # refused if the machine cannot take `size` held states of this one: at the first take, and whenever the
        # state grew (Adam's moments after the first step, a layer unfrozen), also once the ring is full; agreed on
        # with the other processes in the take's one all-reduce, with its own checks
        memory = host_memory_verdict(model, optimizers, self.size, self.nbytes, self.trainable_only, self.processes)
        if full:
            buffer = self._held[0].state
        else:
            buffer = self._spares.pop() if self._spares else RollbackState(self.trainable_only)
        last = self._held[-1].state if self._held else None  # frozen parameters are compared with its fingerprints
        try:
            taken = buffer.take(model, optimizers, step, last, checks=[memory])
        except BaseException:  # refused before any copy: the buffer's old state is intact
            if not full:
                self._spares.append(buffer)
            raise
        if not taken:  # not held (non-finite), before any copy
            if not full:
                self._spares.append(buffer)
            return False
        if full:
            self._held.pop(0)
        self._held.append(HeldState(buffer, extra))
        return True

    def rehold(self, model: nn.Module, optimizers: Sequence[Any], step: int) -> HeldState | None:
        """Another guard rolled ``model`` back to its state of ``step``: drop the states held after that step (they
        are of the trajectory it left, and a firing must not bring them back) and hold the model's state as the
        state of ``step`` (unless one of that step is held: the same state); returns it (``None``: not held). Its
        ``extra`` is the newest kept state's (``None`` when none is kept): the caller's after it are of the
        trajectory left too."""
        self._drop_from(sum(held.step <= step for held in self._held))
        newest = self._held[-1] if self._held else None
        if newest is not None and newest.step == step:
            return newest
        return self._held[-1] if self.take(model, optimizers, step, newest and newest.extra) else None

    def pick(self, further_back: bool = False) -> HeldState | None:
        """The state a firing goes back to: the newest; with ``further_back`` (the fall came back), the newest one
        older than the last rollback's, or with none held, the last rollback's own (the ones after it descend from
        it, and it fell again). ``None`` when nothing is held."""
        again = [held for held in self._held if held.step == self.restored_step]
        back = (self._older() or again) if further_back else []
        return back[-1] if back else self._held[-1] if self._held else None

    def from_state(self, held: HeldState) -> list[HeldState]:
        """``held`` and the states held after it, oldest first: where a rollback that ``held`` refuses goes instead."""
        return self._held[self._held.index(held):]

    def _older(self) -> list[HeldState]:
        """The held states before the step the last rollback went to (none when there was none)."""
        last = self.restored_step
        return [held for held in self._held if last is not None and held.step < last]

    def restore(self, model: nn.Module, optimizers: Sequence[Any], held: HeldState) -> int:
        """Copy ``held`` back into ``model`` and ``optimizers`` (:meth:`RollbackState.restore`) and drop the states
        after it; returns its step."""
        step = held.state.restore(model, optimizers)
        self._drop_from(self._held.index(held) + 1)
        self.restored_step = step
        return step

    def _drop_from(self, keep: int) -> None:
        """Drop the held states after the first ``keep``; their buffers are re-used by the next takes."""
        self._spares.extend(dropped.state for dropped in self._held[keep:])
        del self._held[keep:]

    def clear(self) -> None:
        """Drop every held state and buffer (their host memory)."""
        self._held, self._spares, self.restored_step = [], [], None

    @property
    def nbytes(self) -> int:
        """Host memory held, in bytes (spare buffers included: they are kept for the next takes)."""
        return sum(state.nbytes for state in [*(held.state for held in self._held), *self._spares])


class HeldTogether(nn.Module):
    """The model and the modules holding its averaged weights (an EMA or SWA ``torch.optim.swa_utils.AveragedModel``,
    Lightning's ``WeightAveraging``), held and rolled back as one: ``state_dict()`` is the model's under ``model.``
    and each average's under ``averaged.I.``. An average left at the bad steps' weights would bring the fall back into
    every evaluation made with it; rolled back with the model, it is as if the skipped steps never happened. Never
    called: it only groups the state."""

    def __init__(self, model: nn.Module, averaged: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.averaged = nn.ModuleList(averaged)

    @property
    def held_whole(self) -> nn.ModuleList:
        """The averages: held whole with ``hold="trainable"`` too (their parameters are updated, never trained, so
        often ``requires_grad=False``: :func:`~entrotrain.callbacks.rollback_frozen.frozen_keys`)."""
        return self.averaged


def held_module(model: nn.Module, averaged: Sequence[nn.Module]) -> nn.Module:
    """What a rollback holds: ``model`` alone, or :class:`HeldTogether` with the ``averaged`` modules that are not part
    of it already (an EMA the model holds as a submodule is in its ``state_dict``)."""
    inside = {id(module) for module in model.modules()}
    extra: list[nn.Module] = []
    for module in averaged:
        if id(module) not in inside and all(module is not seen for seen in extra):
            extra.append(module)
    return HeldTogether(model, extra) if extra else model
