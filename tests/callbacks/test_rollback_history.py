"""``EntropyCollapseGuard(action="rollback", rollback_states=k)``: the states of the last k good observations are held,
and a fall that comes back after fewer than k good observations since a rollback goes one held state further back.

Each observation's weights are filled with its step, so the weights after a rollback say which state came back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.rollback_history import RollbackHistory
from entrotrain.errors import EntrotrainError
from tests.helpers.rollback_steps import at_step as _at
from tests.helpers.rollback_steps import observe
from tests.helpers.rollback_steps import weights_step as _weights_step


def _model() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def _guard(k: int, **kwargs) -> tuple[EntropyCollapseGuard, torch.nn.Linear, torch.optim.Optimizer]:
    model, optimizer = _model()
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, rollback_states=k,
                                 lr_factor=0.5, **kwargs)
    guard.track(model, [optimizer])
    return guard, model, optimizer


def _observe(guard: EntropyCollapseGuard, model: torch.nn.Module, optimizer, step: int, good: bool) -> str | None:
    _at(model, step)
    return observe(guard, optimizer, step, good)


def test_the_history_holds_the_newest_k_and_reuses_its_buffers() -> None:
    model, optimizer = _model()
    history = RollbackHistory(size=3)
    for step in range(5):
        _at(model, step)
        assert history.take(model, [optimizer], step, extra=[step])
    assert history.steps == [2, 3, 4]
    buffers = {id(held.state) for held in history._held}
    target = history.pick(further_back=True)  # no rollback yet: the newest
    assert target is not None and target.step == 4 and target.extra == [4]
    history.restore(model, [optimizer], target)
    _at(model, 50)
    history.take(model, [optimizer], 50)
    assert history.steps == [3, 4, 50]
    target = history.pick(further_back=True)  # one older than step 4's state, the last one restored
    assert target is not None and target.step == 3
    assert history.restore(model, [optimizer], target) == 3 and _weights_step(model) == 3.0
    assert history.steps == [3] and history.restored_step == 3
    nbytes = history.nbytes
    for step in (60, 70, 80):  # the dropped states' buffers are taken again: no new host memory
        _at(model, step)
        history.take(model, [optimizer], step)
    assert history.steps == [60, 70, 80] and history.nbytes == nbytes
    assert {id(held.state) for held in history._held} == buffers
    history.clear()
    assert history.step is None and history.nbytes == 0


def test_a_non_finite_state_is_not_held_and_evicts_nothing() -> None:
    model, optimizer = _model()
    history = RollbackHistory(size=2)
    for step in (0, 1):
        _at(model, step)
        history.take(model, [optimizer], step)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert not history.take(model, [optimizer], 2)
    assert history.steps == [0, 1]
    target = history.pick()
    assert target is not None
    history.restore(model, [optimizer], target)
    assert _weights_step(model) == 1.0


def test_a_fall_that_comes_back_goes_one_held_state_further_back_each_time() -> None:
    guard, model, optimizer = _guard(4)
    for step in (0, 10, 20):
        assert _observe(guard, model, optimizer, step, good=True) is None
    message = _observe(guard, model, optimizer, 30, good=False)
    assert "to step 20 (rollback 1 of 3" in message and _weights_step(model) == 20.0
    _observe(guard, model, optimizer, 40, good=True)  # looks recovered, then falls again
    message = _observe(guard, model, optimizer, 50, good=False)
    assert _weights_step(model) == 10.0 and guard.held_states.steps == [0, 10]
    assert ("to step 10, one held state further back: the fall came back 1 good observation after the last rollback "
            "(to step 20) (rollback 2 of 3") in message
    message = _observe(guard, model, optimizer, 60, good=False)
    assert _weights_step(model) == 0.0
    assert "came back with no good observation after the last rollback (to step 10)" in message
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.125)  # each rollback lowers the rate again
    message = _observe(guard, model, optimizer, 70, good=False)
    assert "stopping training" in message and guard.stopping


def test_the_states_held_after_a_rollback_take_the_oldest_ones_places() -> None:
    guard, model, optimizer = _guard(3)
    for step in (0, 10, 20):
        _observe(guard, model, optimizer, step, good=True)
    _observe(guard, model, optimizer, 30, good=False)
    _observe(guard, model, optimizer, 40, good=True)
    assert guard.held_states.steps == [10, 20, 40]  # k states: step 0's went
    _observe(guard, model, optimizer, 50, good=False)
    message = _observe(guard, model, optimizer, 60, good=False)
    assert _weights_step(model) == 10.0
    assert "no older state is held (raise rollback_states to hold older ones)" in message


def test_a_fall_after_k_good_observations_is_a_new_fall_and_goes_to_the_newest() -> None:
    guard, model, optimizer = _guard(2)
    for step in (0, 10):
        _observe(guard, model, optimizer, step, good=True)
    _observe(guard, model, optimizer, 20, good=False)
    for step in (30, 40):
        _observe(guard, model, optimizer, step, good=True)
    message = _observe(guard, model, optimizer, 50, good=False)
    assert _weights_step(model) == 40.0 and "further back" not in message and "came back" not in message


def test_one_held_state_goes_back_to_it_again_and_says_how_to_hold_more() -> None:
    guard, model, optimizer = _guard(1)
    for step in (0, 10):
        _observe(guard, model, optimizer, step, good=True)
    _observe(guard, model, optimizer, 20, good=False)
    message = _observe(guard, model, optimizer, 30, good=False)
    assert _weights_step(model) == 10.0
    assert "no older state is held (raise rollback_states to hold older ones)" in message


def test_the_max_drop_history_comes_back_with_the_state_it_was_held_with() -> None:
    guard, model, optimizer = _guard(3, max_drop=0.5, drop_window=1)
    guard.threshold = None  # judged on the fall only
    for step, value in ((0, 1.0), (10, 0.9), (20, 0.8)):
        _at(model, step)
        assert guard.observe(value, step) is None
    _at(model, 30)
    guard.fire(guard.observe(0.1, 30), 30, [optimizer])
    _at(model, 40)
    guard.observe(0.7, 40)
    _at(model, 50)
    guard.fire(guard.observe(0.05, 50), 50, [optimizer])
    assert _weights_step(model) == 10.0 and list(guard.history) == [1.0, 0.9]


def test_rollback_states_is_validated() -> None:
    with pytest.raises(EntrotrainError, match="rollback_states"):
        EntropyCollapseGuard("k", action="rollback", rollback_states=0)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 4), good=st.lists(st.booleans(), min_size=1, max_size=24))
def test_the_state_that_comes_back_is_the_one_the_rule_names(k: int, good: list[bool]) -> None:
    """Against a plain list model of the rule, on any sequence of good and bad observations."""
    guard, model, optimizer = _guard(k, max_rollbacks=100)
    held: list[tuple[int, int]] = []  # (lineage, step), oldest first
    lineage, restored, since, rollbacks, armed = -1, None, 0, 0, False
    for i, ok in enumerate(good):
        step = 10 * i
        message = _observe(guard, model, optimizer, step, good=ok)
        armed |= ok
        if ok or not armed:  # (arm_on_good: a value bad from the start is where the model starts, not a fall)
            lineage, since = lineage + 1, since + 1
            held = [*held, (lineage, step)][-k:]
            assert message is None
            continue
        came_back = rollbacks > 0 and since < k
        older = [h for h in held if restored is not None and h[0] < restored]
        again = [h for h in held if h[0] == restored]  # with no older one, the last rollback's state again
        target = (older or again or held)[-1] if came_back else held[-1]
        held = held[: held.index(target) + 1]
        lineage = restored = target[0]
        since, rollbacks = 0, rollbacks + 1
        assert _weights_step(model) == float(target[1]), (held, message)
        assert guard.held_states.steps == [s for _, s in held]
