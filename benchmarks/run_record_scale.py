"""Run records at the scale of a three-week run: the writer's cost per log, and `entrotrain status` / `report` on it.

Writes a record through :class:`~entrotrain.dashboards.RunRecordLogger` itself (``log_metrics``, ``log_media``,
``log_threshold``, ``log_event`` and a resume from an older checkpoint, as a Lightning run calls them), shaped like an
``AttentionEntropyMonitor`` run: per-head normalised and raw entropies ``entropy/attn{,_norm}/L{l}/H{h}``, the
summaries, a loss, and the layer × head heatmap as media at every logged row. One head collapses for ``--dip-rows``
logged rows in the middle of the run (a collapse that lasts 20 steps at logging every 10 is 2 rows) and recovers.
``--shape full`` adds, at every logged step, a ``PolicyEntropyMonitor`` row (its 24 keys, a histogram), a
``RepresentationEntropyMonitor`` row (4 layers x 7 keys, a spectrum each), the loop's loss and learning rate in a row
of their own, and a guard threshold on the policy entropy.

Then, each in a fresh process under ``/usr/bin/time -v``: the naive baseline (``json.loads`` of every line of
``metrics.jsonl``, nothing kept: the parse alone), ``entrotrain status RUN`` without the parsed copy
(``ENTROTRAIN_CACHE_DIR=off``), the first ``status`` (it writes the copy: :mod:`entrotrain.dashboards.run_cache`),
then ``status``, ``status --json``, ``status --keys ...``, ``status --check`` from it, ``status --follow``, and
``entrotrain report RUN`` without and with the copy (kept in a temporary folder, removed at the end). Prints a
Markdown table:

- writer: µs per logged step (``log_metrics`` calls + media) over the first and the last ``--probe`` rows: equal
  means O(1) per log (nothing re-reads or rewrites what was written before);
- readers: wall seconds, CPU seconds (user + system: the steadier number on a shared machine), CPU as a multiple of
  the naive parse, peak RSS (MiB) and that peak as a multiple of the record's size on disk; whether ``status`` names
  the short collapse; the report's PNG count and largest PNG;
- ``status --follow``: in one fresh process, the first draw, then ``--follow-rows`` rows appended to
  ``metrics.jsonl`` (copies of its last row at the next steps; the file is cut back to its size afterwards) and one
  redraw: the redraw's CPU and wall seconds, the process's peak RSS, and whether the redraw shows the new last step.

Usage::

    python benchmarks/run_record_scale.py                      # 50 000 rows x 296 keys (~5 min on 2 idle cores)
    python benchmarks/run_record_scale.py --shape full --rows 20000 --every 50 --layers 12 --heads 12
                                 # 1M steps logged every 50: 12x12-head attention, policy, representation, a guard
    python benchmarks/run_record_scale.py --rows 5000          # under a minute
    python benchmarks/run_record_scale.py --keep /tmp/rec      # keep the record; then, before/after a change:
    python benchmarks/run_record_scale.py --record /tmp/rec/records/three-week-run --source /tmp/old
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from entrotrain.dashboards.run_record import RunRecordLogger


def _row_metrics(step: int, grid: np.ndarray, loss: float) -> dict[str, float]:
    layers, heads = grid.shape
    metrics = {f"entropy/attn_norm/L{l}/H{h}": float(grid[l, h]) for l in range(layers) for h in range(heads)}
    metrics.update({f"entropy/attn/L{l}/H{h}": float(grid[l, h] * math.log(512)) for l in range(layers)
                    for h in range(heads)})
    metrics.update({
        "entropy/attn_norm/min": float(grid.min()),
        "entropy/attn_norm/mean": float(grid.mean()),
        "entropy/attn_norm/p05": float(np.quantile(grid, 0.05)),
        "entropy/attn/collapse_frac": float((grid < 0.1).mean()),
        "entropy/attn/overload_frac": float((grid > 0.9).mean()),
        "entropy/attn/nonfinite": 0.0,
        "train/loss": loss,
        "lr-AdamW": 3e-4,
    })
    return metrics


_LAYERS_REPR = ("model.blocks.0", "model.blocks.5", "model.blocks.11", "model.ln_f")


def _policy_metrics(row: int, rows: int, rng: np.random.Generator) -> dict[str, float]:
    """A ``PolicyEntropyMonitor`` row (its documented keys), entropy falling slowly as the reward rises."""
    h = 1.2 * math.exp(-2.0 * row / rows) + 0.05 * rng.random()
    reward = 0.8 - 0.6 * math.exp(h) / math.exp(1.25) + 0.02 * rng.standard_normal()
    p = "entropy/policy/"
    return {f"{p}mean": h, f"{p}p10": 0.2 * h, f"{p}p50": 0.8 * h, f"{p}p90": 2.1 * h, f"{p}top20_mean": 2.6 * h,
            f"{p}seq_mean": 1.02 * h, f"{p}temperature": 1.0, f"{p}tokens": 65536.0, f"{p}cov_mean": 1e-3 * h,
            f"{p}cov_pos_frac": 0.55, f"{p}cov_top1_share": 0.3, f"{p}delta": -1e-4, f"{p}delta_predicted": -9e-5,
            f"{p}eta_eff": 0.1, f"{p}delta_corr": 0.4, f"{p}reward_mean": reward, f"{p}fit_a": 0.4, f"{p}fit_b": 0.8,
            f"{p}fit_ceiling": 0.4, f"{p}fit_r2": 0.7, f"{p}fit_extrapolation": 0.5, f"{p}fit_shown": 1.0,
            f"{p}nonfinite": 0.0, f"{p}reward_nonfinite": 0.0}


def _repr_metrics(row: int, rows: int, rng: np.random.Generator) -> dict[str, float]:
    """A ``RepresentationEntropyMonitor`` row: four layers' RankMe, effective rank, matrix entropy and counts."""
    out = {}
    for i, layer in enumerate(_LAYERS_REPR):
        rank = 200.0 * (1 - 0.3 * row / rows) / (1 + i) + rng.random()
        out.update({f"entropy/repr/{layer}/rankme": rank, f"entropy/repr/{layer}/effective_rank": 0.9 * rank,
                    f"entropy/repr/{layer}/matrix_entropy": math.log(rank), f"entropy/repr/{layer}/n": 2048.0,
                    f"entropy/repr/{layer}/d": 768.0, f"entropy/repr/{layer}/n_streamed": 8192.0,
                    f"entropy/repr/{layer}/nonfinite": 0.0})
    return out


