"""False forks and missed forks of ``ResumeWithChanges`` (real Lightning trainers, CPU, tiny model): an unchanged
resume must be Lightning's own, a changed one a fork. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from entrotrain.callbacks.resume_with_changes import ResumeWithChanges
from entrotrain.errors import EntrotrainError
from tests.callbacks.resume_changes_run import Net, Spy, loader, trainer
from tests.helpers.fork_runs import records

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(root: Path, model: Net, *callbacks, max_steps: int, ckpt: Path | None = None, **kwargs):
    spy = Spy()
    fit = trainer(root, *callbacks, spy, max_steps=max_steps, **kwargs)
    # weights_only=False: a np.float64 hyperparameter is no safe global (Lightning's own load refuses it)
    fit.fit(model, loader(), ckpt_path=None if ckpt is None else str(ckpt), weights_only=False)
    return fit, spy


def _parent(root: Path, model: Net, max_steps: int = 4) -> Path:
    """Train ``model`` for ``max_steps`` with a checkpoint every 2 steps; the step-2 checkpoint."""
    torch.manual_seed(0)
    _fit(root, model, max_steps=max_steps, checkpoints=True)
    return root / "ckpts" / "epoch=0-step=2.ckpt"


def _unchanged(tmp_path: Path, make, ckpt: Path, capsys) -> tuple:
    """Resuming ``make()`` from ``ckpt`` with ResumeWithChanges is Lightning's own resume: no plan, nothing printed,
    no new record, and the same learning rates and moments as a resume without the callback. Returns the plan and
    the learning rates of the resume with and without the callback."""
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "again", make(), callback, ckpt=ckpt, max_steps=4)
    out = capsys.readouterr().out
    assert callback.plan is None, callback.plan.changes
    assert "changed configuration" not in out
    assert records(tmp_path / "again") == []
    _, own = _fit(tmp_path / "own", make(), ckpt=ckpt, max_steps=4, record=False)
    assert spy.lrs == own.lrs
    assert all(torch.equal(a, b) for a, b in zip(spy.exp_avg, own.exp_avg))
    return callback.plan, spy.lrs, own.lrs


# ------------------------------------------------------------------ 1. a manual warmup in optimizer_step
class WarmupNet(Net):
    """Lightning's documented manual warmup: ``optimizer_step`` sets every group's rate to ``scale * hparams.lr``
    over the first 10 steps. ``lr_mult``: a factor written in code (not a hyperparameter)."""

    lr_mult = 1.0

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr * self.lr_mult, betas=tuple(self.hparams.betas))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        scale = min(1.0, float(self.trainer.global_step + 1) / 10.0)
        for group in optimizer.param_groups:
            group["lr"] = scale * self.hparams.lr * self.lr_mult
        optimizer.step(closure=optimizer_closure)


def test_a_manual_warmup_in_optimizer_step_is_not_a_change(tmp_path, capsys):
    """The saved rate is the warmup's (0.002 at step 2), the configured one 0.01. Before the fix the unchanged
    resume forked (``optimizer.lr: 0.002 → 0.01``), wrote a new record and restarted at 0.01."""
    ckpt = _parent(tmp_path / "parent", WarmupNet())
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]["lr"]
    assert saved != pytest.approx(0.01)
    _unchanged(tmp_path, WarmupNet, ckpt, capsys)


def test_a_new_rate_under_a_manual_warmup_still_forks(tmp_path, capsys):
    ckpt = _parent(tmp_path / "parent", WarmupNet())
    callback = ResumeWithChanges()
    _fit(tmp_path / "fork", WarmupNet(lr=0.001), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is not None and callback.plan.changes == [("model.lr", 0.01, 0.001)]
    assert len(records(tmp_path / "fork")) == 1


def test_a_rate_changed_in_code_under_a_manual_warmup_still_forks(tmp_path, capsys, monkeypatch):
    """The configured rate (0.02) is no hyperparameter's value: a change the hyperparameters do not show."""
    ckpt = _parent(tmp_path / "parent", WarmupNet())
    monkeypatch.setattr(WarmupNet, "lr_mult", 2.0)
    callback = ResumeWithChanges()
    _fit(tmp_path / "fork", WarmupNet(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is not None
    assert [key for key, _, _ in callback.plan.changes] == ["optimizer.lr"]
    assert callback.plan.changes[0][2] == pytest.approx(0.02)


class CodeWarmupNet(Net):
    """A manual warmup whose rate is written in code (``RATE``), no hyperparameter holding it."""

    RATE = 0.01

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.RATE, betas=tuple(self.hparams.betas))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        for group in optimizer.param_groups:
            group["lr"] = min(1.0, float(self.trainer.global_step + 1) / 10.0) * self.RATE
        optimizer.step(closure=optimizer_closure)


def _code_warmup_parent(root: Path) -> Path:
    """The parent run with ResumeWithChanges, which records its configured rates in the checkpoints."""
    torch.manual_seed(0)
    _fit(root, CodeWarmupNet(lr=0.5), ResumeWithChanges(), max_steps=4, checkpoints=True)
    return root / "ckpts" / "epoch=0-step=2.ckpt"


def test_a_manual_warmup_of_a_rate_written_in_code_is_not_a_change_when_the_rate_was_recorded(tmp_path, capsys):
    """No hyperparameter holds the rate (``hparams.lr`` is unused): the configured rate the parent's
    ResumeWithChanges recorded at fit start is compared, not the saved running one. Before the fix:
    ``optimizer.lr: 0.002 → 0.01``, a fork."""
    ckpt = _code_warmup_parent(tmp_path / "parent")
    assert torch.load(ckpt, weights_only=False)["callbacks"]["ResumeWithChanges"] == {"configured_rates": [[0.01]]}
    _unchanged(tmp_path, lambda: CodeWarmupNet(lr=0.5), ckpt, capsys)


def test_a_rate_written_in_code_changed_under_a_manual_warmup_forks(tmp_path, capsys, monkeypatch):
    ckpt = _code_warmup_parent(tmp_path / "parent")
    monkeypatch.setattr(CodeWarmupNet, "RATE", 0.02)
    callback = ResumeWithChanges()
    _fit(tmp_path / "fork", CodeWarmupNet(lr=0.5), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is not None and callback.plan.changes == [("optimizer.lr", 0.01, 0.02)]


# ------------------------------------------------------------------ 2. implementation flags
def _adamw(**flags):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas), **flags)
    return configure_optimizers


