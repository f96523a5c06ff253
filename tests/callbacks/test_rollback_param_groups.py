"""The optimizer state kept in param groups rolls back (:mod:`entrotrain.callbacks.rollback_groups`): Prodigy's
step-size estimate and the schedule-free optimizers' counters and weight sums. Property: a guard rolling back from
step s' to step s leaves the weights, the per-parameter state and the group state of the run at step s (bit for bit),
and the steps after it are those of a run resumed from a deep copy of (model, optimizer) at step s with the same rate
change. The schedulers' and the guard's rate entries, and schedule-free's ``train_mode``, are not rolled back."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.rollback_state import RollbackState
from entrotrain.errors import EntrotrainError

try:  # (in the dev extra; the stand-in tests below show the rule without them)
    import prodigyopt
    import schedulefree
except ImportError:  # pragma: no cover
    prodigyopt = schedulefree = None
needs_packages = pytest.mark.skipif(schedulefree is None or prodigyopt is None, reason="needs prodigyopt, schedulefree")

REAL = {} if schedulefree is None or prodigyopt is None else {
    "prodigy": lambda ps: prodigyopt.Prodigy(ps, lr=1.0, d0=1e-3),
    "prodigy_bias_correction": lambda ps: prodigyopt.Prodigy(ps, lr=1.0, d0=1e-3, use_bias_correction=True),
    "adamw_schedulefree": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2, warmup_steps=3),
    "sgd_schedulefree": lambda ps: schedulefree.SGDScheduleFree(ps, lr=1e-2, warmup_steps=2),
    "radam_schedulefree": lambda ps: schedulefree.RAdamScheduleFree(ps, lr=1e-2),
    # its train_mode is an attribute of the wrapper, its k / weight_sum / lr_max in the base optimizer's groups
    "schedulefree_wrapper": lambda ps: schedulefree.ScheduleFreeWrapper(torch.optim.SGD(ps, lr=0.05), momentum=0.9),
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def _step(model: nn.Module, optimizer: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    optimizer.zero_grad(set_to_none=True)
    x, y = batch
    (model(x) - y).pow(2).mean().backward()
    optimizer.step()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _assert_same_run(model: nn.Module, optimizer: Any, ref_model: nn.Module, ref_optimizer: Any) -> None:
    """Weights, per-parameter state (by position) and every group entry but ``params``: bit for bit."""
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref_model.state_dict()[key]), key
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ref_params = [p for g in ref_optimizer.param_groups for p in g["params"]]
    for p, q in zip(params, ref_params):
        state, ref = optimizer.state.get(p, {}), ref_optimizer.state.get(q, {})
        assert state.keys() == ref.keys()
        assert all(_same(state[k], ref[k]) for k in state), [k for k in state if not _same(state[k], ref[k])]
    for group, ref in zip(optimizer.param_groups, ref_optimizer.param_groups, strict=True):
        assert group.keys() == ref.keys()
        differ = [k for k in group if k != "params" and not _same(group[k], ref[k])]
        assert not differ, {k: (group[k], ref[k]) for k in differ}


def _guard(model: nn.Module, optimizer: Any, lr_factor: float = 0.5) -> EntropyCollapseGuard:
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", lr_factor=lr_factor, keep_last_good=False)
    guard.track(model, [optimizer])
    return guard


@needs_packages
@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(REAL) or ["prodigy"]), s=st.integers(1, 4), gap=st.integers(1, 3),
       after=st.integers(1, 3))
def test_a_rollback_is_the_run_resumed_from_the_held_step(kind: str, s: int, gap: int, after: int) -> None:
    model = _mlp()
    optimizer = REAL[kind](model.parameters())
    if hasattr(optimizer, "train"):
        optimizer.train()
    guard = _guard(model, optimizer)
    data = _batches(s + gap + after)
    for step in range(1, s + 1):
        _step(model, optimizer, data[step - 1])
        assert guard.observe(1.0, step) is None  # good: held
    ref_model, ref_optimizer = copy.deepcopy((model, optimizer))
    for step in range(s + 1, s + gap + 1):
        _step(model, optimizer, data[step - 1])
    reason = guard.observe(0.0, s + gap)
    message = guard.fire(reason, s + gap, [optimizer])
    assert f"to step {s}" in message
    for group in ref_optimizer.param_groups:  # the same rate change, on the run resumed from step s
        group["lr"] *= 0.5
    _assert_same_run(model, optimizer, ref_model, ref_optimizer)
    for batch in data[s + gap:]:
        _step(model, optimizer, batch)
        _step(ref_model, ref_optimizer, batch)
    _assert_same_run(model, optimizer, ref_model, ref_optimizer)


@needs_packages
def test_prodigy_and_schedule_free_group_state_goes_back() -> None:
    """The entries named in the module docstring are the ones that move, and they go back."""
    for kind, keys in (("prodigy", {"d", "d_max", "d_numerator", "k"}),
                       ("adamw_schedulefree", {"k", "weight_sum", "lr_max", "scheduled_lr"})):
        model = _mlp()
        optimizer = REAL[kind](model.parameters())
        if hasattr(optimizer, "train"):
            optimizer.train()
        data = _batches(6)
        for batch in data[:2]:
            _step(model, optimizer, batch)
        held = RollbackState()
        held.take(model, [optimizer], step=2)
        before = {k: optimizer.param_groups[0][k] for k in keys}
        for batch in data[2:]:
            _step(model, optimizer, batch)
        assert all(optimizer.param_groups[0][k] != before[k] for k in keys - {"lr_max"}), kind
        held.restore(model, [optimizer])
        assert {k: optimizer.param_groups[0][k] for k in keys} == before, kind


@needs_packages
@pytest.mark.parametrize("kind", ["adamw_schedulefree", "schedulefree_wrapper"])
@pytest.mark.parametrize("taken_in, rolled_back_in", [("eval", "train"), ("train", "eval")])
def test_schedule_free_taken_in_one_mode_and_rolled_back_in_the_other(kind: str, taken_in: str,
                                                                      rolled_back_in: str) -> None:
    """``optimizer.eval()`` around validation (the Lightning pattern): the parameters hold ``x`` there, ``y`` in train
    mode. The state comes back in the mode the loop is in now, as the run resumed from the held step would hold it
    after the same switch."""
    model = _mlp()
    optimizer = REAL[kind](model.parameters())
    optimizer.train()
    guard = _guard(model, optimizer)
    data = _batches(8)
    for step in range(1, 4):
        _step(model, optimizer, data[step - 1])
    getattr(optimizer, taken_in)()
    assert guard.observe(1.0, 3) is None
    ref_model, ref_optimizer = copy.deepcopy((model, optimizer))
    optimizer.train()
    for step in range(4, 6):
        _step(model, optimizer, data[step - 1])
    getattr(optimizer, rolled_back_in)()
    guard.fire(guard.observe(0.0, 5), 5, [optimizer])
    getattr(ref_optimizer, rolled_back_in)()  # the resumed run switches as the loop did
    for group in ref_optimizer.param_groups:
        group["lr"] *= 0.5
    assert optimizer.param_groups[0].get("train_mode", getattr(optimizer, "train_mode", None)) is (
        rolled_back_in == "train")
    _assert_same_run(model, optimizer, ref_model, ref_optimizer)
    optimizer.train()
    ref_optimizer.train()
    for batch in data[5:]:
        _step(model, optimizer, batch)
        _step(ref_model, ref_optimizer, batch)
    _assert_same_run(model, optimizer, ref_model, ref_optimizer)


# ---------------------------------------------------------------------- the rule, without the packages
class _Counting(torch.optim.Optimizer):
    """A stand-in for Prodigy / schedule-free: a step count ``k``, a running ``scale`` and a tensor ``acc`` kept in
    each param group, which the step reads (``momentum``: for OneCycleLR to cycle)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        defaults = dict(lr=lr, momentum=0.9, k=0, scale=1.0, acc=torch.zeros(()), flag=True, note="kept")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            group["k"] += 1
            group["scale"] *= 0.9
            group["acc"] = group["acc"] + sum(p.grad.square().sum() for p in group["params"] if p.grad is not None)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["scale"] / (1 + group["acc"].item()))