def write_record(root: Path, rows: int, layers: int, heads: int, every: int, dip_rows: int, probe: int,
                 resume_at: int | None, shape: str = "attention") -> tuple[Path, float, float, int]:
    """Write the record; return its folder, µs per log over the first and the last ``probe`` rows, and the step
    of the short collapse."""
    rng = np.random.default_rng(0)
    base = 0.6 + 0.3 * rng.random((layers, heads))
    dip_row = rows // 2 + 7
    logger = RunRecordLogger(root, name="records", version="three-week-run", run_name="three-week-run")
    logger.log_hyperparams({"model": {"layers": layers, "heads": heads}, "every_n_steps": every})
    logger.log_threshold("entropy/attn_norm/*", 0.1, "collapse")
    logger.log_threshold("entropy/attn_norm/min", 0.05, "guard (warn)")
    if shape == "full":
        logger.log_threshold("entropy/policy/mean", 0.02, "guard (warn)")
    first = last = 0.0
    row = 0
    rewound = False
    while row < rows:
        step = row * every
        grid = np.clip(base + 0.02 * rng.standard_normal(base.shape) - 0.1 * row / rows, 0.2, 1.0)
        if dip_row <= row < dip_row + dip_rows:
            grid[1 % layers, 3 % heads] = 0.01  # a 20-step collapse of L1H3, then it recovers
        metrics = _row_metrics(step, grid, 3.0 * math.exp(-row / rows) + 0.01 * rng.standard_normal())
        if shape == "full":  # the loop's loss and learning rate in a row of their own, as Lightning logs them
            task = {k: metrics.pop(k) for k in ("train/loss", "lr-AdamW")}
        t0 = time.perf_counter()
        logger.log_metrics(metrics, step=step)
        logger.log_media("entropy/attn_norm/heatmap", grid, step, kind="heatmap", meta={"vmin": 0, "vmax": 1})
        if shape == "full":  # policy, representation (with their media) and the loop's own row, each a log call
            logger.log_metrics(_policy_metrics(row, rows, rng), step=step)
            logger.log_media("entropy/policy/hist", rng.random(30), step, kind="histogram",
                             meta={"range": [0.0, 4.0]})
            logger.log_metrics(_repr_metrics(row, rows, rng), step=step)
            for layer in _LAYERS_REPR:
                logger.log_media(f"entropy/repr/{layer}/spectrum", np.sort(rng.random(64))[::-1], step,
                                 kind="spectrum")
            logger.log_metrics(task, step=step)
        dt = time.perf_counter() - t0
        if row < probe:
            first += dt
        elif row >= rows - probe:
            last += dt
        if row == dip_row:
            logger.log_event("entropy/attn_norm/min", f"EntropyCollapseGuard at step {step}: fell below 0.05.", step,
                             "warn")
        row += 1
        if resume_at is not None and not rewound and row == resume_at:  # a resume from a checkpoint 1000 rows back
            rewound = True
            entry = logger.checkpoint_entry((row - 1000) * every)
            logger.finalize("failed")
            logger = RunRecordLogger(root, name="records", version="unused")
            logger.resume_from_entry(entry, ckpt_path="ckpt/older.ckpt")
            row -= 999
    logger.finalize("success")
    return logger.run_dir, first / probe * 1e6, last / probe * 1e6, dip_row * every


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of ``cmd`` under ``/usr/bin/time -v``, and its
    stdout + stderr. On a shared machine the CPU seconds are the steadier number."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())  # not the checkout: `python -c` imports from its cwd first
    wall = time.perf_counter() - t0

    def field(name: str) -> float:
        found = re.search(rf"{name}: ([\d.]+)", done.stderr)
        return float(found.group(1)) if found else float("nan")

    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = field(r"User time \(seconds\)") + field(r"System time \(seconds\)")
    return wall, cpu, field(r"Maximum resident set size \(kbytes\)") / 1024, done.stdout + done.stderr


