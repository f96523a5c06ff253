"""EntropyCollapseGuard(action="rollback") under FSDP2 in a plain loop (EntropyMonitors): 2 gloo CPU ranks,
``fully_shard`` per block and root on ``init_device_mesh("cpu", (2,))``, Adam.

``python rollback_fsdp2_run.py OUT [TIMEOUT_S]`` forks two ranks. Each trains :func:`make_model` on its half of each
union batch (:func:`batches`), observing the scripted ``VALUES`` (as a monitor reduced across ranks would publish
them): the guard fires at step 2 and rolls back to the end of step 1, then training goes on (steps 3, 4 at half the
rate). Then, in the same processes, the same FSDP2 training without monitors that skips batch 2 and halves the rate
by hand after step 1 (what the rollback must amount to), and the refusals (a 2-D mesh; DTensor parameters without
``fully_shard``). Each rank writes ``rank{r}.json``; rank 0 also writes ``full.pt``: the full (gathered)
parameters at the end of each step and right after the rollback. :func:`reference` is the same rollback run in one
process (no FSDP) on the union batches, for tests/integrations/test_rollback_fsdp2.py. A collective one rank never
joins would hang both: faulthandler dumps the stacks and exits after TIMEOUT_S (default 120).
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
ROWS = 4  # rows per rank and batch
VALUES = [0.9, 0.9, 0.0, 0.9, 0.9]  # the guard (threshold 0.5) fires at step 2
LR, LR_FACTOR = 0.05, 0.5


def make_model() -> nn.Module:
    """Two Linear+Tanh blocks and a head ``Linear(8, 1)``: its weight ``(1, 6)`` and bias ``(1,)`` shard unevenly
    (rank 1 holds empty shards), ``blocks.1``'s ``(6, 8)`` / ``(6,)`` evenly."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 6), nn.Tanh()), nn.Linear(6, 1)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One union batch (``WORLD * ROWS`` rows) per step: inputs and regression targets."""
    g = torch.Generator().manual_seed(100)
    out = []
    for _ in VALUES:
        x = torch.randn(WORLD * ROWS, 4, generator=g)
        out.append((x, x.sum(dim=1, keepdim=True).sin()))
    return out


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """The mean of the ``chunks`` row blocks' mean squared errors: with ``chunks=WORLD`` on the union batch, the loss
    whose gradient is the ranks' averaged gradient (each rank: ``chunks=1`` on its rows)."""
    parts = [(model(xc) - yc).pow(2).mean() for xc, yc in zip(x.chunk(chunks), y.chunk(chunks))]
    return torch.stack(parts).mean()


def run(model: nn.Module, data: list, chunks: int = 1) -> dict[str, Any]:
    """The rollback run under EntropyMonitors: per step the loss, the state (``capture``) at the end of the step, the
    steps it rolled back at and the state right after the rollback."""
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.integrations.loop import EntropyMonitors

    opt = torch.optim.Adam(model.parameters(), lr=LR)
    guard = EntropyCollapseGuard("scripted", threshold=0.5, action="rollback", lr_factor=LR_FACTOR)
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    rec: dict[str, Any] = {"losses": [], "inside": [], "rolled": [], "after": None, "lrs": []}
    with monitors.watch(model, optimizer=opt):
        for step, value in enumerate(VALUES):
            with monitors.step(step):
                opt.zero_grad(set_to_none=True)
                loss = loss_of(model, *data[step], chunks=chunks)
                loss.backward()
                opt.step()
                monitors.observe(scripted=value)
                rec["inside"].append(capture(model, opt))
            rec["losses"].append(loss.item())
            rec["lrs"].append(opt.param_groups[0]["lr"])
            if monitors.rolled_back:
                rec["rolled"].append(step)
                rec["after"] = capture(model, opt)
    return rec


def run_by_hand(model: nn.Module, data: list) -> dict[str, Any]:
    """What the rollback must amount to, without monitors: steps 0 and 1, the rate halved, steps 3 and 4."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in (0, 1, 3, 4):
        if step == 3:
            for group in opt.param_groups:
                group["lr"] *= LR_FACTOR
        opt.zero_grad(set_to_none=True)
        loss_of(model, *data[step]).backward()
        opt.step()
    return capture(model, opt)


def capture(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's share of the state: each parameter's local shard, its Adam state (moments' local shards, the
    step) and the full parameters (gathered: a collective, every rank calls it)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    return {
        "local": {n: local(p) for n, p in model.named_parameters()},
        "adam": {n: {k: local(v) for k, v in opt.state[p].items()} for n, p in model.named_parameters()},
        "full": {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in model.named_parameters()},
    }


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested dicts / lists of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in list(model)[:2]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _refused(model: nn.Module) -> str:
    """The error message of a rollback guard's watch on ``model`` ('' when it was accepted)."""
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.loop import EntropyMonitors

    monitors = EntropyMonitors(guards=[EntropyCollapseGuard("scripted", threshold=0.5, action="rollback")],
                               print_summary=False)
    try:
        with monitors.watch(model, optimizer=torch.optim.Adam(model.parameters())):
            pass
    except EntrotrainError as err:
        return str(err)
    return ""


