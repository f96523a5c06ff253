"""Whether the host can take the states a rollback guard is asked to hold: checked before each copy that grows them.

``EntropyCollapseGuard(action="rollback")`` holds ``rollback_states`` copies of the model's and optimizers' state in
host memory (:mod:`~entrotrain.callbacks.rollback_history`), and every process of the machine holds its own. A ring
that does not fit is not an error Python sees: the kernel's OOM killer ends the run without a traceback, hours in, or
the machine swaps. So before the held states grow (the first good observation, each one while fewer than
``rollback_states`` are held, and one whose state grew: Adam's moments after the first step, a layer unfrozen), the
bytes still to allocate, times the processes of the machine (a Lightning trainer's devices per machine; else
``LOCAL_WORLD_SIZE``, which ``torchrun`` and accelerate set), are compared with the memory available to new
allocations (Linux ``MemAvailable``, or less under a memory limit: a Kubernetes pod, a SLURM job, ``docker
--memory``), with a 10 % margin; too much is refused with the numbers and the ways out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from entrotrain.callbacks.rollback_frozen import frozen_keys
from entrotrain.callbacks.rollback_state import (
    Verdict, agree, agreement_groups, mesh_groups, outside_params, shard_groups, unwrap_optimizer,
)
from entrotrain.errors import EntrotrainError

__all__ = ["check_host_memory", "host_bytes_available", "host_memory_verdict", "state_bytes"]

_MARGIN = 0.9  # of the available memory, the most the held states may take


def state_bytes(model: nn.Module, optimizers: Sequence[Any], trainable_only: bool = False) -> int:
    """The host bytes one held state of ``model`` and ``optimizers`` takes (a DTensor's local shard under FSDP2; not
    the frozen parameters with ``trainable_only``; the parameters an optimizer steps outside the model too)."""
    return _bytes(_state_values(model, optimizers, trainable_only))


def _state_values(model: nn.Module, optimizers: Sequence[Any], trainable_only: bool) -> list[Any]:
    """What one held state copies: the state dict's entries (less the frozen ones with ``trainable_only``), the
    optimizers' per-parameter state and the parameters they step outside the model."""
    live = model.state_dict()
    skipped = set(frozen_keys(model, live)) if trainable_only else set()
    values = [value for key, value in live.items() if key not in skipped]
    inner = [unwrap_optimizer(optimizer) for optimizer in optimizers]
    for optimizer in inner:
        values += [value for state in optimizer.state.values() for value in state.values()]
    return values + outside_params(model, inner)


def _bytes(values: Sequence[Any]) -> int:
    tensors = [value.to_local() if hasattr(value, "to_local") else value for value in values]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def host_bytes_available() -> int | None:
    """The host memory available to new allocations (Linux ``MemAvailable``; elsewhere the free physical pages), or
    less under a memory limit (:func:`_cgroup_available`: there the OOM killer acts at the limit, whatever the
    machine has free); ``None`` when it cannot be read."""
    found = [n for n in (_machine_available(), _cgroup_available()) if n is not None]
    return min(found) if found else None


def _machine_available() -> int | None:
    """Linux ``MemAvailable``; elsewhere the free physical pages (``None``: unreadable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
#: (controller in /proc/self/cgroup, its folder under the root, limit file, usage file, memory.stat key of the
#: inactive page cache, which the kernel reclaims before it kills) for cgroup v2 and v1.
_CGROUPS = (("", "", "memory.max", "memory.current", "inactive_file"),
            ("memory", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_available() -> int | None:
    """The least memory left under the memory limits of this process's control group and its ancestors (limit less
    usage, the inactive page cache counted free), cgroup v2 or v1; ``None`` when none is set or readable."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    left: list[int] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for controller, folder, limit, usage, inactive in _CGROUPS:
            if controller not in (controllers.split(",") if controllers else [""]):
                continue
            here = _CGROUP_ROOT / folder / path.strip("/")
            for level in [here, *here.parents]:
                if not level.is_relative_to(_CGROUP_ROOT / folder):
                    break
                room = _room(level, limit, usage, inactive)
                if room is not None:
                    left.append(room)
    return min(left) if left else None


