"""``EntropyCollapseGuard(action="rollback", hold="trainable")``: frozen parameters (a LoRA run's base) are not copied,
only fingerprinted; the rollback equals ``hold="all"``'s bit for bit while they stay frozen, and a "frozen" parameter
that changes is refused (early, at the next observation, or at the rollback, before anything is copied)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.rollback_state import RollbackState
from entrotrain.errors import EntrotrainError
from tests.helpers.training_state import model_state, opt_state, same


class _Lora(nn.Module):
    """A frozen base weight with a trainable low-rank adapter (as PEFT's LoRA), a LayerNorm and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(16, 16)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(2, 16) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(16, 2))
        self.norm = nn.LayerNorm(16)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.norm(self.base(x) + x @ self.lora_a.T @ self.lora_b.T)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 16, generator=g)).pow(2).mean().backward()
        optimizer.step()


def _run(hold: str) -> tuple[dict, list, int]:
    """Train 3 steps, hold, train 3 more, roll back: the state after the rollback and the host bytes held."""
    model = _Lora()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold=hold)
    guard.track(model, [optimizer])
    _train(model, optimizer, 3, seed=1)
    guard.observe(0.9, 3)
    nbytes = guard.held_states.nbytes
    held = model_state(model), opt_state(optimizer)
    _train(model, optimizer, 3, seed=2)
    assert not same(model_state(model), held[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard.fire(guard.observe(0.1, 6), 6, [optimizer])
    assert same(model_state(model), held[0]) and same(opt_state(optimizer), held[1])
    return model_state(model), opt_state(optimizer), nbytes


def test_trainable_holds_the_adapters_only_and_rolls_back_as_all_does() -> None:
    everything, trainable = _run("all"), _run("trainable")
    assert same(everything[0], trainable[0]) and same(everything[1], trainable[1])
    base = 16 * 16 * 4 + 16 * 4  # the frozen Linear's weight and bias, float32
    assert trainable[2] == everything[2] - base


def test_a_frozen_parameter_changed_between_observations_is_refused_at_the_next() -> None:
    model = _Lora()
    state = RollbackState(trainable_only=True)
    assert state.take(model, [], step=10)
    model.base.weight.data.mul_(0.999)  # an EMA target network written through .data: no version bump
    with pytest.raises(EntrotrainError, match=r"\['base.weight'\] have requires_grad=False but changed between "
                                              r"steps 10 and 20.*hold='all'"):
        state.take(model, [], step=20)


def test_a_frozen_parameter_changed_since_the_take_refuses_the_rollback_and_copies_nothing() -> None:
    model = _Lora()
    optimizer = torch.optim.SGD([model.lora_a, model.lora_b], lr=0.1)
    state = RollbackState(trainable_only=True)
    state.take(model, [optimizer], step=10)
    _train(model, optimizer, 2, seed=3)
    model.base.requires_grad_(True)  # unfrozen later, and trained
    with torch.no_grad():
        model.base.bias.add_(0.01)
    before = model_state(model)
    with pytest.raises(EntrotrainError, match=r"cannot roll back to step 10: the parameter\(s\) \['base.bias'\]"):
        state.restore(model, [optimizer])
    assert same(model_state(model), before)


def test_a_frozen_parameter_left_alone_is_not_refused_whatever_its_flag_now() -> None:
    model = _Lora()
    state = RollbackState(trainable_only=True)
    state.take(model, [], step=0)
    model.base.requires_grad_(True)  # unfrozen, not yet changed
    assert state.restore(model, []) == 0
    model.base.requires_grad_(False)
    assert state.take(model, [], step=5)  # same values: no refusal


def test_hold_is_validated() -> None:
    with pytest.raises(EntrotrainError, match="hold.*'all', 'trainable'"):
        EntropyCollapseGuard("k", action="rollback", hold="lora")


def test_frozen_parameters_of_any_dtype_are_fingerprinted() -> None:
    """A quantized base's packed weights (uint8 / int8 parameters, requires_grad=False), bool, complex, float64."""
    model = nn.Module()
    for name, value in (("packed", torch.arange(64, dtype=torch.uint8)), ("q8", torch.arange(-4, 4, dtype=torch.int8)),
                        ("mask", torch.tensor([True, False])), ("c", torch.tensor([1 + 2j, 3 - 1j])),
                        ("d", torch.tensor([1.0, 2.0], dtype=torch.float64))):
        model.register_parameter(name, nn.Parameter(value, requires_grad=False))
    state = RollbackState(trainable_only=True)
    assert state.take(model, [], step=0) and state.nbytes == 0
    model.packed.data[3] = 200  # a packed byte rewritten
    with pytest.raises(EntrotrainError, match=r"\['packed'\] have requires_grad=False but changed"):
        state.take(model, [], step=1)


def test_a_frozen_parameter_holding_a_nan_or_inf_matches_while_unchanged_and_a_change_shows() -> None:
    """A frozen weight holding a NaN (a bad row of a pretrained embedding) read as changed at every observation
    (NaN != NaN) and refused the run; one holding an Inf hid a change of its other entries (inf == inf)."""
    model = _Lora()
    model.base.weight.data[0, 0] = float("nan")
    model.base.bias.data[1] = float("-inf")
    state = RollbackState(trainable_only=True)
    assert state.take(model, [], step=0)
    assert state.take(model, [], step=1)  # unchanged: no refusal (it raised before)
    assert state.restore(model, []) == 1
    model.base.bias.data[2] += 1.0  # a finite entry beside the -inf changed
    with pytest.raises(EntrotrainError, match=r"\['base.bias'\] have requires_grad=False but changed"):
        state.take(model, [], step=2)
    model.base.bias.data[2] -= 1.0
    model.base.weight.data[0, 1] = float("nan")  # one more NaN, the finite sum moved: changed
    with pytest.raises(EntrotrainError, match=r"\['base.weight'\] have requires_grad=False but changed"):
        state.take(model, [], step=3)
    model.base.weight.data[0, 0] = 1.0  # the NaN went away: changed
    model.base.weight.data[0, 1] = 0.0
    with pytest.raises(EntrotrainError, match=r"\['base.weight'\]"):
        state.take(model, [], step=4)


def test_a_state_that_cannot_be_restored_is_passed_over_for_a_newer_one_or_stops() -> None:
    """A layer unfrozen and trained after step 10's state was taken: going further back to it is refused before any
    copy, and the rollback goes to the newest state that holds the layer (step 20); none: it stops, never raises."""
    model = _Lora()
    optimizer = torch.optim.SGD([model.lora_a, model.lora_b], lr=0.1)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable",
                                 rollback_states=3)
    guard.track(model, [optimizer])

    def observe(step: int, value: float) -> str | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reason = guard.observe(value, step)
            return None if reason is None else guard.fire(reason, step, [optimizer])

    observe(0, 0.9)
    observe(10, 0.9)
    model.base.requires_grad_(True)  # unfrozen and trained from here on
    with torch.no_grad():
        model.base.weight.add_(0.5)
    observe(20, 0.9)
    at_20 = model_state(model)
    with torch.no_grad():
        model.base.weight.add_(0.5)
    assert "to step 20 (" in observe(30, 0.1)
    message = observe(40, 0.1)  # the fall came back: further back is step 10, which did not hold base.weight
    assert "to step 20;" in message and "1 older held state(s) could not be restored" in message
    assert "further back" not in message and same(model_state(model), at_20) and not guard.stopping
    fresh = _Lora()
    fresh_optimizer = torch.optim.SGD([fresh.lora_a, fresh.lora_b], lr=0.1)
    guard2 = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable")
    guard2.track(fresh, [fresh_optimizer])
    guard2.observe(0.9, 0)
    with torch.no_grad():
        fresh.base.weight.add_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = guard2.fire(guard2.observe(0.1, 10), 10, [fresh_optimizer])
    assert "Could not roll back: " in message and "Stopping training." in message and guard2.stopping
