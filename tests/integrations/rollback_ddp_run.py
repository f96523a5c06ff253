"""EntropyCollapseGuard(action="rollback") on 2 gloo CPU ranks in a plain loop (EntropyMonitors).

``python rollback_ddp_run.py OUT`` spawns two ranks. Each trains a DDP-wrapped MLP with Adam on its own batches,
observing the same scripted value (as a monitor reduced across ranks would publish it); the guard fires at step 2 and
rolls back to the end of step 1. Each rank writes ``rank{r}.json`` (the steps it rolled back at, whether the restored
state equals the one it had at the end of step 1, whether an FSDP2 model was accepted and FSDP1 refused, and the
same run with a ``ZeroRedundancyOptimizer``: :func:`zero_redundancy`) and ``weights{r}.pt`` (its weights right
after the rollback). Run by tests/integrations/test_rollback_glue.py.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import gloo  # noqa: E402

VALUES = [0.9, 0.9, 0.0, 0.9, 0.9]


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def worker(rank: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.loop import EntropyMonitors

    faulthandler.dump_traceback_later(120, exit=True)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    guard = EntropyCollapseGuard("scripted", threshold=0.5, action="rollback", lr_factor=0.5)
    inside, rolled, after = _train(ddp, opt, opt, guard, g)
    restored = after is not None and _same(after[0], inside[1][0]) and _same(after[1], inside[1][1])

    # FSDP2 (DTensor shards) is accepted: each rank holds its local shards (rollback_fsdp2_run.py rolls back);
    # FSDP1 (flat parameters) is still refused
    from torch.distributed.fsdp import FullyShardedDataParallel

    def refusal(model: torch.nn.Module) -> str:
        try:
            monitors = EntropyMonitors(guards=[EntropyCollapseGuard("scripted", threshold=0.5, action="rollback")],
                                       print_summary=False)
            with monitors.watch(model, optimizer=torch.optim.Adam(model.parameters())):
                pass
        except EntrotrainError as err:
            return str(err)
        return ""

    sharded = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    fully_shard(sharded, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    fsdp2 = refusal(sharded)
    fsdp1 = refusal(FullyShardedDataParallel(torch.nn.Linear(4, 2), device_id=torch.device("cpu")))

    zero = zero_redundancy(rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rolled": rolled, "restored_equals_held": restored, "fsdp2_accepted": fsdp2 == "",
         "fsdp1_refused": "FSDP" in fsdp1 and "reduce_lr" in fsdp1, "zero": zero}))
    torch.save(after[0] if after is not None else {}, Path(out, f"weights{rank}.pt"))
    faulthandler.cancel_dump_traceback_later()


def _train(ddp, opt, holder, guard, g, after_step=None) -> tuple[dict, list, tuple | None]:
    """Train ``ddp`` with ``opt`` under ``guard`` in a plain loop, the guard judging ``VALUES``; ``after_step(step)``
    runs after each optimizer step. Returns the states at each block's end (``holder``: the optimizer whose state is
    recorded), the steps rolled back at, and the state right after the last rollback."""
    from entrotrain.integrations.loop import EntropyMonitors

    model = ddp.module
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    inside, rolled, after = {}, [], None
    with monitors.watch(ddp, optimizer=opt):
        for step, value in enumerate(VALUES):
            with monitors.step(step):
                opt.zero_grad(set_to_none=True)
                ddp(torch.randn(6, 4, generator=g)).pow(2).mean().backward()
                opt.step()
                if after_step is not None:
                    after_step(step)
                monitors.observe(scripted=value)
                inside[step] = _state(model, holder)
            if monitors.rolled_back:
                rolled.append(step)
                after = _state(model, holder)
    return inside, rolled, after


def zero_redundancy(rank: int) -> dict:
    """DDP with ``ZeroRedundancyOptimizer``: each rank holds and restores its shard of Adam's state (in ``.optim``).
    At step 1 rank 1's shard of the second moments turns infinite while the weights stay finite: no rank holds step
    1 (the verdict is agreed on), so the firing at step 2 rolls every rank back to step 0. ``overlap_with_ddp=True``
    is refused. A host memory check that fails on rank 1 alone is refused on both ranks."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.errors import EntrotrainError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)

    def poison(step: int) -> None:  # rank 1's shard of the second moments turns infinite at step 1
        if step == 1 and rank == 1:
            next(iter(opt.optim.state.values()))["exp_avg_sq"].fill_(float("inf"))

    guard = EntropyCollapseGuard("scripted", threshold=0.5, action="rollback")
    inside, rolled, after = _train(ddp, opt, opt.optim, guard, g, poison)
    try:  # overlap_with_ddp steps inside DDP's communication hook, outside optimizer.state: refused
        overlapped = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam,
                                             overlap_with_ddp=True)
        EntropyCollapseGuard("scripted", action="rollback").track(model, [overlapped])
        refusal = ""
    except EntrotrainError as err:
        refusal = str(err)
    return {"rolled": rolled, "owns_state": bool(opt.optim.state), "memory_refused": _memory_refusal(rank, ddp, opt),
            "overlap_refused": "overlap_with_ddp=False rolls back" in refusal and "reduce_lr" in refusal,
            "restored_step_0": after is not None and _same(after[0], inside[0][0]) and _same(after[1], inside[0][1]),
            "lr": opt.param_groups[0]["lr"], "inner_lr": opt.optim.param_groups[0]["lr"]}


def _memory_refusal(rank: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """The host memory check with rank 1's machine full: every rank refuses (each holds its own shard's size; one
    refusing alone would leave the other waiting in its next collective). The refusal's message, '' if none."""
    from entrotrain.callbacks import rollback_memory
    from entrotrain.errors import EntrotrainError

    real = rollback_memory.host_bytes_available
    rollback_memory.host_bytes_available = (lambda: 1) if rank == 1 else real
    try:
        rollback_memory.check_host_memory(model, [opt], states=2, held_bytes=0)
    except EntrotrainError as err:
        return str(err)
    finally:
        rollback_memory.host_bytes_available = real
    return ""


if __name__ == "__main__":
    gloo.spawn_gloo(worker, sys.argv[1])
