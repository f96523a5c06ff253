"""Smoke tests of the regularised SSL recipes: a few steps through the CLI, the regulariser's terms and the monitor's
keys are logged, and the contrast (first/last values, kNN accuracy) is printed at the end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers.recipes import fit_recipe

# One intra-op thread: small models run several times faster than on the suite's two threads on a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _fit(name: str, tmp_path: Path, *extra: str):
    return fit_recipe(
        ROOT / "recipes" / name, tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1", *extra, logger=False,
    )


def test_entropy_regularised_simsiam_recipe(tmp_path, capsys):
    cli = _fit("ssl_rank_collapse_entropy_reg.yaml", tmp_path)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    assert not cli.model.hparams.stop_gradient
    reg = float(metrics["reg/matrix_entropy"])
    assert -1.0 <= reg < 0.0  # -w·H/ln min(n, d) with w = 1: a normalised entropy in (0, 1]
    assert any(k.startswith("entropy/repr/model.projector/") for k in metrics), sorted(metrics)
    assert "representation entropy (validation" in capsys.readouterr().out


def test_mmcr_recipe(tmp_path, capsys):
    cli = _fit("ssl_mmcr.yaml", tmp_path, "--model.init_args.n_views=3")
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    assert float(metrics["train/loss"]) < 0 and math.isclose(
        float(metrics["train/centroid_nuc"]), -float(metrics["train/loss"]), rel_tol=1e-6
    )
    assert 0.0 <= float(metrics["val/knn_acc"]) <= 1.0
    assert any(k.startswith("entropy/repr/model.projector/") for k in metrics), sorted(metrics)
    out = capsys.readouterr().out
    assert "MMCR kNN accuracy" in out and "representation entropy (validation" in out
