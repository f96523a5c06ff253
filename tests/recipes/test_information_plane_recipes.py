"""The two information-plane recipes run through the CLI for a few steps, log the monitor's keys for every layer and
estimator, and print the per-layer summary."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers.recipes import fit_recipe
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [ROOT / "recipes" / f"information_plane_{a}.yaml" for a in ("tanh", "relu")]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_information_plane_recipe_smoke(recipe, tmp_path, capsys):
    cli = fit_recipe(recipe, tmp_path, "--trainer.max_steps=3")
    trainer, monitor = cli.trainer, next(
        c for c in cli.trainer.callbacks if type(c).__name__ == "InformationPlaneMonitor"
    )
    assert trainer.global_step == 3
    assert cli.model.hparams.activation == recipe.stem.rsplit("_", 1)[1]
    metrics = trainer.callback_metrics
    for layer in range(1, 7):
        for est in monitor.estimators:
            for key in ("I_XT", "I_TY"):
                value = float(metrics[f"info/L{layer}/{est}/{key}"])
                assert math.isfinite(value) and 0.0 <= value <= 12.0 + 1e-9
    assert float(metrics["info/nonfinite"]) == 0.0
    assert len(monitor._probe_data[0]) == 4096
    out = capsys.readouterr().out
    assert "information plane (bits; 1 evaluations kept" in out and "L6=model.output.1" in out
