"""The two MoE router recipes run through the CLI for a few steps: the monitor reads the task's router logits, the
Tsallis recipe logs its loss parts, the contrast table is printed, and the pair differ only by the regulariser."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.recipes import fit_recipe

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
COLLAPSE, TSALLIS = ROOT / "recipes" / "moe_router_collapse.yaml", ROOT / "recipes" / "moe_router_tsallis.yaml"


def _fit(recipe: Path, tmp_path: Path):
    return fit_recipe(
        recipe, tmp_path,
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.init_args.every_n_steps=2",
    )


def test_recipes_differ_only_by_the_router_loss():
    a, b = yaml.safe_load(COLLAPSE.read_text()), yaml.safe_load(TSALLIS.read_text())
    regs = b["model"]["init_args"].pop("regularizers")
    assert a == b
    assert [r["class_path"] for r in regs] == ["entrotrain.regularizers.router_loss.TsallisRouterLoss"]


@pytest.mark.parametrize("recipe", [COLLAPSE, TSALLIS], ids=lambda p: p.stem)
def test_moe_recipe_smoke(recipe, tmp_path, capsys):
    cli = _fit(recipe, tmp_path)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    for key in ("entropy/router/L0/load_entropy_norm", "entropy/router/L1/dead_frac", "val/router/L1/dead", "val/acc"):
        assert key in metrics, sorted(metrics)
    assert ("reg/tsallis_router/balance" in metrics) == (recipe == TSALLIS)
    out = capsys.readouterr().out
    assert "MoE router on the validation digits" in out and "last  step     4" in out
    assert "router entropy (2 MoE layers)" in out  # the monitor's own first/last table
