"""Soak test: a long ``Trainer.fit`` with every language-model monitor at every step. Does memory or step time creep?

One real ``lightning`` ``Trainer.fit`` of the recipes' TinyGPT (``--model tiny``: 4 × 4 × 128, batch 32 × 64 tokens,
on :class:`~entrotrain.tasks.CharCorpusDataModule`, Python's stdlib sources) for ``--steps`` optimizer steps
(default 10 000), the model's block linears converted to σReparam, with, at **every** step:

- ``AttentionEntropyMonitor(every_n_steps=1)``;
- ``RepresentationEntropyMonitor(every_n_steps=1, stage="train")`` on the first and the last block's output;
- ``SigmaReparamMonitor(every_n_steps=1)``;
- ``EntropyCollapseGuard("entropy/attn_norm/min", action="warn")``;
- a ``RunRecordLogger`` (``entrotrain.dashboards``) writing the run record into a temporary folder (or ``--out``),
  every logging call kept (``log_every_n_steps=1``); ``--csv`` adds a ``CSVLogger`` beside it.

No progress bar, no checkpointing, no validation (``--val-every N`` runs the validation loop every N steps),
``--threads`` torch threads (default 1, so the shared machine's load does not stretch parallel ops).

Printed (Markdown tables, ``_common.print_table``):

1. resident memory (``VmRSS`` of ``/proc/self/status``; the peak ``ru_maxrss`` where ``/proc`` is missing) and the
   number of Python objects tracked by the garbage collector, after steps 1, 100, 1k, 2k, 5k, 10k (those
   ≤ ``--steps``), after ``fit`` returned (and ``gc.collect()``), and then after glibc's ``malloc_trim(0)`` (what
   that gives back was freed memory the allocator kept, not live data);
2. step time at the start and at the end: a step is the wall time between two consecutive ``on_train_batch_end``
   (data loading, forward, backward, optimizer, every callback and logger call: everything the loop does). Medians
   over steps 100–600 and over the last 500 steps, and their ratio (the drift; ≈ 1.00 when nothing accumulates);
   the same in process CPU time, which waiting for a core on a loaded machine does not inflate.
   With fewer than 1100 steps the steps after the first tenth (at most 100) are split into two halves instead;
3. the run record at the end: total bytes and file count (walking the folder), and the same per top-level entry, so
   the numbers hold whatever layout the record uses.

Options for explaining a drift:

- ``--breakdown``: each step split into parts, timed in wall and CPU time: the module's ``training_step`` (forward,
  loss and every tap hook inside it), ``backward``, the rest of ``optimizer_step`` (the optimizer itself), each
  callback's hooks (every ``on_*``/``setup`` method it overrides, summed per step), of which the loggers'
  ``log_metrics``/``log_media`` calls and the garbage collector's passes (``gc.callbacks``), and "other" (step minus the above: data loading, the loop, Lightning's logger
  connector). Printed as medians over the start and end windows with their ratio, plus a table of the step time
  and the 1-minute load average per ``--window-table`` steps (default 500) over the whole run;
- ``--save-checkpoints 600,5000,10000``: ``trainer.save_checkpoint`` at those optimizer steps into
  ``OUT/checkpoints/step{N}.ckpt`` (needs ``--out``), for ``soak_profile.py`` to time the same logging step on an
  early and a late model, interleaved in one process;
- ``--resume CKPT``: continue such a checkpoint up to ``--steps`` (windows, RSS and drift then count from its step).

    python benchmarks/soak.py                 # 10 000 steps (~30 min on one CPU thread)
    python benchmarks/soak.py --steps 300     # quick check
    python benchmarks/soak.py --steps 10000 --resume OUT/checkpoints/step5000.ckpt --out OUT   # continue a run
    python benchmarks/soak.py --no-monitors   # baseline: is a drift the monitors' or the loop's?
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, print_table, setup_threads  # noqa: E402
from monitor_overhead import MODELS  # noqa: E402

from entrotrain.callbacks import (  # noqa: E402
    AttentionEntropyMonitor,
    EntropyCollapseGuard,
    RepresentationEntropyMonitor,
    SigmaReparamMonitor,
)
from entrotrain.dashboards import RunRecordLogger  # noqa: E402
from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask  # noqa: E402

MiB = float(1 << 20)
RSS_STEPS = (1, 100, 1_000, 2_000, 5_000, 10_000)
WINDOW = 500  # steps per step-time window
WARMUP = 100  # steps before the start window


# ----------------------------------------------------------------------------------------------------- measuring


def rss_bytes() -> tuple[int, str]:
    """The current resident set (``VmRSS`` of ``/proc/self/status``), else the peak (``ru_maxrss``), and its name."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024, "VmRSS"  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "ru_maxrss (peak)"


