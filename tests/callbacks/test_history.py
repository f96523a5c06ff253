"""ThinnedHistory: what monitors keep per logging step stays bounded however long the run."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from entrotrain.callbacks._history import ThinnedHistory
from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor


@given(n=st.integers(0, 5000), capacity=st.integers(2, 64))
def test_bounded_spans_the_run_and_keeps_first_and_newest(n, capacity):
    history = ThinnedHistory(capacity=capacity)
    steps = ThinnedHistory(capacity=capacity)
    for i in range(n):
        history.append(("row", i))
        steps.append(i)
        assert len(history) <= capacity
    assert [i for _, i in history] == list(steps)  # appended in lockstep, thinned identically
    assert list(steps) == sorted(set(steps))
    if n:
        assert steps[0] == 0 and steps[-1] == n - 1
    if n <= capacity:
        assert list(steps) == list(range(n))  # nothing dropped until full


def test_restoring_a_long_history_thins_it_and_it_compares_as_a_list():
    restored = ThinnedHistory(range(10), capacity=4)
    assert len(restored) <= 4 and restored[0] == 0 and restored[-1] == 9
    assert ThinnedHistory([1, 2]) == [1, 2]
    with pytest.raises(ValueError):
        ThinnedHistory(capacity=1)


def test_monitors_keep_bounded_histories():
    attention = AttentionEntropyMonitor()
    representation = RepresentationEntropyMonitor(include=["x"])
    assert isinstance(attention._history, ThinnedHistory) and isinstance(attention._history_steps, ThinnedHistory)
    assert isinstance(representation.history, ThinnedHistory)
    attention.load_state_dict({"site_names": [], "history": [[[0.5]]] * 3000, "history_steps": list(range(3000))})
    assert len(attention._history) == len(attention._history_steps) <= 1024
