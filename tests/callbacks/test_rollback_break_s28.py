"""Breaking the rollback guard's held states (``rollback_states``), averaged weights and ``hold="trainable"``: each
test here failed before its fix.

Each observation's weights are filled with its step, so the weights after a rollback say which state came back."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.errors import EntrotrainError
from tests.helpers.rollback_steps import at_step as _at
from tests.helpers.rollback_steps import observe as _observe
from tests.helpers.rollback_steps import weights_step as _weights_step
from tests.helpers.training_state import model_state, opt_state, same
from tests.helpers.torch_release import needs_torch


def _guard(model: nn.Module, optimizer: torch.optim.Optimizer, k: int, monitor: str = "k") -> EntropyCollapseGuard:
    guard = EntropyCollapseGuard(monitor, threshold=0.5, action="rollback", keep_last_good=False, rollback_states=k,
                                 lr_factor=0.5)
    guard.track(model, [optimizer])
    return guard


def test_a_resumed_guard_does_not_call_its_first_rollback_a_fall_that_came_back() -> None:
    """The count of rollbacks is in the checkpoint, the held states are not: the first rollback after a resume went
    to the newest state but said 'the fall came back ... after the last rollback (to step None)'."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, rollback_states=3)
    guard.load_state_dict({"rollbacks": 1, "armed": True})  # resumed from a run that rolled back once
    guard.track(model, [optimizer])
    _at(model, 100)
    _observe(guard, optimizer, 100, good=True)
    _at(model, 110)
    message = _observe(guard, optimizer, 110, good=False)
    assert message is not None and _weights_step(model) == 100.0
    assert "None" not in message and "came back" not in message and "(rollback 2 of 3;" in message


def test_a_second_guard_never_goes_back_to_a_state_the_first_one_rolled_away_from() -> None:
    """Guard a rolls back to step 0: the state b held at step 10 is of the trajectory a left. b held step 0's state
    as its newest but kept step 10's as an older one, and its next fall went 'further back' to it: forward."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    a, b = _guard(model, optimizer, 3, "a"), _guard(model, optimizer, 2, "b")
    _at(model, 0)
    _observe(a, optimizer, 0, good=True)
    _at(model, 10)
    _observe(b, optimizer, 10, good=True)
    _at(model, 20)
    _observe(a, optimizer, 20, good=False)  # back to step 0
    assert _weights_step(model) == 0.0 and b.held_states.steps == [0]
    _observe(b, optimizer, 20, good=False)  # the fall b sees: back to step 0 (the newest)
    assert _weights_step(model) == 0.0
    message = _observe(b, optimizer, 30, good=False)  # came back: nothing older than step 0 is held
    assert message is not None and _weights_step(model) == 0.0 and "no older state is held" in message


class _Masked(nn.Module):
    """A trainable layer beside a frozen causal mask of -inf (a parameter with requires_grad=False)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3)
        self.mask = nn.Parameter(torch.full((3, 3), float("-inf")).triu(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) + self.mask).softmax(-1)


def test_hold_trainable_takes_a_frozen_mask_of_minus_inf_as_unchanged() -> None:
    """Its fingerprint (sum -inf, norm inf) was 'moved' against itself (inf - inf is nan): the second observation
    raised 'changed between steps' on a mask nothing touched."""
    model = _Masked()
    optimizer = torch.optim.Adam(model.lin.parameters(), lr=0.1)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable",
                                 rollback_states=2)
    guard.track(model, [optimizer])
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))  # 3 positions
    for step in range(4):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
        if step == 1:
            held = model_state(model), opt_state(optimizer)
        if step < 2:
            _observe(guard, optimizer, step, good=True)
    _observe(guard, optimizer, 3, good=False)
    assert same(model_state(model), held[0]) and same(opt_state(optimizer), held[1])


