"""A rollback guard refuses, before copying, to hold more states than the machine's available memory can take (the
OOM killer would end the run without a traceback), counting every process of the machine (``LOCAL_WORLD_SIZE``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks import rollback_memory
from entrotrain.callbacks.rollback_memory import host_bytes_available, state_bytes
from entrotrain.errors import EntrotrainError


def _tracked(states: int, **kwargs) -> tuple[EntropyCollapseGuard, nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(100, 100)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 100)).sum().backward()
    optimizer.step()
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False,
                                 rollback_states=states, **kwargs)
    guard.track(model, [optimizer])
    return guard, model, optimizer


def test_one_state_is_the_model_and_its_moments() -> None:
    guard, model, optimizer = _tracked(1)
    assert state_bytes(model, [optimizer]) == 3 * 10100 * 4 + 2 * 4  # weights, exp_avg, exp_avg_sq; two steps
    guard.observe(0.9, 0)
    assert guard.held_states.nbytes == state_bytes(model, [optimizer])
    available = host_bytes_available()
    assert available is None or available > 0


def test_states_the_machine_cannot_take_are_refused_before_any_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    guard, model, optimizer = _tracked(3)
    one = state_bytes(model, [optimizer])
    monkeypatch.setattr(rollback_memory, "host_bytes_available", lambda: int(2.5 * one))
    with pytest.raises(EntrotrainError, match=r"would hold 3 state\(s\) of 118.4 KiB .*\(1 process\(es\)\)"
                                              r".*rollback_states.*hold='trainable'"):
        guard.observe(0.9, 0)
    assert guard.held_states.nbytes == 0


def test_every_process_of_the_machine_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    guard, model, optimizer = _tracked(1)
    one = state_bytes(model, [optimizer])
    monkeypatch.setattr(rollback_memory, "host_bytes_available", lambda: 2 * one)
    guard.observe(0.9, 0)  # one process: fits
    guard2, model2, optimizer2 = _tracked(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(EntrotrainError, match=r"4 process\(es\)"):
        guard2.observe(0.9, 0)


def test_trainable_only_counts_what_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    guard, model, optimizer = _tracked(2, hold="trainable")
    model.bias.requires_grad_(False)
    monkeypatch.setattr(rollback_memory, "host_bytes_available", lambda: 10**9)
    assert state_bytes(model, [optimizer], trainable_only=True) == state_bytes(model, [optimizer]) - 100 * 4


def test_a_lightning_trainer_counts_its_devices_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    guard, model, optimizer = _tracked(1)
    one = state_bytes(model, [optimizer])
    monkeypatch.setattr(rollback_memory, "host_bytes_available", lambda: 2 * one)
    guard.held_states.processes = 3  # what on_train_start sets from trainer.num_devices (DDP, 3 devices)
    with pytest.raises(EntrotrainError, match=r"3 process\(es\)"):
        guard.observe(0.9, 0)
