"""The report's "What happened" for representation keys names measures that changed, never the sample sizes,
parameters and counters published beside them (``n`` and ``n_streamed`` follow the padded batch shape: two of the
four sentences of a padded HF run were "n: 108 → 96")."""

from __future__ import annotations

from pathlib import Path

from entrotrain.dashboards import RunRecordLogger
from entrotrain.dashboards.report import findings, sections_of
from entrotrain.dashboards.run_reader import load_run


def test_repr_findings_name_measures_not_their_context(tmp_path: Path) -> None:
    logger = RunRecordLogger(tmp_path, name="records", version="hf", run_name="hf")
    for step, (rankme, n) in enumerate([(27.2, 108), (24.8, 40), (22.1, 400)]):
        logger.log_metrics({
            "entropy/repr/model.layers.0/rankme": rankme, "entropy/repr/model.layers.0/n": n,
            "entropy/repr/model.layers.0/n_streamed": n, "entropy/repr/model.layers.0/d": 64 * (step + 1),
            "entropy/repr/model.layers.0/rankme_eps": 1e-7 * 10**step,
            "entropy/repr/model.layers.0/nonfinite": float(step),
        }, step=5 * (step + 1))  # fmt: skip
    logger.finalize("success")
    run = load_run(logger.run_dir)
    lines = [line for line in findings(run, sections_of(sorted(run.scalars))) if line.startswith("Representation:")]
    assert lines == ["Representation: entropy/repr/model.layers.0/rankme: 27.2 → 22.1 (×0.81)"]
