"""Review of session 28's rollback, inspect and guard changes: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks import rollback_memory
from entrotrain.callbacks.rollback_memory import state_bytes
from entrotrain.errors import EntrotrainError


def test_a_held_state_that_grows_once_the_ring_is_full_is_checked_against_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # rollback_states=1: the ring is full after the first take; Adam's moments appearing later triple the state
    # (so would a backbone unfrozen by BackboneFinetuning): the module docstring says that growth is checked too.
    model = nn.Linear(100, 100)
    optimizer = torch.optim.Adam(model.parameters())
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)
    guard.track(model, [optimizer])
    weights = state_bytes(model, [optimizer])
    monkeypatch.setattr(rollback_memory, "host_bytes_available", lambda: 2 * weights)
    guard.observe(0.9, 0)  # the weights alone: fits
    model(torch.randn(2, 100)).sum().backward()
    optimizer.step()
    with pytest.raises(EntrotrainError, match=r"would hold 1 state\(s\) of .*rollback_states"):
        guard.observe(0.9, 1)
