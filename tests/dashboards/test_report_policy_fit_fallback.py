"""The report fits ``R = -a·exp(H) + b`` itself only for a run whose monitor published no ``fit_*`` keys, and only
from as many logged steps as ``PolicyEntropyMonitor`` needs (5): a 6-step TRL run (3 logged steps, entropy flat at
2.633) read "Fitted R = −8.51·exp(H) + 118.5: predicted reward ceiling when the entropy is spent b − a = 110" for
rewards in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrotrain.dashboards import RunRecordLogger
from entrotrain.dashboards.report import findings, sections_of
from entrotrain.dashboards.run_reader import load_run


def _policy_lines(root: Path, points: list[tuple[float, float]]) -> list[str]:
    logger = RunRecordLogger(root, name="records", version=f"p{len(points)}", run_name="grpo")
    for i, (h, r) in enumerate(points):
        logger.log_metrics({"entropy/policy/mean": h, "entropy/policy/reward_mean": r}, step=2 * (i + 1))
    logger.finalize("success")
    run = load_run(logger.run_dir)
    return findings(run, sections_of(sorted(run.scalars)))


def test_no_fit_from_fewer_points_than_the_monitor_needs(tmp_path: Path) -> None:
    lines = _policy_lines(tmp_path, [(2.6332, 0.0), (2.6337, 0.0), (2.6327, 0.125)])
    assert not any("Fitted R" in line or "b − a" in line for line in lines)
    assert "Policy entropy went from 2.633 to 2.633 nats (-0 %)." in lines


@pytest.mark.parametrize("n", [5, 8])
def test_fit_from_enough_points(tmp_path: Path, n: int) -> None:
    import math

    points = [(1.5 - 0.2 * i, -0.2 * math.exp(1.5 - 0.2 * i) + 1.0) for i in range(n)]
    lines = _policy_lines(tmp_path, points)
    assert any(line.startswith("Fitted R = −0.2·exp(H) + 1") for line in lines), lines
