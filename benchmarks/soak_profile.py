"""Why does the soak's step time move? Time the same logging step on an early and a late checkpoint, interleaved.

``soak.py --save-checkpoints 500,5000 --out DIR`` keeps full Lightning checkpoints of the soak run (weights,
optimizer state, loop state, every monitor's ``state_dict`` with its histories). This script resumes each of them
with ``Trainer.fit(ckpt_path=...)`` for ``--steps`` more optimizer steps, every monitor at every step exactly as in the
soak (``soak.monitors``; a fresh ``RunRecordLogger(resume=False)`` in a temp folder), and splits every step into
parts with ``soak.Breakdown`` (module ``training_step`` with its tap hooks, ``backward``, the optimizer, each
callback's hooks, the loggers' writes, the garbage collector, the rest). The checkpoints run in turn inside each of
``--rounds`` rounds (order reversed every other round), in one process, so load from other processes falls on all of
them alike: a part whose time differs between checkpoints by more than the spread between rounds depends on the state
of training (or on what the callbacks carry in their state); one that does not was machine noise in the soak.

``--baseline`` adds the same resume without any monitor (is a difference the monitors' or the model's?);
``--ops N`` then profiles ``--profile-steps`` steps of each checkpoint under ``torch.profiler`` and prints the N ops
with the most self CPU time per step, side by side.

    OMP_NUM_THREADS=1 python benchmarks/soak_profile.py DIR/checkpoints/step500.ckpt DIR/checkpoints/step5000.ckpt
    ... --steps 40 --rounds 3 --baseline --ops 15

Printed: per part and checkpoint the median ms per step (CPU time; wall in brackets) over all rounds' measured steps
(the first ``--warmup`` steps after each resume are dropped), the ratio of each checkpoint to the first, and the
rounds' spread (max/min of the per-round medians of the step) as the noise floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, print_table, setup_threads  # noqa: E402
from monitor_overhead import MODELS  # noqa: E402
from soak import Probe, instrument, monitors  # noqa: E402

from entrotrain.dashboards import RunRecordLogger  # noqa: E402
from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask  # noqa: E402

STEP = "step"


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


class _OpProfiler(L.Callback):
    """``torch.profiler`` over the steps after the warm-up: started at a batch start, stopped at a batch end."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.prof, self.steps = first, last, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.prof is None and trainer.global_step >= self.first:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is not None:
            self.steps += 1
            if trainer.global_step >= self.last:
                self.prof.stop()
                self.last = 1 << 62


def resume(args: argparse.Namespace, ckpt: Path, with_monitors: bool, profile_ops: bool = False):
    """Resume ``ckpt`` for ``args.steps`` steps; returns per-step parts {part: (wall, cpu)} of the measured steps, or
    the op profiler."""
    n_layer, n_head, n_embd, block, batch = MODELS[args.model]
    start = checkpoint_step(ckpt)
    data = CharCorpusDataModule(block_size=block, batch_size=batch, seed=args.seed, steps_per_epoch=args.steps_per_epoch)
    task = LanguageModelingTask(
        block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, lr=args.lr, sigma_reparam=True
    )
    callbacks = monitors(n_layer) if with_monitors else []
    with tempfile.TemporaryDirectory(prefix="entrotrain-soak-profile-") as tmp:
        record = RunRecordLogger(tmp, name="profile", resume=False)
        probe = Probe(rss_at=())
        probe.breakdown = None if profile_ops else instrument(task, callbacks, [record])
        extra = []
        if profile_ops:
            extra = [_OpProfiler(start + args.warmup, start + args.warmup + args.profile_steps)]
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=start + (args.warmup + args.profile_steps if profile_ops else
                                                             args.steps),
            logger=[record], log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[*callbacks, *extra, probe.callback()],
        )
        trainer.fit(task, datamodule=data, ckpt_path=str(ckpt))
        if probe.breakdown is not None:
            probe.breakdown.untrack_gc()
    if profile_ops:
        return extra[0]
    wall, cpu = probe.step_times(), probe.step_times(cpu=True)
    rows = []
    for s in sorted(wall):
        if s <= start + args.warmup:
            continue
        row = dict(probe.breakdown.by_step.get(s, {}))
        fwd, bwd, opt = (row.pop(k, (0.0, 0.0)) if k.startswith("optimizer_step") else row.get(k, (0.0, 0.0))
                         for k in _STEP_PARTS)
        row["optimizer (optimizer_step minus the two above)"] = (opt[0] - fwd[0] - bwd[0], opt[1] - fwd[1] - bwd[1])
        top = [v for k, v in row.items() if k not in probe.breakdown.nested]
        row["other (data, loop, logger connector)"] = (wall[s] - sum(v[0] for v in top), cpu[s] - sum(v[1] for v in top))
        row[STEP] = (wall[s], cpu[s])
        rows.append(row)
    return rows


