"""Findings (session 28): EntropyCollapseGuard(action="rollback") under ``transformers.Trainer`` with gradient
accumulation: the firing (at the log of a window's end) rolls back to the end of the last good window bit for bit with
no gradient left, and the step after it is logged at the rate it ran at (``learning_rate`` comes from the
scheduler's ``get_last_lr()``, which still gave the rate before the rollback)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback  # noqa: E402

from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.helpers.training_state import same  # noqa: E402
from tests.integrations.test_rollback_glue import AfterLog, ScriptLogs, guard, hf_trainer  # noqa: E402


class RateUsed(TrainerCallback):
    """The learning rate each optimizer step runs at (read at its step begin)."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = optimizer.param_groups[0]["lr"]


def test_hf_rollback_with_gradient_accumulation_and_the_rate_logged_after_it(tmp_path: Path) -> None:
    trainer = hf_trainer(tmp_path, 4, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    script, after, used = ScriptLogs([0.9, 0.9, 0.0, 0.9]), AfterLog(), RateUsed()
    g = guard()
    cb = EntropyTrainerCallback(guards=[g]).attach(trainer)
    handler = trainer.callback_handler.callbacks
    handler.insert(handler.index(cb), script)
    trainer.add_callback(after)
    trainer.add_callback(used)
    with pytest.warns(UserWarning, match="to step 2"):
        trainer.train()
    assert g.rollbacks == 1
    assert same(after.at_log[3][0], script.at_step_end[2][0]) and same(after.at_log[3][1], script.at_step_end[2][1])
    assert all(after.at_log[3][2])  # no gradient of the abandoned window left
    logged = {row["step"]: row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row}
    assert used.rates[4] == pytest.approx(1e-2 * 1 / 4 * 0.5)  # linear decay over 4 steps, halved
    assert logged == pytest.approx(used.rates)
