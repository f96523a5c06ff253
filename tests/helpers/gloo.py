"""Two (or more) CPU processes in a gloo process group, without Lightning: for the run scripts that call
``torch.distributed`` themselves (``tests/**/*_ddp_run.py``). A script's worker only does its rank's part."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(worker: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes, each inside a gloo process group (TCP on a free
    local port) that it leaves after a barrier, once every rank's worker has returned. ``worker`` must be picklable
    (a module-level function of the script)."""
    mp.spawn(_in_group, args=(world, free_port(), worker, args), nprocs=world, join=True)


def _in_group(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    worker(rank, *args)
    dist.barrier()
    dist.destroy_process_group()


def rank_rows(split: Sequence[int], rank: int) -> slice:
    """The rows of ``rank`` when a batch of ``sum(split)`` rows is split unevenly, ``split[r]`` rows to rank ``r`` in
    rank order: ``split=(3, 5)`` gives rank 0 rows 0..2, rank 1 rows 3..7."""
    lo = sum(split[:rank])
    return slice(lo, lo + split[rank])


def in_one_process_group(body: Callable[[], None]) -> None:
    """Run ``body()`` in this process inside a 1-process gloo group, then destroy the group. What ``body`` built (DDP
    and FSDP modules hold the group; a DDP reducer may hold pending work on it) is freed when ``body`` returns and
    collected while the group is still up, before ``destroy_process_group`` shuts it down: a DDP module freed after
    the shutdown, at the end of a test's frame, once hung a pytest worker in ``~ProcessGroupGloo``'s thread join.
    Skips when a process group is already up."""
    import gc

    import pytest

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        body()
    finally:
        gc.collect()
        dist.destroy_process_group()