def malloc_trim() -> bool:
    """Ask glibc to return freed heap memory to the system (``malloc_trim(0)``); False where there is no glibc. RSS
    that this gives back was allocator retention (freed blocks kept for reuse), not live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


@dataclass
class Probe:
    """What the probe callback saw: one time per step, RSS and GC object counts at the chosen steps."""

    rss_at: tuple[int, ...]
    ends: list[float] = field(default_factory=list)  # perf_counter at each on_train_batch_end
    cpu_ends: list[float] = field(default_factory=list)  # process_time (CPU seconds, all threads) there
    steps: list[int] = field(default_factory=list)  # trainer.global_step there (optimizer steps done)
    memory: list[tuple[str, int, int]] = field(default_factory=list)  # (label, rss bytes, gc objects)
    rss_method: str = ""
    checkpoint_at: tuple[int, ...] = ()
    checkpoint_dir: Path | None = None
    breakdown: Breakdown | None = None
    load_every: int = WINDOW
    loads: dict[int, float] = field(default_factory=dict)  # 1-minute load average at every load_every-th step

    def sample_memory(self, label: str) -> None:
        rss, self.rss_method = rss_bytes()
        self.memory.append((label, rss, len(gc.get_objects())))

    def callback(self) -> L.Callback:
        """A Lightning callback that records into this probe; put it LAST so every other hook runs inside a step."""
        probe = self

        class SoakProbe(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                probe.ends.append(time.perf_counter())
                probe.cpu_ends.append(time.process_time())
                probe.steps.append(trainer.global_step)
                step = trainer.global_step
                if probe.breakdown is not None:
                    probe.breakdown.close_step(step)
                if step % probe.load_every == 0 and hasattr(os, "getloadavg"):
                    probe.loads[step] = os.getloadavg()[0]
                if step in probe.checkpoint_at and probe.checkpoint_dir is not None:
                    trainer.save_checkpoint(probe.checkpoint_dir / f"step{step}.ckpt")
                if not probe.memory and step not in probe.rss_at:  # a resumed run: its first step
                    probe.sample_memory(f"step {step} (first of this process)")
                if trainer.global_step in probe.rss_at and f"step {trainer.global_step}" not in probe.labels():
                    probe.sample_memory(f"step {trainer.global_step}")

        return SoakProbe()

    def labels(self) -> set[str]:
        return {label for label, _, _ in self.memory}

    def step_times(self, cpu: bool = False) -> dict[int, float]:
        """Seconds of step ``s`` (end of step ``s - 1`` to end of step ``s``), for every step but the first: wall
        time, or with ``cpu`` the process's CPU time (immune to waiting for a core on a loaded machine)."""
        ends = self.cpu_ends if cpu else self.ends
        return {s: b - a for s, a, b in zip(self.steps[1:], ends, ends[1:])}