def _nan_on_one_rank(rank: int, mesh: Any, data: list) -> dict[str, Any]:
    """RollbackState directly: a good take at step 0; then rank 1's shard of ``1.0.weight`` goes NaN (an overflow
    on one rank) and the take at step 1 must be skipped on EVERY rank (the verdict is all-reduced), so both ranks
    keep holding step 0; the restore brings rank 1's shard back to finite values."""
    from entrotrain.callbacks.rollback_state import RollbackState

    model = shard(make_model(), mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    state = RollbackState()
    loss_of(model, *data[0]).backward()
    opt.step()
    first = state.take(model, [opt], step=0)
    held = capture(model, opt)
    loss_of(model, *data[1]).backward()
    opt.step()
    if rank == 1:
        with torch.no_grad():
            model[1][0].weight.to_local()[0, 0] = float("nan")
    second = state.take(model, [opt], step=1)
    step = state.restore(model, [opt])
    return {"first": first, "second": second, "held_step": step,
            "restored": same(capture(model, opt)["local"], held["local"])}


def _moments_rebuilt(mesh: Any, data: list) -> dict[str, Any]:
    """A parameter whose Adam state was dropped after the take (``optimizer.state.pop``) gets its held moments back as
    DTensors rebuilt from the held local shards (same mesh, placements, shape): the next step then equals, bit for
    bit, the one of a model that never lost them."""
    from torch.distributed.tensor import DTensor

    from entrotrain.callbacks.rollback_state import RollbackState

    models = [shard(make_model(), mesh) for _ in range(2)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]
    for model, opt in zip(models, opts):
        loss_of(model, *data[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = RollbackState()
    state.take(models[0], [opts[0]], step=0)
    weight = models[0][1][0].weight
    spec = [(type(v).__name__, v.placements, v.shape) for v in opts[0].state[weight].values() if isinstance(v, DTensor)]
    opts[0].state.pop(weight)
    state.restore(models[0], [opts[0]])
    rebuilt = [(type(v).__name__, v.placements, v.shape) for v in opts[0].state[weight].values()
               if isinstance(v, DTensor)]
    for model, opt in zip(models, opts):
        loss_of(model, *data[1]).backward()
        opt.step()
    a, b = (capture(m, o) for m, o in zip(models, opts))
    return {"specs_equal": spec == rebuilt and len(spec) == 2, "next_step_same": same(a["local"], b["local"])
            and same(a["adam"], b["adam"])}


def _copy_refused(mesh: Any) -> dict[str, Any]:
    """A state-dict hook that hands out a copy of one shard (``1.0.bias``): the restore cannot reach that parameter,
    so it is refused, and before copying anything (the other parameters keep their values, not half rolled back)."""
    from entrotrain.callbacks.rollback_state import RollbackState
    from entrotrain.errors import EntrotrainError

    model = shard(make_model(), mesh)
    state = RollbackState()
    state.take(model, [], step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0)
    moved = {n: p.to_local().clone() for n, p in model.named_parameters()}

    def copies(module: nn.Module, sd: dict, prefix: str, meta: Any) -> None:
        sd["1.0.bias"] = sd["1.0.bias"].clone()

    model._register_state_dict_hook(copies)
    try:
        state.restore(model, [])
        message = ""
    except EntrotrainError as err:
        message = str(err)
    return {"message": message, "untouched": same({n: p.to_local() for n, p in model.named_parameters()}, moved)}


def worker(rank: int, out: str, timeout: float) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    faulthandler.dump_traceback_later(timeout, exit=True)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    data = [(x[rows], y[rows]) for x, y in batches()]
    mesh = init_device_mesh("cpu", (WORLD,))

    model = shard(make_model(), mesh)
    sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
    shapes = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
    rec = run(model, data)
    by_hand = run_by_hand(shard(make_model(), mesh), data)
    end = rec["inside"][-1]
    after = rec["after"] or {}

    hsdp = shard(make_model(), init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
    plain = make_model()  # DTensor parameters without fully_shard (tensor parallel alone)
    for name, param in list(plain[2].named_parameters()):
        setattr(plain[2], name, nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)])))
    result = {
        "rolled": rec["rolled"], "losses": rec["losses"], "lrs": rec["lrs"], "sharded": sharded, "shapes": shapes,
        "local_restored": bool(after) and same(after["local"], rec["inside"][1]["local"]),
        "adam_restored": bool(after) and same(after["adam"], rec["inside"][1]["adam"]),
        "full_restored": bool(after) and same(after["full"], rec["inside"][1]["full"]),
        "changed_before": not same(rec["inside"][2]["local"], rec["inside"][1]["local"]),
        "adam_step_after": {n: float(s["step"]) for n, s in after.get("adam", {}).items()},
        "by_hand_local": same(end["local"], by_hand["local"]), "by_hand_adam": same(end["adam"], by_hand["adam"]),
        "hsdp_refused": _refused(hsdp), "tp_refused": _refused(plain),
        "nan": _nan_on_one_rank(rank, mesh, data), "copy_refused": _copy_refused(mesh),
        "moments": _moments_rebuilt(mesh, data),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save({"inside": [s["full"] for s in rec["inside"]], "after": after.get("full")}, Path(out, "full.pt"))
    faulthandler.cancel_dump_traceback_later()


def reference() -> dict[str, Any]:
    """The same rollback run in one process (no FSDP) on the union batches, ``chunks=WORLD``."""
    return run(make_model(), batches(), chunks=WORLD)


def _in_group(rank: int, world: int, port: int, out: str, timeout: float) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    worker(rank, out, timeout)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.helpers import gloo

    for name in ("entrotrain.integrations.loop", "torch.distributed.fsdp", "torch.distributed.tensor"):
        importlib.import_module(name)  # forked after these imports (seconds each), as loop_fsdp2_run.py does
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 120.0
    mp.start_processes(_in_group, args=(WORLD, gloo.free_port(), sys.argv[1], seconds), nprocs=WORLD, join=True,
                       start_method="fork")
