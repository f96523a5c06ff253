"""Bug hunt on ``ResumeWithChanges`` with real Lightning trainers (CPU, tiny model): each test is a scenario a user
resuming at 2 a.m. would run, and failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from entrotrain.callbacks.resume_with_changes import ResumeWithChanges
from tests.callbacks.resume_changes_run import Net, Spy, loader, trainer
from tests.helpers.fork_runs import records

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(root: Path, model: Net, *callbacks, max_steps: int, ckpt: Path | str | None = None,
         weights_only: bool | None = None, **kwargs):
    spy = Spy()
    fit = trainer(root, *callbacks, spy, max_steps=max_steps, **kwargs)
    fit.fit(model, loader(), ckpt_path=None if ckpt is None else str(ckpt), weights_only=weights_only)
    return fit, spy


def _fit_guarded(root: Path, model: Net, *callbacks, **kwargs):
    """:func:`_fit` with a collapse guard that fires at its first observation (``train/loss`` above -1) and halves
    the learning rates once (``action="reduce_lr"``), its warnings silenced."""
    import warnings

    from entrotrain.callbacks import EntropyCollapseGuard

    guard = EntropyCollapseGuard("train/loss", mode="max", threshold=-1.0, arm_on_good=False, action="reduce_lr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _fit(root, model, *callbacks, guard, **kwargs)


def _guard_lowered_parent(root: Path) -> Path:
    """The checkpoint at step 4 of a run of ``Net`` (under the scheduler a test set) whose rates the guard of
    :func:`_fit_guarded` lowered once."""
    torch.manual_seed(0)
    _fit_guarded(root, Net(), max_steps=6, checkpoints=True)
    return root / "ckpts" / "epoch=0-step=4.ckpt"


def _always_plateau(self, optimizer):
    """mode="max" on a falling loss: every step is a plateau, so the rate halves at every step."""
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
    return {"scheduler": plateau, "interval": "step", "monitor": "train/loss"}


def test_a_rate_reduce_lr_on_plateau_has_cut_is_not_a_change(tmp_path, capsys, monkeypatch):
    """ReduceLROnPlateau keeps no initial rate: the saved (cut) rate differs from the configured one on an unchanged
    resume. Before the fix this forked (``optimizer.lr: 0.005 → 0.01``), reset the rate to 0.01 and wrote a new
    record; it is Lightning's own resume, at the saved rate."""
    monkeypatch.setattr(Net, "scheduler", _always_plateau)
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=6, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]["lr"]
    assert saved < Net().hparams.lr  # the plateau did cut the rate
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=6)
    assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
    assert spy.lrs[0] == [saved]
    assert records(tmp_path / "again") == []
    (parent,) = records(tmp_path / "parent")
    assert len(json.loads((parent / "meta.json").read_text())["resumes"]) == 1


def test_a_new_rate_under_reduce_lr_on_plateau_still_forks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Net, "scheduler", _always_plateau)
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=6, checkpoints=True)
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "fork", Net(lr=0.001), callback, ckpt=tmp_path / "parent" / "ckpts" / "epoch=0-step=4.ckpt",
                  max_steps=6)
    assert "model.lr: 0.01 → 0.001" in capsys.readouterr().out
    assert spy.lrs[0] == [0.001]


def test_the_forks_plan_is_still_readable_after_validate(tmp_path):
    """``plan`` is documented as the last fit's fork; before the fix a ``trainer.validate`` after the fit (its
    ``setup``) set it to ``None``."""
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=4, checkpoints=True)
    callback = ResumeWithChanges(verbose=False)
    fit, _ = _fit(tmp_path / "fork", Net(lr=0.001), callback, ckpt=tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt",
                  max_steps=4)
    assert callback.plan is not None
    fit.validate(Net(lr=0.001), loader(), verbose=False)
    assert callback.plan is not None and callback.plan.changes == [("model.lr", 0.01, 0.001)]


def _one_cycle_over_the_run(self, optimizer):
    """The usual OneCycleLR: over ``trainer.estimated_stepping_batches`` (the run's ``max_steps``)."""
    cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr,
                                                total_steps=self.trainer.estimated_stepping_batches)
    return {"scheduler": cycle, "interval": "step"}