def _room(level: Path, limit: str, usage: str, inactive: str) -> int | None:
    """Limit less usage plus inactive page cache in the control group folder ``level`` (``None``: no limit there)."""
    try:
        bound = (level / limit).read_text().strip()
        if bound == "max" or int(bound) >= 1 << 60:  # v2 "max", v1's unlimited page-rounded LONG_MAX
            return None
        used = int((level / usage).read_text())
        stat = dict(line.split()[:2] for line in (level / "memory.stat").read_text().splitlines() if " " in line)
    except (OSError, ValueError):
        return None
    return max(int(bound) - used + int(stat.get(inactive, 0)), 0)


def _size(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (``118.4 KiB``, ``12.3 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_host_memory(
    model: nn.Module, optimizers: Sequence[Any], states: int, held_bytes: int, trainable_only: bool = False,
    processes: int | None = None,
) -> None:
    """Refuse to grow the held states to ``states`` copies of the current state when the machine cannot take them;
    ``held_bytes``: what is held (allocated) already; ``processes``: the training processes on this machine, each
    holding its own (``None``: ``LOCAL_WORLD_SIZE``, which ``torchrun`` and accelerate set, else 1).

    Raises:
        EntrotrainError: with the numbers and the ways out.
    """
    # ranks holding different shards (FSDP2, ZeRO), or DDP replicas on machines with different free memory, decide
    # differently: one refusing alone would leave the others waiting in their next collective (or hold a state the
    # others do not), so the verdict is agreed on (any rank over: every rank refuses)
    values = _state_values(model, optimizers, trainable_only)
    verdict = host_memory_verdict(model, optimizers, states, held_bytes, trainable_only, processes, values)
    meshes = {id(v.device_mesh): v.device_mesh for v in values if hasattr(v, "device_mesh")}.values()
    if not agree([verdict.refusal is None], agreement_groups([*mesh_groups(meshes), *shard_groups(optimizers)]))[0]:
        raise verdict.refusal or verdict.elsewhere


def host_memory_verdict(
    model: nn.Module, optimizers: Sequence[Any], states: int, held_bytes: int, trainable_only: bool = False,
    processes: int | None = None, values: list[Any] | None = None,
) -> Verdict:
    """:func:`check_host_memory`'s verdict on this process alone (no collective), for the caller to agree on with the
    other processes' (:meth:`RollbackState.take <entrotrain.callbacks.rollback_state.RollbackState.take>`'s
    ``checks``, in the take's one all-reduce): ``refusal`` when this machine cannot take the states; ``elsewhere``,
    the error when another process's machine cannot. ``values``: :func:`_state_values`, when known."""
    values = _state_values(model, optimizers, trainable_only) if values is None else values
    one = _bytes(values)
    more = states * one - held_bytes
    available = host_bytes_available() if more > 0 else None
    processes = max(processes or int(os.environ.get("LOCAL_WORLD_SIZE") or 1), 1)
    over = available is not None and processes * more > _MARGIN * available
    ways_out = (
        "Hold fewer states (rollback_states), only what trains (hold='trainable', for frozen weights such as a "
        "LoRA base), or use action='reduce_lr' / 'stop' and come back from the kept checkpoint."
    )
    elsewhere = EntrotrainError(
        f"EntropyCollapseGuard(action='rollback') would hold {states} state(s) in host memory, and another "
        "process of this run (a DDP replica, an FSDP2 / ZeroRedundancyOptimizer shard) cannot take its share on "
        f"its machine (this process could: {_size(processes * max(more, 0))} more of "
        f"{_size(available) if available is not None else 'unknown'}); every process refuses together. " + ways_out
    )
    if not over:
        return Verdict(None, elsewhere)
    return Verdict(EntrotrainError(
        f"EntropyCollapseGuard(action='rollback') would hold {states} state(s) of {_size(one)} each in host memory "
        f"(the model's and optimizers' tensors): {_size(processes * more)} more on this machine ({processes} "
        f"process(es)), and {_size(available)} are available, so the OOM killer would end the run. " + ways_out
    ), elsewhere)