def test_a_state_another_guard_rolled_away_from_is_not_called_not_finite() -> None:
    """Guard b rolled back to step 10: guard a, which judged step 20 good, holds step 10's state instead, and its
    rollback said 'the state after step 20 was not finite, so it was not held'."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    a, b = _guard(model, optimizer, 1, "a"), _guard(model, optimizer, 1, "b")
    _at(model, 10)
    _observe(b, optimizer, 10, good=True)
    _at(model, 20)
    _observe(a, optimizer, 20, good=True)
    _observe(b, optimizer, 20, good=False)  # back to step 10: a holds it
    message = _observe(a, optimizer, 30, good=False)
    assert message is not None and _weights_step(model) == 10.0 and "not finite" not in message


def test_a_state_not_held_because_not_finite_is_still_named() -> None:
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = _guard(model, optimizer, 2)
    _at(model, 10)
    _observe(guard, optimizer, 10, good=True)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    _observe(guard, optimizer, 20, good=True)
    message = _observe(guard, optimizer, 30, good=False)
    assert message is not None and "the state after step 20 was not finite, so it was not held" in message


def test_a_max_drop_guard_judges_after_another_guards_rollback_against_the_values_of_the_state_kept() -> None:
    """Its history kept the value measured on the trajectory the other guard left (4.0 at step 20): the same value
    as before that (1.0) read as a fall of 75 % and rolled back again."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    a = _guard(model, optimizer, 2, "a")
    b = EntropyCollapseGuard("b", threshold=None, max_drop=0.5, drop_window=1, action="rollback",
                             keep_last_good=False, rollback_states=2)
    b.track(model, [optimizer])
    _at(model, 10)
    _observe(a, optimizer, 10, good=True)
    assert b.observe(1.0, 10) is None
    _at(model, 20)
    assert b.observe(4.0, 20) is None
    _observe(a, optimizer, 20, good=False)  # back to step 10
    assert b.held_states.steps == [10] and list(b.history) == [1.0]
    assert b.observe(1.0, 30) is None


def test_a_frozen_parameter_changed_since_the_last_observation_is_refused_there_whatever_rollback_states() -> None:
    """With rollback_states > 1 each take re-uses another held state's buffer and compared the frozen parameters with
    that state's fingerprints, from k observations before or none: an EMA target updated through .data went
    unnoticed until the ring was full, or until a rollback to that state was refused mid-collapse."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)  # a target network, "frozen" but updated through .data
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable",
                                 rollback_states=3)
    guard.track(model, [optimizer])
    _observe(guard, optimizer, 0, good=True)
    with torch.no_grad():
        model[0].weight.data.mul_(0.5)
    with pytest.raises(EntrotrainError, match=r"\['0.weight'\] have requires_grad=False but changed between steps 0 "
                                              r"and 1"):
        _observe(guard, optimizer, 1, good=True)


@settings(max_examples=40, deadline=None)
@given(ks=st.tuples(st.integers(1, 3), st.integers(1, 3)), patience=st.integers(1, 2),
       good=st.lists(st.tuples(st.sampled_from([None, True, False]), st.sampled_from([None, True, False])),
                     min_size=1, max_size=16))
def test_two_guards_on_one_model_only_ever_go_back_along_the_trajectory_kept(
    ks: tuple[int, int], patience: int, good: list[tuple[bool | None, bool | None]]
) -> None:
    """Each step makes new weights (its number) from the current ones; whatever two guards observe (None: nothing),
    every rollback lands on an ancestor of the weights it rolls back from, never on weights another rollback left."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    guards = [EntropyCollapseGuard(name, threshold=0.5, action="rollback", keep_last_good=False, rollback_states=k,
                                   patience=patience, max_rollbacks=100) for name, k in zip("ab", ks)]
    for guard in guards:
        guard.track(model, [optimizer])
    parent: dict[int, int | None] = {}
    current: int | None = None
    warnings.simplefilter("ignore")  # (a value bad from the start warns: the threshold is not armed yet)
    for step, judged in enumerate(good, start=1):
        parent[step], current = current, step
        _at(model, step)
        for guard, ok in zip(guards, judged):
            if ok is not None and _observe(guard, optimizer, step, ok) is not None and not guard.stopping:
                ancestors, node = set(), current
                while node is not None:
                    ancestors.add(node)
                    node = parent[node]
                current = int(_weights_step(model))
                assert current in ancestors


