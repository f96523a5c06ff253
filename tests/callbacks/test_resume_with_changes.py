"""``ResumeWithChanges``: roll back and cure with a plain Lightning ``Trainer`` (no CLI, no config file). A real short
fit writes checkpoints; ``trainer.fit(changed_module, ckpt_path=...)`` then uses the changed module's settings,
keeps the checkpoint's weights and moments, and records a new run naming its parent. Without the callback,
Lightning's own behaviour is kept (and documented here: the saved optimizer state wins).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entrotrain.callbacks.resume_with_changes import ResumeWithChanges
from entrotrain.errors import EntrotrainError
from tests.callbacks.resume_changes_run import Net, Spy, loader, trainer
from tests.helpers.fork_runs import record_bytes, records

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.01
SCRIPT = Path(__file__).with_name("resume_changes_run.py")


def _parent(root: Path, **hparams) -> tuple[Path, Path]:
    """A 4-step fit of ``Net(**hparams)`` with a checkpoint every 2 steps and a run record: (step-2 checkpoint,
    record)."""
    torch.manual_seed(0)
    fit = trainer(root, checkpoints=True)
    fit.fit(Net(**hparams), loader())
    (record,) = records(root)
    return root / "ckpts" / "epoch=0-step=2.ckpt", record


def _resume(root: Path, model: Net, ckpt: Path, *callbacks, max_steps: int = 4, **kwargs):
    spy = Spy()
    fit = trainer(root, *callbacks, spy, max_steps=max_steps, **kwargs)
    fit.fit(model, loader(), ckpt_path=str(ckpt))
    return fit, spy


@pytest.fixture
def parent(tmp_path):
    return _parent(tmp_path / "parent")


# ---------------------------------------------------------------------------------------------- optimizer
def test_a_lower_learning_rate_is_used_from_the_first_resumed_step_and_the_moments_kept(parent, tmp_path, capsys):
    ckpt, _ = parent
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    fit, spy = _resume(tmp_path / "fork", Net(lr=0.001), ckpt, ResumeWithChanges())
    out = capsys.readouterr().out
    assert spy.lrs == [[0.001], [0.001]]  # steps 2 and 3
    assert torch.equal(spy.exp_avg[0], saved["state"][0]["exp_avg"])  # Adam's moments are the checkpoint's
    assert fit.global_step == 4
    assert "with a changed configuration" in out and "model.lr: 0.01 → 0.001" in out
    assert "optimizer: lr 0.01 → 0.001; its moments are the checkpoint's" in out
    assert out.count("with a changed configuration") == 1


def test_without_the_callback_lightning_restores_the_saved_learning_rate(parent, tmp_path, capsys):
    """Lightning's own behaviour, kept when the callback is not there: the restored optimizer state overrides the
    learning rate the module configures (0.001), silently."""
    ckpt, _ = parent
    _, spy = _resume(tmp_path / "plain", Net(lr=0.001), ckpt)
    assert spy.lrs == [[LR], [LR]]
    assert "changed configuration" not in capsys.readouterr().out


def test_betas_changed_in_code_only_are_found_in_the_optimizer(parent, tmp_path, capsys, monkeypatch):
    """No hyperparameter says so (betas hard-coded in configure_optimizers): the optimizer's saved state is compared
    with the configured one."""
    ckpt, _ = parent
    original = Net.configure_optimizers

    def other_betas(self):
        optimizer = original(self)
        for group in optimizer.param_groups:
            group["betas"] = (0.8, 0.9)
        return optimizer

    monkeypatch.setattr(Net, "configure_optimizers", other_betas)
    _, spy = _resume(tmp_path / "fork", Net(), ckpt, ResumeWithChanges())
    out = capsys.readouterr().out
    assert "optimizer.betas: [0.9, 0.95] → [0.8, 0.9]" in out
    (fork,) = records(tmp_path / "fork")
    changes = json.loads((fork / "meta.json").read_text())["forked_from"]["changes"]
    assert changes == [["optimizer.betas", [0.9, 0.95], [0.8, 0.9]]]


def test_an_unchanged_resume_is_lightnings_own(parent, tmp_path, capsys):
    """Same module: the callback changes nothing (weights after the resumed steps bit-identical with and without it)
    and says nothing."""
    ckpt, _ = parent
    torch.manual_seed(1)
    with_cb, _ = _resume(tmp_path / "a", Net(), ckpt, ResumeWithChanges(), record=False)
    torch.manual_seed(1)
    without, _ = _resume(tmp_path / "b", Net(), ckpt, record=False)
    assert "changed configuration" not in capsys.readouterr().out
    a, b = with_cb.lightning_module.state_dict(), without.lightning_module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert with_cb.callbacks[0].plan is None


def test_a_change_of_shape_is_an_error_naming_the_parameter(parent, tmp_path):
    ckpt, _ = parent
    with pytest.raises(EntrotrainError, match=r"body\.0\.weight: \[8, 4\] in the checkpoint, \[16, 4\] in the model"):
        _resume(tmp_path / "fork", Net(width=16), ckpt, ResumeWithChanges(), record=False)


def test_a_bad_argument_is_refused():
    with pytest.raises(EntrotrainError, match="verbose"):
        ResumeWithChanges(verbose="yes")


# ---------------------------------------------------------------------------------------------- σReparam
def test_sigma_reparam_added_at_the_resume_loads_function_preservingly_and_trains(parent, tmp_path, capsys):
    from entrotrain.regularizers.sigma_reparam import sigma_reparam

    ckpt, _ = parent
    plain = Net()
    plain.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    x = next(iter(loader()))[0]
    expected = plain(x).detach()
    model = sigma_reparam(Net(), include="body.*")
    outputs = []

    class Probe(Spy):
        def on_train_start(self, trainer, pl_module):  # the weights as loaded, before any resumed step
            outputs.append(pl_module(x).detach())

    fit = trainer(tmp_path / "fork", ResumeWithChanges(), Probe(), max_steps=4)
    fit.fit(model, loader(), ckpt_path=str(ckpt))
    out = capsys.readouterr().out
    assert torch.allclose(outputs[0], expected, atol=1e-5, rtol=1e-5)  # γ = σ(W): the checkpoint's function
    assert fit.global_step == 4 and math.isfinite(float(fit.callback_metrics["train/loss"]))
    assert "model.sigma_reparam_layers: 0 → 2" in out and "start afresh" in out
    assert type(model.body[0]).__name__ == "SigmaReparamLinear"


def test_removing_sigma_reparam_is_an_error_naming_it(tmp_path):
    from entrotrain.regularizers.sigma_reparam import sigma_reparam

    root = tmp_path / "parent"
    fit = trainer(root, checkpoints=True, record=False)
    fit.fit(sigma_reparam(Net(), include="body.*"), loader())
    with pytest.raises(EntrotrainError, match=r"σReparam cannot be removed.*|body\.0\.gamma") as err:
        _resume(tmp_path / "fork", Net(lr=0.001), root / "ckpts" / "epoch=0-step=2.ckpt", ResumeWithChanges(),
                record=False)
    assert "body.0.gamma" in str(err.value) and "σReparam cannot be removed" in str(err.value)


# ---------------------------------------------------------------------------------------------- run record
def test_the_fork_is_a_new_record_naming_its_parent_which_is_left_byte_for_byte(parent, tmp_path):
    ckpt, parent_record = parent
    before = record_bytes(parent_record)
    _resume(tmp_path / "fork", Net(lr=0.001), ckpt, ResumeWithChanges())
    assert record_bytes(parent_record) == before
    (fork,) = records(tmp_path / "fork")
    meta = json.loads((fork / "meta.json").read_text())
    assert meta["forked_from"]["run_dir"] == str(parent_record.resolve())
    assert meta["forked_from"]["step"] == 2 and meta["forked_from"]["ckpt_path"] == str(ckpt)
    assert ["model.lr", 0.01, 0.001] in meta["forked_from"]["changes"]
    assert meta["status"] == "finished" and not meta.get("resumes")
    steps = [json.loads(line)["step"] for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) >= 2  # the fork's own steps only


def test_without_the_callback_a_changed_resume_continues_the_parents_record(parent, tmp_path):
    """Today's behaviour without the callback (documented): the parent's record is continued, and the changed
    run's steps supersede its history after the checkpoint."""
    ckpt, parent_record = parent
    with pytest.warns(UserWarning, match=r"RunRecordLogger: resuming from .* with hyperparameters that differ from the "
                      r"checkpoint's \(model\.lr: 0\.01 → 0\.001\).*add entrotrain\.callbacks\.resume_with_changes"
                      r"\.ResumeWithChanges\(\)"):
        _resume(tmp_path / "plain", Net(lr=0.001), ckpt)
    assert records(tmp_path / "plain") == []
    assert len(json.loads((parent_record / "meta.json").read_text())["resumes"]) == 1