def windows(steps: int, first: int = 0) -> tuple[range, range]:
    """The start and end windows of step numbers: 100–600 and the last 500, or two halves when the run is short
    (counted from ``first``, the step a resumed run started at)."""
    n = steps - first
    if n >= WARMUP + 2 * WINDOW:
        return range(first + WARMUP + 1, first + WARMUP + WINDOW + 1), range(steps - WINDOW + 1, steps + 1)
    warm = min(WARMUP, n // 10)
    mid = first + warm + (n - warm) // 2
    return range(first + warm + 2, mid + 1), range(mid + 1, steps + 1)  # + 2: the first step has no predecessor


def walk(folder: Path) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """Total bytes and files under ``folder``, and (bytes, files) per top-level entry."""
    total_bytes = total_files = 0
    per_entry: dict[str, tuple[int, int]] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            size = path.stat().st_size
            top = path.relative_to(folder).parts[0]
            b, n = per_entry.get(top, (0, 0))
            per_entry[top] = (b + size, n + 1)
            total_bytes += size
            total_files += 1
    return total_bytes, total_files, per_entry


class Breakdown:
    """Per-step wall and CPU seconds by part: wraps bound methods (instance attributes, so Lightning's ``getattr``
    finds them) with ``perf_counter``/``process_time``; :meth:`close_step` files what accumulated under the step."""

    LOGGERS = "loggers (log_metrics, log_media)"

    def __init__(self) -> None:
        self.current: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.by_step: dict[int, dict[str, tuple[float, float]]] = {}
        self.order: list[str] = []  # parts in the order they were wrapped (table rows)
        self.nested: set[str] = set()  # parts timed inside another part (reported, not subtracted)

    def wrap(self, obj: object, method: str, label: str, nested: bool = False) -> None:
        original: Callable = getattr(obj, method)
        current = self.current

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                acc = current[label]
                acc[0] += time.perf_counter() - t0
                acc[1] += time.process_time() - c0

        setattr(obj, method, timed)
        if label not in self.order:
            self.order.append(label)
        if nested:
            self.nested.add(label)

    def track_gc(self) -> None:
        """Time the cyclic garbage collector's passes (``gc.callbacks``), nested in whatever part triggered them."""
        label, current, started = "gc (cyclic collector passes)", self.current, [0.0, 0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[:] = [time.perf_counter(), time.process_time()]
            else:
                acc = current[label]
                acc[0] += time.perf_counter() - started[0]
                acc[1] += time.process_time() - started[1]

        gc.callbacks.append(on_gc)
        self._gc_hook = on_gc
        self.order.append(label)
        self.nested.add(label)

    def untrack_gc(self) -> None:
        hook = getattr(self, "_gc_hook", None)
        if hook is not None and hook in gc.callbacks:
            gc.callbacks.remove(hook)

    def wrap_callback(self, callback: L.Callback, label: str) -> None:
        """Every hook the callback overrides (``on_*``, ``setup``, ``teardown``, ``state_dict``...), summed as one part."""
        for name in dir(type(callback)):
            if not (name.startswith("on_") or name in ("setup", "teardown")):
                continue
            if getattr(type(callback), name) is not getattr(L.Callback, name, None):
                self.wrap(callback, name, label)

    def wrap_module(self, module: L.LightningModule) -> None:
        self.wrap(module, "training_step", "training_step (forward, loss, tap hooks)")
        self.wrap(module, "backward", "backward")
        self.wrap(module, "optimizer_step", "optimizer_step (incl. the two above)")

    def wrap_logger(self, logger: object) -> None:
        for method in ("log_metrics", "log_media"):
            if hasattr(logger, method):
                self.wrap(logger, method, self.LOGGERS, nested=True)

    def close_step(self, step: int) -> None:
        self.by_step[step] = {k: (v[0], v[1]) for k, v in self.current.items()}
        self.current.clear()

    def table(self, probe: "Probe", start: range, end: range) -> tuple[list[str], list[list[str]], dict[str, str]]:
        """Median ms per part over the two windows (wall and CPU) and the end / start ratios."""
        wall, cpu = probe.step_times(), probe.step_times(cpu=True)
        step_label = "training_step (forward, loss, tap hooks)", "backward", "optimizer_step (incl. the two above)"

        def parts(s: int) -> dict[str, tuple[float, float]]:
            row = dict(self.by_step.get(s, {}))
            fwd, bwd, opt = (row.get(k, (0.0, 0.0)) for k in step_label)
            if step_label[2] in row:  # the optimizer proper: optimizer_step minus the closure's forward and backward
                row["optimizer (optimizer_step minus the two above)"] = (
                    opt[0] - fwd[0] - bwd[0], opt[1] - fwd[1] - bwd[1]
                )
                del row[step_label[2]]
            top = [v for k, v in row.items() if k not in self.nested]
            row["other (data, loop, logger connector)"] = (
                wall[s] - sum(v[0] for v in top), cpu[s] - sum(v[1] for v in top)
            )
            row["step"] = (wall[s], cpu[s])
            return row

        labels = [k for k in self.order if k != step_label[2]]
        labels.insert(2, "optimizer (optimizer_step minus the two above)")
        labels += ["other (data, loop, logger connector)", "step"]
        med = {}
        for name, window in (("start", start), ("end", end)):
            rows = [parts(s) for s in window if s in wall]
            for k in labels:
                med[name, k] = tuple(
                    statistics.median(r.get(k, (0.0, 0.0))[i] for r in rows) if rows else float("nan") for i in (0, 1)
                )
        out = []
        for k in labels:
            (w0, c0), (w1, c1) = med["start", k], med["end", k]
            name = ("  of which " + k) if k in self.nested else k
            out.append([
                name, f"{1e3 * w0:.1f}", f"{1e3 * w1:.1f}", f"{w1 / w0:.2f}" if w0 > 1e-5 else "–",
                f"{1e3 * c0:.1f}", f"{1e3 * c1:.1f}", f"{c1 / c0:.2f}" if c0 > 1e-5 else "–",
            ])
        headers = [
            f"part (median per step; start {start.start}–{start.stop - 1}, end {end.start}–{end.stop - 1})",
            "start ms", "end ms", "end/start", "CPU start ms", "CPU end ms", "CPU end/start",
        ]
        return headers, out, {}


# ---------------------------------------------------------------------------------------------------------- run


def monitors(n_layer: int) -> list:
    """Every LM monitor at every step (the representation monitor on the first and last block)."""
    return [
        AttentionEntropyMonitor(every_n_steps=1, print_summary=False),
        RepresentationEntropyMonitor(
            include=["model.blocks.0", f"model.blocks.{n_layer - 1}"], every_n_steps=1, stage="train",
            print_summary=False,
        ),
        SigmaReparamMonitor(every_n_steps=1),
        EntropyCollapseGuard(monitor="entropy/attn_norm/min", threshold=0.05, action="warn"),
    ]


def soak(args: argparse.Namespace, out: Path) -> tuple[Probe, RunRecordLogger, EntropyCollapseGuard | None, float]:
    n_layer, n_head, n_embd, block, batch = MODELS[args.model]
    L.seed_everything(args.seed, verbose=False)
    data = CharCorpusDataModule(
        block_size=block, batch_size=batch, seed=args.seed, steps_per_epoch=args.steps_per_epoch
    )
    task = LanguageModelingTask(
        block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, lr=args.lr, sigma_reparam=True
    )
    record = RunRecordLogger(out, name="soak", run_name=f"soak-{args.steps}")
    loggers = [record] + ([CSVLogger(out, name="csv")] if args.csv else [])
    probe = Probe(
        rss_at=tuple(s for s in RSS_STEPS if s <= args.steps), checkpoint_at=args.save_checkpoints,
        checkpoint_dir=out / "checkpoints" if args.save_checkpoints else None, load_every=args.window_table,
    )
    if probe.checkpoint_dir is not None:
        probe.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [] if args.no_monitors else monitors(n_layer)
    guard = callbacks[-1] if callbacks else None
    if args.breakdown:
        probe.breakdown = instrument(task, callbacks, loggers)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=args.steps, logger=loggers, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if args.val_every else 0, val_check_interval=args.val_every or None,
        check_val_every_n_epoch=None if args.val_every else 1, callbacks=[*callbacks, probe.callback()],
    )
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=data, ckpt_path=None if args.resume is None else str(args.resume))
    wall = time.perf_counter() - t0
    if probe.breakdown is not None:
        probe.breakdown.untrack_gc()
    gc.collect()
    probe.sample_memory("after fit (gc.collect)")
    if malloc_trim():
        probe.sample_memory("then glibc malloc_trim(0)")
    return probe, record, guard, wall