def test_group_state_goes_back_and_what_the_guard_and_schedulers_own_does_not() -> None:
    model = _mlp()
    optimizer = _Counting(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=20)  # + momentum: cycles
    guard = _guard(model, optimizer)
    data = _batches(6)
    for step in range(1, 3):
        _step(model, optimizer, data[step - 1])
        scheduler.step()
        guard.observe(1.0, step)
    held = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    for step in range(3, 6):
        _step(model, optimizer, data[step - 1])
        scheduler.step()
    optimizer.param_groups[0]["flag"], optimizer.param_groups[0]["note"] = False, "changed"
    owned = {k: optimizer.param_groups[0][k] for k in ("lr", "initial_lr", "max_lr", "min_lr", "momentum")}
    guard.fire(guard.observe(0.0, 5), 5, [optimizer], [scheduler])
    group = optimizer.param_groups[0]
    assert (group["k"], group["scale"], group["acc"]) == (held["k"], held["scale"], held["acc"])
    assert group["lr"] == owned["lr"] * 0.5 and group["max_lr"] == owned["max_lr"] * 0.5  # lowered, not rolled back
    assert group["initial_lr"] == owned["initial_lr"] * 0.5 and group["min_lr"] == owned["min_lr"] * 0.5
    assert group["momentum"] == owned["momentum"]  # the scheduler's position goes on
    assert (group["flag"], group["note"]) == (False, "changed")  # flags and strings: configuration, left