#: One ``status --follow`` session in a fresh process: the first draw, ``n`` rows appended, one redraw (JSON out).
#: A package without :class:`RunFollower` (``--source`` before it) redraws by reading the whole record again.
_FOLLOW = """
import inspect, json, os, resource, sys, time
from pathlib import Path
from entrotrain.dashboards import terminal_status as ts

run, n, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
metrics = run / "metrics.jsonl"
size = metrics.stat().st_size
kw = {"followers": {}} if "followers" in inspect.signature(ts._view).parameters else {}
view = ([str(run)], None, 10, 24, False, 12)

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

try:
    t0 = cpu()
    ts._view(*view, **kw)
    first = cpu() - t0
    with metrics.open("rb") as f:
        f.seek(max(0, size - (1 << 22)))
        row = json.loads(f.read().rstrip(b"\\n").rsplit(b"\\n", 1)[-1])
    last = row["step"]
    with metrics.open("a") as f:
        for k in range(1, n + 1):
            row["step"] = last + k * every
            f.write(json.dumps(row) + "\\n")
    t0, w0 = cpu(), time.perf_counter()
    text = ts._view(*view, **kw)[0]
    redraw, wall = cpu() - t0, time.perf_counter() - w0
finally:
    os.truncate(metrics, size)
# VmHWM, not ru_maxrss: that one starts at the forking parent's peak
peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"first": first, "redraw": redraw, "wall": wall, "peak": peak, "incremental": bool(kw),
                  "shows": f"step {last + n * every} " in text}))
"""


def _follow(run_dir: Path, rows: int, every: int, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _FOLLOW, str(run_dir), str(rows), str(every)], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"the follow session exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "report" not in p.parts)


