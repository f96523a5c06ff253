"""Small ``torch.distributed`` helpers for the policy losses: no-ops (identity) when no process group is up."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor

from entrotrain.errors import EntrotrainError

__all__ = [
    "GatheredBatch", "all_gather_padded", "all_gather_varlen", "all_reduce_max", "all_reduce_sum", "collective_device",
    "dist_ready", "gather_objects", "gather_padded_dict", "gather_rows", "module_device", "reshard_fsdp", "world",
]


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not dist_ready():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def collective_device(group: object = None) -> torch.device:
    """The device a collective on ``group`` (the default group for ``None``) takes its tensors on: the CPU for a group
    that gloo (or MPI) serves, e.g. ``"gloo"`` or ``"cpu:gloo,cuda:nccl"``; else the current device of the
    accelerator (``torch.accelerator``: CUDA under NCCL, XPU under XCCL, ...), the current CUDA device where
    ``torch.accelerator`` is missing (torch < 2.6)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    accelerator = getattr(torch, "accelerator", None)
    kind = accelerator.current_accelerator() if accelerator is not None else None
    if kind is None:
        return torch.device("cuda", torch.cuda.current_device())
    index = getattr(accelerator, "current_device_index", None) or accelerator.current_device_idx
    return torch.device(kind.type, index())


def module_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; the CPU for a model with neither: the device a rank
    that captured nothing joins a reduce on, and where a regulariser's exact-zero total is made."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order (one ``all_gather_object`` on the default group); ``[obj]``
    without a process group."""
    if not dist_ready():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor, no autograd)."""
    x = x.detach().clone()
    if dist_ready():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    x = x.detach().clone()
    if dist_ready():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def gather_rows(x: Tensor, device: torch.device | str | None = None) -> Tensor:
    """``all_gather`` of a same-shaped tensor: ``(world, *x.shape)``, on ``x``'s device. ``device``: the device the
    collective takes it on (e.g. :func:`collective_device` for a host tensor; the result stays there); ``None``:
    ``x``'s. ``x.detach()[None]`` without a process group (no copy to ``device``)."""
    if not dist_ready():
        return x.detach()[None]
    x = x.detach().to(device).contiguous() if device is not None else x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.stack(parts)


def all_gather_padded(x: Tensor, fill: float | bool = 0) -> Tensor:
    """Concatenate along dim 0 the tensors of every rank, in rank order. Sizes may differ in every dim; trailing dims
    are padded with ``fill`` to the largest (e.g. ``(B_r, T_r)`` token tensors become ``(sum B_r, max T_r)``)."""
    if not dist_ready():
        return x.detach()
    shape = torch.tensor(x.shape, dtype=torch.int64, device=x.device)
    shapes = gather_rows(shape)  # (world, ndim)
    return _gather_shaped(x, [tuple(int(n) for n in row) for row in shapes], fill)


def _gather_shaped(x: Tensor, shapes: list[tuple[int, ...]], fill: float | bool) -> Tensor:
    """The padded concatenation of :func:`all_gather_padded`, every rank's shape known (``shapes[r]``, one ndim)."""
    padded = torch.full(tuple(max(dims) for dims in zip(*shapes)), fill, dtype=x.dtype, device=x.device)
    padded[tuple(slice(0, n) for n in x.shape)] = x.detach()
    parts = gather_rows(padded)
    return torch.cat([parts[r, : shapes[r][0]] for r in range(parts.shape[0])])


@dataclass
class GatheredBatch:
    """What :func:`gather_padded_dict` returns: ``tensors``, the union over ranks of each key that every rank held;
    ``held[r]``, the keys rank ``r`` held; ``extra[r]``, the object rank ``r`` sent with them."""

    tensors: dict[str, Tensor]
    held: list[frozenset[str]]
    extra: list[object]


def gather_padded_dict(
    tensors: Mapping[str, Tensor | None], fills: Mapping[str, float | bool], extra: object = None,
    check: Callable[[list[frozenset[str]], list[object]], None] | None = None,
) -> GatheredBatch:
    """:func:`all_gather_padded` of several tensors, some of which a rank may not hold (``None``), with one small
    exchange of their layouts first: one ``all_gather_object`` of each rank's (key -> dtype, shape) and ``extra`` (a
    picklable object the caller agrees on), then one ``all_gather`` per key that **every** rank holds (a key some
    ranks lack is not gathered; ``held`` says who had it). ``check(held, extra)`` runs on every rank between the two,
    on the same arguments everywhere: raise from it to refuse before any tensor is gathered (every rank raises
    alike). A tensor's dtype on the wire is promoted over the ranks (``torch.cat``'s rule), its trailing dims padded
    with ``fills[key]`` (0 when absent) to the largest. Every rank calls it, with the same keys, in the same order.
    One process: the tensors as they are (detached), no collective.

    Raises:
        EntrotrainError: a key every rank holds has a different number of dims on two ranks (on every rank alike).
    """
    mine = {key: value for key, value in tensors.items() if value is not None}
    if not dist_ready():
        if check is not None:
            check([frozenset(mine)], [extra])
        return GatheredBatch({key: value.detach() for key, value in mine.items()}, [frozenset(mine)], [extra])
    layouts = gather_objects(({key: (value.dtype, tuple(value.shape)) for key, value in mine.items()}, extra))
    held = [frozenset(layout) for layout, _ in layouts]
    if check is not None:
        check(held, [obj for _, obj in layouts])
    out: dict[str, Tensor] = {}
    for key in (key for key in tensors if all(key in h for h in held)):
        dtypes = [layout[key][0] for layout, _ in layouts]
        shapes = [layout[key][1] for layout, _ in layouts]
        if len({len(shape) for shape in shapes}) != 1:
            raise EntrotrainError(
                f"{key!r} has shapes {shapes} on the ranks (in rank order): gathered over the ranks, its rows are "
                "concatenated, so give it the same number of dims on every rank."
            )
        out[key] = _gather_shaped(mine[key].to(reduce(torch.promote_types, dtypes)), shapes, fills.get(key, 0))
    return GatheredBatch(out, held, [obj for _, obj in layouts])


def all_gather_varlen(x: Tensor) -> Tensor:
    """Concatenate the 1-D tensors of every rank, in rank order (lengths may differ)."""
    return all_gather_padded(x.reshape(-1))


def reshard_fsdp(module: torch.nn.Module) -> None:
    """Free what FSDP2 (``fully_shard``) un-sharded for forwards that no backward follows (a monitor's probe or
    generation under ``no_grad``): FSDP2 keeps the root's parameters gathered after its forward
    (``reshard_after_forward=False`` for the root) until the backward, so without this every rank would hold the
    root's full parameters (embeddings, output head) from the probe until the next training step. A no-op for
    modules that ``fully_shard`` did not touch."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
