"""EntropyMonitors in a hand-written FSDP2 training loop: 2 CPU ranks (gloo), ``fully_shard`` per block, MoE layer and
root on ``init_device_mesh("cpu", (2,))`` (tests/helpers/loop_fsdp.py), no Lightning Trainer.

``python loop_fsdp2_run.py OUT [TIMEOUT_S]`` forks two ranks; each runs ``LOOP_STEPS`` SGD steps on its half of each
union batch under ``EntropyMonitors`` (attention, representation, σReparam, router, prediction from the output with
probe and generation and from the head hook with probe; every step), then the same loop without monitors on a fresh
model, and writes ``rank{r}.json``: losses, the monitors' logs by step, the ``log=`` calls, the model's hook counts
before ``watch`` and after leaving it, the torch-function-mode depth after it, and which parameters were DTensors.
Rank 0 also writes ``weights.pt`` and ``weights_unmonitored.pt``: the full (gathered) parameters and buffers after the
last step of each loop. A collective that one rank never joins would hang both: faulthandler dumps every stack and
exits after TIMEOUT_S (default 120).
Run by test_loop_scale.py.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tests.helpers import gloo  # noqa: E402

WORLD = 2


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered (``full_tensor`` is a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    items = list(model.named_parameters()) + list(model.named_buffers())
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in items}


def worker(rank: int, out: str, timeout: float) -> None:
    from torch.distributed.tensor import DTensor

    from tests.helpers.fsdp_models import dataset, union_loader
    from tests.helpers.loop_fsdp import LOOP_STEPS, LoopLM, hooks, make_monitors, rank_batch, shard, train

    faulthandler.dump_traceback_later(timeout, exit=True)
    torch.set_num_threads(1)
    batches = [rank_batch(b, rank) for b in list(union_loader(dataset()))[:LOOP_STEPS]]

    model = LoopLM()
    shard(model, WORLD)
    sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
    before = hooks(model)
    calls: list = []
    losses, logs = train(model, batches, make_monitors(calls))
    after = hooks(model)
    modes = torch._C._len_torch_function_stack()
    weights = _full(model)

    bare = LoopLM()  # the same loop without monitors: monitoring must not change a bit of it
    shard(bare, WORLD)
    bare_losses, _ = train(bare, batches, None)
    unmonitored = _full(bare)
    record = {
        "world": dist.get_world_size(), "losses": losses, "bare_losses": bare_losses, "logs": logs, "calls": calls,
        "hooks_before": before, "hooks_after": after, "function_modes": modes, "sharded": sharded,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(weights, Path(out, "weights.pt"))
        torch.save(unmonitored, Path(out, "weights_unmonitored.pt"))
    faulthandler.cancel_dump_traceback_later()


def _in_group(rank: int, world: int, port: int, out: str, timeout: float) -> None:
    """gloo.spawn_gloo's wrapper with a bounded collective timeout (a missed collective fails instead of waiting)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    worker(rank, out, timeout)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # forked after these imports (seconds each), as loop_ddp_run.py does
    for name in ("entrotrain.integrations.loop", "tests.helpers.loop_fsdp", "torch.distributed.fsdp",
                 "torch.distributed.tensor"):
        importlib.import_module(name)
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 120.0
    mp.start_processes(
        _in_group, args=(WORLD, gloo.free_port(), sys.argv[1], seconds), nprocs=WORLD, join=True, start_method="fork"
    )