#: The naive baseline: every line of metrics.jsonl through json.loads, nothing kept (the parse alone; a reader that
#: keeps the rows as dicts costs ~4x the record in memory on top).
_NAIVE = "import json, sys\nwith open(sys.argv[1], 'rb') as f:\n    for line in f:\n        json.loads(line)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("attention", "full"), default="attention",
                        help="attention: one AttentionEntropyMonitor row per logged step; full: attention, policy, "
                        "representation (4 layers) and the loop's loss, each its own row, with their media")
    parser.add_argument("--rows", type=int, default=50_000, help="logged rows (500k steps at every 10: 50 000)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=36, help="layers x heads x 2 + 8 keys per row (default 296)")
    parser.add_argument("--every", type=int, default=10, help="steps between logged rows")
    parser.add_argument("--dip-rows", type=int, default=2, help="logged rows the short collapse lasts")
    parser.add_argument("--probe", type=int, default=1000, help="rows timed at the start and at the end")
    parser.add_argument("--no-resume", action="store_true", help="do not resume from an older checkpoint midway")
    parser.add_argument("--keep", type=Path, default=None, help="write the record here and keep it")
    parser.add_argument("--record", type=Path, default=None,
                        help="read this record (written earlier with --keep, RUN_DIR) instead of writing one")
    parser.add_argument("--source", type=Path, default=None,
                        help="run status / report from this copy of the package's parent folder (e.g. `git archive "
                        "HEAD~3 entrotrain | tar -x -C /tmp/old` then --source /tmp/old): a before/after comparison")
    parser.add_argument("--quick", action="store_true", help="skip the report (status only)")
    parser.add_argument("--follow-rows", type=int, default=100,
                        help="rows appended between the first draw and the redraw of `status --follow`")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="run_record_scale-"))
    cache = Path(tempfile.mkdtemp(prefix="run_record_scale-cache-"))
    try:
        print("| what | wall s | CPU s | × naive (CPU) | peak RSS MiB | RSS / record size | note |")
        print("|---|---:|---:|---:|---:|---:|---|")
        if args.record is None:
            t0 = time.perf_counter()
            resume_at = None if args.no_resume else max(args.rows * 3 // 5, 1001)
            probe = min(args.probe, args.rows // 3)
            run_dir, first_us, last_us, dip_step = write_record(
                root, args.rows, args.layers, args.heads, args.every, args.dip_rows, probe, resume_at, args.shape)
            keys = 2 * args.layers * args.heads + 8
            what = (f"{keys} attention keys + a {args.layers}x{args.heads} heatmap" if args.shape == "attention" else
                    f"{keys - 2} attention + 24 policy + 28 representation + 2 loop keys in 4 rows, a "
                    f"{args.layers}x{args.heads} heatmap, a histogram and 4 spectra")
            print(f"| write the record | {time.perf_counter() - t0:.0f} | | | | | {args.rows} logged steps x {what} "
                  "per step" + ("" if args.no_resume else f"; resumed at row {resume_at} from 1000 rows back") + " |")
            print(f"| writer, first {probe} logs | {first_us * probe / 1e6:.2f} | | | | | {first_us:.0f} µs per "
                  "logged step |")
            print(f"| writer, last {probe} logs | {last_us * probe / 1e6:.2f} | | | | | {last_us:.0f} µs per logged "
                  f"step (×{last_us / first_us:.2f} the first) |")
        else:
            run_dir = args.record
        size = _size(run_dir)
        mib = f"record {size / 2**20:.0f} MiB"
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "ENTROTRAIN_CACHE_DIR": str(cache)}
        if args.source is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(args.source.resolve()), env.get("PYTHONPATH", "")])
        off = {**env, "ENTROTRAIN_CACHE_DIR": "off"}
        exe = [sys.executable, "-c", "import sys; from entrotrain.cli import console; sys.argv[0] = 'entrotrain'; "
               "console()"]
        _, naive, naive_rss, _ = _timed([sys.executable, "-c", _NAIVE, str(run_dir / "metrics.jsonl")], env)

        def row(what: str, cmd: list[str], run_env: dict[str, str], note: str | Callable[[], str] = "") -> str:
            wall, cpu, rss, out = _timed(cmd, run_env)
            note = note() if callable(note) else note
            print(f"| {what} | {wall:.1f} | {cpu:.2f} | {cpu / naive:.2f} | {rss:.0f} | {rss * 2**20 / size:.2f} | "
                  f"{note} |", flush=True)
            return out

        print(f"| naive: `json.loads` of each line of metrics.jsonl | | {naive:.2f} | 1.00 | {naive_rss:.0f} | "
              f"{naive_rss * 2**20 / size:.2f} | {mib}; the parse alone, nothing kept |")
        out = row("`entrotrain status RUN`, no cache (`ENTROTRAIN_CACHE_DIR=off`)", [*exe, "status", str(run_dir)], off)
        said = "short collapse named" if "recovered: L1H3" in out else "short collapse not named"
        row("`entrotrain status RUN`, first (writes the cache)", [*exe, "status", str(run_dir)], env, said)
        written = sum(p.stat().st_size for p in cache.glob("*.npz")) / 2**20
        row("`entrotrain status RUN`", [*exe, "status", str(run_dir)], env,
            f"from the cache ({written:.0f} MiB)" if written else "no cache: metrics.jsonl under 16 MiB")
        row("`entrotrain status RUN --json`", [*exe, "status", str(run_dir), "--json"], env)
        row("`entrotrain status RUN --keys 'entropy/attn_norm/L1/*'`",
            [*exe, "status", str(run_dir), "--keys", "entropy/attn_norm/L1/*"], env)
        row("`entrotrain status RUN --check`", [*exe, "status", str(run_dir), "--check"], env)
        if not args.quick:
            for what, run_env in (("no cache", off), ("", env)):
                out_dir = Path(tempfile.mkdtemp(prefix="report-"))
                try:
                    row(f"`entrotrain report RUN`{', ' + what if what else ''}",
                        [*exe, "report", str(run_dir), "-o", str(out_dir)], run_env, lambda: _pngs(out_dir))
                finally:
                    shutil.rmtree(out_dir, ignore_errors=True)
        # last: it appends to metrics.jsonl and cuts it back (a new modification time: the cache is not trusted after)
        got = _follow(run_dir, args.follow_rows, args.every, env)
        how = "reads the appended bytes" if got["incremental"] else "reads the whole record again"
        print(f"| `status --follow` redraw after {args.follow_rows} appended rows | {got['wall']:.2f} | "
              f"{got['redraw']:.2f} | {got['redraw'] / naive:.2f} | {got['peak']:.0f} | "
              f"{got['peak'] * 2**20 / size:.2f} | {how}; first draw {got['first']:.1f} CPU s; "
              f"{'shows' if got['shows'] else 'does not show'} the new last step |")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _pngs(out_dir: Path) -> str:
    pngs = sorted(out_dir.glob("*.png"))
    return f"{len(pngs)} PNGs, largest {max((p.stat().st_size for p in pngs), default=0) / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