def test_a_longer_one_cycle_runs_as_configured(tmp_path, capsys, monkeypatch):
    """A run extended (max_steps 4 → 8) under a OneCycleLR over the run's steps: the fork says
    ``lr_scheduler.total_steps: 4 → 8``. Before the fix the saved scheduler (total_steps 4) was restored anyway and
    the fit died at step 5 with torch's ``Tried to step 5 times``; now the configured cycle runs from the saved
    step."""
    monkeypatch.setattr(Net, "scheduler", _one_cycle_over_the_run)
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=4, checkpoints=True)
    callback = ResumeWithChanges()
    fit, spy = _fit(tmp_path / "fork", Net(), callback, ckpt=tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt",
                    max_steps=8)
    assert "lr_scheduler.total_steps: 4 → 8" in capsys.readouterr().out
    assert fit.global_step == 8
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    cycle = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.01, total_steps=8)
    expected = []
    for _ in range(8):
        expected.append(cycle.get_last_lr()[0])
        reference.step()
        cycle.step()
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx(expected[2:])


def _plateau(factor):
    def scheduler(self, optimizer):
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=factor, patience=0)
        return {"scheduler": plateau, "interval": "step", "monitor": "train/loss"}
    return scheduler


def test_a_changed_plateau_factor_is_used(tmp_path, capsys, monkeypatch):
    """ReduceLROnPlateau(factor 0.5 → 0.1) changed in code: the fork says so; before the fix the saved factor was
    restored and used anyway."""
    monkeypatch.setattr(Net, "scheduler", _plateau(0.5))
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=4, checkpoints=True)
    monkeypatch.setattr(Net, "scheduler", _plateau(0.1))
    _, spy = _fit(tmp_path / "fork", Net(), ResumeWithChanges(), max_steps=4,
                  ckpt=tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt")
    assert "lr_scheduler.factor: 0.5 → 0.1" in capsys.readouterr().out
    first, second = (lrs[0] for lrs in spy.lrs)
    assert second == pytest.approx(first * 0.1)  # every step is a plateau (mode="max" on a falling loss)


class _NoOptimizer(Net):
    """A module that trains nothing (``configure_optimizers`` returns ``None``: Lightning's mock optimizer, saved as
    an empty state)."""

    def configure_optimizers(self):
        return None

    def training_step(self, batch, batch_idx):
        return None


def test_a_changed_module_without_an_optimizer_forks(tmp_path, capsys):
    """Before the fix: ``KeyError: 'param_groups'`` from the fork's adaptation of the (empty) saved optimizer."""
    trainer(tmp_path / "parent", checkpoints=True).fit(_NoOptimizer(), loader())
    callback = ResumeWithChanges()
    trainer(tmp_path / "fork", callback).fit(_NoOptimizer(lr=0.001), loader(),
                                             ckpt_path=str(tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt"))
    assert callback.plan is not None and "model.lr: 0.01 → 0.001" in capsys.readouterr().out


class Warmup:
    """A warmup as a callable object (picklable, no ``__repr__``: printed with its address)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


class _CallableLR(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler keeping its rate function as a setting (in its ``state_dict``, as custom schedulers do)."""

    def __init__(self, optimizer, fn, last_epoch: int = -1) -> None:
        self.fn = fn
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base * self.fn(self.last_epoch) for base in self.base_lrs]


def _warmup(steps):
    def scheduler(self, optimizer):
        return {"scheduler": _CallableLR(optimizer, Warmup(steps)), "interval": "step"}
    return scheduler


def test_a_scheduler_holding_a_callable_object_resumes_unchanged(tmp_path, capsys, monkeypatch):
    """The checkpoint's ``Warmup(4)`` is unpickled as another object than the configured ``Warmup(4)``: before the
    fix their reprs (addresses) differed and the unchanged resume forked; a changed warmup still forks."""
    monkeypatch.setattr(Net, "scheduler", _warmup(4))
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=4, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt"
    callback = ResumeWithChanges()
    _fit(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=4, weights_only=False)
    assert callback.plan is None and records(tmp_path / "again") == []
    monkeypatch.setattr(Net, "scheduler", _warmup(8))
    _fit(tmp_path / "fork", Net(), callback, ckpt=ckpt, max_steps=4, weights_only=False)
    assert callback.plan is not None and [key for key, _, _ in callback.plan.changes] == ["lr_scheduler.fn"]
    assert "lr_scheduler.fn: Warmup(steps=4) → Warmup(steps=8)" in capsys.readouterr().out


def test_a_checkpoint_from_an_older_torch_resumes_unchanged(tmp_path, capsys):
    """An older torch saved AdamW's groups without the flags added since (``decoupled_weight_decay``, ``fused``,
    ...; torch fills in their defaults on load). Before the fix the unchanged resume forked
    (``optimizer.decoupled_weight_decay: None → True``, ...)."""
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=4, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    for group in checkpoint["optimizer_states"][0]["param_groups"]:
        for flag in ("maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
            group.pop(flag, None)
    torch.save(checkpoint, ckpt)
    callback = ResumeWithChanges()
    _fit(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=4)
    assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
    _fit(tmp_path / "fork", Net(lr=0.001), callback, ckpt=ckpt, max_steps=4)
    out = capsys.readouterr().out
    assert "optimizer: lr 0.01 → 0.001; its moments" in out and "decoupled_weight_decay" not in out


class _Gan(Net):
    """Two optimizers, manual optimization (GAN-style): Adam on ``body`` (the "generator") with a StepLR, Adam on
    ``critic`` (the "discriminator")."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr=lr)
        self.automatic_optimization = False
        self.critic = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        generator, critic = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        generator.zero_grad()
        self.manual_backward(loss)
        generator.step()
        critic_loss = self.critic(self(x).detach()).pow(2).mean()
        critic.zero_grad()
        self.manual_backward(critic_loss)
        critic.step()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        generator = torch.optim.Adam(self.body.parameters(), lr=self.hparams.lr)
        critic = torch.optim.Adam(self.critic.parameters(), lr=0.02)
        return [generator, critic], [torch.optim.lr_scheduler.StepLR(generator, step_size=1, gamma=0.5)]


def test_sigma_reparam_on_the_critic_only_keeps_the_generators_moments_and_schedule(tmp_path, capsys):
    """σReparam added to the critic of a GAN (its optimizer's groups grew by a γ per layer). Before the fix every
    optimizer and scheduler started afresh: the generator lost its moments and its decayed rate (back to 0.01)."""
    from entrotrain.regularizers.sigma_reparam import sigma_reparam

    trainer(tmp_path / "parent", checkpoints=True, max_steps=8).fit(_Gan(), loader())
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=4.ckpt"  # 2 batches: 2 steps of each optimizer
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    model = _Gan()
    sigma_reparam(model.critic)
    seen = {}

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                generator, critic = trainer.optimizers
                seen["lr"] = generator.param_groups[0]["lr"]
                seen["exp_avg"] = generator.state[generator.param_groups[0]["params"][0]]["exp_avg"].clone()
                seen["critic_state"] = len(critic.state)

    callback = ResumeWithChanges()
    trainer(tmp_path / "fork", callback, Look(), max_steps=8).fit(model, loader(), ckpt_path=str(ckpt))
    out = capsys.readouterr().out
    assert "model.sigma_reparam_layers: 0 → 2" in out
    assert "optimizer1's parameters changed" in out
    assert seen["lr"] == pytest.approx(0.01 * 0.5 ** 2) and seen["lr"] == saved["param_groups"][0]["lr"]
    assert torch.equal(seen["exp_avg"], saved["state"][0]["exp_avg"])
    assert seen["critic_state"] == 0  # the critic's optimizer starts afresh


def test_a_new_beta2_under_one_cycle_is_used(tmp_path, capsys, monkeypatch):
    """OneCycleLR cycles Adam's beta1 only. Before the fix the whole ``betas`` was taken for a position in the cycle:
    ``model.betas: [0.9, 0.95] → [0.9, 0.99]`` was printed as used, but training went on with beta2 = 0.95 (and a
    beta2 changed in code only was not seen at all)."""
    def one_cycle(self, optimizer):
        return {"scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8),
                "interval": "step"}

    monkeypatch.setattr(Net, "scheduler", one_cycle)
    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(), max_steps=8, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]["betas"]
    betas = []

    class Betas(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(tuple(trainer.optimizers[0].param_groups[0]["betas"]))

    _fit(tmp_path / "fork", Net(betas=(0.9, 0.99)), ResumeWithChanges(), Betas(), ckpt=ckpt, max_steps=8)
    assert betas[0] == (saved[0], 0.99)  # beta1: the cycle's position; beta2: the configured one
    assert all(beta2 == 0.99 for _, beta2 in betas)
    def beta2_in_code(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.98))
        return {"optimizer": optimizer, "lr_scheduler": one_cycle(self, optimizer)}

    monkeypatch.setattr(Net, "configure_optimizers", beta2_in_code)
    callback = ResumeWithChanges()
    _fit(tmp_path / "code", Net(), callback, ckpt=ckpt, max_steps=8)
    assert callback.plan is not None and ("optimizer.beta2", 0.95, 0.98) in callback.plan.changes


@pytest.mark.parametrize("t_max", [0, 40], ids=["no schedule", "cosine"])
def test_an_unchanged_resume_under_stochastic_weight_averaging_is_lightnings_own(tmp_path, capsys, t_max):
    """Lightning's StochasticWeightAveraging replaces the schedule by its SWALR once SWA starts (the checkpoint's
    groups hold ``swa_lr`` and its ``initial_lr``, its ``lr_schedulers`` SWALR's state). Before the fix an unchanged
    resume after SWA started forked (``optimizer.lr: 0.005 → 0.01``, ``lr_scheduler: 1 → None``), put the rate
    back to 0.01 and wrote a new record."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    def swa():
        return StochasticWeightAveraging(swa_lrs=0.005, swa_epoch_start=1)

    torch.manual_seed(0)
    _fit(tmp_path / "parent", Net(t_max=t_max), swa(), max_steps=24, checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=1-step=20.ckpt"  # 16 batches an epoch: SWA since step 16
    _, own = _fit(tmp_path / "own", Net(t_max=t_max), swa(), ckpt=ckpt, max_steps=24, record=False)
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "again", Net(t_max=t_max), swa(), callback, ckpt=ckpt, max_steps=24)
    assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
    assert spy.lrs == own.lrs and records(tmp_path / "again") == []


class _Backbone(Net):
    """``body.0`` is the backbone BackboneFinetuning freezes, then unfreezes (a new param group) at epoch 1."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr=lr)
        self.backbone = self.body[0]

    def configure_optimizers(self):
        head = [p for name, p in self.named_parameters() if not name.startswith(("backbone", "body.0"))]
        return torch.optim.AdamW(head, lr=self.hparams.lr)


@pytest.mark.parametrize("lr", [0.01, 0.001], ids=["unchanged", "new rate"])
def test_a_resume_after_backbone_finetuning_unfroze_keeps_its_param_groups(tmp_path, capsys, lr):
    """BackboneFinetuning adds the backbone's param group when it unfreezes it and puts it back at the resume's
    ``on_fit_start`` (from its state in the checkpoint). Before the fix the configured optimizer (one group) was
    compared with the saved one (two): the unchanged resume forked with a fresh one-group state, and Lightning's
    restore died with torch's ``ValueError: loaded state dict has a different number of parameter groups``."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    _fit(tmp_path / "parent", _Backbone(), BackboneFinetuning(unfreeze_backbone_at_epoch=1), max_steps=24,
         checkpoints=True)
    ckpt = tmp_path / "parent" / "ckpts" / "epoch=1-step=20.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert len(saved["param_groups"]) == 2
    callback = ResumeWithChanges()
    _, spy = _fit(tmp_path / "again", _Backbone(lr=lr), BackboneFinetuning(unfreeze_backbone_at_epoch=1), callback,
                  ckpt=ckpt, max_steps=24)
    assert torch.equal(spy.exp_avg[0], saved["state"][0]["exp_avg"])  # the moments are the checkpoint's
    if lr == 0.01:
        assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
        assert spy.lrs[0] == [group["lr"] for group in saved["param_groups"]]
    else:
        assert callback.plan is not None and spy.lrs[0][0] == 0.001


def test_a_rate_a_collapse_guard_lowered_is_not_a_change(tmp_path, capsys):
    """``EntropyCollapseGuard(action="reduce_lr")`` halved the rate of an unscheduled group before the checkpoint:
    an unchanged resume is Lightning's own, at the lowered rate (it forked, ``optimizer.lr: 0.005 → 0.01``, and undid
    the guard's action)."""
    ckpt = _guard_lowered_parent(tmp_path / "parent")
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]["lr"]
    assert saved == pytest.approx(Net().hparams.lr / 2)  # the guard fired once
    callback = ResumeWithChanges()
    _, spy = _fit_guarded(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=6)
    assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
    assert spy.lrs[0] == [saved]


def test_a_one_cycle_rate_a_collapse_guard_lowered_is_not_a_change(tmp_path, capsys, monkeypatch):
    """Under OneCycleLR a guard's ``reduce_lr`` (and a rollback's) lowers the groups' ``initial_lr`` / ``max_lr`` /
    ``min_lr`` too, or the cycle would bring the rate back at its next step: an unchanged resume then forked
    (``optimizer.lr``, ``max_lr``, ``min_lr``) and undid the guard's action. It is Lightning's own resume."""
    def one_cycle(self, optimizer):
        return {"scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8),
                "interval": "step"}

    monkeypatch.setattr(Net, "scheduler", one_cycle)
    ckpt = _guard_lowered_parent(tmp_path / "parent")
    group = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]
    assert group["max_lr"] == pytest.approx(0.005)  # the guard fired once
    callback = ResumeWithChanges()
    _fit_guarded(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=6)
    assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
    fork = ResumeWithChanges()  # a real change still forks
    _fit_guarded(tmp_path / "fork", Net(lr=0.001), fork, ckpt=ckpt, max_steps=6)
    assert fork.plan is not None and "model.lr: 0.01 → 0.001" in capsys.readouterr().out
