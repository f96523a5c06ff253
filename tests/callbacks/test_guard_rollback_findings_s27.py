"""Findings (session 27) on the rollback guard's episodes.

A key that went silent fires as *stale* and a rollback guard only warns for it (a silence says nothing about the
model). That firing used to end the episode: when the key came back already collapsed (or NaN), in the same bad
streak, the guard saw a bad value and did nothing — no rollback until a good value re-armed it, i.e. never for a
model that stays collapsed. A firing the guard did not act on no longer uses up the episode.
"""

from __future__ import annotations

import warnings

import torch

from entrotrain.callbacks import EntropyCollapseGuard


def _tracked() -> tuple[EntropyCollapseGuard, torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)
    guard.track(model, [optimizer])
    return guard, model, optimizer


def _silence(guard: EntropyCollapseGuard, optimizer: torch.optim.Optimizer, step: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = guard.check_stale(step)
    assert reason is not None
    assert "Not rolled back" in guard.fire(reason, step, [optimizer])


def test_a_collapse_right_after_a_silence_is_rolled_back() -> None:
    guard, model, optimizer = _tracked()
    guard.observe(0.9, 0)
    held = {k: v.clone() for k, v in model.state_dict().items()}
    guard.observe(0.9, 10)
    with torch.no_grad():
        model.weight.add_(1.0)
    _silence(guard, optimizer, 100)
    reason = guard.observe(0.1, 110)  # the key is back, collapsed: the same bad streak
    assert reason is not None and "fell below 0.5" in reason
    message = guard.fire(reason, 110, [optimizer])
    assert "Rolled back the model and optimizer state to step 10" in message and guard.rollbacks == 1
    assert all(torch.equal(held[k], v) for k, v in model.state_dict().items())


def test_a_nan_right_after_a_silence_is_rolled_back_and_silences_fire_once() -> None:
    guard, model, optimizer = _tracked()
    guard.observe(0.9, 0)
    guard.observe(0.9, 10)
    _silence(guard, optimizer, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert guard.check_stale(200) is None  # a further silence in the same episode: no second firing
    reason = guard.observe(float("nan"), 210)
    assert reason is not None and guard.fire(reason, 210, [optimizer]).count("Rolled back") == 1
    assert guard.rollbacks == 1 and guard.last_level == "rollback"
