"""``entrotrain status [RUN_DIR | FOLDER ...]``: where runs stand, in the terminal, from their run records.

For the ssh session at 2 a.m.: no browser, no wandb, nothing written into the run's folder (a record whose
``metrics.jsonl`` is 16 MiB or more leaves a parsed copy under ``~/.cache/entrotrain`` that the next ``status`` or
``report`` starts from: :mod:`~entrotrain.dashboards.run_cache`). One run record (a folder holding ``meta.json``)
gets a page of text::

    attention_collapse — running · step 275 · updated 4 s ago · pid 8121 on gpu-07
      runs/records/attention_collapse-20261206-1338
      metric                              first       min      last  steps 0 → 275
      entropy/attn_norm/min              0.8123    0.0090    0.0120  ███▇▆▄▃▂▁▁▁▁
      ...
      What happened
      - 14 of 16 attention heads are collapsed (normalised entropy < 0.1) at step 275: ...
      Guard: 1 firing; last at step 75 (warn): EntropyCollapseGuard at step 75: ... fell below 0.05 (last good: ...).

A folder of records (``runs``, ``runs/records``) gets one line per run, newest first: status, last step, last update
and the headline numbers. ``--follow SECONDS`` redraws until no listed run is still running (Ctrl+C leaves); after
the first, each redraw reads only the bytes each run appended since
(:class:`~entrotrain.dashboards.run_reader.RunFollower`), not the whole record.
``--json`` prints the same as JSON (:func:`run_summary` per run) for scripts; ``--check`` exits with code 1 when a run
shown failed, was interrupted or killed, went stale, or shows a collapse (:func:`~entrotrain.dashboards.remedies.
diagnose`), for a cron job or a CI step; errors exit with code 2.

The status of a run (``running``, ``finished``, ``failed`` / ``interrupted`` with the reason, ``killed`` when the
writer's process is gone, ``stale``) is :func:`~entrotrain.dashboards.run_reader.run_status`'s, as in the report; the
headline keys, the "What happened" sentences and "What to try" are the report's
(:func:`~entrotrain.dashboards.report.headline_keys`, :func:`~entrotrain.dashboards.report.findings`,
:func:`~entrotrain.dashboards.remedies.diagnose`). Reads like the report: numpy only, no torch, no lightning.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from entrotrain.dashboards.remedies import diagnose
from entrotrain.dashboards.report import HEADLINES, findings, headline_keys, sections_of, value_format
from entrotrain.dashboards.report_figures import shown_ceiling
from entrotrain.dashboards.run_reader import RunData, RunFollower, find_records, missing_path, natural_order
from entrotrain.errors import EntrotrainError

__all__ = ["PROBLEM_STATES", "run_lines", "run_summary", "runs_table", "sparkline", "status_main"]

#: Run states ``entrotrain status --check`` counts as a problem (with any diagnosed collapse).
PROBLEM_STATES = ("failed", "interrupted", "killed", "stale", "unknown")

_BARS = "▁▂▃▄▅▆▇█"
_GAP = "·"  # a stretch of the run with no finite value


#: A trend line whose stretches differ by at most this fraction of their magnitude is drawn flat (1e-3: an entropy
#: at 0.9999 ± 0.0001 is not magnified into a full-height zigzag).
FLAT_RELATIVE = 1e-3


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """``values`` (in step order) as at most ``width`` bar characters: the run cut into ``width`` consecutive stretches
    of (nearly) equal length, each drawn at the mean of its finite values, scaled from the least to the greatest of
    those means; ``·`` for a stretch without a finite value; a line whose means differ by at most
    :data:`FLAT_RELATIVE` of their magnitude is drawn flat, at mid height."""
    data = np.asarray(values, dtype=float)
    if data.size == 0 or width < 1:
        return ""
    chunks = np.array_split(data, min(width, data.size))
    means = np.array([c[np.isfinite(c)].mean() if np.isfinite(c).any() else np.nan for c in chunks])
    finite = means[np.isfinite(means)]
    if finite.size == 0:
        return _GAP * len(means)
    low, high = float(finite.min()), float(finite.max())
    flat = high - low <= FLAT_RELATIVE * max(abs(high), abs(low))  # round-off, not a trend: do not magnify it
    top = len(_BARS) - 1
    out = []
    for m in means:
        if not math.isfinite(m):
            out.append(_GAP)
        elif flat:
            out.append(_BARS[top // 2])
        else:
            out.append(_BARS[min(top, int(round((m - low) / (high - low) * top)))])
    return "".join(out)


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def _matching_keys(run: RunData, patterns: Sequence[str] | None) -> list[str]:
    """Every key the table would show, in order: the globs' matches (natural order), else the headline keys, the
    guarded keys and the non-finite counters that are not 0 at their last step."""
    if patterns:
        return sorted((k for k in run.scalars if any(fnmatch.fnmatchcase(k, p) for p in patterns)), key=natural_order)
    guarded = [t["key"] for t in run.thresholds if str(t.get("label", "")).startswith("guard")]
    nonfinite = [k for k in sorted(run.scalars) if k.endswith("/nonfinite") and (run.first_last(k) or (0, 0))[1] > 0]
    return list(dict.fromkeys([*headline_keys([run]), *(k for k in guarded if k in run.scalars), *nonfinite]))


def _fell_silent(steps: np.ndarray, last_step: int | None) -> bool:
    """Whether a key's last finite value is older than its own logging interval allows (it went NaN or its monitor
    stopped): the run reached ``last_step`` more than one interval after it."""
    if last_step is None or not len(steps):
        return False
    interval = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
    return last_step - int(steps[-1]) > max(interval, 1.0)


def _key_stats(run: RunData, key: str) -> tuple[float | None, float | None, float | None, int | None]:
    """``key``'s first, least finite and last logged values and its last step (the table's columns)."""
    steps, values = run.scalars[key]
    finite = values[np.isfinite(values)]
    first = float(values[0]) if len(values) else None
    last = float(values[-1]) if len(values) else None
    return first, float(finite.min()) if finite.size else None, last, int(steps[-1]) if len(steps) else None


def run_lines(run: RunData, keys: Sequence[str] | None = None, limit: int = 12, width: int = 24,
              now: float | None = None) -> list[str]:
    """The text of one run: status line, key table (first / min / last / trend), the report's findings, the guard's
    firings and the commands to go further. ``keys``: glob patterns choosing the table's keys (default: the report's
    headline keys and the guarded keys); ``limit``: at most this many rows."""
    now = time.time() if now is None else now
    status = run.decided_status
    step = run.last_step
    meta = run.meta
    head = [f"{run.label} — {status.label}", f"step {step}" if step is not None else "no step logged yet"]
    head.append(f"updated {_ago(status.last_update, now)}")
    if status.state == "running" and meta.get("pid"):
        head.append(f"pid {meta.get('pid')} on {meta.get('host')}")
    lines = [" · ".join(head), f"  {run.path}"]
    if run.forked_from:
        lines.append(f"  {run.forked_from}")
    if status.message and status.state != "running":
        lines.append(f"  {status.message}")
    lines += [f"  warning: {w}" for w in run.warnings if w != status.message]  # torn lines, no monitor output, ...
    lines += [f"  note: {n}" for n in run.notes]  # rows a resume from an older checkpoint superseded
    matching = _matching_keys(run, keys)
    chosen = matching[:limit]
    if chosen:
        name_width = max(24, *(len(k) for k in chosen))
        first_step = min(int(run.scalars[k][0][0]) for k in chosen if len(run.scalars[k][0]))
        lines.append(f"  {'metric':<{name_width}} {'first':>9} {'min':>9} {'last':>9}  steps {first_step} → {step}")
        for key in chosen:
            steps, values = run.scalars[key]
            first, least, last, _ = _key_stats(run, key)
            show = value_format(key)
            behind = f"  (last logged at step {int(steps[-1])})" if _fell_silent(steps, step) else ""
            lines.append(
                f"  {key:<{name_width}} {show(first):>9} {show(least):>9} {show(last):>9}  {sparkline(values, width)}"
                + behind
            )
        more = len(matching) - len(chosen)
        if more > 0:
            lines.append(f"  … {more} more key(s) match; show them with --rows {len(chosen) + more}")
    elif keys:
        lines.append(f"  no logged key matches {', '.join(keys)}; logged: {', '.join(sorted(run.scalars)[:10])}")
    said = findings(run, sections_of(sorted(run.scalars)))
    if said:
        lines.append("  What happened")
        lines += [f"  - {line}" for line in said if not line.startswith("EntropyCollapseGuard fired")]
    found = diagnose(run)
    if found:
        lines.append("  What to try")
        lines += [f"  {line}" for remedy in found for line in remedy.lines()]
    fired = run.guard_firings
    if fired:
        e = fired[-1]
        times = "firing" if len(fired) == 1 else "firings"
        last = f"last at step {e.get('step')} ({e.get('level')}): {e.get('message')}"
        lines.append(f"  Guard: {len(fired)} {times}; {last}")
        if run.rollbacks:
            lines.append("  Rolled back: " + ", ".join(f"at step {at} to step {to}" for at, to in run.rollbacks))
    lines.append(f"  entrotrain report {run.path}")
    return lines


def runs_table(runs: Sequence[RunData], now: float | None = None, columns: int = 3) -> list[str]:
    """One line per run: its folder's name (what ``entrotrain status`` / ``report`` take: two runs of one recipe differ
    by their time), status, last step, last update, the last value of up to ``columns`` headline keys
    (the report's, in its order, among those any of the runs logged), the guard's firings and the diagnosed failures
    (:func:`~entrotrain.dashboards.remedies.diagnose`)."""
    now = time.time() if now is None else now
    present = {k for run in runs for k in run.scalars}
    if "entropy/policy/fit_ceiling" in present and not any(shown_ceiling(run) for run in runs):
        present.discard("entropy/policy/fit_ceiling")  # no prediction (the run's findings say why)
    keys = [k for k in HEADLINES if k in present][:columns]
    header = ["run", "status", "step", "updated", *(k.removeprefix("entropy/") for k in keys), "guard", "diagnosis"]
    rows = []
    for run in runs:
        status = run.decided_status
        values = []
        for key in keys:
            fl = run.first_last(key)
            values.append(value_format(key)(fl[1]) if fl else "–")
        step = run.last_step
        shown_step = "–" if step is None else str(step)
        fired = len(run.guard_firings)
        found = ", ".join(r.failure.lower() for r in diagnose(run)) or "–"
        name = run.path.resolve().name  # (a run given as `.` is named too)
        rows.append([name, status.label, shown_step, _ago(status.last_update, now), *values, str(fired), found])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def run_summary(run: RunData, keys: Sequence[str] | None = None, limit: int = 12) -> dict[str, object]:
    """What :func:`run_lines` shows, as a JSON-able dict: path, name, status (state, label, message, last update),
    last step, the chosen keys' first / min / last values and last step, findings, diagnosed failures with their
    cures, and the guard's firings."""
    status = run.decided_status
    values: dict[str, dict[str, float | int | None]] = {}
    for key in _matching_keys(run, keys)[:limit]:
        first, least, last, last_step = _key_stats(run, key)
        values[key] = {"first": _number(first), "min": _number(least), "last": _number(last), "last_step": last_step}
    fired = run.guard_firings
    return {
        "path": str(run.path),
        "name": run.label,
        "state": status.state,
        "status": status.label,
        "message": status.message,
        "last_update": status.last_update,
        "last_step": run.last_step,
        "forked_from": run.meta.get("forked_from"),
        "values": values,
        "findings": findings(run, sections_of(sorted(run.scalars))),
        "remedies": [{"failure": r.failure, "evidence": r.evidence, "cures": list(r.cures)} for r in diagnose(run)],
        "guard_firings": [{k: e.get(k) for k in ("step", "key", "level", "message")} for e in fired],
    }


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _problem(run: RunData) -> bool:
    """``--check``'s rule: the run ended badly, went stale, or shows a collapse."""
    return run.decided_status.state in PROBLEM_STATES or bool(diagnose(run))


def _collect(
    paths: Sequence[str], limit: int, followers: dict[Path, RunFollower] | None = None
) -> tuple[list[RunData], bool, list[str]]:
    """The runs named by ``paths`` (run records, or folders searched for the ``limit`` newest), whether one run was
    named, and the warnings of runs that could not be read. ``followers``: the readers of earlier redraws, by folder
    (``--follow``: each redraw reads only what was appended since the last); a run read for the first time adds
    its own, and the readers of runs no longer listed (newer runs came into a folder's ``limit``) are let go."""
    runs: list[RunData] = []
    problems: list[str] = []
    single = len(paths) == 1
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EntrotrainError(missing_path(path, "Pass a run record folder or a folder holding run records "
                                               "(e.g. runs, where `entrotrain fit` writes them)."))
        if (path / "meta.json").is_file():
            found = [path]
        else:
            found = find_records(path, limit)
            single = single and len(found) == 1
            if not found:
                raise EntrotrainError(f"no run record under {path}: a run record is a folder holding meta.json and "
                                      "metrics.jsonl (every `entrotrain fit` writes one under runs/records/).")
        for folder in found:
            follower = RunFollower(folder) if followers is None else followers.setdefault(folder, RunFollower(folder))
            try:
                runs.append(follower.read(require_monitors=False))
            except EntrotrainError as err:
                problems.append(f"{folder}: {err}")
                if followers is not None:
                    del followers[folder]  # read it afresh next time
    if followers is not None:
        listed = {Path(p) for p in paths} | {run.path for run in runs}
        for folder in [f for f in followers if f not in listed]:
            del followers[folder]  # (each keeps its run's columns in memory)
    return runs, single and len(runs) == 1, problems


def _view(
    paths: Sequence[str], keys: Sequence[str] | None, limit: int, width: int, as_json: bool = False, rows: int = 12,
    compact: bool = False, followers: dict[Path, RunFollower] | None = None,
) -> tuple[str, bool, bool]:
    """The text to print, whether any run it shows is still running, and whether any has a problem (``--check``)."""
    runs, single, problems = _collect(paths, limit, followers)
    running = any(run.decided_status.state == "running" for run in runs)
    bad = bool(problems) or any(_problem(run) for run in runs)
    if as_json:
        out = {"runs": [run_summary(run, keys, rows) for run in runs], "unreadable": problems}
        return json.dumps(out, indent=None if compact else 1, allow_nan=False), running, bad
    if single:
        lines = run_lines(runs[0], keys, limit=rows, width=width)
    else:
        lines = runs_table(runs)
        if runs:
            lines.append(f"details: entrotrain status {runs[0].path}")
    lines += [f"could not read {p}" for p in problems]
    return "\n".join(lines), running, bad


def status_main(argv: list[str]) -> int:
    """``entrotrain status`` on the command line. Returns the exit code: 0, or 1 with ``--check`` when a run shown
    has a problem; errors go to stderr with exit code 2."""
    parser = argparse.ArgumentParser(
        prog="entrotrain status",
        description="Where runs stand, in the terminal: a run record's status, key numbers with trends, what happened "
        "and the guard's firings; or one line per run for a folder of records.",
    )
    parser.add_argument("paths", nargs="*", default=["runs"], metavar="PATH",
                        help="a run record folder, or a folder holding records (default: runs)")
    parser.add_argument("--keys", nargs="+", default=None, metavar="GLOB",
                        help="the keys to tabulate, as globs (e.g. 'entropy/attn_norm/L3/*'); default the headlines")
    parser.add_argument("-n", "--runs", type=int, default=10, help="list at most this many runs per folder")
    parser.add_argument("--rows", type=int, default=12, help="at most this many keys in a run's table")
    parser.add_argument("--width", type=int, default=24, help="characters of each trend line")
    parser.add_argument("--follow", type=float, default=None, metavar="SECONDS",
                        help="redraw every SECONDS until no run shown is running (Ctrl+C leaves)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per run) instead of text")
    parser.add_argument("--check", action="store_true",
                        help="exit with code 1 when a run shown failed, was interrupted or killed, went stale, or "
                        "shows a collapse (for cron jobs and CI)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.width < 1 or args.rows < 1 or (args.follow is not None and args.follow <= 0):
        parser.error("--runs, --rows and --width must be at least 1 and --follow positive seconds")
    clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() and not args.json else ""
    compact = args.json and args.follow is not None  # one JSON object per line while following
    bad = False
    followers: dict[Path, RunFollower] | None = {} if args.follow is not None else None
    try:
        while True:
            text, running, bad = _view(args.paths, args.keys, args.runs, args.width, args.json, args.rows, compact,
                                       followers)
            if args.follow is None or not running:
                print(f"{clear}{text}" if args.follow is not None else text, flush=True)
                break
            footer = "" if args.json else f"\n(every {args.follow:g} s; Ctrl+C to leave)"
            print(f"{clear}{text}{footer}", flush=True)
            time.sleep(args.follow)
    except EntrotrainError as err:
        print(f"entrotrain status: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except KeyboardInterrupt:
        pass
    return 1 if args.check and bad else 0
