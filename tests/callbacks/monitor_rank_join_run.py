"""Run by test_monitor_rank_join.py as a script: 2 gloo processes, AttentionEntropyMonitor's and
RouterEntropyMonitor's logging steps where one rank captured less than the other (no forward at all, or a forward
through only some attention sites / routers), through the loop / HF driver and through the Lightning callback's
``_flush``; and PolicyEntropyMonitor's logging batch where the ranks' ``training_step`` returned different optional
tensors (rewards, post-update entropy, phase ids on one rank only, different temperatures) or dtypes, through the
Lightning callback's ``on_train_batch_end``. Each rank writes what it got; rank 0 also writes one process's values on
the union of both ranks' captures (the reference)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import entrotrain.callbacks.attention_monitor as attention_module  # noqa: E402
import entrotrain.callbacks.policy_monitor as policy_module  # noqa: E402
import entrotrain.callbacks.representation_monitor as representation_module  # noqa: E402
import entrotrain.callbacks.router_monitor as router_module  # noqa: E402
from entrotrain.callbacks import (  # noqa: E402
    AttentionEntropyMonitor,
    RepresentationEntropyMonitor,
    RouterEntropyMonitor,
)
from entrotrain.errors import EntrotrainError, TapError  # noqa: E402
from entrotrain.integrations._monitor_session import (  # noqa: E402
    _AttentionDriver,
    _RepresentationDriver,
    _RouterDriver,
    distributed,
)
from tests.helpers.ddp_trainer import count_collectives  # noqa: E402
from tests.helpers.gloo import spawn_gloo  # noqa: E402
from tests.helpers.lightning_models import TinyLM, token_loader  # noqa: E402
from tests.helpers.policy_batches import rank_batches, union_of_ranks  # noqa: E402
from tests.helpers.router_models import ToyMoE  # noqa: E402

#: what each rank runs in a window: "all" = the whole model, "block1" = only blocks[1] (one of the two attention
#: sites), "none" = no forward (a rank that skipped the batch)
CASES = {"rank1_nothing_first_step": ("all", "none"), "rank1_one_site": ("all", "block1"),
         "rank0_nothing": ("none", "all"), "nobody": ("none", "none")}

#: seconds after which a worker is killed (a hang); the whole script takes ~20-40 s on 2 quiet CPU cores and 70 s
#: under a load of 16 (torch 2.15): the limit only costs time when a rank hangs
WATCHDOG_S = 180


def forward(model: TinyLM, what: str, idx: torch.Tensor) -> None:
    with torch.no_grad():
        if what == "all":
            model(idx)
        elif what == "block1":
            model.blocks[1](model.emb(idx))


def monitor() -> AttentionEntropyMonitor:
    return AttentionEntropyMonitor(max_rows=None, max_queries=None, strict=False, log_media=False)


def reference(model: TinyLM, batches: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """One process scoring both ranks' forwards of each case in one window (``[case]`` → metrics)."""
    driver = _AttentionDriver(monitor(), "reference")
    driver.bind(model)
    out = {}
    for step, (case, plan) in enumerate(CASES.items()):
        driver.arm()
        for rank, what in enumerate(plan):
            forward(model, what, batches[rank])
        driver.disarm()
        out[case] = driver.compute(step, 1, 0, None)
    return out


def router_forward(model: ToyMoE, what: str, x: torch.Tensor) -> None:
    with torch.no_grad():
        if what == "all":
            model.blocks(x)
        elif what == "block1":
            model.blocks[1](x)


def router_step(driver: _RouterDriver, model: ToyMoE, plan: tuple[str, ...], xs: list[torch.Tensor],
                ranks: range) -> None:
    driver.arm()
    for r in ranks:
        router_forward(model, plan[r], xs[r])
    driver.disarm()
    driver._consume()


def outcome(path: str, driver: Any, trainer: SimpleNamespace, model: Any, step: int, published: list) -> object:
    """What ``path`` publishes at ``step``: the driver's compute on this rank (``"driver"``), the Lightning flush's
    published metrics (``"lightning"``), one process on both ranks' forwards (``"reference"``); ``"TapError"`` when it
    raises that (no rank captured anything)."""
    world, rank, reduce = distributed()
    try:
        if path == "driver":
            return driver.compute(step, world, rank, reduce)
        if path == "lightning":
            driver.monitor._flush(trainer, model, step)
            return published[-1]
        return driver.compute(step, 1, 0, None)
    except TapError:
        return "TapError"


