"""``EntropyCollapseGuard(action="rollback")`` on TRL's GRPO: the policy entropy the trainer logs falls below the
guard's threshold, and the policy model and its optimizer go back to the state of the last good logged step
(the RL entropy collapse of Cui et al., cured the way large runs cure a spike). TRL is optional: skipped without it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from entrotrain.callbacks import EntropyCollapseGuard  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from entrotrain.integrations.trl import EntrotrainGRPOTrainer  # noqa: E402
from tests.integrations.test_trl import _model, _train, _trainer  # noqa: E402

KEY = "entropy/policy/mean"


class StateAtLogs(TrainerCallback):
    """The policy's weights and Adam's moments at each step end (before the guard judges at the log), and after each
    log (after the guard acted), with the learning rate."""

    def __init__(self) -> None:
        self.at_step_end: dict[int, dict[str, torch.Tensor]] = {}
        self.after_log: dict[int, tuple[dict[str, torch.Tensor], float]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at_step_end[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if logs and KEY in logs:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.after_log[state.global_step] = (weights, optimizer.param_groups[0]["lr"])


def _entropies(tmp_path, model, steps: int) -> list[float]:
    trainer = _trainer(EntrotrainGRPOTrainer, tmp_path, model=copy.deepcopy(model), max_steps=steps)
    _train(trainer)
    return [row[KEY] for row in trainer.state.log_history if KEY in row]


def test_grpo_policy_rolls_back_when_its_entropy_falls(tmp_path) -> None:
    model, steps = _model(), 6
    values = _entropies(tmp_path / "dry", model, steps)  # the same run without the guard: training is deterministic
    assert len(values) == steps
    # the first logged step whose entropy is below every earlier one: a threshold between fires exactly there
    fall = next((k for k in range(1, steps) if values[k] < min(values[:k])), None)
    assert fall is not None, values
    threshold = (values[fall] + min(values[:fall])) / 2
    trainer = _trainer(EntrotrainGRPOTrainer, tmp_path / "run", model=copy.deepcopy(model), max_steps=steps)
    guard = EntropyCollapseGuard(KEY, threshold=threshold, action="rollback", lr_factor=0.5, keep_last_good=False)
    EntropyTrainerCallback(guards=[guard]).attach(trainer)
    spy = StateAtLogs()
    trainer.add_callback(spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(trainer)
    messages = [str(w.message) for w in caught if "EntropyCollapseGuard at step" in str(w.message)]
    assert guard.rollbacks >= 1 and messages, values
    assert f"Rolled back the model and optimizer state to step {fall}" in messages[0]
    # logged at step fall + 1: the policy is back at the end of step fall (the last good log), lr halved
    weights, lr = spy.after_log[fall + 1]
    assert any(not torch.equal(weights[k], spy.at_step_end[fall + 1][k]) for k in weights)
    assert all(torch.equal(weights[k], spy.at_step_end[fall][k]) for k in weights)
    # the linear schedule's rate for the next step (1e-2 · (steps − s) / steps after s steps), halved
    assert lr == pytest.approx(1e-2 * (steps - fall - 1) / steps * 0.5, rel=1e-12)
    assert guard.held_states.step is None  # freed at the end of training
