"""The scratch-task GRPO recipes (baseline, PEAR, CANON) run through the CLI for a few rollouts and print contrasts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from entrotrain.tasks.arithmetic import SEPARATOR
from tests.helpers.recipes import fit_recipe

# One intra-op thread: small models run several times faster than on the suite's two threads on a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {name: ROOT / "recipes" / f"{name}.yaml" for name in ("grpo_scratch_baseline", "grpo_pear", "grpo_canon")}

#: Keys each recipe must log besides the policy monitor's phase statistics.
EXTRA_KEYS = {
    "grpo_scratch_baseline": (),
    "grpo_pear": ("grpo/pear/penalty", "grpo/pear/think_length", "grpo/shaped_reward_mean"),
    "grpo_canon": ("grpo/canon/reward_high", "grpo/canon/reward_low", "grpo/canon/adv_abs"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_grpo_shaping_recipe_smoke(name, tmp_path, capsys):
    cli = fit_recipe(
        RECIPES[name], tmp_path,
        "--trainer.max_steps=4",  # 2 rollouts x (2 PPO epochs x 2 mini-batches)
        "--trainer.enable_progress_bar=false", "--model.init_args.sft_steps=5", "--data.init_args.prompts_per_batch=4",
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    for key in ("phase0/length", "phase1/length", "phase0/mean", "entropy_length_corr", "mean", "reward_mean"):
        assert f"entropy/policy/{key}" in metrics, sorted(metrics)
    for key in EXTRA_KEYS[name]:
        assert key in metrics, sorted(metrics)
    out = capsys.readouterr().out
    assert "phase-0 length" in out and "greedy accuracy" in out and "phase0/length" in out  # the contrast


def test_recipes_share_the_task_and_differ_only_in_the_shaping():
    configs = {name: yaml.safe_load(path.read_text()) for name, path in RECIPES.items()}
    base = configs["grpo_scratch_baseline"]
    assert base["data"]["init_args"]["scratch_tokens"] > 0
    for name in ("grpo_pear", "grpo_canon"):
        cfg = configs[name]
        assert cfg["data"] == base["data"] and cfg["trainer"] == base["trainer"]
        args = dict(cfg["model"]["init_args"])
        shaping = args.pop("reward_shaping", None) or args.pop("advantage_estimator")
        assert args == base["model"]["init_args"]
        assert shaping["class_path"].startswith("entrotrain.regularizers.token_shaping.")
    pear = configs["grpo_pear"]["model"]["init_args"]["reward_shaping"]["init_args"]
    assert pear["delimiter_ids"] == [SEPARATOR]  # the PEAR delimiter is the task's separator