def routers(rank: int, result: dict[str, object], trainer: SimpleNamespace) -> None:
    """The router monitor's cases (``nobody`` = TapError on every rank), driver and Lightning path, and rank 0's
    one-process reference."""
    model = ToyMoE().double()
    xs = [torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(2)]
    published: list[dict[str, float]] = []
    router_module.publish_scalars = lambda trainer, pl_module, metrics, source=None: published.append(metrics)
    router_module.record_arrays = lambda *args: None
    runs = {"driver": _RouterDriver(RouterEntropyMonitor(top_k=2, log_media=False), "test"),
            "lightning": _RouterDriver(RouterEntropyMonitor(top_k=2, log_media=False), "test")}
    if rank == 0:
        runs["reference"] = _RouterDriver(RouterEntropyMonitor(top_k=2, log_media=False), "reference")
    for driver in runs.values():
        driver.bind(model)
    for step, (case, plan) in enumerate(CASES.items()):
        for path, driver in runs.items():
            router_step(driver, model, plan, xs, range(2) if path == "reference" else range(rank, rank + 1))
            result[f"router/{path}/{case}"] = outcome(path, driver, trainer, model, step, published)


def representations(rank: int, result: dict[str, object], trainer: SimpleNamespace, model: TinyLM,
                    batches: list[torch.Tensor]) -> None:
    """The representation monitor's cases (on ``blocks.*``), as :func:`routers`."""
    published: list[dict[str, float]] = []
    representation_module.publish_scalars = lambda trainer, pl_module, metrics, source=None: published.append(metrics)
    trainer.sanity_checking, trainer.global_rank = False, rank

    def make() -> _RepresentationDriver:
        return _RepresentationDriver(RepresentationEntropyMonitor(include=["blocks.*"], print_summary=False), "test")

    runs = {"driver": make(), "lightning": make(), **({"reference": make()} if rank == 0 else {})}
    for driver in runs.values():
        driver.bind(model)
    for step, (case, plan) in enumerate(CASES.items()):
        for path, driver in runs.items():
            driver.arm()
            for r in range(2) if path == "reference" else range(rank, rank + 1):
                forward(model, plan[r], batches[r])
            driver.disarm()
            result[f"representation/{path}/{case}"] = outcome(path, driver, trainer, model, step, published)


#: PolicyEntropyMonitor: what each rank's training_step returns besides rank_batches' tensors (rewards, temperature
#: 1.0): ``-rewards`` drops them, ``+post`` / ``+phases`` adds post_token_entropy / phase_ids, ``t=0.7`` sets the
#: temperature, ``f64`` casts the float tensors to float64, ``loss only`` returns no tensors; (rank 0's, rank 1's)
POLICY_CASES = {"rewards_on_rank0": ("", "-rewards"), "post_entropy_on_rank1": ("", "+post"),
                "phases_on_rank0": ("+phases", ""), "temperatures_differ": ("", "t=0.7"),
                "dtypes_differ": ("", "f64"), "rank1_no_tensors": ("", "loss only")}


def policy_outputs(batch: dict, how: str) -> dict:
    """``batch`` (a rank's rows or the union) as a training_step returning it ``how`` (see :data:`POLICY_CASES`)."""
    out = dict(batch)
    if how == "loss only":  # a training_step that returned no per-token tensors on this rank
        return {"loss": torch.zeros(())}
    if "-rewards" in how:
        del out["rewards"]
    if "+post" in how:
        out["post_token_entropy"] = out["token_entropy"] * 0.9
    if "+phases" in how:
        out["phase_ids"] = torch.where(out["response_mask"], 0, -1)
    if "t=0.7" in how:
        out["temperature"] = 0.7
    if "f64" in how:
        out = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
    return out


