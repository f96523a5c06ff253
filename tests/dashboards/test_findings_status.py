"""Bug hunt on ``entrotrain status`` and "what to try" (terminal_status.py, remedies.py): records a user really
gets (nothing logged, keys gone NaN, per-head globs, a run that starts with sharp heads, a diverging fit) read
back through the status page, its table, ``--json`` and ``diagnose``. Each test named for a bug failed
before its fix (the bug-hunt round of 2026-12-06)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from entrotrain.cli import main
from entrotrain.dashboards.remedies import diagnose, what_to_try
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.dashboards.terminal_status import run_lines, runs_table, status_main


def _record(root: Path, name: str, rows: list[tuple[int | None, dict[str, float]]], finish: bool = True) -> Path:
    record = RunRecordLogger(root, version=name, run_name=name)
    for step, values in rows:
        record.log_metrics(values, step=step)
    if finish:
        record.finalize("success")
    return record.run_dir


def _status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = status_main(list(argv))
    return code, capsys.readouterr().out


# ------------------------------------------------------------------ what held (coverage)
def test_a_record_with_no_scalar_at_all_reads_in_every_view(tmp_path: Path, capsys) -> None:
    path = _record(tmp_path, "empty", [])
    run = load_run(path, require_monitors=False)
    page = "\n".join(run_lines(run))
    assert "no step logged yet" in page and f"entrotrain report {path}" in page
    assert runs_table([run])[1].split()[2] == "–"  # the step column
    code, out = _status(capsys, str(path), "--json")
    assert code == 0 and json.loads(out)["runs"][0]["values"] == {}


def test_json_stays_valid_with_nan_and_inf_in_the_record(tmp_path: Path, capsys) -> None:
    """A metrics.jsonl written by another tool with NaN / Infinity tokens (json.loads accepts them): ``--json``
    (allow_nan=False) still prints valid JSON, with null for the non-finite numbers."""
    path = _record(tmp_path, "nan", [(0, {"entropy/attn_norm/min": 0.5})])
    with (path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "time": 0, "values": {"entropy/attn_norm/min": NaN, "entropy/attn/collapse_frac": '
                'Infinity}}\n')
    code, out = _status(capsys, str(path), "--json", "--keys", "entropy/*")
    values = json.loads(out)["runs"][0]["values"]
    assert code == 0 and values["entropy/attn_norm/min"]["last"] is None and values["entropy/attn_norm/min"]["min"] == 0.5
    assert values["entropy/attn/collapse_frac"]["last"] is None


def test_rows_without_a_step_and_a_key_logged_only_as_nan(tmp_path: Path) -> None:
    path = _record(tmp_path, "odd", [(None, {"entropy/attn_norm/min": 0.5 - 0.1 * i, "x/only_nan": math.nan})
                                     for i in range(3)])
    run = load_run(path)
    assert "x/only_nan" not in run.scalars  # stored as null, never a number
    page = "\n".join(run_lines(run, keys=["*"]))
    rows = [line.split()[0] for line in page.splitlines()[2:] if line.startswith("  ") and line.split()]
    assert "entropy/attn_norm/min" in rows and "x/only_nan" not in rows  # no table row, only the warning naming it
    assert "x/only_nan (3, first at step 0)" in page


def test_two_records_named_give_the_table_and_one_record_its_page(tmp_path: Path, capsys) -> None:
    a = _record(tmp_path, "a", [(0, {"entropy/attn_norm/min": 0.5})])
    b = _record(tmp_path, "b", [(0, {"entropy/attn_norm/min": 0.4})])
    code, out = _status(capsys, str(a), str(b))
    assert code == 0 and out.splitlines()[0].startswith("run ") and len(out.splitlines()) == 4  # header, a, b, details
    code, out = _status(capsys, str(a))
    assert out.startswith("a — finished")


def test_a_torn_last_line_of_a_live_writer_is_not_a_warning(tmp_path: Path) -> None:
    path = _record(tmp_path, "live", [(0, {"entropy/attn_norm/min": 0.5})], finish=False)  # this process: alive
    with (path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "values": {"entropy/at')
    run = load_run(path)
    assert run.status == "running" and not any("torn" in w for w in run.warnings)
    assert list(run.scalars["entropy/attn_norm/min"][0]) == [0]


def test_follow_stops_when_the_run_it_follows_was_killed(tmp_path: Path, capsys) -> None:
    path = _record(tmp_path, "dead", [(0, {"entropy/attn_norm/min": 0.5})], finish=False)
    meta = json.loads((path / "meta.json").read_text())
    meta["pid"] = 2**22 + 12345  # a pid that does not run: the writer was killed
    meta["pid_start"] = None
    (path / "meta.json").write_text(json.dumps(meta))
    t0 = time.monotonic()
    code, out = _status(capsys, str(path), "--follow", "30", "--check")
    assert time.monotonic() - t0 < 20 and code == 1 and "killed" in out


def test_a_missing_second_path_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    a = _record(tmp_path, "a", [(0, {"entropy/attn_norm/min": 0.5})])
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(a), str(tmp_path / "gone")])
    assert exit_info.value.code == 2 and "gone does not exist" in capsys.readouterr().err


def test_healthy_runs_print_nothing_to_try(tmp_path: Path) -> None:
    """No false alarm for a key logged only at its first step, a representation measure starting at 0, or a
    collapse fraction without attn_norm/min."""
    path = _record(tmp_path, "ok", [
        (0, {"entropy/attn/collapse_frac": 0.0, "entropy/repr/layer/rankme": 0.0, "entropy/policy/mean": 1.0}),
        (50, {"entropy/repr/layer/rankme": 4.0, "entropy/policy/mean": 0.9}),
    ])
    assert diagnose(load_run(path)) == [] and what_to_try(path) == []


# ------------------------------------------------------------------ bugs
def test_a_run_that_went_nan_does_not_look_healthy(tmp_path: Path) -> None:
    rows = [(s, {"entropy/attn_norm/min": 0.8, "entropy/attn/collapse_frac": 0.0, "entropy/attn/nonfinite": 0.0})
            for s in range(5)]
    rows += [(s, {"entropy/attn_norm/min": math.nan, "entropy/attn/collapse_frac": math.nan,
                  "entropy/attn/nonfinite": 256.0}) for s in range(5, 8)]  # what a monitor logs once the model is NaN
    run = load_run(_record(tmp_path, "went_nan", rows))
    page = "\n".join(run_lines(run))
    assert "step 7" in page.splitlines()[0]  # the run logged up to step 7 (the nonfinite counter)
    assert "nonfinite" in page or "non-finite" in page, page


def test_keys_glob_over_sixteen_heads_shows_them_all_or_says_how_many_are_left_out(tmp_path: Path, capsys) -> None:
    path = _record(tmp_path, "heads", [(s, {f"entropy/attn_norm/L0/H{h}": 0.5 for h in range(16)}) for s in range(3)])
    code, out = _status(capsys, str(path), "--keys", "entropy/attn_norm/L0/*")
    shown = [f"H{h}" for h in range(16) if f"entropy/attn_norm/L0/H{h} " in out]
    assert shown == [f"H{h}" for h in range(16)] or "more" in out, out


def test_heads_sharp_from_initialisation_are_not_a_collapse(tmp_path: Path) -> None:
    rows = [(s, {"entropy/attn/collapse_frac": 1 / 3, "entropy/attn_norm/min": 0.02, "entropy/attn_norm/mean": 0.6})
            for s in range(0, 200, 50)]
    assert [r.failure for r in diagnose(load_run(_record(tmp_path, "sharp_init", rows)))] == []


def test_a_fit_with_the_wrong_sign_is_not_read_as_a_ceiling(tmp_path: Path) -> None:
    rows = [(s, {"entropy/policy/mean": 1.14 - 0.01 * s, "entropy/policy/reward_mean": 0.25 - 0.04 * s,
                 "entropy/policy/fit_a": -1.009, "entropy/policy/fit_b": -2.902}) for s in range(3)]
    page = "\n".join(run_lines(load_run(_record(tmp_path, "fit", rows))))
    assert "−-" not in page and "+ -" not in page, page
    assert "ceiling when the entropy is spent b − a = -" not in page, page


def test_json_follow_prints_only_json(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import entrotrain.dashboards.terminal_status as terminal_status

    record = RunRecordLogger(tmp_path, version="live", run_name="live")
    record.log_metrics({"entropy/attn_norm/min": 0.5}, step=0)  # running, in this (live) process
    monkeypatch.setattr(terminal_status.time, "sleep", lambda s: record.finalize("success"))
    code, out = _status(capsys, str(record.run_dir), "--json", "--follow", "1")
    assert code == 0 and "(every" not in out, out
