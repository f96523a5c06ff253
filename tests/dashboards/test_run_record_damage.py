"""Damaged and unusual run records: each gives a readable status / report with a warning naming what was skipped,
or an EntrotrainError naming the fix (never a raw traceback)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from entrotrain.dashboards.report import build_report, findings, sections_of
from entrotrain.dashboards.report_template import esc
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.dashboards.terminal_status import run_lines, status_main
from entrotrain.errors import EntrotrainError


def _record(root: Path, version: str, steps: range, extra=lambda step: {}) -> Path:
    logger = RunRecordLogger(root, version=version, run_name=version)
    for step in steps:
        logger.log_metrics({"entropy/attn_norm/min": 0.5 - 0.001 * step, "train/loss": 2.0, **extra(step)}, step=step)
    logger.finalize("success")
    return logger.run_dir


def test_values_logged_as_nan_or_inf_are_named_in_a_warning(tmp_path: Path) -> None:
    path = _record(tmp_path, "nan", range(0, 50, 10),
                   lambda step: {"train/loss": math.nan if step == 20 else math.inf if step == 40 else 1.0})
    run = load_run(path)
    assert list(run.scalars["train/loss"][0]) == [0, 10, 30]  # no point at 20 and 40
    said = [w for w in run.warnings if "NaN or Inf" in w]
    assert said and "train/loss (2, first at step 20)" in said[0]


def test_a_key_that_changes_type_mid_run_is_named_and_its_numbers_kept(tmp_path: Path) -> None:
    path = _record(tmp_path, "types", range(0, 30, 10))
    with (path / "metrics.jsonl").open("a") as f:  # another tool's writer: text and a list under numeric keys
        f.write(json.dumps({"step": 30, "values": {"train/loss": "diverged", "entropy/attn_norm/min": [0.1, 0.2],
                                                   "train/flag": True}}) + "\n")
    run = load_run(path)
    assert list(run.scalars["train/loss"][0]) == [0, 10, 20] and "train/flag" not in run.scalars
    said = [w for w in run.warnings if "not numbers" in w]
    assert said and "train/loss (1 str)" in said[0] and "entropy/attn_norm/min (1 list)" in said[0]
    assert "changed type during the run" in said[0] and "train/flag (1 bool)" in said[0]


def test_a_resume_from_an_older_checkpoint_shows_the_final_trajectory_and_says_so(tmp_path: Path) -> None:
    first = RunRecordLogger(tmp_path, version="rewind")
    for step in range(0, 100, 10):
        first.log_metrics({"entropy/attn_norm/min": 0.5}, step=step)
        if step == 40:
            entry = first.checkpoint_entry(step)
    first.finalize("failed")
    resumed = RunRecordLogger(tmp_path, version="other")
    resumed.resume_from_entry(entry, ckpt_path="ckpt/step40.ckpt")
    for step in range(50, 80, 10):
        resumed.log_metrics({"entropy/attn_norm/min": 0.2}, step=step)
    resumed.finalize("success")
    run = load_run(first.run_dir)
    steps, values = run.scalars["entropy/attn_norm/min"]
    assert list(steps) == [0, 10, 20, 30, 40, 50, 60, 70] and list(values[-3:]) == [0.2, 0.2, 0.2]
    said = [w for w in run.notes if "resumed from an earlier checkpoint" in w]
    assert said and "at step 40" in said[0] and "5 logged row(s)" in said[0] and "steps 50–90" in said[0]
    assert "final trajectory" in said[0] and not run.warnings  # not damage: how resuming works
    assert esc(said[0]) in build_report([first.run_dir]).read_text(encoding="utf-8")
    assert any(line == f"  note: {said[0]}" for line in run_lines(run))


def test_a_record_of_a_newer_format_names_the_upgrade(tmp_path: Path, capsys) -> None:
    path = _record(tmp_path, "newer", range(0, 20, 10))
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format": "entrotrain-run-record/2"}))
    with pytest.raises(EntrotrainError, match=r"newer entrotrain .*pip install -U entrotrain"):
        load_run(path)
    assert status_main([str(tmp_path)]) == 0  # a folder of records: the others are listed, this one named
    assert "newer entrotrain" in capsys.readouterr().out
    other = dict(meta, format="something-else/1")
    (path / "meta.json").write_text(json.dumps(other))
    with pytest.raises(EntrotrainError, match="is not an entrotrain run record"):
        load_run(path)


@pytest.mark.parametrize("version", ["ünï-😀", "a/b"])
def test_unicode_and_slash_in_names(tmp_path: Path, version: str) -> None:
    """Any label; a version is one folder name (a '/' nested folders: refused, naming a plain one)."""
    if "/" in version:
        with pytest.raises(EntrotrainError, match="version='a-b'"):
            RunRecordLogger(tmp_path, version=version)
        version = "a-b"
    logger = RunRecordLogger(tmp_path, version=version, run_name="α/β 🚀")
    logger.log_metrics({"entropy/attn_norm/min": 0.5}, step=0)
    logger.finalize("success")
    index = build_report([logger.run_dir])
    assert "α/β 🚀" in index.read_text(encoding="utf-8") and load_run(logger.run_dir).label == "α/β 🚀"


def test_a_head_that_collapsed_for_one_logged_step_and_recovered_is_named(tmp_path: Path) -> None:
    logger = RunRecordLogger(tmp_path, version="blip")
    for step in range(0, 3000, 10):
        blip = step == 1500
        logger.log_metrics({"entropy/attn_norm/L0/H0": 0.8, "entropy/attn_norm/L0/H1": 0.01 if blip else 0.7,
                            "entropy/attn_norm/min": 0.01 if blip else 0.7}, step=step)
    logger.finalize("success")
    run = load_run(logger.run_dir)
    said = findings(run, sections_of(sorted(run.scalars)))
    assert any("recovered: L0H1 (1 logged step(s), first at step 1500)" in line for line in said), said


def test_an_empty_last_file_and_a_torn_line_give_a_report_with_warnings(tmp_path: Path) -> None:
    path = _record(tmp_path, "torn", range(0, 30, 10))
    (path / "events.jsonl").write_text("")
    with (path / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 30, "values": {"entropy/attn_norm/min": 0.4')
    run = load_run(path)
    assert any("torn line" in w for w in run.warnings) and run.last_step == 20
    assert build_report([path]).is_file()
    assert np.isfinite(run.scalars["entropy/attn_norm/min"][1]).all()


def test_two_processes_writing_one_record_are_named(tmp_path: Path) -> None:
    """Two writers on one folder interleave whole lines (no torn line): the curve would silently mix both runs."""
    one, two = RunRecordLogger(tmp_path, version="same"), RunRecordLogger(tmp_path, version="same")
    for step in range(0, 50, 10):
        one.log_metrics({"entropy/attn_norm/min": 0.1}, step=step)
        two.log_metrics({"entropy/attn_norm/min": 0.9}, step=step)
    one.finalize("success")
    two.finalize("success")
    run = load_run(one.run_dir)
    said = [w for w in run.warnings if "Two processes are writing this record" in w]
    assert said and "entropy/attn_norm/min (5, first at step 0)" in said[0]


def test_an_empty_meta_json_gives_a_report_that_says_so(tmp_path: Path) -> None:
    path = _record(tmp_path, "nometa", range(0, 30, 10))
    (path / "meta.json").write_text("")
    run = load_run(path)
    assert run.warnings[0].startswith("meta.json is not valid JSON") and run.last_step == 20
    assert build_report([path]).is_file() and run.status == "unknown"
    (path / "metrics.jsonl").unlink()
    with pytest.raises(EntrotrainError, match="no metrics.jsonl beside it"):
        load_run(path)


def test_an_emptied_metrics_file_of_a_finished_run_is_named_as_truncated(tmp_path: Path, capsys) -> None:
    path = _record(tmp_path, "emptied", range(0, 30, 10))
    (path / "metrics.jsonl").write_text("")
    with pytest.raises(EntrotrainError, match=r"metrics.jsonl is empty \(0 bytes\).*truncated"):
        load_run(path)
    assert status_main([str(path)]) == 0 and "is empty (0 bytes)" in capsys.readouterr().out


def test_numbers_beyond_range_are_no_traceback(tmp_path: Path) -> None:
    """Another tool's writer: a step beyond int64 is no step (warned), an integer value beyond float's range is inf."""
    path = _record(tmp_path, "huge", range(0, 20, 10))
    with (path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 100000000000000000000000000000, "values": {"train/loss": 1.0}}\n')
        f.write('{"step": 30, "values": {"train/loss": 1' + "0" * 400 + ', "entropy/attn_norm/min": 0.4}}\n')
    run = load_run(path)
    assert any("line 3 has no valid step/values" in w for w in run.warnings)
    assert run.scalars["train/loss"][1][-1] == math.inf and run.scalars["entropy/attn_norm/min"][1][-1] == 0.4
    assert build_report([path]).is_file()


@pytest.mark.parametrize("name", ["../outside.bin", "media/../../outside.bin", "ABS", "media\\..\\..\\outside.bin"])
def test_a_media_row_naming_a_file_outside_the_run_folder_is_skipped_not_read(tmp_path: Path, name: str) -> None:
    """media/index.jsonl rows name their file relative to the run's folder; one through '..' (or absolute) read a file
    outside it (a record copied from elsewhere could make the report read any file): now skipped with a warning."""
    path = _record(tmp_path, "v", range(0, 30, 10))
    outside = path.parent / "outside.bin"
    outside.write_bytes(np.arange(4, dtype="<f8").tobytes())
    name = str(outside) if name == "ABS" else name
    (path / "media").mkdir(exist_ok=True)
    row = {"key": "entropy/h", "step": 0, "kind": "values", "file": name, "offset": 0, "shape": [4], "dtype": "<f8"}
    (path / "media" / "index.jsonl").write_text(json.dumps(row) + "\n")
    run = load_run(path)
    assert "entropy/h" not in run.media
    assert any("outside the run's folder" in w for w in run.warnings), run.warnings
