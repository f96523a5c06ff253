"""What a rollback guard says and records: the rate it goes on at, why it went further back than the last good step,
``stop`` (not ``rollback``) as the level of a firing that stopped, and no rollback for a key that went silent."""

from __future__ import annotations

import warnings

import pytest
import torch

from entrotrain.callbacks import EntropyCollapseGuard


def _tracked(**kwargs) -> tuple[EntropyCollapseGuard, torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, **kwargs)
    guard.track(model, [optimizer])
    return guard, model, optimizer


def test_the_message_gives_the_rate_it_goes_on_at_and_the_level_is_rollback() -> None:
    guard, model, optimizer = _tracked(lr_factor=0.1)
    assert guard.observe(0.9, 0) is None
    reason = guard.observe(0.1, 10)
    message = guard.fire(reason, 10, [optimizer])
    assert "Rolled back the model and optimizer state to step 0" in message
    assert message.endswith("learning rates multiplied by 0.1, now 0.01.") and guard.last_level == "rollback"
    assert not guard.stopping and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_rollback_guard_that_stops_records_stop() -> None:
    guard, model, optimizer = _tracked(max_rollbacks=1)
    guard.observe(0.9, 0)
    guard.fire(guard.observe(0.1, 10), 10, [optimizer])
    guard.observe(0.9, 20)
    message = guard.fire(guard.observe(0.1, 30), 30, [optimizer])
    assert "stopping training" in message and guard.stopping and guard.last_level == "stop"


def test_a_state_gone_non_finite_is_not_held_and_the_message_says_why() -> None:
    guard, model, optimizer = _tracked()
    guard.observe(0.9, 0)
    held = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(float("nan"))  # the update after the good observation of step 10 went NaN
    guard.observe(0.9, 10)
    message = guard.fire(guard.observe(float("nan"), 20), 20, [optimizer])
    assert "to step 0 (" in message and "the state after step 10 was not finite, so it was not held" in message
    assert all(torch.equal(held[k], v) for k, v in model.state_dict().items())


def test_a_silent_key_is_warned_about_not_rolled_back() -> None:
    guard, model, optimizer = _tracked()
    guard.observe(0.9, 0)
    with torch.no_grad():
        model.weight.add_(1.0)
    guard.observe(0.9, 10)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = guard.check_stale(100)  # stale after 3 × 10 steps
    assert reason is not None and "was not published for 90 steps" in reason
    message = guard.fire(reason, 100, [optimizer])
    assert "Not rolled back" in message and guard.last_level == "warn" and guard.rollbacks == 0
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 0.1
    # a value that falls afterwards is a new episode once a good one came: it rolls back as usual
    guard.observe(0.9, 110)
    assert "Rolled back" in guard.fire(guard.observe(0.1, 120), 120, [optimizer]) and guard.rollbacks == 1


def test_a_value_next_to_the_threshold_is_printed_with_the_digits_that_tell_them_apart() -> None:
    guard = EntropyCollapseGuard("k", threshold=1.0, keep_last_good=False)
    guard.observe(1.00004, 0)
    reason = guard.observe(0.99996, 1)
    assert reason == "k = 0.99996 fell below 1.0 (last good: 1.00004 at step 0)"  # was "= 1 fell below 1.0"
    far = EntropyCollapseGuard("k", threshold=0.05, keep_last_good=False)
    far.observe(0.0749612, 0)
    assert far.observe(0.0122234, 1) == "k = 0.01222 fell below 0.05 (last good: 0.07496 at step 0)"


def test_a_rate_held_at_min_lr_is_said_so() -> None:
    guard, model, optimizer = _tracked(lr_factor=0.5, min_lr=0.08)
    guard.observe(0.9, 0)
    message = guard.fire(guard.observe(0.1, 10), 10, [optimizer])
    # (it read "multiplied by 0.5, now 0.08")
    assert message.endswith("learning rates multiplied by 0.5 (held at min_lr=0.08), now 0.08.")
    guard.observe(0.9, 20)
    optimizer.param_groups[0]["lr"] = 1.0
    assert guard.fire(guard.observe(0.1, 30), 30, [optimizer]).endswith("multiplied by 0.5, now 0.5.")


def test_a_rollback_further_back_names_the_checkpoint_of_the_state_it_went_back_to() -> None:
    guard, model, optimizer = _tracked(rollback_states=3)
    checkpoints = [f"ckpts/step={s}.ckpt" for s in (10, 20, 35, 45)]
    guard.observe(0.9, 10)
    guard.observe(0.8, 20)
    message = guard.fire(guard.observe(0.1, 30), 30, [optimizer], checkpoints=checkpoints)
    assert "to step 20" in message and message.endswith("Newest checkpoint at or before step 20: ckpts/step=20.ckpt.")
    guard.observe(0.7, 40)  # one good observation on the trajectory from step 20's state, then the fall comes back
    message = guard.fire(guard.observe(0.1, 50), 50, [optimizer], checkpoints=checkpoints)
    assert "(last good: 0.7 at step 40)" in message and "to step 10, one held state further back" in message
    # step 45's checkpoint descends from the state that fell again: the hint names the state the model is now
    assert message.endswith("Newest checkpoint at or before step 10: ckpts/step=10.ckpt.")
    assert (guard.last_good_step, guard.last_good_value) == (10, 0.9)
    message = guard.fire(guard.observe(0.1, 60), 60, [optimizer])
    assert "(last good: 0.9 at step 10)" in message
