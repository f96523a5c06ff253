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
   ≤ ``--steps``) and after ``fit`` returned;
2. step time at the start and at the end: a step is the wall time between two consecutive ``on_train_batch_end``
   (data loading, forward, backward, optimizer, every callback and logger call: everything the loop does). Medians
   over steps 100–600 and over the last 500 steps, and their ratio (the drift; ≈ 1.00 when nothing accumulates);
   the same in process CPU time, which waiting for a core on a loaded machine does not inflate.
   With fewer than 1100 steps the steps after the first tenth (at most 100) are split into two halves instead;
3. the run record at the end: total bytes and file count (walking the folder), and the same per top-level entry, so
   the numbers hold whatever layout the record uses.

    python benchmarks/soak.py                 # 10 000 steps (~30 min on one CPU thread)
    python benchmarks/soak.py --steps 300     # quick check
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


@dataclass
class Probe:
    """What the probe callback saw: one time per step, RSS and GC object counts at the chosen steps."""

    rss_at: tuple[int, ...]
    ends: list[float] = field(default_factory=list)  # perf_counter at each on_train_batch_end
    cpu_ends: list[float] = field(default_factory=list)  # process_time (CPU seconds, all threads) there
    steps: list[int] = field(default_factory=list)  # trainer.global_step there (optimizer steps done)
    memory: list[tuple[str, int, int]] = field(default_factory=list)  # (label, rss bytes, gc objects)
    rss_method: str = ""

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


def windows(steps: int) -> tuple[range, range]:
    """The start and end windows of step numbers: 100–600 and the last 500, or two halves when the run is short."""
    if steps >= WARMUP + 2 * WINDOW:
        return range(WARMUP + 1, WARMUP + WINDOW + 1), range(steps - WINDOW + 1, steps + 1)
    warm = min(WARMUP, steps // 10)
    mid = warm + (steps - warm) // 2
    return range(warm + 2, mid + 1), range(mid + 1, steps + 1)  # warm + 2: step warm + 1 has no predecessor


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
    probe = Probe(rss_at=tuple(s for s in RSS_STEPS if s <= args.steps))
    callbacks = [] if args.no_monitors else monitors(n_layer)
    guard = callbacks[-1] if callbacks else None
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=args.steps, logger=loggers, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if args.val_every else 0, val_check_interval=args.val_every or None,
        check_val_every_n_epoch=None if args.val_every else 1, callbacks=[*callbacks, probe.callback()],
    )
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=data)
    wall = time.perf_counter() - t0
    gc.collect()
    probe.sample_memory("after fit (gc.collect)")
    return probe, record, guard, wall


def step_time_table(probe: Probe, done: int) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """Median wall and CPU step time over the start and end windows, and their drift (end / start)."""
    start, end = windows(done)
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
    print(environment_line(torch.device(args.device), args.threads))
    print(
        f"soak: {args.model} TinyGPT {n_layer} x {n_head} x {n_embd} (sigma_reparam), batch {batch} x {block} tokens; "
        f"Trainer.fit of {done} steps in {wall:.1f} s ({1e3 * wall / max(done, 1):.1f} ms/step incl. setup); "
        + ("no monitor (baseline)" if args.no_monitors else "attention + representation (first, last block) + "
           "sigma_reparam monitors at every step, collapse guard")
        + ", RunRecordLogger" + (" + CSVLogger" if args.csv else "")
    )

    first = probe.memory[0][1] if probe.memory else 0
    rows = [
        [label, f"{rss / MiB:.1f}", f"{(rss - first) / MiB:+.1f}", f"{objs:,}"] for label, rss, objs in probe.memory
    ]
    print_table([f"when ({probe.rss_method})", "RSS MiB", "Δ from step 1", "gc objects"], rows, {})

    print_table(*step_time_table(probe, done))
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
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}.")
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
