"""Under ``transformers.Trainer`` on several ranks, a ``stop`` / ``rollback`` / ``reduce_lr`` guard whose key comes in
a log of the user's own (``Trainer.log`` outside Trainer's training and evaluation logs, which are reduced over
ranks) is warned about once: each rank may judge its own value, and one rank acting alone drifts or hangs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

import entrotrain.integrations.transformers as hf  # noqa: E402
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # noqa: E402


def _said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, world: int, logs: list[dict]) -> list[str]:
    monkeypatch.setattr(hf, "distributed", lambda: (world, 0, None))
    guard = EntropyCollapseGuard(next(iter(logs[0])), threshold=5.0, mode="max", action=action,
                                 keep_last_good=False)
    cb = hf.EntropyTrainerCallback(guards=[guard])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no")
    state, control = TrainerState(), TrainerControl()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, row in enumerate(logs, start=1):
            state.global_step = step
            cb.on_log(args, state, control, logs=dict(row))
    return [str(w.message) for w in caught if "a log of your own" in str(w.message)]


@pytest.mark.parametrize(("action", "world", "warned"), [
    ("stop", 2, True), ("rollback", 2, True), ("reduce_lr", 4, True), ("stop", 1, False), ("warn", 2, False),
])
def test_a_key_of_your_own_log_on_several_ranks_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, world: int, warned: bool
) -> None:
    said = _said(tmp_path, monkeypatch, action, world, [{"aux_loss": 1.0, "epoch": 0.1}, {"aux_loss": 9.0}])
    assert len(said) == (1 if warned else 0)
    if warned:
        assert f"each of the {world} ranks" in said[0] and "self.accelerator.reduce" in said[0]


@pytest.mark.parametrize("logs", [
    [{"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 0.5}],  # Trainer's training log: reduced over ranks
    [{"eval_loss": 1.0, "epoch": 1.0}],  # its evaluation: gathered predictions
])
def test_trainer_s_own_logs_are_not_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[dict]
) -> None:
    assert _said(tmp_path, monkeypatch, "stop", 2, logs) == []
