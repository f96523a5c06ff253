"""The report and ``entrotrain status`` show the fitted ceiling b − a as a headline only when ceiling_verdict shows it;
otherwise "What happened" keeps the number and says why it is not a prediction. Before: a 6-step TRL GRPO run with
a flat entropy (2.633 nats) and rewards in [0, 0.125] read "predicted reward ceiling ... b − a = 127" and had a
"fitted reward ceiling" card."""

from __future__ import annotations

import math
from pathlib import Path

from entrotrain.dashboards import RunRecordLogger
from entrotrain.dashboards.report import findings, headline_keys, sections_of
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.terminal_status import run_lines, runs_table
from entrotrain.functional import fit_entropy_reward

FLAT_H = [2.6332, 2.6337, 2.6327, 2.6330, 2.6335, 2.6331]
FLAT_R = [0.0, 0.0, 0.125, 0.0625, 0.0, 0.125]
CEILING = "entropy/policy/fit_ceiling"


def _record(root: Path, name: str, h: list[float], r: list[float], min_points: int = 5):
    """A run record as PolicyEntropyMonitor(fit_min_points=5) writes it: the fit from the 5th point on."""
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    for i, (hv, rv) in enumerate(zip(h, r)):
        row = {"entropy/policy/mean": hv, "entropy/policy/reward_mean": rv}
        if i + 1 >= min_points:
            fit = fit_entropy_reward(h[: i + 1], r[: i + 1])
            row.update({"entropy/policy/fit_a": fit.a, "entropy/policy/fit_b": fit.b, CEILING: fit.ceiling,
                        "entropy/policy/fit_r2": fit.r2})
        logger.log_metrics(row, step=i + 1)
    logger.finalize("success")
    return load_run(logger.run_dir)


def test_flat_entropy_six_steps_has_no_headline_ceiling_and_says_why(tmp_path: Path) -> None:
    run = _record(tmp_path, "flat", FLAT_H, FLAT_R)
    said = findings(run, sections_of(sorted(run.scalars)))
    line = next(s for s in said if s.startswith("Fitted R"))
    assert "predicted reward ceiling when the entropy is spent" not in line
    assert "is not a predicted reward ceiling" in line and "only 6 fitted steps" in line and "extrapolated" in line
    assert "far outside the observed rewards" in line
    assert CEILING not in headline_keys([run])
    page = "\n".join(run_lines(run))
    assert "is not a predicted reward ceiling" in page and f"  {CEILING} " not in page
    assert "fit_ceiling" not in runs_table([run])[0]


def test_a_good_law_keeps_its_headline_ceiling(tmp_path: Path) -> None:
    h = [1.5 - 0.1 * i for i in range(12)]
    r = [-0.2 * math.exp(v) + 1.0 + 0.003 * (-1) ** i for i, v in enumerate(h)]
    run = _record(tmp_path, "law", h, r)
    said = findings(run, sections_of(sorted(run.scalars)))
    line = next(s for s in said if s.startswith("Fitted R"))
    assert "predicted reward ceiling when the entropy is spent b − a = 0.79" in line, line
    assert CEILING in headline_keys([run])
    assert "fit_ceiling" in runs_table([run])[0]
