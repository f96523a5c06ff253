"""CPU thread settings, quiet and under load: wall time and CPU time of a fixed training workload.

Why: on a shared 2-core machine the README main job (``entrotrain fit --config recipes/attention_collapse.yaml``)
took 53 s wall / 93 s user CPU when quiet and 23 min wall / 7.5 min user CPU at a load of 11. The CPU time grew for
the same work, the signature of OpenMP worker threads spin-waiting at barriers while their team-mates are
descheduled (torch's bundled libgomp spins ``GOMP_SPINCOUNT`` = 300,000 iterations by default before sleeping).

Workload: ``--steps`` optimiser steps of the ``attention_collapse`` recipe's task and data (LanguageModelingTask,
TinyGPT 4 × 128, batch 32 × 64 characters, Adam lr 1e-2, seed 0), no logger, no validation, in a fresh subprocess
per measurement (environment variables such as ``OMP_WAIT_POLICY`` are read when libgomp loads, i.e. at
``import torch``). The child times ``trainer.fit`` alone (wall, and user+sys CPU of all its threads from
``getrusage(RUSAGE_SELF)``); the parent also records ``getrusage(RUSAGE_CHILDREN)`` around the child (import and
set-up included). The child prints a hash of the trained parameters, so the table also says which settings give
bit-identical results to the default.

Settings (``--settings``, comma-separated):

=================  =============================================================================================
``default``        nothing set: torch's intra-op threads = cores, libgomp's default spin
``omp1``           ``OMP_NUM_THREADS=1``
``set1``           ``torch.set_num_threads(1)`` after import (what a library can still do at run time)
``passive``        ``OMP_WAIT_POLICY=PASSIVE`` before the child starts (workers sleep at once at a barrier)
``passive-late``   ``OMP_WAIT_POLICY=PASSIVE`` set inside the child *after* ``import torch`` (shows it is ignored)
``spin0``          ``GOMP_SPINCOUNT=0`` before the child starts
``free``           ``torch.set_num_threads(min(cores, max(1, round(cores - load1))))`` from ``os.getloadavg``
``entrotrain``     ``entrotrain._cpu_threads``: ``prepare_cpu_env`` before ``import torch`` (as the package
                   ``__init__`` does for the ``entrotrain`` command), then ``configure_cpu_threads``
=================  =============================================================================================

Load (``--load N``, default = cores): N busy Python processes spinning (``while True: pass``) for the loaded rows.
The machine may be shared: every row prints the 1-minute load average before and after it, and the ratios that
matter (loaded / quiet of one setting, setting / default under one condition) are taken within one run, with the
rounds interleaved (``--repeats``; the minimum over rounds is used for the ratios).

Run: ``OMP_NUM_THREADS= python benchmarks/cpu_load.py --steps 30 --repeats 1`` (a few minutes). ``--quick`` is a
smoke test (2 steps, two settings).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "omp1", "set1", "passive", "passive-late", "spin0", "free", "entrotrain")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

CHILD = r"""
import hashlib, json, os, resource, sys, time
setting, steps = sys.argv[1], int(sys.argv[2])
if setting == "entrotrain":  # as the package __init__ does for the CLI: before torch loads libgomp
    import importlib.util
    spec = importlib.util.spec_from_file_location("_cpu_threads", os.path.join("entrotrain", "_cpu_threads.py"))
    cpu_threads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_threads)
    cpu_threads.prepare_cpu_env()
import torch
if setting == "set1":
    torch.set_num_threads(1)
elif setting == "passive-late":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
elif setting == "free":
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(min(cores, max(1, round(cores - os.getloadavg()[0]))))
elif setting == "entrotrain":
    print(cpu_threads.configure_cpu_threads())
import lightning as L
from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask
L.seed_everything(0, verbose=False)
task = LanguageModelingTask(block_size=64, n_layer=4, n_head=4, n_embd=128, lr=1e-2, warmup_steps=0)
data = CharCorpusDataModule(block_size=64, batch_size=32, seed=0)
trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
trainer.fit(task, data)
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in task.parameters())).hexdigest()[:12]
print("RESULT " + json.dumps({"wall": wall, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                              "threads": torch.get_num_threads(), "digest": digest}))
"""


def _spin() -> None:  # pragma: no cover - runs in the load processes
    while True:
        pass


def child_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS or setting == "entrotrain"}
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    extra = {"omp1": {"OMP_NUM_THREADS": "1"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
             "spin0": {"GOMP_SPINCOUNT": "0"}}.get(setting, {})
    env.update(extra)
    return env


def measure(setting: str, steps: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, setting, str(steps)], env=child_env(setting),
                          capture_output=True, text=True, cwd=ROOT)
    total_wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{setting}: child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(total_wall=total_wall, load_before=load0, load_after=os.getloadavg()[0],
               total_cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
               note=next((ln[:48] for ln in proc.stdout.splitlines() if ln.startswith("entrotrain:")), ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)), help="busy processes when loaded")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--conditions", default="quiet,loaded")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, default and omp1, load 1")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.settings, args.load, args.repeats = 2, "default,omp1", 1, 1
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {SETTINGS}")
    conditions = [c.strip() for c in args.conditions.split(",")]
    cores = len(os.sched_getaffinity(0))
    print(f"# cpu_load: {args.steps} steps of attention_collapse's task, {cores} cores, load = {args.load} busy "
          f"processes, {args.repeats} round(s); 1-min load average before/after each row", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for condition in conditions:
            spinners = []
            if condition == "loaded":
                ctx = mp.get_context("spawn")
                spinners = [ctx.Process(target=_spin, daemon=True) for _ in range(args.load)]
                for p in spinners:
                    p.start()
                time.sleep(2.0)
            try:
                for setting in settings:
                    r = measure(setting, args.steps)
                    results.setdefault((condition, setting), []).append(r)
                    print(f"{condition:7s} {setting:13s} fit wall {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  "
                          f"(process wall {r['total_wall']:6.1f} s cpu {r['total_cpu']:6.1f} s)  threads "
                          f"{r['threads']}  params {r['digest']}  load {r['load_before']:.1f}->{r['load_after']:.1f}"
                          + (f"  [{r['note']}]" if r["note"] else ""), flush=True)
            finally:
                for p in spinners:
                    p.terminate()
                for p in spinners:
                    p.join()
    best = {k: min(v, key=lambda r: r["cpu"]) for k, v in results.items()}
    base = {c: best.get((c, "default")) for c in conditions}
    quiet_digest = best[(conditions[0], "default")]["digest"] if (conditions[0], "default") in best else None
    print("\n| setting | condition | fit wall s | fit CPU s | CPU/wall | wall / default | CPU / default | "
          "CPU loaded / quiet | wall loaded / quiet | threads | params = default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        for condition in conditions:
            r = best.get((condition, setting))
            if r is None:
                continue
            d, q = base.get(condition), best.get(("quiet", setting))
            cells = [
                setting, condition, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{r['cpu'] / r['wall']:.2f}",
                f"{r['wall'] / d['wall']:.2f}" if d else "-", f"{r['cpu'] / d['cpu']:.2f}" if d else "-",
                f"{r['cpu'] / q['cpu']:.2f}" if q and condition != "quiet" else "",
                f"{r['wall'] / q['wall']:.2f}" if q and condition != "quiet" else "",
                str(r["threads"]), "yes" if r["digest"] == quiet_digest else "NO",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