_STEP_PARTS = ("training_step (forward, loss, tap hooks)", "backward", "optimizer_step (incl. the two above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="soak.py --save-checkpoints files (early first)")
    parser.add_argument("--steps", type=int, default=40, help="steps per resume (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped after each resume (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--baseline", action="store_true", help="also resume each checkpoint without monitors")
    parser.add_argument("--ops", type=int, default=0, help="torch.profiler: print the top N ops per checkpoint")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler (default 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps-per-epoch", type=int, default=1000, help="as the soak run (default 1000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="as the soak run (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        raise SystemExit(f"--steps must exceed --warmup + 1 ({args.warmup + 1}), got {args.steps}.")
    for ckpt in args.checkpoints:
        if not ckpt.is_file():
            raise SystemExit(f"checkpoint {ckpt} not found: pass files written by soak.py --save-checkpoints.")
    setup_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint.*", category=UserWarning)
    names: list[str] = []
    for c in args.checkpoints:
        name = f"step {checkpoint_step(c)}"
        names.append(name if name not in names else f"{name} ({c.name}, #{len(names) + 1})")
    variants = [("monitors", True)] + ([("no monitor", False)] if args.baseline else [])
    rows: dict[tuple[str, str], list[dict]] = {(v, n): [] for v, _ in variants for n in names}
    round_medians: dict[tuple[str, str], list[float]] = {k: [] for k in rows}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = list(zip(names, args.checkpoints))
        for variant, with_monitors in variants:
            for name, ckpt in order if r % 2 == 0 else order[::-1]:
                got = resume(args, ckpt, with_monitors)
                rows[variant, name] += got
                round_medians[variant, name].append(statistics.median(row[STEP][1] for row in got))
    print(environment_line(torch.device("cpu"), args.threads))
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(
        f"soak_profile: {args.rounds} rounds x {len(names)} checkpoints x {len(variants)} variant(s), {args.steps} steps "
        f"per resume ({args.warmup} dropped) in {time.perf_counter() - t0:.0f} s; load average "
        + " ".join(f"{x:.2f}" for x in load)
    )
    for variant, _ in variants:
        parts: list[str] = []
        for name in names:
            for row in rows[variant, name]:
                parts += [k for k in row if k not in parts]
        parts = [p for p in parts if p != STEP] + [STEP]
        table = []
        for part in parts:
            cells, base = [part], None
            for name in names:
                got = rows[variant, name]
                w = statistics.median(row.get(part, (0.0, 0.0))[0] for row in got)
                c = statistics.median(row.get(part, (0.0, 0.0))[1] for row in got)
                base = c if base is None else base
                cells.append(f"{1e3 * c:.1f} ({1e3 * w:.1f})")
                if name != names[0]:
                    cells.append(f"{c / base:.2f}" if base > 1e-5 else "–")
            table.append(cells)
        spread = ["rounds' spread of the step's CPU median (max/min)"]
        for name in names:
            m = round_medians[variant, name]
            spread.append(f"{max(m) / min(m):.2f}")
            if name != names[0]:
                spread.append("")
        table.append(spread)
        headers = [f"{variant}: part, CPU ms (wall)"]
        for name in names:
            headers.append(name)
            if name != names[0]:
                headers.append(f"÷ {names[0]}")
        print(f"\n{variant}: median per step over {sum(len(rows[variant, n]) for n in names) // len(names)} steps "
              "per checkpoint")
        print_table(headers, table, {})
    if args.ops:
        profiles = {name: resume(args, ckpt, True, profile_ops=True) for name, ckpt in zip(names, args.checkpoints)}
        per_op: dict[str, dict[str, float]] = {}
        for name, prof in profiles.items():
            for event in prof.prof.key_averages():
                per_op.setdefault(event.key, {})[name] = event.self_cpu_time_total / 1e3 / max(prof.steps, 1)
        top = sorted(per_op, key=lambda k: -max(per_op[k].values()))[: args.ops]
        headers = ["op (self time ms per step, profiler wall clock)"] + names + ([f"÷ {names[0]}"] if len(names) > 1 else [])
        table = []
        for op in top:
            vals = [per_op[op].get(n, 0.0) for n in names]
            ratio = [f"{vals[-1] / vals[0]:.2f}" if vals[0] > 1e-6 else "–"] if len(names) > 1 else []
            table.append([op] + [f"{v:.2f}" for v in vals] + ratio)
        print(f"\ntorch.profiler, {args.profile_steps} steps per checkpoint after {args.warmup} warm-up steps, with "
              f"monitors (one pass: noisier than the tables above)")
        print_table(headers, table, {})


if __name__ == "__main__":
    main()
