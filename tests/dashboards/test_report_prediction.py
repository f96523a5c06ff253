"""entrotrain report: the prediction-entropy section (PredictionEntropyMonitor's keys).

Run records are synthetic, written through RunRecordLogger the way a PredictionEntropyMonitor run writes them: the
hyperfitting run's held-out entropy falls from 1.92 to 0.08 nats while its held-out NLL rises and greedy distinct-2
rises; the baseline stays put. Every expected number below is recomputed from what the writer logged. The last test
reads the record of a real (tiny) PredictionEntropyMonitor fit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from entrotrain.dashboards import report_figures_prediction as pred_figs  # noqa: E402
from entrotrain.dashboards.report import build_report, sections_of, write_report  # noqa: E402
from entrotrain.dashboards.report_template import fmt  # noqa: E402
from entrotrain.dashboards.run_reader import RunData, load_run  # noqa: E402
from entrotrain.dashboards.run_record import RunRecordLogger  # noqa: E402
from tests.helpers.report_page import parse_page  # noqa: E402

P = "entropy/pred"
STEPS = list(range(0, 201, 20))
POSITIONS = [0, 5, 10, 15]
LENGTH = 16


def probe_mean(step: int, hyperfit: bool) -> float:
    a = step / STEPS[-1]
    return 1.92 + (0.08 - 1.92) * a if hyperfit else 1.92 - 0.1 * a


def profile(step: int, hyperfit: bool) -> np.ndarray:
    """Per-position entropy: early positions (little context) highest, scaled to the probe mean."""
    shape = np.linspace(1.5, 0.5, LENGTH)
    return shape / shape.mean() * probe_mean(step, hyperfit)


def distinct2(step: int, hyperfit: bool) -> float:
    return 0.31 + (0.55 - 0.31) * step / STEPS[-1] if hyperfit else 0.31


def write_pred_run(root: Path, name: str, hyperfit: bool, *, media: bool = True, generation: bool = True,
                   extra: dict[int, dict[str, float]] | None = None, steps: list[int] = STEPS) -> Path:
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    for step in steps:
        h = probe_mean(step, hyperfit)
        prof = profile(step, hyperfit)
        m: dict[str, float] = {}
        for split, mean in (("probe", h), ("train", h * 0.9)):
            m.update({f"{P}/{split}/mean": mean, f"{P}/{split}/p10": 0.5 * mean, f"{P}/{split}/p50": mean,
                      f"{P}/{split}/p90": 1.4 * mean, f"{P}/{split}/top1_prob": 1 - mean / 3,
                      f"{P}/{split}/below_floor_frac": float((prof < 0.5).mean()), f"{P}/{split}/tokens": 64.0})
        m[f"{P}/probe/nll"] = 2.0 + (1.5 * step / STEPS[-1] if hyperfit else -0.2 * step / STEPS[-1])
        m[f"{P}/train/nll"] = 2.0 - 1.9 * step / STEPS[-1]
        m.update({f"{P}/probe/pos/{i}": float(prof[i]) for i in POSITIONS})
        m[f"{P}/nonfinite"] = 0.0
        m.update((extra or {}).get(step, {}))
        logger.log_metrics(m, step=step)
        if generation:
            d2 = distinct2(step, hyperfit)
            logger.log_metrics({f"{P}/gen/distinct_1": d2 * 0.6, f"{P}/gen/distinct_2": d2, f"{P}/gen/distinct_3": min(1.0, d2 * 1.3),
                                f"{P}/gen/ttr": d2 * 0.8, f"{P}/gen/repetition": 1 - d2}, step=step)
        if media:
            logger.log_media(f"{P}/probe/pos_profile", prof, step, kind="values")
    logger.finalize("success")
    return root / "records" / name


def test_prediction_keys_form_their_own_section():
    keys = [f"{P}/probe/mean", f"{P}/probe/pos/3", f"{P}/gen/distinct_2", "entropy/policy/mean", "train/loss"]
    sections = {s.id: s for s in sections_of(keys)}
    assert sections["prediction"].title == "Prediction entropy"
    assert sorted(sections["prediction"].keys) == sorted(keys[:3])
    assert [s.id for s in sections_of(keys)][:2] == ["policy", "prediction"]


def test_single_run_figures_cards_and_findings(tmp_path):
    run_dir = write_pred_run(tmp_path, "hyperfit", hyperfit=True)
    page = parse_page(build_report([run_dir]))
    for png in ("prediction_entropy.png", "prediction_positions_over_time.png", "prediction_generation_diversity.png"):
        assert png in page.images
    first, last = probe_mean(STEPS[0], True), probe_mean(STEPS[-1], True)
    card = page.cards[(f"{P}/probe/mean", "hyperfit")]
    assert float(card["first"]) == pytest.approx(first) and float(card["last"]) == pytest.approx(last)
    card = page.cards[(f"{P}/gen/distinct_2", "hyperfit")]
    assert float(card["first"]) == pytest.approx(distinct2(0, True)) and float(card["last"]) == pytest.approx(distinct2(200, True))
    text = page.joined
    assert f"held-out prediction entropy fell from {fmt(first)} to {fmt(last)} nats (step 0 → 200)" in text
    assert "hyperfitting" in text
    assert f"distinct-2 {fmt(distinct2(0, True))} → {fmt(distinct2(200, True))}" in text
    end = profile(200, True)
    assert f"highest at position 0 ({fmt(end[0])} nats) and lowest at position {LENGTH - 1}" in text
    # the per-position scalars are in the map, not in the generic grid (no ".../pos/#" panel family)
    assert "section_prediction.png" in page.images  # tokens etc. left to the generic grid
    assert "predicted positions held NaN/Inf" not in text  # nonfinite logged as 0 at every step


def test_position_matrix_from_profile_media_and_from_scalars(tmp_path):
    with_media = load_run(write_pred_run(tmp_path, "a", hyperfit=True))
    positions, steps, grid, source = pred_figs.position_matrix(with_media)
    assert source == "profile" and list(positions) == list(range(LENGTH)) and list(steps) == STEPS
    for j, s in enumerate(STEPS):
        np.testing.assert_allclose(grid[:, j], profile(s, True))
    scalars_only = load_run(write_pred_run(tmp_path, "b", hyperfit=True, media=False, steps=[0, 40, 80]))
    positions, steps, grid, source = pred_figs.position_matrix(scalars_only)
    assert source == "scalars" and list(positions) == POSITIONS and list(steps) == [0, 40, 80]
    for j, s in enumerate([0, 40, 80]):
        np.testing.assert_allclose(grid[:, j], profile(s, True)[POSITIONS])


def test_position_matrix_scalars_on_different_steps_leave_gaps(tmp_path):
    extra = {240: {f"{P}/probe/pos/99": 0.7}}
    run = load_run(write_pred_run(tmp_path, "gaps", hyperfit=False, media=False, extra=extra, steps=[0, 20, 240]))
    positions, steps, grid, _ = pred_figs.position_matrix(run)
    assert list(positions) == POSITIONS + [99] and list(steps) == [0, 20, 240]
    assert np.isnan(grid[-1, :2]).all() and grid[-1, 2] == pytest.approx(0.7)


def test_two_runs_side_by_side_and_compared(tmp_path):
    a = write_pred_run(tmp_path, "baseline", hyperfit=False)
    b = write_pred_run(tmp_path, "hyperfit", hyperfit=True, media=False)
    page = parse_page(build_report([a, b]))
    assert "prediction_positions_over_time.png" in page.images
    text = page.joined
    end_a, end_b = probe_mean(200, False), probe_mean(200, True)
    assert f"At the end, {P}/probe/mean is {fmt(end_a)} in baseline and {fmt(end_b)} in hyperfit." in text
    assert f"held-out prediction entropy fell from {fmt(1.92)} to {fmt(end_a)} nats" in text
    assert "baseline: probe entropy per position (every position)" not in text  # titles live in the PNG, not the page
    assert (f"{P}/probe/mean", "baseline") in page.cards and (f"{P}/probe/mean", "hyperfit") in page.cards


def _poisoned(run: RunData, where: dict[str, dict[int, float]]) -> RunData:
    """``run`` with ``where[key][step]`` written into its scalars in memory (the record's writer stores non-finite
    scalars as strings, which its reader drops; a monitor's callback_metrics or another reader may still hold them)."""
    scalars = {k: (s.copy(), v.copy()) for k, (s, v) in run.scalars.items()}
    for key, points in where.items():
        steps, values = scalars[key]
        for step, value in points.items():
            values[int(np.flatnonzero(steps == step)[0])] = value
    return RunData(path=run.path, meta=dict(run.meta), scalars=scalars, hparams=run.hparams, media=run.media)


def test_nonfinite_values_never_break_a_figure_or_a_finding(tmp_path):
    nan, inf = float("nan"), float("inf")
    run = load_run(write_pred_run(tmp_path, "poisoned", hyperfit=True, media=False))
    run = _poisoned(run, {
        f"{P}/probe/mean": {0: nan, 200: inf},
        f"{P}/probe/p90": {0: inf},
        f"{P}/probe/pos/5": {0: nan},
        f"{P}/probe/pos/0": {200: -inf},
        f"{P}/nonfinite": {100: 2.0, 200: 3.0, 40: nan},
        f"{P}/probe/below_floor_frac": {100: nan},
        f"{P}/gen/distinct_2": {0: nan, 200: -inf},
        f"{P}/gen/repetition": {100: inf},
    })
    page = parse_page(write_report([run], tmp_path / "out"))
    for png in ("prediction_entropy.png", "prediction_positions_over_time.png", "prediction_generation_diversity.png"):
        assert png in page.images
    text = page.joined
    first, last = probe_mean(20, True), probe_mean(180, True)  # the first and last finite values
    assert f"held-out prediction entropy fell from {fmt(first)} to {fmt(last)} nats (step 20 → 180)" in text
    assert f"distinct-2 {fmt(distinct2(20, True))} → {fmt(distinct2(180, True))}" in text
    assert "5 predicted positions held NaN/Inf at 2 logging step(s), first at step 100" in text
    findings = [t for t in page.text if t.startswith("Prediction entropy:")]
    assert len(findings) >= 6 and not any(re.search(r"\b(nan|inf)\b", t) for t in findings)
    # the map's last column: position 0 is -inf → grey, so the highest finite position is 5
    _, _, grid, _ = pred_figs.position_matrix(run)
    assert np.isnan(grid[0, -1]) and np.isnan(grid[1, 0])
    assert f"highest at position 5 ({fmt(profile(200, True)[5])} nats)" in text


def test_nonfinite_profile_media_is_grey_and_an_all_nonfinite_map_still_draws(tmp_path):
    logger = RunRecordLogger(tmp_path, name="records", version="sparse", run_name="sparse")
    for step in (0, 10):
        logger.log_metrics({f"{P}/train/mean": 1.0 - step / 20}, step=step)
        logger.log_media(f"{P}/probe/pos_profile", np.array([np.nan, np.inf, -np.inf]), step, kind="values")
    logger.finalize("success")
    run = load_run(tmp_path / "records" / "sparse")
    _, _, grid, source = pred_figs.position_matrix(run)
    assert source == "profile" and grid.shape == (3, 2) and np.isnan(grid).all()
    page = parse_page(build_report([run.path]))
    assert "prediction_entropy.png" in page.images  # train curve only
    assert "prediction_positions_over_time.png" in page.images  # all grey, no colour-scale error
    assert "prediction_generation_diversity.png" not in page.images
    assert "training-batch prediction entropy fell from 1 to 0.5 nats" in page.joined
    assert "highest at position" not in page.joined


def test_a_run_without_prediction_keys_has_no_prediction_section(tmp_path):
    logger = RunRecordLogger(tmp_path, name="records", version="policy", run_name="policy")
    for step in (0, 10, 20):
        logger.log_metrics({"entropy/policy/mean": 1.0 - step / 40, "train/loss": 1.0}, step=step)
    logger.finalize("success")
    page = parse_page(build_report([tmp_path / "records" / "policy"]))
    assert not any(img.startswith("prediction_") for img in page.images)
    assert "Prediction entropy" not in page.joined


def test_one_run_with_and_one_without_prediction_keys(tmp_path):
    a = write_pred_run(tmp_path, "pred", hyperfit=True)
    logger = RunRecordLogger(tmp_path, name="records", version="other", run_name="other")
    for step in (0, 100, 200):
        logger.log_metrics({"entropy/policy/mean": 1.0, "train/loss": 1.0}, step=step)
    logger.finalize("success")
    page = parse_page(build_report([a, tmp_path / "records" / "other"]))
    assert {"prediction_entropy.png", "prediction_positions_over_time.png"} <= set(page.images)


def test_real_prediction_monitor_fit_record(tmp_path):
    """A short real fit: the record the monitor writes gives the section, and the findings quote its numbers."""
    from torch.utils.data import DataLoader

    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from tests.callbacks.pred_ddp_run import MONITOR, SEQ, PredLM, data, probe
    from tests.helpers.lightning_models import quiet_trainer

    L.seed_everything(0)
    logger = RunRecordLogger(tmp_path, name="records", version="real", run_name="real")
    monitor = PredictionEntropyMonitor(probe=probe(), **{**MONITOR, "every_n_steps": 2})
    trainer = quiet_trainer(callbacks=[monitor], max_steps=6, logger=logger, log_every_n_steps=1)
    trainer.fit(PredLM(lr=0.5), DataLoader(data(), batch_size=8))
    run = load_run(tmp_path / "records" / "real")
    steps, values = run.scalars[f"{P}/probe/mean"]
    assert len(steps) == 3
    positions, _, grid, source = pred_figs.position_matrix(run)
    assert source == "profile" and len(positions) == SEQ and np.isfinite(grid).all()
    np.testing.assert_allclose(grid[MONITOR["positions"], :].T,
                               [[row[f"{P}/probe/pos/{i}"] for i in MONITOR["positions"]] for _, row in monitor.history], rtol=1e-6)
    page = parse_page(build_report([run.path]))
    assert {"prediction_entropy.png", "prediction_positions_over_time.png", "prediction_generation_diversity.png"} <= set(page.images)
    text = page.joined
    assert f"from {fmt(float(values[0]))} to {fmt(float(values[-1]))} nats (step {int(steps[0])} → {int(steps[-1])})" in text
    assert math.isfinite(float(page.cards[(f"{P}/probe/mean", "real")]["last"]))


def test_wandb_summaries_of_the_prediction_keys(monkeypatch):
    """Collapse-like prediction keys (high is bad) are summarised by their maximum, the entropies by their minimum."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from entrotrain.dashboards.wandb_media import setup_wandb_dashboard

    logger = WandbLogger(mode="disabled")
    defined: list[tuple[str, dict]] = []
    monkeypatch.setattr(logger.experiment, "define_metric", lambda name, **k: defined.append((name, k)))
    setup_wandb_dashboard([logger])
    options = dict(defined)
    for key in (f"{P}/nonfinite", f"{P}/probe/below_floor_frac", f"{P}/train/below_floor_frac", f"{P}/probe/top1_prob",
                f"{P}/gen/repetition"):
        assert options[key]["summary"] == "max,last", key
    assert options["entropy/*"]["summary"] == "min,last" and f"{P}/probe/mean" not in options


def test_reference_step_from_the_config_gives_the_fine_tuning_change(tmp_path):
    run_dir = write_pred_run(tmp_path, "hf", hyperfit=True)
    (run_dir / "config.yaml").write_text(
        "trainer:\n  callbacks:\n  - class_path: entrotrain.callbacks.attention_monitor.AttentionEntropyMonitor\n"
        "  - class_path: entrotrain.callbacks.prediction_monitor.PredictionEntropyMonitor\n"
        "    init_args:\n      every_n_steps: 20\n      reference_step: 110\n"
    )
    run = load_run(run_dir)
    assert pred_figs.reference_step(run) == 110
    text = parse_page(build_report([run_dir])).joined
    h_ref, nll_ref = probe_mean(100, True), 2.0 + 1.5 * 100 / 200  # the last logged step at or before 110
    assert (f"reference_step 110 (e.g. the end of pre-training) to the end: held-out prediction entropy fell from "
            f"{fmt(h_ref)} to {fmt(probe_mean(200, True))} nats (step 100 → 200) while the held-out NLL rose from "
            f"{fmt(nll_ref)} to {fmt(3.5)}: hyperfitting; greedy distinct-2 {fmt(distinct2(100, True))} → "
            f"{fmt(distinct2(200, True))}.") in text
    (run_dir / "config.yaml").write_text("trainer: [unclosed\n")  # unreadable: no reference sentence, no error
    assert pred_figs.reference_step(load_run(run_dir)) is None
    assert "reference_step" not in parse_page(build_report([run_dir])).joined.split("What happened")[1].split("Configuration")[0]
