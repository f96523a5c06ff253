"""Findings of the session-26 hunt in the TRL adapters (EntrotrainGRPOTrainer, EntrotrainRLOOTrainer and their shared
PolicyStatsTrainerMixin). Each test failed before its fix.

TRL is an optional extra: the whole module is skipped without it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from trl import GRPOTrainer, RLOOTrainer  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.trl import EntrotrainGRPOTrainer  # noqa: E402
from entrotrain.integrations.trl_rloo import EntrotrainRLOOTrainer  # noqa: E402


class _TRLBuilt(Exception):
    """Raised in place of TRL's trainer __init__: reaching it means TRL started building (model, refs, data)."""


@pytest.mark.parametrize("cls, base", [(EntrotrainGRPOTrainer, GRPOTrainer), (EntrotrainRLOOTrainer, RLOOTrainer)])
@pytest.mark.parametrize(
    "kw, name",
    [
        ({"window_align": "sideways"}, "window_align"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"entropy_length_corr": "yes"}, "entropy_length_corr"),
        ({"stats_prefix": 3}, "stats_prefix"),
    ],
)
def test_bad_statistic_arguments_are_refused_before_trl_builds_anything(monkeypatch, cls, base, kw, name):
    """The mixin promises "a bad statistic argument (naming it), before TRL builds anything". window, window_align
    and entropy_length_corr were checked by the monitor only after TRL's __init__ (model, reference model, data
    loaders built first); stats_prefix was not checked at all (a TypeError at the first logging step)."""

    def refuse(self, *args, **kwargs):
        raise _TRLBuilt

    monkeypatch.setattr(base, "__init__", refuse)
    with pytest.raises(EntrotrainError, match=name):
        cls(model=None, **kw)


def test_hf_callback_monitors_see_only_the_training_forward_under_trl(tmp_path):
    """A representation monitor attached to EntrotrainRLOOTrainer streams the rows of the loss's forward on a logging
    step, as under a plain Trainer (one forward per micro-batch). It streamed about 3x as many (232 rows for one
    80-position micro-batch: 72 from generate, 80 from the rollout log-probs, 80 from the loss)."""
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.integrations.transformers import EntropyTrainerCallback
    from tests.integrations.test_trl import _train, _trainer

    t = _trainer(EntrotrainRLOOTrainer, tmp_path, max_steps=1)
    positions: list[int] = []
    loss = t._compute_loss

    def spy(model, inputs):
        positions.append(inputs["prompt_ids"].numel() + inputs["completion_ids"].numel())
        return loss(model, inputs)

    t._compute_loss = spy
    EntropyTrainerCallback([RepresentationEntropyMonitor(include=["model.layers.1"])]).attach(t)
    _train(t)
    (row,) = [r for r in t.state.log_history if "loss" in r]
    assert row["entropy/repr/model.layers.1/n_streamed"] <= sum(positions)


def test_rloo_reward_mean_is_over_the_rows_the_logged_step_trained_on(tmp_path):
    """The RLOO docstring said ``reward_mean`` "equals TRL's reward". With steps_per_generation=2 one rollout of 16
    completions feeds two optimizer steps of 8: TRL's ``reward`` (step 1 only) averages all 16, while reward_mean
    averages the 8 rows each step trained on (the rows of its entropies), also on step 2, where TRL logs no reward.
    Fix: the docstring states this (the behaviour is the right one for the entropy–reward fit)."""
    import math

    import torch

    from entrotrain.integrations._trl_stats import REWARDS_KEY
    from tests.integrations.test_trl import _train, _trainer

    t = _trainer(EntrotrainRLOOTrainer, tmp_path, max_steps=2, steps_per_generation=2)
    trained: dict[int, list[torch.Tensor]] = {}
    generated: list[torch.Tensor] = []
    loss, rewards = t._compute_loss, t._calculate_rewards

    def spy_loss(model, inputs):
        trained.setdefault(t.state.global_step + 1, []).append(inputs[REWARDS_KEY].clone())
        return loss(model, inputs)

    def spy_rewards(*args, **kwargs):
        out = rewards(*args, **kwargs)
        generated.append(out.clone())
        return out

    t._compute_loss, t._calculate_rewards = spy_loss, spy_rewards
    _train(t)
    rows = {r["step"]: r for r in t.state.log_history if "loss" in r}
    (per_func,) = generated
    assert per_func.shape[0] == 16
    for step in (1, 2):
        want = float(torch.cat(trained[step]).double().nanmean())
        assert rows[step]["entropy/policy/reward_mean"] == pytest.approx(want, rel=1e-12)
    assert rows[1]["reward"] == pytest.approx(float((per_func @ t.reward_weights).nanmean()), rel=1e-6)
    assert "reward" not in rows[2] and math.isfinite(rows[2]["entropy/policy/reward_mean"])
    from entrotrain.integrations import trl_rloo

    assert "equals TRL's ``reward`` when" in trl_rloo.__doc__  # the docstring says so


@pytest.mark.parametrize("cls", [EntrotrainGRPOTrainer, EntrotrainRLOOTrainer])
def test_logging_first_step_logs_the_statistics_under_logging_strategy_no(tmp_path, cls):
    """HF logs step 1 when logging_first_step=True whatever the logging strategy (DefaultFlowCallback.on_step_end);
    the capture rule returned False for logging_strategy="no" before looking at logging_first_step, so that logged
    step had no entropy/policy/* keys."""
    from tests.integrations.test_trl import _train, _trainer

    t = _trainer(cls, tmp_path, max_steps=2, logging_strategy="no", logging_first_step=True)
    _train(t)
    rows = [r for r in t.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [1]
    assert "entropy/policy/mean" in rows[0] and rows[0]["entropy/policy/tokens"] > 0
