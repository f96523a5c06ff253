"""Every recipe runs through the CLI for a few steps; the wandb offline run and the sync hint are produced."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrotrain.cli import main
from tests.helpers.recipes import fit_recipe

ROOT = Path(__file__).resolve().parents[2]
# One intra-op thread: the recipes' small models run several times faster than on the suite's two threads on a
# loaded machine (5 smoke tests: 78 s -> 12 s).
pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

#: Which monitor's keys a recipe must log, by recipe-name prefix (attention recipes otherwise).
MONITOR_PREFIX = {
    "grpo_": "entropy/policy/",
    "ssl_": "entropy/repr/",
    "classifier_": "entropy/repr/",
    "information_plane_": "info/",
    "moe_": "entropy/router/",
    "hyperfitting": "entropy/pred/",
}


def _monitor_prefix(recipe: Path) -> str | None:
    return next((v for k, v in MONITOR_PREFIX.items() if recipe.stem.startswith(k)), None)


def _fit(recipe: Path, tmp_path: Path, *extra: str):
    return fit_recipe(
        recipe, tmp_path, "--trainer.max_steps=3", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=2", *extra,
    )


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"attention_collapse.yaml", "attention_baseline.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke(recipe, tmp_path):
    # a GRPO recipe's supervised warm start runs before RL whatever max_steps is: keep it short in the smoke test
    extra = ("--model.init_args.sft_steps=5",) if recipe.stem.startswith("grpo_") else ()
    cli = _fit(recipe, tmp_path, *extra)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step >= 3  # manual-optimisation tasks (GRPO) may take several optimizer steps a batch
    prefix = _monitor_prefix(recipe)
    if prefix is not None:
        assert any(k.startswith(prefix) for k in metrics), sorted(metrics)
    else:
        assert "entropy/attn_norm/mean" in metrics and 0.0 <= float(metrics["entropy/attn_norm/mean"]) <= 1.0


def test_offline_run_written_and_sync_hint_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    wandb.teardown()  # wandb caches its settings (mode=disabled from earlier tests) process-wide until torn down
    _fit(ROOT / "recipes" / "attention_baseline.yaml", tmp_path)
    runs = [p for p in tmp_path.rglob("offline-run-*") if p.is_dir()]
    assert len(runs) == 1, (list(tmp_path.rglob("*"))[:20], capsys.readouterr())
    assert list(runs[0].glob("run-*.wandb"))
    assert (runs[0] / "files" / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert f"wandb sync {runs[0]}" in out
    assert "attention entropy (normalised, over heads)" in out


def test_recipes_command_lists_recipes(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    assert "attention_collapse " in out and "attention_baseline " in out  # listed by name (--recipe NAME)


def test_recipe_run_writes_a_run_record(tmp_path, capsys):
    import json

    from entrotrain.dashboards.run_reader import load_run

    _fit(ROOT / "recipes" / "attention_collapse.yaml", tmp_path)
    (record,) = (tmp_path / "records").iterdir()
    assert record.name.startswith("attention_collapse-")
    meta = json.loads((record / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["recipe"].endswith("attention_collapse.yaml")
    assert "Attention-entropy collapse" in meta["description"]
    assert "model:" in (record / "config.yaml").read_text()
    run = load_run(record)
    assert "entropy/attn_norm/min" in run.scalars and "lr-AdamW/pg1" in run.scalars  # monitor + Lightning logs
    assert run.media["entropy/attn_norm/heatmap"][0].load().shape == (4, 4)
    assert f"entrotrain report {record}" in capsys.readouterr().out