def test_a_fall_that_came_back_with_no_older_state_held_goes_back_to_the_last_target_not_forward() -> None:
    """k = 2: rolled back to step 10, one good observation (step 30) replaced step 0's state; the fall comes back.
    It went to step 30's state, a descendant of step 10's, which fell again, 'the same fall' gone forward."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = _guard(model, optimizer, 2)
    for step, good in ((0, True), (10, True), (20, False), (30, True)):
        _at(model, step)
        _observe(guard, optimizer, step, good)
    assert guard.held_states.steps == [10, 30]
    _at(model, 40)
    message = _observe(guard, optimizer, 40, good=False)
    assert message is not None and _weights_step(model) == 10.0 and guard.held_states.steps == [10]
    assert "to step 10; the fall came back 1 good observation after the last rollback (to step 10)" in message


def test_hold_trainable_holds_an_averaged_copy_of_a_frozen_weight_which_rounding_moves() -> None:
    """An EMA (``AveragedModel``, as Lightning's ``EMAWeightAveraging``) writes every parameter of its copy, frozen
    ones too, and ``decay * ema + (1 - decay) * w`` of a constant ``w`` moves by rounding. Fingerprinted and not held,
    the copy stayed moved after the rollback (and after a few hundred updates was refused as 'changed')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    model[0].requires_grad_(False)
    ema = AveragedModel(model, avg_fn=get_ema_avg_fn(0.999), use_buffers=True)
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.01)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable")
    guard.track(model, [optimizer], averaged=[ema])
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
            ema.update_parameters(model)

    train(2)
    _observe(guard, optimizer, 2, good=True)
    held = model_state(ema)
    train(20)
    assert not torch.equal(ema.module[0].weight, held["module.0.weight"])  # moved by rounding alone
    _observe(guard, optimizer, 22, good=False)
    assert same(model_state(ema), held)


def test_a_fall_back_at_once_says_so_in_words() -> None:
    """It said 'the fall came back 0 good observations after the last rollback'."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = _guard(model, optimizer, 2)
    for step, good in ((0, True), (10, True), (20, False)):
        _at(model, step)
        _observe(guard, optimizer, step, good)
    message = _observe(guard, optimizer, 30, good=False)
    assert message is not None and "0 good" not in message
    assert "the fall came back with no good observation after the last rollback (to step 10)" in message


@needs_torch(2, 6, "torch.distributed.fsdp.fully_shard is public from torch 2.6")
def test_hold_trainable_refuses_frozen_fsdp2_shards_when_training_starts() -> None:
    """It was refused at the first good observation, possibly thousands of steps in."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.helpers.gloo import in_one_process_group

    def body() -> None:
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        model[0].requires_grad_(False)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
        guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", hold="trainable")
        with pytest.raises(EntrotrainError, match="hold='trainable'.*FSDP2.*use hold='all'"):
            guard.track(model, [optimizer])
        EntropyCollapseGuard("k", threshold=0.5, action="rollback").track(model, [optimizer])  # hold='all': fine

    in_one_process_group(body)


def test_another_guards_rollback_ends_a_bad_streak_measured_on_the_weights_it_undid() -> None:
    """Guard b (patience 2) saw one bad value; guard a rolled the model back. b's first bad value after it completed
    the streak with one measured on the weights gone, and rolled back (and cut the rate) a second time."""
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    a = _guard(model, optimizer, 1, "a")
    b = EntropyCollapseGuard("b", threshold=0.5, action="rollback", keep_last_good=False, patience=2, lr_factor=0.5)
    b.track(model, [optimizer])
    _at(model, 0)
    _observe(a, optimizer, 0, good=True)
    _observe(b, optimizer, 0, good=True)
    _at(model, 10)
    _observe(b, optimizer, 10, good=False)  # one bad value: no firing yet
    _observe(a, optimizer, 10, good=False)  # a rolls back to step 0
    assert _observe(b, optimizer, 20, good=False) is None and b.rollbacks == 0
    assert optimizer.param_groups[0]["lr"] == 0.5  # a's cut only