def policies(rank: int, result: dict[str, object]) -> None:
    """PolicyEntropyMonitor's Lightning path (``on_train_batch_end`` with a stand-in trainer, batch 0) for each of
    :data:`POLICY_CASES`: the metrics it published or the error it raised; rank 0 also one process on the union."""
    published: list[dict[str, float]] = []
    policy_module.publish_scalars = lambda trainer, pl_module, metrics, source=None: published.append(metrics)
    policy_module.record_arrays = lambda *args: None
    trainer = SimpleNamespace(sanity_checking=False, accumulate_grad_batches=1, is_global_zero=rank == 0, loggers=[],
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=0)))
    mine, union = rank_batches(rank, 1)[0], union_of_ranks(1)[0]
    for case, plan in POLICY_CASES.items():
        monitor = policy_module.PolicyEntropyMonitor(log_media=False, print_summary=False)
        collectives = count_collectives(monitor, "on_train_batch_end")
        try:
            monitor.on_train_batch_end(trainer, None, policy_outputs(mine, plan[rank]), None, 0)
            result[f"policy/lightning/{case}"] = published[-1]
        except EntrotrainError as error:
            result[f"policy/lightning/{case}"] = {"error": str(error)}
        result[f"policy/collectives/{case}"] = collectives
        if rank == 0 and case == "dtypes_differ":  # the union, as one process concatenates it (float32 values)
            reference = policy_module.PolicyEntropyMonitor(log_media=False, print_summary=False)
            found = reference._tensors(union)
            tensors = {name: found[name] for name, _ in policy_module._GATHERED if found[name] is not None}
            summary = reference.summarise(tensors, 0, temperature=found["temperature"])
            result[f"policy/reference/{case}"] = {reference.prefix + k: v for k, v in summary.items()}
    # gradient accumulation, 2 micro-batches a step: rank 0's second one returns no rewards, so pooling its step
    # (_pooled) refuses on rank 0 alone; rank 1's step pools
    case = "pooled_rewards_on_rank0"
    accumulating = SimpleNamespace(sanity_checking=False, accumulate_grad_batches=2, global_step=0,
                                   is_global_zero=rank == 0, loggers=[])
    monitor = policy_module.PolicyEntropyMonitor(log_media=False, print_summary=False)
    collectives = count_collectives(monitor, "on_train_batch_end")
    try:
        for i, how in enumerate(("", "-rewards" if rank == 0 else "")):
            monitor.on_train_batch_start(accumulating, None, None, i)
            accumulating.global_step = i  # the optimizer steps after the second micro-batch
            monitor.on_train_batch_end(accumulating, None, policy_outputs(mine, how), None, i)
        result[f"policy/lightning/{case}"] = published[-1]
    except EntrotrainError as error:
        result[f"policy/lightning/{case}"] = {"error": str(error)}
    result[f"policy/collectives/{case}"] = collectives


def worker(rank: int, out: str) -> None:
    # a rank left waiting in a collective (the bug) is ended by SIGALRM (default action: terminate, even inside a
    # C++ wait holding the GIL), so the test fails instead of leaving processes behind; left pending over the barrier
    signal.alarm(WATCHDOG_S)
    torch.manual_seed(0)
    model = TinyLM().double()
    batches = [b[0][:, :-1] for b in token_loader(n=8, batch_size=4)]
    result: dict[str, object] = {}
    # the loop / HF path
    driver = _AttentionDriver(monitor(), "test")
    driver.bind(model)
    world, _, reduce = distributed()
    for step, (case, plan) in enumerate(CASES.items()):
        driver.arm()
        forward(model, plan[rank], batches[rank])
        driver.disarm()
        result[f"driver/{case}"] = driver.compute(step, world, rank, reduce)
    # the Lightning path: _flush with a stand-in trainer (publishing recorded, not sent through Lightning)
    published: list[dict[str, float]] = []
    attention_module.publish_scalars = lambda trainer, pl_module, metrics, source=None: published.append(metrics)
    attention_module.record_arrays = lambda *args: None

    def sum_ranks(t: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        t = t.clone()
        dist.all_reduce(t)
        return t

    trainer = SimpleNamespace(world_size=2, is_global_zero=rank == 0, loggers=[],
                              strategy=SimpleNamespace(reduce=sum_ranks))
    callback = monitor()
    callback.bind(model)
    for step, (case, plan) in enumerate(CASES.items()):
        callback.tap.reset()
        callback.tap.arm()
        forward(model, plan[rank], batches[rank])
        callback.tap.disarm()
        callback._flush(trainer, model, step)
        result[f"lightning/{case}"] = published[-1]
    result["site_names"] = callback.site_names
    if rank == 0:
        result["reference"] = reference(model, batches)
    routers(rank, result, trainer)
    representations(rank, result, trainer, model, batches)
    policies(rank, result)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    spawn_gloo(worker, sys.argv[1])
