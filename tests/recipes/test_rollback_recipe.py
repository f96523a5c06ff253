"""The rollback recipe: the collapse guard rolls the collapsing GPT back to its last good state, at a tenth of the
learning rate, with no human in the loop (``EntropyCollapseGuard(action="rollback")``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entrotrain.callbacks import EntropyCollapseGuard
from tests.helpers.recipes import fit_recipe

# One intra-op thread: small models run several times faster than on the suite's two threads on a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "attention_rollback.yaml"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rollback_recipe_rolls_back_at_the_first_fall(tmp_path):
    # The monitor logs every 25 steps: step 0 is good (normalised min entropy ~1), and by step 25 the recipe's lr 1e-2
    # has taken the least entropic head below 0.2 (0.073 on one thread and on two): one rollback to step 0's state,
    # then lr 1e-3.
    cli = fit_recipe(RECIPE, tmp_path, "--trainer.max_steps=27", "--trainer.enable_progress_bar=false",
                     "--trainer.limit_val_batches=0", logger=False)
    guard = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EntropyCollapseGuard))
    assert guard.action == "rollback" and guard.rollbacks == 1 and guard.last_good_step == 0
    assert [group["lr"] for group in cli.trainer.optimizers[0].param_groups] == pytest.approx([1e-3, 1e-3])
    assert guard.held_states.step is None  # the held state is freed at the end of fit
    events = [json.loads(line) for line in next(tmp_path.rglob("events.jsonl")).read_text().splitlines()]
    rolled = [e for e in events if e["level"] == "rollback"]
    assert len(rolled) == 1 and rolled[0]["step"] == 25
    assert "Rolled back the model and optimizer state to step 0" in rolled[0]["message"]
