"""entrotrain report: regulariser terms ``reg/*`` drawn with ``train/loss`` and listed in the task metrics table.

Synthetic records through RunRecordLogger: a representation-monitor key (so the run is monitor output), ``train/loss``
per step, a negative term ``reg/matrix_entropy`` (−λ·H) and, optionally, a small positive ``reg/tsallis_router``
three orders of magnitude smaller (symmetric-log axis).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from entrotrain.dashboards import report_figures as figs  # noqa: E402
from entrotrain.dashboards.report import build_report, sections_of, write_report  # noqa: E402
from entrotrain.dashboards.report_template import fmt  # noqa: E402
from entrotrain.dashboards.run_reader import RunData, load_run  # noqa: E402
from entrotrain.dashboards.run_record import RunRecordLogger  # noqa: E402
from tests.helpers.report_page import parse_page  # noqa: E402

STEPS = range(0, 60)


def write_reg_run(root: Path, name: str, terms: tuple[str, ...] = ("matrix_entropy",), nan_at: int | None = None) -> Path:
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    for step in STEPS:
        values = {"train/loss": 2.0 - step / 60}
        if "matrix_entropy" in terms:
            values["reg/matrix_entropy"] = -0.1 * (2.0 + step / 30)  # −λ·H, H rising
        if "tsallis_router" in terms:
            values["reg/tsallis_router"] = 1e-4 * (1.0 + step / 60)
        if step == nan_at:
            values["reg/matrix_entropy"] = float("nan")
        logger.log_metrics(values, step=step)
        if step % 10 == 0:
            logger.log_metrics({"entropy/repr/encoder/rankme": 5.0 + step / 10, "val/loss": 1.5 - step / 100}, step=step)
    logger.finalize("success")
    return logger.run_dir


def _task_table_rows(html: str) -> dict[str, list[str]]:
    """metric → its cells, from the task section's first / last / min / max table."""
    section = html[html.index('id="task"') :]
    section = section[: section.index("<h2", 1)] if "<h2" in section[1:] else section
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", section, flags=re.S):
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_terms_drawn_with_the_loss_and_tabled(tmp_path):
    run_dir = write_reg_run(tmp_path, "reg")
    index = build_report([run_dir])
    page = parse_page(index)
    assert "loss_and_regularizers.png" in page.images
    assert (index.parent / "loss_and_regularizers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = index.read_text()
    rows = _task_table_rows(html)
    values = [-0.1 * (2.0 + s / 30) for s in STEPS]
    assert rows["reg/matrix_entropy"] == [fmt(values[0]), fmt(values[-1]), fmt(min(values)), fmt(max(values))]
    assert "train/loss" in rows and "val/loss" in rows
    # the other task curves still get their panel grid, without the loss and the terms drawn above
    assert "section_task.png" in page.images
    assert "symmetric-log" not in html  # one term: a linear axis


def test_symlog_axis_when_terms_differ_by_orders_of_magnitude(tmp_path):
    run = load_run(write_reg_run(tmp_path, "two", terms=("matrix_entropy", "tsallis_router")))
    figure = figs.loss_and_regularizers([run], tmp_path)
    assert "symmetric-log" in figure.caption
    similar = load_run(write_reg_run(tmp_path, "one", terms=("matrix_entropy",)))
    assert "symmetric-log" not in figs.loss_and_regularizers([similar], tmp_path).caption


def test_two_runs_side_by_side_and_a_run_without_terms(tmp_path, attention_run):
    with_terms = write_reg_run(tmp_path, "cure")
    plain = write_reg_run(tmp_path, "plain", terms=())
    page = parse_page(build_report([plain, with_terms], tmp_path / "cmp"))
    assert "loss_and_regularizers.png" in page.images
    rows = _task_table_rows((tmp_path / "cmp" / "index.html").read_text())
    assert rows["reg/matrix_entropy"][:4] == ["–"] * 4  # the plain run logged no term
    # an old record without reg/* keys: the task section renders as before (no loss panel)
    page = parse_page(build_report([attention_run]))
    assert "loss_and_regularizers.png" not in page.images and "section_task.png" in page.images
    assert figs.loss_and_regularizers([load_run(attention_run)], tmp_path) is None


def test_nonfinite_terms_are_gaps(tmp_path):
    run_dir = write_reg_run(tmp_path, "nan", nan_at=30)  # the logger writes no value for a NaN
    run = load_run(run_dir)
    assert 30 not in run.scalars["reg/matrix_entropy"][0].tolist()
    scalars = {k: (s, v.copy()) for k, (s, v) in run.scalars.items()}
    scalars["reg/matrix_entropy"][1][[5, 9]] = [np.inf, np.nan]
    scalars["train/loss"][1][3] = -np.inf
    bad = RunData(path=run.path, meta=dict(run.meta), scalars=scalars)
    figure = figs.loss_and_regularizers([bad], tmp_path)
    assert (tmp_path / figure.file).is_file()
    rows = _task_table_rows(write_report([bad], tmp_path / "out").read_text())
    finite = scalars["reg/matrix_entropy"][1][np.isfinite(scalars["reg/matrix_entropy"][1])]
    assert rows["reg/matrix_entropy"][2:] == [fmt(finite.min()), fmt(finite.max())]


def test_reg_keys_belong_to_the_task_section():
    sections = sections_of(["reg/aem", "train/loss", "entropy/attn/min", "regx/a"])
    assert [s.id for s in sections] == ["attention", "task", "regx"]
    assert sections[1].keys == ["reg/aem", "train/loss"]