def instrument(task: L.LightningModule, callbacks: list, loggers: list) -> Breakdown:
    """A :class:`Breakdown` wrapped around the module's step methods, each callback's hooks and the loggers."""
    breakdown = Breakdown()
    breakdown.wrap_module(task)
    for callback in callbacks:
        breakdown.wrap_callback(callback, type(callback).__name__)
    for logger in loggers:
        breakdown.wrap_logger(logger)
    breakdown.track_gc()
    return breakdown


def window_table(probe: Probe, every: int) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """Median wall and CPU step time per ``every`` steps over the whole run, with the load average at its end."""
    wall, cpu = probe.step_times(), probe.step_times(cpu=True)
    done = probe.steps[-1] if probe.steps else 0
    rows = []
    for a in range(0, done, every):
        w = [wall[s] for s in range(a + 1, a + every + 1) if s in wall]
        c = [cpu[s] for s in range(a + 1, a + every + 1) if s in cpu]
        if not w:
            continue
        load = probe.loads.get(min(a + every, done))
        rows.append([
            f"{a + 1}–{min(a + every, done)}", f"{1e3 * statistics.median(w):.1f}", f"{1e3 * min(w):.1f}",
            f"{1e3 * statistics.median(c):.1f}", "–" if load is None else f"{load:.2f}",
        ])
    return ["steps", "median ms", "min ms", "CPU median ms", "load avg (1 min) at end"], rows, {}