@pytest.mark.parametrize("callbacks", [(ResumeWithChanges,), ()], ids=["with", "without"])
def test_an_unchanged_resume_continues_the_record(parent, tmp_path, capsys, callbacks):
    """With or without the callback; without it the record does not warn either (nothing changed)."""
    import warnings

    ckpt, parent_record = parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _resume(tmp_path / "again", Net(), ckpt, *(cb() for cb in callbacks))
    assert not [w for w in caught if "RunRecordLogger: resuming" in str(w.message)]
    assert "changed configuration" not in capsys.readouterr().out
    meta = json.loads((parent_record / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and "forked_from" not in meta
    assert records(tmp_path / "again") == []


# ---------------------------------------------------------------------------------------------- schedulers
def _cosine(step: int, t_max: int, lr: float = LR) -> float:
    return lr * (1 + math.cos(math.pi * step / t_max)) / 2


def test_a_changed_cosine_period_follows_the_configured_schedule(tmp_path, capsys):
    """T_max 8 → 16 (a hyperparameter): from the first resumed step the rate is the 16-step cosine at step 2, not
    the saved 8-step one (which Lightning alone restores)."""
    ckpt, _ = _parent(tmp_path / "parent", t_max=8)
    _, spy = _resume(tmp_path / "fork", Net(t_max=16), ckpt, ResumeWithChanges())
    assert "model.t_max: 8 → 16" in capsys.readouterr().out
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx([_cosine(2, 16), _cosine(3, 16)])
    _, plain = _resume(tmp_path / "plain", Net(t_max=16), ckpt, record=False)
    assert [lrs[0] for lrs in plain.lrs] == pytest.approx([_cosine(2, 8), _cosine(3, 8)])


def test_a_cosine_period_changed_in_code_only_is_found_in_the_scheduler(tmp_path, capsys, monkeypatch):
    ckpt, _ = _parent(tmp_path / "parent", t_max=8)
    monkeypatch.setattr(Net, "scheduler_period", lambda self: 16)
    _, spy = _resume(tmp_path / "fork", Net(t_max=8), ckpt, ResumeWithChanges())
    assert "lr_scheduler.T_max: 8 → 16" in capsys.readouterr().out
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx([_cosine(2, 16), _cosine(3, 16)])


def test_validate_from_a_checkpoint_is_lightnings_own(parent, tmp_path):
    ckpt, _ = parent
    callback = ResumeWithChanges()
    fit = trainer(tmp_path / "v", callback, record=False, limit_val_batches=1)
    fit.validate(Net(lr=0.001), loader(), ckpt_path=str(ckpt))
    assert callback.plan is None and "load_model_state_dict" not in vars(fit.strategy)


# ---------------------------------------------------------------------------------------------- DDP
def test_two_rank_ddp_prints_once_records_once_and_both_ranks_use_the_configured_rate(parent, tmp_path):
    ckpt, parent_record = parent
    before = record_bytes(parent_record)
    root = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(root)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("with a changed configuration") == 1
    assert proc.stdout.count("model.lr: 0.01 → 0.001") == 1
    for rank in (0, 1):
        logged = json.loads((root / f"rank{rank}.json").read_text())
        assert logged["lrs"][0] == [0.001] and logged["step"] == 4
    (fork,) = records(root)
    meta = json.loads((fork / "meta.json").read_text())
    assert meta["forked_from"]["run_dir"] == str(parent_record.resolve())
    rows = [json.loads(line) for line in (fork / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in (r.get("values") or {})]
    assert steps == sorted(set(steps)) and steps  # each step written once (rank zero only)
    assert record_bytes(parent_record) == before


def test_a_strategy_that_restores_after_its_setup_forks_the_same(parent, tmp_path, capsys):
    """``restore_checkpoint_after_setup`` (DeepSpeed, FSDP's sharded checkpoints): the record starts before the
    checkpoint loads (hyperparameters are logged first); the fork still gets its own record, the configured rate
    and the checkpoint's moments."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class LateRestore(SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    ckpt, parent_record = parent
    before = record_bytes(parent_record)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    _, spy = _resume(tmp_path / "fork", Net(lr=0.001), ckpt, ResumeWithChanges(),
                     strategy=LateRestore(device=torch.device("cpu")))
    assert "model.lr: 0.01 → 0.001" in capsys.readouterr().out
    assert spy.lrs == [[0.001], [0.001]] and torch.equal(spy.exp_avg[0], saved["state"][0]["exp_avg"])
    (fork,) = records(tmp_path / "fork")
    assert json.loads((fork / "meta.json").read_text())["forked_from"]["run_dir"] == str(parent_record.resolve())
    assert record_bytes(parent_record) == before


# ---------------------------------------------------------------------------------------------- the recipes' task
LM = dict(n_layer=1, n_embd=32, n_head=2, block_size=16)


def _lm_data():
    from entrotrain.tasks import CharCorpusDataModule

    return CharCorpusDataModule(block_size=16, batch_size=4, max_chars=20000)


@pytest.fixture(scope="module")
def lm_parent(tmp_path_factory, one_thread):
    """LanguageModelingTask (the fork tests' small model) for 4 steps, a checkpoint every 2: (step-2 ckpt, record)."""
    from entrotrain.tasks import LanguageModelingTask

    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    trainer(root, checkpoints=True).fit(LanguageModelingTask(lr=LR, **LM), datamodule=_lm_data())
    (record,) = records(root)
    return root / "ckpts" / "epoch=0-step=2.ckpt", record


def test_sigma_reparam_switched_on_in_the_task_is_applied_and_recorded(lm_parent, tmp_path, capsys):
    from entrotrain.tasks import LanguageModelingTask

    ckpt, parent_record = lm_parent
    before = record_bytes(parent_record)
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor

    model = LanguageModelingTask(lr=LR, sigma_reparam=True, **LM)
    fit = trainer(tmp_path, AttentionEntropyMonitor(every_n_steps=1), ResumeWithChanges(), max_steps=4)
    fit.fit(model, datamodule=_lm_data(), ckpt_path=str(ckpt))
    out = capsys.readouterr().out
    assert "model.sigma_reparam: false → true" in out and "start afresh" in out
    assert type(model.model.blocks[0].attn.qkv).__name__ == "SigmaReparamLinear" and fit.global_step == 4
    (fork,) = records(tmp_path)
    rows = [json.loads(line) for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "entropy/attn_norm/min" in (r.get("values") or {})} == {2, 3}  # the monitor's
    assert ["model.sigma_reparam", False, True] in json.loads((fork / "meta.json").read_text())["forked_from"]["changes"]
    assert record_bytes(parent_record) == before


def test_a_regulariser_with_learnable_thresholds_added_at_the_resume_starts_from_its_initial_values(
        lm_parent, tmp_path, capsys):
    """The task does not save its regularisers as hyperparameters: the band's parameters, absent from the
    checkpoint, are the change; they keep their initial values, every other weight is the checkpoint's."""
    from entrotrain.regularizers.attention_entropy import EntropyBandRegularizer
    from entrotrain.tasks import LanguageModelingTask

    ckpt, _ = lm_parent
    band = EntropyBandRegularizer(n_layers=1, n_heads=2)
    initial = band.raw.detach().clone()
    model = LanguageModelingTask(lr=LR, regularizers=[band], **LM)
    loaded = {}

    class Probe(Spy):
        def on_train_start(self, trainer, pl_module):
            loaded["raw"] = band.raw.detach().clone()
            loaded["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    fit = trainer(tmp_path, ResumeWithChanges(), Probe(), max_steps=4)
    fit.fit(model, datamodule=_lm_data(), ckpt_path=str(ckpt))
    out = capsys.readouterr().out
    assert 'model.new_parameters: [] → ["regularizer.raw"]' in out and "new in the model, from their initial values: regularizer.raw" in out
    assert torch.equal(loaded["raw"], initial)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(loaded["state"]) - set(saved) == {"regularizer.raw"}
    assert all(torch.equal(loaded["state"][k], v) for k, v in saved.items())
    assert fit.global_step == 4


def test_in_entrotrain_fit_the_cli_fork_is_the_one_made(lm_parent, tmp_path, capsys):
    """The callback added to an ``entrotrain fit`` run that forks: the CLI's fork is made once (one plan printed,
    one record), the callback stands aside."""
    from entrotrain.cli import main

    ckpt, _ = lm_parent
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "attention_collapse.yaml"
    main(["fit", "--config", str(recipe), "--model.init_args.n_layer=1", "--model.init_args.n_embd=32",
          "--model.init_args.n_head=2", "--model.init_args.block_size=16", "--data.init_args.block_size=16",
          "--data.init_args.batch_size=4", "--data.init_args.max_chars=20000", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.val_check_interval=2",
          "--trainer.callbacks+=entrotrain.callbacks.resume_with_changes.ResumeWithChanges",
          f"--trainer.default_root_dir={tmp_path}", "--model.init_args.lr=0.001", "--trainer.max_steps=3",
          f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert out.count("with a changed configuration") == 1 and "model.lr: 0.01 → 0.001" in out
    (fork,) = records(tmp_path)
    assert json.loads((fork / "meta.json").read_text())["forked_from"]["changes"] == [["model.lr", 0.01, 0.001]]


def _plateau(self, optimizer):
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    return {"scheduler": plateau, "interval": "step", "monitor": "train/loss"}


def _one_cycle(self, optimizer):
    cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=8)
    return {"scheduler": cycle, "interval": "step"}


def _step(gamma):
    def scheduler(self, optimizer):
        return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma), "interval": "step"}
    return scheduler


@pytest.mark.parametrize("scheduler", [_plateau, _one_cycle, _step(0.5)], ids=["plateau", "one_cycle", "step"])
def test_a_schedulers_position_is_not_a_change(tmp_path, capsys, monkeypatch, scheduler):
    """What a scheduler moves as it runs (ReduceLROnPlateau's best loss and bad-step count, OneCycleLR's betas, a
    decayed rate) differs from a fresh one's: not a change. The resume is Lightning's own and continues the record."""
    monkeypatch.setattr(Net, "scheduler", scheduler)
    ckpt, parent_record = _parent(tmp_path / "parent")
    callback = ResumeWithChanges()
    _resume(tmp_path / "again", Net(), ckpt, callback)
    assert "changed configuration" not in capsys.readouterr().out and callback.plan is None
    assert records(tmp_path / "again") == []
    assert len(json.loads((parent_record / "meta.json").read_text())["resumes"]) == 1


def test_a_step_decay_changed_in_code_forks_and_runs_as_configured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Net, "scheduler", _step(0.5))
    ckpt, _ = _parent(tmp_path / "parent")
    monkeypatch.setattr(Net, "scheduler", _step(0.8))
    _, spy = _resume(tmp_path / "fork", Net(), ckpt, ResumeWithChanges())
    assert "lr_scheduler.gamma: 0.5 → 0.8" in capsys.readouterr().out
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx([LR * 0.8 ** 2, LR * 0.8 ** 3])


def test_a_fork_keeps_the_betas_a_one_cycle_schedule_has_moved(tmp_path, capsys, monkeypatch):
    """OneCycleLR cycles Adam's beta1 with the rate: the fork (a new peak rate) keeps the saved beta1, a position in
    the cycle, instead of resetting it to the cycle's start."""
    monkeypatch.setattr(Net, "scheduler", _one_cycle)
    ckpt, _ = _parent(tmp_path / "parent")
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]

    def lower_peak(self, optimizer):
        cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR / 2, total_steps=8)
        return {"scheduler": cycle, "interval": "step"}

    monkeypatch.setattr(Net, "scheduler", lower_peak)
    betas = []

    class Betas(Spy):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(tuple(trainer.optimizers[0].param_groups[0]["betas"]))

    _resume(tmp_path / "fork", Net(), ckpt, ResumeWithChanges(), Betas())
    out = capsys.readouterr().out
    assert "optimizer.max_lr: 0.01 → 0.005" in out and "optimizer.betas" not in out and "betas [" not in out
    assert saved["betas"][0] != 0.95 and betas[0] == tuple(saved["betas"])


def test_an_unchanged_resume_from_a_weights_only_checkpoint_is_lightnings_own(tmp_path):
    """No optimizer state saved: nothing to compare, so no fork; Lightning refuses to resume training from it, with
    or without the callback."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = tmp_path / "parent"
    trainer(root, ModelCheckpoint(dirpath=root / "w", every_n_train_steps=2, save_top_k=-1, save_weights_only=True),
            record=False, enable_checkpointing=True).fit(Net(), loader())
    for callbacks in ((ResumeWithChanges(),), ()):
        with pytest.raises(KeyError, match="contains only the model"):
            _resume(tmp_path / "again", Net(), root / "w" / "epoch=0-step=2.ckpt", *callbacks, record=False)


def test_another_optimizer_kind_forks_and_starts_afresh(parent, tmp_path, capsys, monkeypatch):
    ckpt, _ = parent
    monkeypatch.setattr(Net, "configure_optimizers", lambda self: torch.optim.SGD(self.parameters(), lr=0.05,
                                                                                 momentum=0.9))
    fit, spy = _resume(tmp_path / "fork", Net(), ckpt, ResumeWithChanges())
    out = capsys.readouterr().out
    assert "optimizer: another optimizer → SGD" in out and "the optimizer changed (now SGD)" in out
    assert spy.lrs[0] == [0.05] and fit.global_step == 4
    assert isinstance(fit.optimizers[0], torch.optim.SGD)
