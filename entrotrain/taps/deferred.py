"""Captures made inside a ``torch.compile``'d region, replayed eagerly once the compiled code has run.

A tap's hooks run inside the graph that dynamo traces when the model is compiled. The capture side (sampling, masks,
the entropy maths, dictionaries of statistics) is plain eager code: traced, it would break the graph (``.item()``,
``lru_cache``, data-dependent branches) or specialise it on values that change every step, and break or recompile it
again on every logging step. So, while dynamo traces (:func:`torch.compiler.is_compiling`), a hook only *appends* what
it saw — strings decided at arm time and detached tensors — to a :class:`DeferredCaptures` queue. Dynamo turns the
append into a side effect that runs after the graph, with the tensors as extra graph outputs: the model's own
computation is unchanged, no graph break, and the graph with the taps armed is compiled once (the armed tap is a
different torch-function mode stack, or different hooks, from the unarmed model: one guard failure, one extra
compile, reused at every later logging step). The tap then :meth:`~DeferredCaptures.drain`\\ s the queue in eager
code (when it is disarmed, and before any eager capture, so order is kept) and runs its usual capture on each item.

Outside compilation the queue is not used: hooks capture at once, as before.

Dynamo does not guard on a module's *empty* hook dictionaries (``torch._dynamo.config.skip_nnmodule_hook_guards``):
a graph compiled while no hook was installed would run, hooks ignored, once hooks are installed again. So a hook tap
armed on a compiled model also pushes an :class:`ArmedMarker`, a torch-function mode that changes nothing but the
mode stack, which dynamo does guard on: armed and unarmed steps each find their own graph.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["ArmedMarker", "DeferredCaptures", "compiling", "detached", "in_fx_graph", "remove_mode", "snapshot"]

_FX_CODE = "<eval_with_key>"  # file name torch.fx gives the code it generates for a GraphModule


def compiling() -> bool:
    """Whether dynamo is tracing the code that calls this (``torch.compiler.is_compiling``; ``False`` in eager)."""
    return torch.compiler.is_compiling()


def in_fx_graph(depth: int = 1) -> bool:
    """Whether the torch call being handled by a torch-function mode was made by torch.fx-generated code: a graph
    that dynamo compiled, run by a backend that calls torch functions (``backend="eager"`` or a custom one returning
    ``gm.forward``). Its calls were queued when the graph was traced; a mode must not score them again.

    ``depth`` is how many frames above the caller the mode's ``__torch_function__`` sits (1: the caller is it); the
    ``__torch_function__`` frames of other modes stacked above it are skipped.
    """
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:  # pragma: no cover - not that many frames
        return False
    for _ in range(16):
        if frame is None:
            return False
        if frame.f_code.co_name != "__torch_function__":
            return frame.f_code.co_filename.startswith(_FX_CODE)
        frame = frame.f_back
    return False


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor, also inside tuples, lists and dict values."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def detached(value: Any) -> Any:
    """``value`` with every tensor (also inside tuples, lists and dict values) detached from the autograd graph."""
    return _map_tensors(value, lambda t: t.detach())


def snapshot(value: Any) -> Any:
    """:func:`detached`, and each tensor copied: ops that run later in the same graph (``ReLU(inplace=True)``) must not
    change what was captured (a backend that runs the traced graph as is would write into the captured tensor)."""
    return _map_tensors(value, lambda t: t.detach().clone())


class ArmedMarker(TorchFunctionMode):
    """A torch-function mode that forwards every call unchanged: pushed while a tap is armed on a compiled model, so
    that the armed state is part of what dynamo's guards check (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack wherever it is, keeping the others in order."""
    above = []
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


class DeferredCaptures:
    """A FIFO of captures recorded while dynamo traces; :meth:`drain` hands them out in eager code.

    The list object is kept for the tap's lifetime (cleared in place, never replaced): dynamo guards on it, and a
    new object at each arming would be a new guard failure, hence a recompile, at every logging step.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Any, ...]] = []

    def add(self, *item: Any) -> None:
        """Queue one capture (called from traced code; ``item`` holds constants and tensors)."""
        self.pending.append(item)

    def drain(self) -> list[tuple[Any, ...]]:
        """The queued captures, oldest first; the queue is empty afterwards."""
        if not self.pending:
            return []
        items = list(self.pending)
        self.pending.clear()
        return items

    def clear(self) -> None:
        """Forget queued captures (a tap disarmed on an exception)."""
        self.pending.clear()

    def __len__(self) -> int:
        return len(self.pending)