@pytest.mark.parametrize("flags", [{"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["fused", "foreach", "for-loop"])
def test_an_implementation_flag_is_not_a_change(tmp_path, capsys, monkeypatch, flags):
    """AdamW saved with the default implementation, resumed as fused / foreach / for-loop AdamW: the same
    optimizer. Before the fix this forked (``optimizer.fused: None → True``)."""
    ckpt = _parent(tmp_path / "parent", Net())
    monkeypatch.setattr(Net, "configure_optimizers", _adamw(**flags))
    callback = ResumeWithChanges()
    _fit(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is None, callback.plan.changes
    assert records(tmp_path / "again") == []


def test_a_fork_does_not_list_an_implementation_flag(tmp_path, capsys, monkeypatch):
    ckpt = _parent(tmp_path / "parent", Net())
    monkeypatch.setattr(Net, "configure_optimizers", _adamw(fused=True))
    callback = ResumeWithChanges()
    _fit(tmp_path / "fork", Net(lr=0.001), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan.changes == [("model.lr", 0.01, 0.001)]
    assert "fused" not in "\n".join(callback.plan.lines())


# ------------------------------------------------------------------ 3. a refused resume
def test_a_refused_resume_leaves_no_record(tmp_path):
    """σReparam removed at the resume is refused (EntrotrainError). Before the fix Lightning's ``finalize("failed")``
    still wrote a new record folder saying "failed", with nothing in it, beside the parent's."""
    from entrotrain.regularizers.sigma_reparam import sigma_reparam

    ckpt = _parent(tmp_path / "parent", sigma_reparam(Net(), include="body.*"))
    with pytest.raises(EntrotrainError, match="σReparam cannot be removed"):
        _fit(tmp_path / "fork", Net(lr=0.001), ResumeWithChanges(), ckpt=ckpt, max_steps=4)
    assert records(tmp_path / "fork") == []
    # the logger is usable again: a later fit of the same trainer objects still records
    assert len(records(tmp_path / "parent")) == 1


# ------------------------------------------------------------------ 4. schedulers, hyperparameter types
def _scheduler(make):
    def scheduler(self, optimizer):
        return {"scheduler": make(optimizer), "interval": "step"}
    return scheduler


def _sequential(warmup: int, milestone: int, t_max: int = 10):
    def make(optimizer):
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[milestone])
    return make


def _chained(gamma: float):
    def make(optimizer):
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        return torch.optim.lr_scheduler.ChainedScheduler([linear, decay])
    return make


def _restarts(t_0: int):
    return lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t_0)


def _lambda(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))


UNCHANGED = {"sequential": _sequential(3, 3), "chained": _chained(0.9), "restarts": _restarts(3), "lambda": _lambda}


@pytest.mark.parametrize("name", sorted(UNCHANGED))
def test_an_unchanged_scheduler_is_lightnings_own_resume(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(Net, "scheduler", _scheduler(UNCHANGED[name]))
    ckpt = _parent(tmp_path / "parent", Net())
    plan, resumed, own = _unchanged(tmp_path, Net, ckpt, capsys)
    assert plan is None and resumed == own and resumed


CHANGED = {
    "sequential-milestone": (_sequential(3, 3), _sequential(3, 2), "lr_scheduler.milestones"),
    "sequential-warmup": (_sequential(3, 3), _sequential(2, 3), "lr_scheduler.schedulers[0].total_iters"),
    "sequential-cosine": (_sequential(3, 3), _sequential(3, 3, t_max=20), "lr_scheduler.schedulers[1].T_max"),
    "chained-gamma": (_chained(0.9), _chained(0.5), "lr_scheduler.schedulers[1].gamma"),
    "restarts-period": (_restarts(3), _restarts(5), "lr_scheduler.T_0"),
}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_changed_composite_scheduler_forks(tmp_path, capsys, monkeypatch, name):
    """A SequentialLR's milestones and its children's settings, a ChainedScheduler's children's: before the fix
    none was compared (the constructor's ``milestones`` / ``schedulers`` are saved as ``_milestones`` /
    ``_schedulers``), so the resume was Lightning's own with the saved schedule."""
    before, after, key = CHANGED[name]
    monkeypatch.setattr(Net, "scheduler", _scheduler(before))
    ckpt = _parent(tmp_path / "parent", Net())
    monkeypatch.setattr(Net, "scheduler", _scheduler(after))
    callback = ResumeWithChanges()
    _fit(tmp_path / "fork", Net(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is not None and [c[0] for c in callback.plan.changes] == [key]


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_a_rate_of_another_number_type_is_not_a_change(tmp_path, capsys, kind):
    """``AdamW(lr=self.hparams.lr)`` with ``lr`` a ``np.float64`` or a 0-d tensor."""
    value = {"numpy": np.float64(0.01), "tensor": torch.tensor(0.01, dtype=torch.float64)}[kind]
    ckpt = _parent(tmp_path / "parent", Net(lr=value))
    plan, resumed, own = _unchanged(tmp_path, lambda: Net(lr=value), ckpt, capsys)
    assert plan is None and resumed == own and resumed


def _configured_lrs(make, steps: int) -> list[float]:
    """The rates a fresh run under scheduler ``make`` trains its first ``steps`` steps at (lr 0.01)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = make(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name", ["sequential-milestone", "sequential-warmup", "chained-gamma", "restarts-period"])
def test_a_forked_composite_scheduler_runs_as_configured_from_the_saved_step(tmp_path, capsys, monkeypatch, name):
    """The fork's schedule is the configured one at the saved step (as for a closed-form scheduler). Before the fix
    the saved position was kept with the settings copied in: a SequentialLR never switched at its new milestone,
    CosineAnnealingWarmRestarts kept the saved period ``T_i``."""
    before, after, _ = CHANGED[name]
    monkeypatch.setattr(Net, "scheduler", _scheduler(before))
    ckpt = _parent(tmp_path / "parent", Net(), max_steps=6)
    monkeypatch.setattr(Net, "scheduler", _scheduler(after))
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "fork", Net(), callback, ckpt=ckpt, max_steps=6)
    assert callback.plan is not None
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx(_configured_lrs(after, 6)[2:], rel=1e-6, abs=1e-12)


def test_a_new_tensor_rate_still_forks(tmp_path, capsys):
    """Before the fix the fork died writing its note (``TypeError: Object of type Tensor is not JSON
    serializable``: the tensor rates went to ``short_value`` as they were)."""
    ckpt = _parent(tmp_path / "parent", Net(lr=torch.tensor(0.01, dtype=torch.float64)))
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "fork", Net(lr=torch.tensor(0.001, dtype=torch.float64)), callback, ckpt=ckpt,
                  max_steps=4)
    assert callback.plan is not None and callback.plan.changes == [("model.lr", 0.01, 0.001)]
    assert float(spy.lrs[0][0]) == pytest.approx(0.001)


def test_a_schedule_added_at_a_fork_with_a_tensor_rate(tmp_path, capsys):
    """A tensor rate under a schedule the fork adds: its note formats the rate (a guard beside the one above)."""
    ckpt = _parent(tmp_path / "parent", Net(lr=torch.tensor(0.01, dtype=torch.float64)))
    callback = ResumeWithChanges()
    fit, _ = _fit(tmp_path / "fork", Net(lr=torch.tensor(0.01, dtype=torch.float64), t_max=4), callback, ckpt=ckpt,
                  max_steps=4)
    assert fit.global_step == 4 and "a learning-rate schedule the checkpoint's run did not have" in capsys.readouterr().out


# ------------------------------------------------------------------ Adam ↔ AdamW
def _optimizer(cls, weight_decay):
    def configure_optimizers(self):
        return cls(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=weight_decay)
    return configure_optimizers


def test_adam_and_adamw_without_weight_decay_are_the_same_optimizer(tmp_path, capsys, monkeypatch):
    """Adam → AdamW(weight_decay=0): the same algorithm. Before the fix: ``optimizer.decoupled_weight_decay: False →
    True``, a fork."""
    monkeypatch.setattr(Net, "configure_optimizers", _optimizer(torch.optim.Adam, 0.0))
    ckpt = _parent(tmp_path / "parent", Net())
    monkeypatch.setattr(Net, "configure_optimizers", _optimizer(torch.optim.AdamW, 0.0))
    callback = ResumeWithChanges()
    _fit(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is None, callback.plan.changes


def test_adam_to_adamw_with_the_same_weight_decay_forks(tmp_path, capsys, monkeypatch):
    """Coupled (L2 in the gradient) → decoupled weight decay: another update."""
    monkeypatch.setattr(Net, "configure_optimizers", _optimizer(torch.optim.Adam, 0.01))
    ckpt = _parent(tmp_path / "parent", Net())
    monkeypatch.setattr(Net, "configure_optimizers", _optimizer(torch.optim.AdamW, 0.01))
    callback = ResumeWithChanges()
    _fit(tmp_path / "fork", Net(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is not None and callback.plan.changes == [("optimizer.decoupled_weight_decay", False, True)]


# ------------------------------------------------------------------ param groups a callback adds
class ExtraNet(Net):
    """``extra``: a parameter ``configure_optimizers`` leaves out; :class:`AddGroup` adds it at fit start."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.body(x) + self.extra

    def configure_optimizers(self):
        return torch.optim.AdamW(self.body.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))


class AddGroup(L.Callback):
    """Adds ``extra`` as a second param group at ``on_fit_start`` (before Lightning restores the optimizer state,
    as ``BaseFinetuning`` does)."""

    def on_fit_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        if len(optimizer.param_groups) == 1:
            optimizer.add_param_group({"params": [pl_module.extra], "lr": 0.002})


def test_a_param_group_a_callback_adds_is_not_a_change(tmp_path, capsys):
    """Before the fix the unchanged resume forked (``optimizer.param_groups: [4, 1] → [4]``), restarted the
    optimizer with one group, and Lightning's restore into the two groups the callback had added again died with
    torch's ``ValueError: loaded state dict has a different number of parameter groups``."""
    torch.manual_seed(0)
    _fit(tmp_path / "parent", ExtraNet(), AddGroup(), max_steps=4, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt"
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "again", ExtraNet(), AddGroup(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is None and records(tmp_path / "again") == []
    _, own = _fit(tmp_path / "own", ExtraNet(), AddGroup(), ckpt=ckpt, max_steps=4, record=False)
    assert spy.lrs == own.lrs and all(torch.equal(a, b) for a, b in zip(spy.exp_avg, own.exp_avg))


def test_a_new_rate_with_a_param_group_a_callback_adds_forks_and_keeps_the_moments(tmp_path, capsys):
    torch.manual_seed(0)
    _fit(tmp_path / "parent", ExtraNet(), AddGroup(), max_steps=4, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    callback = ResumeWithChanges()
    fit, spy = _fit(tmp_path / "fork", ExtraNet(lr=0.001), AddGroup(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan.changes == [("model.lr", 0.01, 0.001)] and fit.global_step == 4
    assert spy.lrs[0] == [0.001, 0.002]  # the configured group's new rate; the callback's group as saved
    assert torch.equal(spy.exp_avg[0], saved["state"][0]["exp_avg"])


def test_a_param_group_the_configuration_dropped_still_forks(tmp_path, capsys, monkeypatch):
    """Two groups configured in the parent, one (the same parameters) at the resume: every parameter is in a
    configured group, so the saved second group is not a callback's."""
    def two_groups(self):
        first, *rest = list(self.parameters())
        return torch.optim.AdamW([{"params": [first]}, {"params": rest}], lr=self.hparams.lr,
                                 betas=tuple(self.hparams.betas))

    monkeypatch.setattr(Net, "configure_optimizers", two_groups)
    ckpt = _parent(tmp_path / "parent", Net())
    monkeypatch.setattr(Net, "configure_optimizers", _adamw())
    callback = ResumeWithChanges()
    fit, _ = _fit(tmp_path / "fork", Net(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is not None and callback.plan.changes == [("optimizer.param_groups", [1, 3], [4])]
    assert fit.global_step == 4
