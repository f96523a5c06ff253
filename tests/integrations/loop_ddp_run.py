"""EntropyMonitors in a hand-written loop on 2 CPU ranks (gloo), and the same loop in one process.

``python loop_ddp_run.py OUT`` starts two ranks; each trains a TinyGPT (same seed) for ``STEPS`` SGD steps on its
half of each batch of ``ROWS`` rows, averaging gradients by hand (``all_reduce``), under
``EntropyMonitors(attention, representation, a stop guard, log=...)``, and writes ``rank{r}.json``: the world size,
the monitors' logs and ``should_stop`` by step and the ``log`` calls, and a run record under
``{name}_record``. The test runs ``run(OUT, "single")`` itself (one process, every row) and checks
that the reduced statistics equal those of the union batch and that only rank 0 calls ``log``. Then each rank runs
:func:`policy_refusal` (``record_policy`` refusing a micro-batch on rank 1 alone) and writes ``policy{r}.json``.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.multiprocessing as mp  # noqa: E402

from tests.helpers import gloo  # noqa: E402
from tests.helpers.gloo import rank_rows  # noqa: E402

ROWS, STEPS = 8, 2

#: seconds after which a worker is killed (a rank left waiting in a collective); the script takes ~15 s
WATCHDOG_S = 150


def run(out: Path, name: str) -> None:
    """The loop on this process's rows (all of them without a process group); writes ``out/{name}.json``."""
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.integrations._monitor_session import distributed
    from entrotrain.integrations.loop import EntropyMonitors
    from tests.helpers.gpt_module import GPTModule
    from tests.helpers.loop_runs import token_batches

    torch.set_num_threads(1)
    world, rank, _ = distributed()
    module = GPTModule(seed=0, convert=False)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    calls: list[tuple[int, dict]] = []
    monitors = EntropyMonitors(
        [
            AttentionEntropyMonitor(every_n_steps=1, max_rows=None, max_queries=None, log_media=False),
            RepresentationEntropyMonitor(
                include=["model.blocks.*"], measures=("rankme", "effective_rank", "matrix_entropy"), every_n_steps=1,
                max_tokens=None, log_spectrum=False,
            ),
        ],
        # always "collapsed" (normalised entropy <= 1): fires at the second observation, on every rank alike
        guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, patience=2, action="stop", arm_on_good=False)],
        log=lambda metrics, *, step: calls.append((step, metrics)),
        print_summary=False,
        record=out / f"{name}_record",  # written by rank 0 only
    )
    logs: dict[int, dict[str, float]] = {}
    stop: list[bool] = []
    rows = rank_rows((ROWS // world,) * world, rank)
    with monitors.watch(module, opt):
        for step, (batch,) in enumerate(token_batches(STEPS, rows=ROWS)):
            with monitors.step(step):
                module.training_step((batch[rows],), step).backward()
                if world > 1:  # equal halves: the mean of the ranks' mean losses is the union's mean loss
                    for p in module.parameters():
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
                opt.step()
                opt.zero_grad()
            logs[step] = dict(monitors.logs)
            stop.append(monitors.should_stop)
    (out / f"{name}.json").write_text(json.dumps({"world": world, "logs": logs, "stop": stop, "calls": calls}))


def policy_refusal(rank: int) -> dict:
    """``record_policy`` at step 0 with a mask holding a 2 on rank 1 alone, then an ordinary step 1: what the step
    blocks raised ('' if none) and step 1's logs."""
    from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.loop import EntropyMonitors
    from tests.helpers.policy_batches import rank_batches

    monitors = EntropyMonitors([PolicyEntropyMonitor(every_n_batches=1, log_media=False)], print_summary=False)
    got: dict = {"record_policy": "", "step0": ""}
    with monitors.watch(torch.nn.Linear(2, 2)):
        for step, batch in enumerate(rank_batches(rank, 2)):
            mask = batch["response_mask"].float()
            if step == 0 and rank == 1:
                mask[0, 0] = 2.0  # refused on this rank alone
            try:
                with monitors.step(step):
                    try:  # (before: raised here, on rank 1 alone, and rank 0 waited for it at the block's end)
                        monitors.record_policy(batch["token_entropy"], batch["logprobs"], batch["advantages"], mask,
                                               rewards=batch["rewards"])
                    except EntrotrainError as error:
                        got["record_policy"] = str(error)
                        raise
            except EntrotrainError as error:
                got[f"step{step}"] = str(error)
            got[f"logs{step}"] = dict(monitors.logs)
    return got


def worker(rank: int, out: str) -> None:
    # a rank left waiting in a collective (the bug) is ended by SIGALRM, so the test fails instead of hanging
    signal.alarm(WATCHDOG_S)
    run(Path(out), f"rank{rank}")
    (Path(out) / f"policy{rank}.json").write_text(json.dumps(policy_refusal(rank)))


if __name__ == "__main__":
    # gloo.spawn_gloo's worker wrapper, forked instead of spawned: the ranks inherit the imports below (seconds each)
    for module in ("entrotrain.integrations.loop", "tests.helpers.gpt_module", "tests.helpers.loop_runs",
                   "tests.helpers.policy_batches"):
        importlib.import_module(module)

    mp.start_processes(
        gloo._in_group, args=(2, gloo.free_port(), worker, (sys.argv[1],)), nprocs=2, join=True, start_method="fork"
    )
