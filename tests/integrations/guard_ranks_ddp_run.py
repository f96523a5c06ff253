"""Guards in a plain loop (EntropyMonitors) on 2 gloo CPU ranks whose own values differ: the ranks must decide alike.

``python guard_ranks_ddp_run.py OUT`` forks two ranks. Each trains a DDP-wrapped MLP (same seed, its own batches)
under ``EntropyMonitors(guards=[...])`` and hands the guard its own scripted value with ``monitors.observe(loss=...)``
(as each rank hands over its own loss), in three runs:

- ``rollback``: rank 1's value is bad at step 2, rank 0's never is;
- ``stop``: rank 1's value is NaN at step 1, rank 0's is finite;
- ``reduce_lr``: only rank 0 hands a value over (bad at step 1); rank 1 never calls ``observe``;
- ``rollback_buffer``: both ranks' values are bad at step 3, and rank 1's buffer went NaN after step 2's update;
- ``frozen_take`` / ``frozen_restore`` (``hold="trainable"``): rank 1's frozen parameter changes after step 1's update
  (the take of step 1 refuses) / step 3's (bad on both ranks: the restore refuses).

Each rank writes ``rank{r}.json``: per run, the steps it rolled back at, ``should_stop`` after each step, the final
learning rate and its final weights (flattened), and the collectives the held states' takes issued (``takes``: how
many takes). Then one logging step of a ``PolicyEntropyMonitor`` whose tensors
(``record_policy``) are gathered over the ranks: rank 1 hands nothing over, or no rewards, or empty ``(0, T)``
tensors, or float32 tensors where rank 0's are float64; each rank writes the step's logs or the error it raised.
Run by tests/integrations/test_guard_ranks_ddp.py.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.multiprocessing as mp  # noqa: E402

from tests.helpers import gloo  # noqa: E402

NAN = math.nan
#: run -> (guard arguments, values of rank 0, values of rank 1; None: not handed over)
RUNS = {
    "rollback": (dict(threshold=5.0, mode="max", action="rollback"), [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 9.0, 1.0]),
    "stop": (dict(threshold=5.0, mode="max", action="stop"), [1.0, 1.0, 1.0, 1.0], [1.0, NAN, 1.0, 1.0]),
    "reduce_lr": (dict(threshold=5.0, mode="max", action="reduce_lr"), [1.0, 9.0, 1.0, 1.0], [None] * 4),
    "rollback_buffer": (dict(threshold=5.0, mode="max", action="rollback"), [1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 9.0]),
    "frozen_take": (dict(threshold=5.0, mode="max", action="rollback", hold="trainable"), [1.0] * 4, [1.0] * 4),
    "frozen_restore": (dict(threshold=5.0, mode="max", action="rollback", hold="trainable"), [1.0, 1.0, 1.0, 9.0],
                       [1.0, 1.0, 1.0, 9.0]),
}
#: run -> (rank, step, what): after that step's update, that rank's buffer goes NaN ("buffer": as BatchNorm's running
#: statistics can on one rank, DDP does not keep buffers equal between its forwards' broadcasts), or its frozen
#: parameter changes ("frozen": with hold="trainable", a take then a restore refuses)
POISONED = {"rollback_buffer": (1, 2, "buffer"), "frozen_take": (1, 1, "frozen"), "frozen_restore": (1, 3, "frozen")}


def train(rank: int, guard_args: dict, values: list, poisoned: tuple[int, int, str] | None = None) -> dict:
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.loop import EntropyMonitors
    from tests.helpers.ddp_trainer import count_collectives

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model.register_buffer("stat", torch.zeros(2))
    model.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    guard = EntropyCollapseGuard("loss", keep_last_good=False, **guard_args)
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    rolled, restored, stop = [], [], []
    collectives: list[str] = []
    takes: list[int] = []
    try:
        with monitors.watch(ddp, optimizer=opt):
            collectives = count_collectives(guard.held_states, "take")  # (every take's, in order)
            counted = guard.held_states.take
            guard.held_states.take = lambda *a, **k: (takes.append(1), counted(*a, **k))[1]
            for step, value in enumerate(values):
                with monitors.step(step):
                    opt.zero_grad(set_to_none=True)
                    ddp(torch.randn(6, 4, generator=g)).pow(2).mean().backward()
                    opt.step()
                    if poisoned == (rank, step, "buffer"):
                        model.stat.fill_(NAN)
                    if poisoned == (rank, step, "frozen"):
                        model.frozen.data.add_(1.0)
                    if value is not None:
                        monitors.observe(loss=torch.tensor(value))
                if monitors.rolled_back:
                    rolled.append(step)
                    restored.append(guard.held_states.restored_step)
                stop.append(monitors.should_stop)
    except EntrotrainError as error:
        return {"error": str(error), "step": step, "collectives": collectives, "takes": len(takes)}
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    return {"rolled": rolled, "stop": stop, "lr": opt.param_groups[0]["lr"], "weights": weights,
            "restored_to": restored, "collectives": collectives, "takes": len(takes)}


#: run -> what each rank hands PolicyEntropyMonitor at step 0: "batch", "batch+rewards", "empty" ((0, T)), "batch32"
#: (float32 tensors; the others are float64) or None
POLICY = {
    "policy_missing": ("batch", None),
    "policy_rewards": ("batch+rewards", "batch"),
    "policy_empty": ("batch", "empty"),
    "policy_dtypes": ("batch", "batch32"),
}


def policy(rank: int, handed: str | None) -> dict:
    """One logging step of a PolicyEntropyMonitor in a loop; the step's statistics, or the error raised."""
    from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.loop import EntropyMonitors

    g = torch.Generator().manual_seed(7)  # the same rows on both ranks: rank 1's 'empty' adds none
    rows = 0 if handed == "empty" else 4
    batch = {"entropy": torch.rand(rows, 6, generator=g, dtype=torch.float64),
             "logprobs": -torch.rand(rows, 6, generator=g, dtype=torch.float64),
             "advantages": torch.randn(rows, generator=g, dtype=torch.float64), "mask": torch.ones(rows, 6) > 0}
    if handed == "batch+rewards":
        batch["rewards"] = torch.rand(rows, generator=g, dtype=torch.float64)
    if handed == "batch32":
        batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    monitors = EntropyMonitors([PolicyEntropyMonitor(print_summary=False)], print_summary=False)
    try:
        with monitors.watch(torch.nn.Linear(2, 2)):
            with monitors.step(0):
                if handed is not None:
                    monitors.record_policy(**batch)
    except EntrotrainError as err:
        return {"error": str(err)}
    return {"logs": monitors.logs}


def worker(rank: int, out: str) -> None:
    faulthandler.dump_traceback_later(180, exit=True)  # a rank left waiting in a collective: fail, do not hang
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    found = {name: train(rank, args, by_rank[rank], POISONED.get(name)) for name, (args, *by_rank) in RUNS.items()}
    found.update({name: policy(rank, by_rank[rank]) for name, by_rank in POLICY.items()})
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    importlib.import_module("entrotrain.integrations.loop")  # inherited by the forked ranks
    mp.start_processes(
        gloo._in_group, args=(2, gloo.free_port(), worker, (sys.argv[1],)), nprocs=2, join=True, start_method="fork"
    )
