"""``entrotrain status``: trend lines, one run's page of text, a folder's table, the CLI (errors, --keys, --follow),
statuses of runs that failed or were killed, and an import without torch or lightning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.cli import main
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.dashboards.terminal_status import _BARS, _GAP, run_lines, runs_table, sparkline

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ sparkline
@given(
    st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(math.nan), st.just(math.inf)), max_size=60),
    st.integers(1, 40),
)
def test_sparkline_shape_and_alphabet(values: list[float], width: int) -> None:
    line = sparkline(values, width)
    assert len(line) == min(width, len(values))
    assert set(line) <= set(_BARS) | {_GAP}


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=60, unique=True), st.integers(2, 30))
def test_sparkline_follows_a_sorted_series_from_bottom_to_top(values: list[float], width: int) -> None:
    values = sorted(values)
    line = sparkline(values, width)
    levels = [_BARS.index(c) for c in line]
    assert levels == sorted(levels)  # bucket means of a sorted series never go down
    if len(set(line)) > 1:  # not drawn flat (a spread within FLAT_RELATIVE of the magnitude is)
        assert line[0] == _BARS[0] and line[-1] == _BARS[-1]
    if max(values) - min(values) > 2e-3 * max(abs(v) for v in values) and len(line) > 1:
        assert len(set(line)) > 1  # a real spread is drawn


def test_sparkline_flat_empty_and_missing() -> None:
    assert sparkline([0.5] * 5, 10) == _BARS[3] * 5
    assert sparkline([0.99990, 0.99985, 0.99995, 0.9999], 4) == _BARS[3] * 4  # round-off is not a trend
    assert sparkline([1.0, 0.99], 2) == _BARS[-1] + _BARS[0]  # a 1 % fall is
    assert sparkline([], 10) == ""
    assert sparkline([math.nan] * 3, 10) == _GAP * 3
    assert sparkline([1.0, math.nan, 0.0], 3) == _BARS[-1] + _GAP + _BARS[0]
    assert sparkline(list(range(100)), 4) == _BARS[0] + _BARS[2] + _BARS[5] + _BARS[-1]  # 4 stretches of 25


# ------------------------------------------------------------------ a run's page
def _record(root: Path, name: str, steps: int = 8, finish: str | None = "success", **meta) -> RunRecordLogger:
    record = RunRecordLogger(root, version=name, run_name=name)
    record.log_threshold("entropy/attn_norm/*", 0.1, "collapse")
    record.log_threshold("entropy/attn_norm/min", 0.05, "guard (warn)")
    for step in range(steps):
        value = 0.9 * 0.5**step
        record.log_metrics({"entropy/attn_norm/min": value, "entropy/attn_norm/mean": 2 * value,
                            "entropy/attn/collapse_frac": step / steps, "train/loss": 3.0 - 0.1 * step}, step=step)
        record.log_media("entropy/attn_norm/heatmap", np.full((2, 2), value), step, kind="heatmap")
        if value < 0.05:
            record.log_event("entropy/attn_norm/min", f"EntropyCollapseGuard at step {step}: fell below 0.05.", step, "warn")
    if meta:
        record.set_meta(**meta)
    if finish is not None:
        record.finalize(finish)
    return record


def test_one_run_page_has_status_numbers_trends_findings_and_the_guard(tmp_path: Path) -> None:
    record = _record(tmp_path, "collapse")
    run = load_run(record.run_dir)
    text = "\n".join(run_lines(run, now=time.time()))
    assert text.startswith("collapse — finished · step 7 · updated")
    row = next(line for line in text.splitlines() if line.strip().startswith("entropy/attn_norm/min "))
    first, least, last, trend = row.split()[1:]
    assert (float(first), float(least), float(last)) == pytest.approx((0.9, 0.9 * 0.5**7, 0.9 * 0.5**7), rel=1e-3)
    assert trend == sparkline(run.scalars["entropy/attn_norm/min"][1], 24) and trend[0] == _BARS[-1]
    share = next(line for line in text.splitlines() if "collapse_frac" in line)
    assert "0 %" in share and "88 %" in share  # shares in percent, as on the report's cards
    assert "What happened" in text and "Least head entropy (normalised) went from 0.9 to" in text
    assert "Guard: 3 firings; last at step 7 (warn)" in text  # steps 5, 6, 7 are below 0.05
    assert f"entrotrain report {record.run_dir}" in text


def test_keys_globs_choose_the_rows_and_say_when_nothing_matches(tmp_path: Path) -> None:
    run = load_run(_record(tmp_path, "r").run_dir)
    rows = [line.split()[0] for line in run_lines(run, keys=["train/*", "entropy/attn_norm/m*"]) if "  " in line]
    assert {"train/loss", "entropy/attn_norm/min", "entropy/attn_norm/mean"} <= set(rows)
    assert "entropy/attn/collapse_frac" not in rows
    assert any("no logged key matches nope/*" in line for line in run_lines(run, keys=["nope/*"]))


def test_failed_and_killed_runs_say_so(tmp_path: Path) -> None:
    try:
        raise RuntimeError("CUDA error: an illegal memory access")
    except RuntimeError:
        failed = _record(tmp_path, "failed", finish="failed")
    text = "\n".join(run_lines(load_run(failed.run_dir)))
    assert "— failed" in text and "RuntimeError: CUDA error: an illegal memory access" in text

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = _record(tmp_path, "killed", finish=None, pid=int(gone.stdout), pid_start=None)
    text = "\n".join(run_lines(load_run(killed.run_dir)))
    assert text.splitlines()[0].startswith("killed — killed (no update since")
    assert "its process (pid" in text


def test_a_folder_lists_runs_newest_first_with_their_headlines(tmp_path: Path) -> None:
    _record(tmp_path, "older", steps=3)
    time.sleep(0.05)
    _record(tmp_path, "newer", steps=5)
    from entrotrain.dashboards.terminal_status import _collect

    runs, single, problems = _collect([str(tmp_path)], 10)
    assert [r.label for r in runs] == ["newer", "older"] and not single and not problems
    lines = runs_table(runs)
    assert lines[0].split()[:4] == ["run", "status", "step", "updated"] and "attn_norm/min" in lines[0]
    assert lines[1].split()[:3] == ["newer", "finished", "4"] and lines[2].split()[:3] == ["older", "finished", "2"]
    assert f"{0.9 * 0.5**4:.4g}" in lines[1]


# ------------------------------------------------------------------ the command line
def test_cli_prints_one_run_or_a_table_and_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = _record(tmp_path / "runs" / "a", "only")
    main(["status", str(tmp_path / "runs")])  # a folder with one run: its page
    assert capsys.readouterr().out.startswith("only — finished")
    _record(tmp_path / "runs" / "b", "second")
    main(["status", str(tmp_path / "runs"), "-n", "5"])
    out = capsys.readouterr().out
    assert out.startswith("run ") and "details: entrotrain status" in out
    main(["status", str(record.run_dir), "--keys", "train/*", "--width", "4"])
    assert "train/loss" in capsys.readouterr().out
    for argv, said in (
        (["status", str(tmp_path / "missing")], "does not exist"),
        (["status", str(tmp_path / "runs" / "a" / "records" / "only" / "media")], "no run record under"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["status", str(record.run_dir), "--width", "0"])
    assert exc.value.code == 2


def test_follow_redraws_until_the_run_ends(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    record = _record(tmp_path, "live", finish=None)  # running, written by this (live) process
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the run logs one more step, then finishes
        sleeps.append(seconds)
        record.log_metrics({"entropy/attn_norm/min": 0.001}, step=8)
        record.finalize("success")

    monkeypatch.setattr("entrotrain.dashboards.terminal_status.time.sleep", sleep)
    main(["status", str(record.run_dir), "--follow", "2"])
    out = capsys.readouterr().out
    assert sleeps == [2.0]
    first, second = out.split("(every 2 s; Ctrl+C to leave)")
    assert "live — running · step 7" in first and f"pid {os.getpid()}" in first
    assert "live — finished · step 8" in second


def test_a_finished_run_without_monitor_output_is_listed_not_refused(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    record = RunRecordLogger(tmp_path, version="plain", run_name="plain")
    record.log_metrics({"loss": 2.0}, step=1)
    record.finalize("success")
    main(["status", str(record.run_dir)])
    out = capsys.readouterr().out
    assert out.startswith("plain — finished · step 1")


def test_status_imports_neither_torch_nor_lightning(tmp_path: Path) -> None:
    record = _record(tmp_path, "light")
    meta = json.loads((record.run_dir / "meta.json").read_text())
    assert meta["status"] == "finished"
    code = (
        "import sys\n"
        "from entrotrain.cli import main\n"
        f"main(['status', {str(record.run_dir)!r}])\n"
        "heavy = [m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout and "light — finished" in done.stdout


def test_json_holds_what_the_text_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = _record(tmp_path, "collapse")
    main(["status", str(record.run_dir), "--json"])
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert (run["name"], run["state"], run["last_step"]) == ("collapse", "finished", 7)
    assert run["values"]["entropy/attn_norm/min"] == pytest.approx(
        {"first": 0.9, "min": 0.9 * 0.5**7, "last": 0.9 * 0.5**7, "last_step": 7})
    assert [f["step"] for f in run["guard_firings"]] == [5, 6, 7]
    assert run["remedies"][0]["failure"] == "Attention-entropy collapse" and run["findings"]


@pytest.mark.parametrize(("kind", "code"), [("healthy", 0), ("collapse", 1), ("failed", 1)])
def test_check_exits_1_for_a_failed_or_collapsing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, code: int
) -> None:
    steps = {"healthy": 1, "collapse": 8, "failed": 1}[kind]  # one step: collapse_frac 0, entropy 0.9
    if kind == "failed":
        try:
            raise ValueError("diverged")
        except ValueError:
            record = _record(tmp_path, kind, steps=steps, finish="failed")
    else:
        record = _record(tmp_path, kind, steps=steps)
    if code:
        with pytest.raises(SystemExit) as exc:
            main(["status", str(record.run_dir), "--check"])
        assert exc.value.code == code
    else:
        main(["status", str(record.run_dir), "--check"])
    assert capsys.readouterr().out.startswith(f"{kind} — ")


def test_a_transformers_record_shows_its_loss_as_a_task_metric(tmp_path: Path) -> None:
    """What ``Trainer`` logs (``loss``, ``eval_loss``, ``grad_norm``) is the task section: headline rows and the
    task finding, as ``train/loss`` / ``val/loss`` are for a Lightning run."""
    from entrotrain.dashboards.report import sections_of

    record = RunRecordLogger(tmp_path, version="hf")
    for step in (5, 10):
        record.log_metrics({"loss": 4.0 - step / 10, "grad_norm": 1.0, "entropy/attn_norm/min": 0.5}, step=step)
    record.log_metrics({"eval_loss": 3.0}, step=10)
    record.finalize("success")
    run = load_run(record.run_dir)
    assert [s.id for s in sections_of(sorted(run.scalars))] == ["attention", "task"]
    text = "\n".join(run_lines(run))
    rows = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and len(line.split()) == 5]
    assert {"loss", "eval_loss", "entropy/attn_norm/min"} <= set(rows)
    assert "eval_loss: 3 → 3." in text


def test_the_table_counts_guard_firings_and_names_the_diagnosis(tmp_path: Path) -> None:
    from entrotrain.dashboards.terminal_status import _collect

    _record(tmp_path, "short", steps=1)  # collapse_frac 0, no firing
    time.sleep(0.05)
    _record(tmp_path, "long", steps=8)  # collapse_frac 7/8 at the end, 3 firings
    runs, _, _ = _collect([str(tmp_path)], 10)
    header, long, short = runs_table(runs)
    assert header.split()[-2:] == ["guard", "diagnosis"]
    assert long.split()[-3:] == ["3", "attention-entropy", "collapse"] and short.split()[-2:] == ["0", "–"]


def test_the_readers_warnings_are_shown(tmp_path: Path) -> None:
    """A torn last line (a writer killed mid-line) is said on the page, as the report's banner says it."""
    record = _record(tmp_path, "torn")
    with (record.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "values": {"entropy/attn_')
    text = "\n".join(run_lines(load_run(record.run_dir)))
    assert "  warning: " in text and "metrics.jsonl" in text


def test_piping_into_head_ends_quietly(tmp_path: Path) -> None:
    """``entrotrain status | head``: when the reader closes the pipe early, printing raises BrokenPipeError; the
    console script ends quietly with code 0 (no traceback), as Unix tools do. The pipe's timing is a race, so the
    error is raised on purpose here."""
    code = (
        "import sys, entrotrain.cli as cli\n"
        "def main():\n"
        "    print('first line', flush=True)\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli.main = main\n"
        "sys.argv = ['entrotrain', 'status']\n"
        "cli.console()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "first line\n" and "Traceback" not in done.stderr, done.stderr


def test_a_run_that_rolled_back_says_where_each_rollback_went(tmp_path: Path) -> None:
    """The messages are a real rollback guard's, so the line follows what the guard says."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.5, action="rollback", keep_last_good=False,
                                 rollback_states=3)
    guard.track(model, [optimizer])
    logger = RunRecordLogger(tmp_path, name="records", version="rolled", run_name="rolled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, value in ((0, 0.9), (10, 0.9), (20, 0.1), (30, 0.1)):
            logger.log_metrics({"entropy/attn_norm/min": value}, step=step)
            reason = guard.observe(value, step)
            if reason is not None:
                logger.log_event(guard.monitor, guard.fire(reason, step, [optimizer]), step, guard.last_level)
    logger.finalize("success")
    run = load_run(logger.run_dir)
    assert run.rollbacks == [(20, 10), (30, 0)]  # (the report marks its curves "rollback → 10" from these)
    assert "  Rolled back: at step 20 to step 10, at step 30 to step 0" in run_lines(run)