def step_time_table(probe: Probe, done: int, first: int = 0) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """Median wall and CPU step time over the start and end windows, and their drift (end / start)."""
    start, end = windows(done, first)
    wall, cpu = probe.step_times(), probe.step_times(cpu=True)
    medians = {}
    for name, window in (("start", start), ("end", end)):
        w = [wall[s] for s in window if s in wall]
        c = [cpu[s] for s in window if s in cpu]
        if w:
            medians[name] = (statistics.median(w), min(w), statistics.median(c))
    headers = ["step time window", "median ms", "min ms", "drift", "CPU median ms", "CPU drift"]
    if len(medians) < 2:
        return headers, [], {"step time": f"too few steps ({done}) for two windows"}
    (w0, _, c0), rows = medians["start"], []
    for name, window in (("start", start), ("end", end)):
        w, lo, c = medians[name]
        label = f"{name}: steps {window.start}–{window.stop - 1}"
        rows.append([label, f"{1e3 * w:.1f}", f"{1e3 * lo:.1f}", f"{w / w0:.2f}", f"{1e3 * c:.1f}", f"{c / c0:.2f}"])
    return headers, rows, {}


def report(
    args: argparse.Namespace, probe: Probe, record: RunRecordLogger, guard: EntropyCollapseGuard | None, wall: float
) -> None:
    n_layer, n_head, n_embd, block, batch = MODELS[args.model]
    done = probe.steps[-1] if probe.steps else 0
    resumed_at = probe.steps[0] - 1 if probe.steps else 0  # 0, or the checkpoint's step for --resume
    print(environment_line(torch.device(args.device), args.threads))
    print(
        f"soak: {args.model} TinyGPT {n_layer} x {n_head} x {n_embd} (sigma_reparam), batch {batch} x {block} tokens; "
        f"Trainer.fit of {done - resumed_at} steps" + (f" (resumed at step {resumed_at})" if resumed_at else "")
        + f" in {wall:.1f} s ({1e3 * wall / max(done - resumed_at, 1):.1f} ms/step incl. setup); "
        + ("no monitor (baseline)" if args.no_monitors else "attention + representation (first, last block) + "
           "sigma_reparam monitors at every step, collapse guard")
        + ", RunRecordLogger" + (" + CSVLogger" if args.csv else "")
    )

    first = probe.memory[0][1] if probe.memory else 0
    rows = [
        [label, f"{rss / MiB:.1f}", f"{(rss - first) / MiB:+.1f}", f"{objs:,}"] for label, rss, objs in probe.memory
    ]
    print_table([f"when ({probe.rss_method})", "RSS MiB", "Δ from step 1", "gc objects"], rows, {})

    print_table(*step_time_table(probe, done, resumed_at))
    if probe.breakdown is not None:
        print_table(*probe.breakdown.table(probe, *windows(done, resumed_at)))
        print("(each part's median is taken on its own, so the parts need not add up to the step's median; "
              "'of which' parts are nested in the parts above)")
        print_table(*window_table(probe, args.window_table))
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if args.device == "cpu" and load > cores:
        print(
            f"WARNING: load average {load:.1f} > {cores} cores: other processes compete for the CPU and stretch wall "
            "times unevenly over the run; judge the drift by the CPU-time columns."
        )

    total_bytes, total_files, per_entry = walk(record.run_dir)
    rows = [[name, f"{b:,}", f"{n:,}"] for name, (b, n) in sorted(per_entry.items())]
    rows.append(["total", f"{total_bytes:,}", f"{total_files:,}"])
    print(f"run record: {record.run_dir}")
    print_table(["run record entry", "bytes", "files"], rows, {})
    if guard is not None:
        fired = getattr(guard, "times_fired", None)
        print(f"collapse guard on {guard.monitor} < {guard.threshold}: fired {fired} time(s)")


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers such as 600,5000, got {text!r}")
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"step numbers must be >= 1, got {text!r}")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000, help="optimizer steps (default 10000)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps-per-epoch", type=int, default=1000, help="batches per epoch (epoch hooks run too)")
    parser.add_argument("--val-every", type=int, default=0, help="run validation every N steps (0: never)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", action="store_true", help="add a CSVLogger beside the run record")
    parser.add_argument("--no-monitors", action="store_true", help="baseline: the same run without any monitor")
    parser.add_argument("--out", type=Path, default=None, help="keep the run record here (default: a temp dir)")
    parser.add_argument("--breakdown", action="store_true", help="time each part of the step (see the docstring)")
    parser.add_argument("--window-table", type=int, default=WINDOW, help="steps per row of the breakdown's run table")
    parser.add_argument(
        "--save-checkpoints", type=_steps_list, default=(), metavar="STEP,STEP",
        help="trainer.save_checkpoint at these optimizer steps into OUT/checkpoints/step{N}.ckpt (needs --out)",
    )
    parser.add_argument(
        "--resume", type=Path, default=None, metavar="CKPT",
        help="continue a --save-checkpoints file up to --steps (the run record it names continues too)",
    )
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}.")
    if args.window_table < 1:
        raise SystemExit(f"--window-table must be >= 1, got {args.window_table}.")
    if args.save_checkpoints and args.out is None:
        raise SystemExit("--save-checkpoints needs --out DIR to keep the checkpoints in (a temp dir is deleted).")
    setup_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # the char corpus needs none
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report(args, *soak(args, args.out))
        return
    with tempfile.TemporaryDirectory(prefix="entrotrain-soak-") as tmp:
        report(args, *soak(args, Path(tmp)))


if __name__ == "__main__":
    main()
