"""PolicyEntropyMonitor in a hand-written RL loop (EntropyMonitors.record_policy): the statistics of
PolicyStatsRecorder (the monitor's own code) on the same tensors, only at the monitor's steps, guards on its keys,
and a step without tensors publishes nothing (no NaN)."""

from __future__ import annotations

import json

import pytest
import torch

from entrotrain.callbacks import EntropyCollapseGuard, PolicyEntropyMonitor
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.integrations.policy_stats import PolicyStatsRecorder


def _batch(step: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A rollout whose entropy drains with the step; ragged response masks."""
    return {
        "entropy": torch.rand(4, 6, generator=g, dtype=torch.float64) * (2.0 - 0.2 * step),
        "logprobs": -torch.rand(4, 6, generator=g, dtype=torch.float64),
        "advantages": torch.randn(4, generator=g, dtype=torch.float64),
        "mask": torch.rand(4, 6, generator=g) > 0.3,
        "rewards": torch.rand(4, generator=g, dtype=torch.float64),
    }


def test_same_statistics_as_the_recorder_at_the_monitors_steps_only() -> None:
    g = torch.Generator().manual_seed(0)
    monitors = EntropyMonitors([PolicyEntropyMonitor(every_n_batches=3, fit_min_points=2, print_summary=False)])
    reference = PolicyStatsRecorder(fit_min_points=2)
    logged = []
    with monitors.watch(torch.nn.Linear(2, 2)):
        for step in range(9):
            micro = [_batch(step, g), _batch(step, g)]  # two micro-batches: their union is one statistic
            with monitors.step(step):
                for b in micro:
                    monitors.record_policy(b["entropy"], b["logprobs"], b["advantages"], b["mask"], rewards=b["rewards"])
            if step % 3:
                assert monitors.logs == {}
                continue
            for b in micro:
                reference.add(b["entropy"], b["logprobs"], b["advantages"], b["mask"], rewards=b["rewards"])
            want = reference.compute(step)
            assert monitors.logs == want  # same keys, same floats
            logged.append(step)
            last = monitors.logs
    assert logged == [0, 3, 6]
    assert "entropy/policy/fit_ceiling" in last  # the R = -a e^H + b fit over the logged steps
    json.dumps(monitors.state_dict())


def test_guard_on_policy_entropy_and_no_nan_when_nothing_is_handed_over() -> None:
    g = torch.Generator().manual_seed(1)
    guard = EntropyCollapseGuard("entropy/policy/mean", threshold=0.6, action="stop")
    monitors = EntropyMonitors([PolicyEntropyMonitor(print_summary=False)], guards=[guard])
    with monitors.watch(torch.nn.Linear(2, 2)):
        with monitors.step(0):
            b = _batch(0, g)
            monitors.record_policy(b["entropy"], b["logprobs"], b["advantages"], b["mask"])
        assert monitors.logs["entropy/policy/mean"] > 0.6 and not monitors.should_stop
        with monitors.step(1):
            pass  # no rollout this step: no observation, not NaN (a NaN would count as bad for the guard)
        assert monitors.logs == {} and guard.bad_streak == 0
        with pytest.warns(UserWarning, match="fell below 0.6"), monitors.step(2):
            b = _batch(9, g)
            monitors.record_policy(b["entropy"] * 0.1, b["logprobs"], b["advantages"], b["mask"])
        assert monitors.should_stop and monitors.logs["entropy/policy/mean/alert"] == 1.0


def test_record_policy_errors() -> None:
    b = _batch(0, torch.Generator().manual_seed(2))
    args = (b["entropy"], b["logprobs"], b["advantages"], b["mask"])
    monitors = EntropyMonitors([PolicyEntropyMonitor()])
    with monitors.watch(torch.nn.Linear(2, 2)):
        with pytest.raises(EntrotrainError, match="inside a `with monitors.step"):
            monitors.record_policy(*args)
    from entrotrain.callbacks import AttentionEntropyMonitor

    other = EntropyMonitors([AttentionEntropyMonitor()])
    with other.watch(torch.nn.Linear(2, 2)), other.step(1), pytest.raises(EntrotrainError, match="no PolicyEntropyMonitor"):
        other.record_policy(*args)
    with pytest.raises(EntrotrainError, match="entropy must be"):
        with monitors.watch(torch.nn.Linear(2, 2)), monitors.step(0):
            monitors.record_policy(b["entropy"][0], *args[1:])


def test_recorder_refuses_a_step_whose_micro_batches_disagree_on_rewards():
    """rewards= with some micro-batches of a step and not others dropped the rewards of the whole step without a
    word (no reward mean, no fit point); refused, naming the micro-batches."""
    recorder = PolicyStatsRecorder()
    h, lp, adv, m = torch.rand(2, 3), -torch.rand(2, 3), torch.randn(2), torch.ones(2, 3, dtype=torch.bool)
    recorder.add(h, lp, adv, m, rewards=torch.rand(2))
    recorder.add(h, lp, adv, m)
    with pytest.raises(EntrotrainError, match=r"micro-batch\(es\) \[0\] of the step handed rewards=.*\[1\] did not"):
        recorder.compute(0)
    recorder.add(h, lp, adv, m, rewards=torch.tensor([0.25, 0.75]))
    recorder.add(h, lp, adv, m, rewards=torch.tensor([0.5, 0.5]))
    assert recorder.compute(1)["entropy/policy/reward_mean"] == pytest.approx(0.5)