def test_an_entry_that_appeared_since_is_removed() -> None:
    model = _mlp()
    optimizer = _Counting(model.parameters())
    held = RollbackState()
    held.take(model, [optimizer], step=0)
    optimizer.param_groups[0]["d_hat"] = 0.3  # as Prodigy adds its own at its first step
    held.restore(model, [optimizer])
    assert "d_hat" not in optimizer.param_groups[0]


def test_a_group_added_since_is_left_and_a_group_gone_is_refused_before_any_copy() -> None:
    model = _mlp()
    extra = nn.Parameter(torch.ones(3))
    optimizer = _Counting(list(model[0].parameters()))
    optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    data = _batches(4)
    _step(model, optimizer, data[0])
    held = RollbackState()
    held.take(model, [optimizer], step=1)
    optimizer.add_param_group({"params": [extra], "lr": 0.01})
    _step(model, optimizer, data[1])
    new_group = {k: v for k, v in optimizer.param_groups[2].items() if k != "params"}
    held.restore(model, [optimizer])
    assert [g["k"] for g in optimizer.param_groups] == [1, 1, 1]
    assert optimizer.param_groups[2]["acc"] is new_group["acc"]  # the added group: as it is

    _step(model, optimizer, data[2])
    del optimizer.param_groups[1:]  # a group the held state has is gone
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EntrotrainError, match="had 2 param groups when the good state was taken and has 1 now"):
        held.restore(model, [optimizer])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # nothing was copied


class _ModeWithoutSwitch(_Counting):
    """A ``train_mode`` flag in the groups, but no ``train()`` / ``eval()`` to convert the parameters with."""

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        for group in self.param_groups:
            group["train_mode"] = True


def test_a_mode_that_cannot_be_switched_is_refused_before_any_copy() -> None:
    model = _mlp()
    optimizer = _ModeWithoutSwitch(model.parameters())
    held = RollbackState()
    held.take(model, [optimizer], step=0)
    _step(model, optimizer, _batches(1)[0])
    optimizer.param_groups[0]["train_mode"] = False
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EntrotrainError, match="was in train mode when the good state was taken and is in eval mode"):
        held.restore(model, [optimizer])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@needs_packages
def test_lightning_schedule_free_with_eval_around_validation(tmp_path) -> None:
    """The Lightning pattern (``optimizer.eval()`` at validation start, ``train()`` at each training epoch's start)
    with a guard on a validation key: the state is held and rolled back at validation end, in eval mode. The step
    count ``k`` goes back with it: 4 epochs of 4 steps, rolled back at the third validation (after 12 steps) to the
    state of the second (step 8, after 8 steps: k = 8; the guard judges a validation at the weights' step), so the
    run ends at k = 12, not 16."""
    import lightning.pytorch as pl

    values = {0: 0.9, 1: 0.9, 2: 0.1, 3: 0.9}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/x", values[self.current_epoch])

        def configure_optimizers(self):
            return schedulefree.AdamWScheduleFree(self.parameters(), lr=1e-2)

        def on_train_epoch_start(self) -> None:
            self.optimizers().optimizer.train()

        def on_validation_epoch_start(self) -> None:
            self.optimizers().optimizer.eval()

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    guard = EntropyCollapseGuard("val/x", threshold=0.5, action="rollback", keep_last_good=False)
    module = Module()
    trainer = pl.Trainer(max_epochs=4, callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="at step 12: .*Rolled back the model and optimizer state to step 8"):
        trainer.fit(module, data, data)
    group = trainer.optimizers[0].param_groups[0]
    assert guard.rollbacks == 1 and group["k"] == 12 and group["lr"] == pytest.approx(5e-3)
