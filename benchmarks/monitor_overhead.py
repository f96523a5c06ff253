"""Step-time overhead of the monitors (DESIGN §6: ≤ 5 % on a CPU tiny GPT and ≤ 2 % on a GPU GPT-small with a log
every 50 steps, 0 % on steps that do not log).

Two measurements:

1. (default) ``AttentionEntropyMonitor`` alone on the recipe's TinyGPT, in a manual loop (below).
2. ``--all``: the overhead budget: real ``Trainer.fit`` runs with *all* the monitors that apply to a language model —
   ``AttentionEntropyMonitor``, ``SigmaReparamMonitor``, ``RepresentationEntropyMonitor`` (train stage, every block's
   output), ``EntropyCollapseGuard`` — at ``every_n_steps = --every`` (50) versus none, rounds interleaved. The step is
   timed from the first callback's ``on_train_batch_start`` to the last callback's ``on_train_batch_end``, so every
   monitor hook is inside it. ``--model gpt-small`` (12 × 12 × 768, 1024 tokens, batch 8: run it on a GPU with
   ``--device cuda``) or ``tiny`` (the recipe's 4 × 4 × 128, 64 tokens, batch 32).
3. ``--loop``: the same monitors through :class:`~entrotrain.integrations.loop.EntropyMonitors` in a plain training
   loop against the same loop without it (``--model``, ``--device`` and ``--every`` as ``--all``).

One process trains three identical models (same seed, same batches) in interleaved rounds so machine load hits
them alike:

- ``plain``: no monitor;
- ``monitor/50``: ``AttentionEntropyMonitor(every_n_steps=50)`` (the recipe preset logs every 25);
- ``monitor/1``: a monitor that logs every step, to measure the cost of one logging step precisely.

Each round runs ``--steps`` optimizer steps of each model (a manual loop that calls the callback hooks the way
Lightning does, so no Trainer overhead blurs the ratio). Reported: median step time on non-logging steps (should
equal ``plain``), the extra time of one logging step, and the amortised overhead at every 50 / every 25 steps.

    python benchmarks/monitor_overhead.py            # CPU, 2 threads
    python benchmarks/monitor_overhead.py --all --quick   # 4 steps, 1 round: proves the script runs
    python benchmarks/monitor_overhead.py --loop --threads 1 --steps 100 --rounds 3
    python benchmarks/monitor_overhead.py --loop --record --threads 1 --steps 100 --rounds 3   # + the run record
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table  # noqa: E402

from entrotrain.callbacks import (  # noqa: E402
    AttentionEntropyMonitor,
    EntropyCollapseGuard,
    RepresentationEntropyMonitor,
    SigmaReparamMonitor,
)
from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask  # noqa: E402


class _FakeTrainer(SimpleNamespace):
    """Just what the monitor reads from a Trainer."""


def _trainer() -> _FakeTrainer:
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0))
    return _FakeTrainer(
        global_step=0, sanity_checking=False, world_size=1, loggers=[], is_global_zero=True, fit_loop=loop
    )


def _run(task, opt, batches, monitor, trainer, samples, logged):
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        if monitor is not None:
            monitor.on_train_batch_start(trainer, task, batch, i)
        loss = task.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trainer.global_step += 1
        if monitor is not None:
            monitor.on_train_batch_end(trainer, task, {"loss": loss}, batch, i)
        trainer.fit_loop.epoch_loop._batches_that_stepped += 1
        samples.append(time.perf_counter() - t0)
        logged.append(monitor is not None and (trainer.global_step - 1) % monitor.every_n_steps == 0)


MODELS = {  # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "tiny": (4, 4, 128, 64, 32),
    "gpt-small": (12, 12, 768, 1024, 8),
}


class _StepTimer:
    """Two callbacks bracketing all others: start at the first ``on_train_batch_start``, stop at the last ``..._end``."""

    def __init__(self) -> None:
        import lightning as L

        timer = self
        self.samples: list[float] = []
        self.steps: list[int] = []
        self._t0 = 0.0

        class Start(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                timer._t0 = time.perf_counter()

        class Stop(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                timer.samples.append(time.perf_counter() - timer._t0)
                timer.steps.append(trainer.global_step - 1)

        self.start, self.stop = Start(), Stop()


def _all_monitors(every: int, root: str = "model.") -> list:
    """Every language-model monitor and a guard; ``root``: the module path of the TinyGPT (``model.`` in the task)."""
    return [
        AttentionEntropyMonitor(every_n_steps=every, print_summary=False),
        SigmaReparamMonitor(every_n_steps=every),
        RepresentationEntropyMonitor(
            include=[f"{root}blocks.*"], exclude=[f"{root}blocks.*.*"], every_n_steps=every, stage="train",
            print_summary=False,
        ),
        EntropyCollapseGuard(monitor="entropy/attn_norm/min", threshold=0.0),
    ]


def _budget_rows(base: str, monitored: str, plain: float, quiet: float, loud: float, every: int) -> list[list[str]]:
    """The overhead table's rows: the baseline, a non-logging and a logging step (medians, seconds) as ratios to it,
    and the amortised ratio with one logging step in ``every``."""
    rows = [
        [base, f"{1e3 * plain:.1f} ms", "1.000"],
        [f"{monitored}, non-logging step", f"{1e3 * quiet:.1f} ms", f"{quiet / plain:.3f}"],
        [f"{monitored}, logging step", f"{1e3 * loud:.1f} ms", f"{loud / plain:.3f}"],
    ]
    for n in sorted({every, 50}):  # 50: DESIGN §6's budget, whatever interval was measured
        rows.append([f"amortised at every {n} (medians)", "", f"{1 + (loud - quiet) / n / plain:.3f}"])
    return rows


def budget(args: argparse.Namespace) -> None:
    """``--all``: every monitor at every ``--every`` steps vs none, through ``Trainer.fit``."""
    import warnings

    import lightning as L

    warnings.filterwarnings("ignore")
    n_layer, n_head, n_embd, block, batch = MODELS[args.model]
    data = CharCorpusDataModule(block_size=block, batch_size=batch, seed=0, steps_per_epoch=args.steps)
    data.setup("fit")
    batches = list(data.train_dataloader())[: args.steps]
    timers = {"none": [], "all monitors": []}
    weights = {}
    first = 1 if args.quick else 0  # --quick proves the script runs: no warm-up round
    for round_ in range(first, args.rounds + 1):  # round 0 warms up (allocator, kernels), not counted
        for name in timers:
            timer = _StepTimer()
            monitors = _all_monitors(args.every) if name != "none" else []
            torch.manual_seed(0)
            task = LanguageModelingTask(
                block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, lr=1e-4
            )
            trainer = L.Trainer(
                accelerator=args.device, devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                callbacks=[timer.start, *monitors, timer.stop],
            )
            trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
            if round_:
                timers[name].append(timer)
            weights[name] = [p.detach().cpu() for p in task.parameters()]
    plain = statistics.median(t for tm in timers["none"] for t in tm.samples)
    quiet, loud = [], []
    for tm in timers["all monitors"]:
        for t, step in zip(tm.samples, tm.steps):
            (loud if step % args.every == 0 else quiet).append(t)
    quiet_median, loud_median = statistics.median(quiet), statistics.median(loud)
    mean_all = statistics.fmean(t for tm in timers["all monitors"] for t in tm.samples)
    mean_none = statistics.fmean(t for tm in timers["none"] for t in tm.samples)
    rows = [
        *_budget_rows("no monitor", "all monitors", plain, quiet_median, loud_median, args.every),
        ["mean step, all monitors / none (incl. noise)", "", f"{mean_all / mean_none:.3f}"],
    ]
    print(environment_line(torch.device(args.device), args.threads))
    print(
        f"{args.model}: {n_layer} x {n_head} x {n_embd}, batch {batch} x {block} tokens; Trainer.fit, "
        f"{args.rounds} interleaved rounds of {args.steps} steps; monitors: attention, sigma_reparam, representation "
        f"(train, blocks), collapse guard; every {args.every} steps"
    )
    print(markdown_table(["step", "median time", "ratio to none"], rows))
    same = all(torch.equal(a, b) for a, b in zip(weights["none"], weights["all monitors"]))
    print(f"weights after training, none vs all monitors: {'bit-identical' if same else 'DIFFERENT'}")


def loop_budget(args: argparse.Namespace) -> None:
    """``--loop``: the ``--all`` monitors through :class:`~entrotrain.integrations.loop.EntropyMonitors` in a plain
    training loop, against the same loop without it; rounds interleaved, the step timed around the whole
    ``with monitors.step(step):`` block (forward, backward, optimizer step, arming, statistics, guards)."""
    import warnings

    from entrotrain.integrations.loop import EntropyMonitors

    warnings.filterwarnings("ignore")
    n_layer, n_head, n_embd, block, batch = MODELS[args.model]
    device = torch.device(args.device)
    data = CharCorpusDataModule(block_size=block, batch_size=batch, seed=0, steps_per_epoch=args.steps)
    data.setup("fit")
    batches = [(x.to(device), y.to(device)) for x, y in list(data.train_dataloader())[: args.steps]]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    records = tempfile.TemporaryDirectory()  # --record: the run records written by the third arm

    def run(monitored: bool, record: bool = False) -> tuple[list[float], list]:
        torch.manual_seed(0)
        task = LanguageModelingTask(block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, lr=1e-4)
        model = task.model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        *monitors, guard = _all_monitors(args.every, root="")  # the loop watches the TinyGPT itself
        folder = records.name if record else None
        watcher = EntropyMonitors(monitors, guards=[guard], print_summary=False, record=folder)
        watcher.watch(model, opt)
        samples = []
        for step, (x, y) in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            with watcher.step(step) if monitored else contextlib.nullcontext():
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync()
            samples.append(time.perf_counter() - t0)
        watcher.close()
        return samples, [p.detach().cpu() for p in model.parameters()]

    arms = ["plain loop", "EntropyMonitors"] + (["EntropyMonitors + run record"] if args.record else [])
    timers: dict[str, list[float]] = {name: [] for name in arms}
    weights = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in timers:
            samples, weights[name] = run(name != "plain loop", record="record" in name)
            if round_:
                timers[name].extend(samples)
    records.cleanup()
    steps = list(range(args.steps)) * args.rounds
    plain = statistics.median(timers["plain loop"])
    rows = []
    for name in arms[1:]:
        quiet = statistics.median(t for t, s in zip(timers[name], steps) if s % args.every)
        loud = statistics.median(t for t, s in zip(timers[name], steps) if s % args.every == 0)
        rows += _budget_rows("plain loop", name, plain, quiet, loud, args.every)[0 if name == arms[1] else 1:]
    print(environment_line(device, args.threads))
    print(
        f"{args.model}: {n_layer} x {n_head} x {n_embd}, batch {batch} x {block} tokens; plain loop, {args.rounds} "
        f"interleaved rounds of {args.steps} steps; EntropyMonitors with attention, sigma_reparam, representation "
        f"(blocks), collapse guard; every {args.every} steps"
    )
    print(markdown_table(["step", "median time", "ratio to plain loop"], rows))
    for name in arms[1:]:
        same = all(torch.equal(a, b) for a, b in zip(weights["plain loop"], weights[name]))
        print(f"weights after training, plain loop vs {name}: {'bit-identical' if same else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per model per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-queries", type=int, default=256)
    parser.add_argument("--max-rows", type=int, default=4)
    parser.add_argument("--all", action="store_true", help="the overhead budget: all monitors through Trainer.fit")
    parser.add_argument("--loop", action="store_true",
                        help="the --all monitors through EntropyMonitors in a plain loop, vs the same loop without")
    parser.add_argument("--record", action="store_true",
                        help="--loop: a third arm, EntropyMonitors writing a run record (record=), the record's cost")
    parser.add_argument("--every", type=int, default=50, help="--all/--loop: logging interval of every monitor")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="--all: model shape")
    parser.add_argument("--device", default="cpu", help="--all: cpu or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="4 steps, 1 round (--all: no warm-up round), log every 2 steps: proves the script runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.every = 4, 1, 2
    torch.set_num_threads(args.threads)
    if args.all:
        budget(args)
        return
    if args.loop:
        loop_budget(args)
        return

    data = CharCorpusDataModule(block_size=64, batch_size=32, seed=0, steps_per_epoch=args.steps)
    data.setup("fit")
    batches = list(data.train_dataloader())[: args.steps]

    def make(every):
        torch.manual_seed(0)
        task = LanguageModelingTask(lr=1e-3)
        task.log = lambda *a, **k: None  # no Trainer attached: LightningModule.log would refuse
        opt = task.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        monitor, trainer = None, _trainer()
        if every:
            monitor = AttentionEntropyMonitor(
                every_n_steps=every, max_rows=args.max_rows, max_queries=args.max_queries, print_summary=False
            )
            monitor.on_fit_start(trainer, task)
        return SimpleNamespace(task=task, opt=opt, monitor=monitor, trainer=trainer, samples=[], logged=[])

    runs = {"plain": make(0), "monitor/50": make(50), "monitor/1": make(1)}
    for run in runs.values():  # warm-up round, not timed
        _run(run.task, run.opt, batches[:3], run.monitor, run.trainer, [], [])
    for _ in range(args.rounds):
        for run in runs.values():
            _run(run.task, run.opt, batches, run.monitor, run.trainer, run.samples, run.logged)

    plain = statistics.median(runs["plain"].samples)
    quiet = [t for t, lg in zip(runs["monitor/50"].samples, runs["monitor/50"].logged) if not lg]
    quiet_median = statistics.median(quiet)
    logging_step = statistics.median(runs["monitor/1"].samples)
    extra = logging_step - plain
    rows = [
        ["plain step (no monitor)", f"{1e3 * plain:.1f} ms", "1.000"],
        ["non-logging step, monitor/50", f"{1e3 * quiet_median:.1f} ms", f"{quiet_median / plain:.3f}"],
        ["logging step (monitor/1)", f"{1e3 * logging_step:.1f} ms", f"{logging_step / plain:.3f}"],
        ["amortised, log every 50", "", f"{1 + extra / 50 / plain:.3f}"],
        ["amortised, log every 25 (recipe preset)", "", f"{1 + extra / 25 / plain:.3f}"],
    ]
    print(environment_line(torch.device("cpu"), args.threads))
    print(
        f"TinyGPT 4x4x128, batch 32 x 64 tokens; monitor max_rows={args.max_rows}, max_queries={args.max_queries}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps each"
    )
    print(markdown_table(["step", "median time", "ratio to plain"], rows))
    same = all(
        torch.equal(a, b) for a, b in zip(runs["plain"].task.parameters(), runs["monitor/1"].task.parameters())
    )
    print(f"weights after training, plain vs monitor every step: {'bit-identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
