"""EntropyCollapseGuard(action="rollback") outside Lightning: ``transformers.Trainer`` (through
EntropyTrainerCallback) and a plain loop (EntropyMonitors): the model and optimizer state right after the firing equal
those at the end of the last good step, the rates (and the scheduler's) lowered; refusals are clear errors. The 2-rank
DDP and FSDP runs are in tests/integrations/rollback_ddp_run.py; the FSDP2 rollback in test_rollback_fsdp2.py."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.scripts import run_script
from tests.helpers.training_state import model_state, opt_state, same

KEY = "scripted"
LR = 0.05


def guard(**kwargs) -> EntropyCollapseGuard:
    kwargs.setdefault("threshold", 0.5)
    kwargs.setdefault("lr_factor", 0.5)
    return EntropyCollapseGuard(KEY, action="rollback", **kwargs)


# ---------------------------------------------------------------------------- plain loop
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, generator=g) for _ in range(n)]


def loop(model, opt, monitors, values, scheduler=None, forward=None):
    """Train on ``data``; observe ``values[step]``; returns the states at each block's end (before the guards
    judge) and after it (after a rollback), and the steps ``rolled_back`` was set."""
    forward = forward or model
    inside, after, rolled = {}, {}, []
    with monitors.watch(model, optimizer=opt, scheduler=scheduler):
        for step, x in enumerate(data(len(values))):
            with monitors.step(step):
                opt.zero_grad(set_to_none=True)
                forward(x).pow(2).mean().backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                monitors.observe(**{KEY: values[step]})
                inside[step] = (model_state(model), opt_state(opt))
            after[step] = (model_state(model), opt_state(opt), [p.grad is None for p in model.parameters()])
            if monitors.rolled_back:
                rolled.append(step)
            if monitors.should_stop:
                break
    return inside, after, rolled


def test_loop_rolls_back_to_the_last_good_step_and_lowers_the_rates() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = guard()
    monitors = EntropyMonitors(guards=[g], print_summary=False)
    with pytest.warns(UserWarning, match="Rolled back the model and optimizer state to step 1"):
        inside, after, rolled = loop(model, opt, monitors, [0.9, 0.9, 0.0, 0.9, 0.9], sched)
    assert rolled == [2] and g.rollbacks == 1
    assert not same(inside[2][0], inside[1][0])
    assert same(after[2][0], inside[1][0]) and same(after[2][1], inside[1][1]) and all(after[2][2])
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.5) and sched.base_lrs == [pytest.approx(LR * 0.5)]
    assert g.held_states.step is None and g._tracked is None  # let go at the end of the with block


def test_loop_stops_after_max_rollbacks() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = guard(max_rollbacks=1)
    monitors = EntropyMonitors(guards=[g], print_summary=False)
    with pytest.warns(UserWarning, match="max_rollbacks=1"):
        _, _, rolled = loop(model, opt, monitors, [0.9, 0.0, 0.0, 0.9])
    assert rolled == [1] and monitors.should_stop


def test_loop_refuses_a_rollback_guard_without_optimizer_and_leaves_nothing_behind() -> None:
    model = mlp()
    monitors = EntropyMonitors(guards=[guard()], print_summary=False)
    with pytest.raises(EntrotrainError, match="optimizer=optimizer"):
        monitors.watch(model)
    g = monitors.guards[0]
    assert g._tracked is None
    with pytest.raises(EntrotrainError, match="before watch"):  # no half-started run left to step into
        with monitors.step(0):
            pass
    # the refused watch left no half-started run: a correct watch afterwards works and rolls back
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.warns(UserWarning, match="Rolled back"):
        _, _, rolled = loop(model, opt, monitors, [0.9, 0.0, 0.9])
    assert rolled == [1]


def test_loop_with_a_compiled_model() -> None:
    model = mlp()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        compiled(torch.zeros(1, 4))
    except Exception as err:  # noqa: BLE001 - no compile on this platform
        pytest.skip(f"torch.compile unavailable: {err}")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    monitors = EntropyMonitors(guards=[guard()], print_summary=False)
    with pytest.warns(UserWarning, match="Rolled back"):
        inside, after, rolled = loop(compiled, opt, monitors, [0.9, 0.9, 0.0, 0.9])
    assert rolled == [2]
    assert same({k.removeprefix("_orig_mod."): v for k, v in after[2][0].items()},
                {k.removeprefix("_orig_mod."): v for k, v in inside[1][0].items()})
    # the compiled graph reads the restored weights: same output as the eager model holding the held weights
    ref = mlp()
    ref.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in inside[1][0].items()})
    x = torch.randn(3, 4)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in inside[1][0].items()})
    assert torch.equal(compiled(x), ref(x))


def test_loop_with_a_ddp_wrapped_model() -> None:

    from tests.helpers.gloo import in_one_process_group

    def body() -> None:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=LR)
        monitors = EntropyMonitors(guards=[guard()], print_summary=False)
        with pytest.warns(UserWarning, match="Rolled back"):
            inside, after, rolled = loop(model, opt, monitors, [0.9, 0.9, 0.0, 0.9, 0.9], forward=ddp)
        assert rolled == [2] and same(after[2][0], inside[1][0]) and same(after[2][1], inside[1][1])

    in_one_process_group(body)


def test_loop_a_rollback_guard_that_never_fires_changes_nothing() -> None:
    finals = []
    for guards in ([EntropyCollapseGuard(KEY, threshold=0.5, action="warn")], [guard()]):  # (a loop needs one)
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        inside, _, rolled = loop(model, opt, EntropyMonitors(guards=guards, print_summary=False), [0.9] * 5)
        finals.append((inside[4], rolled))
    assert same(finals[0][0][0], finals[1][0][0]) and same(finals[0][0][1], finals[1][0][1])
    assert finals[1][1] == []


def test_loop_rolled_back_is_false_for_a_stop_and_other_actions() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = EntropyCollapseGuard(KEY, threshold=0.5, action="reduce_lr")
    monitors = EntropyMonitors(guards=[g], print_summary=False)
    with pytest.warns(UserWarning, match="multiplied"):
        _, _, rolled = loop(model, opt, monitors, [0.9, 0.0, 0.9])
    assert rolled == []


def test_loop_rolled_back_is_false_when_a_silent_key_is_only_warned_about() -> None:
    """A key that stops being observed fires as stale; a rollback guard warns and does not roll back, so
    ``monitors.rolled_back`` stays False (it said True: it looked at the action, not at what the guard did)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = guard()
    monitors = EntropyMonitors(guards=[g], print_summary=False)
    rolled = []
    with monitors.watch(model, optimizer=opt), pytest.warns(UserWarning, match="Not rolled back"):
        for step, x in enumerate(data(8)):
            with monitors.step(step):
                opt.zero_grad(set_to_none=True)
                model(x).pow(2).mean().backward()
                opt.step()
                if step < 2:  # published at steps 0 and 1, then silent: stale after 3 steps
                    monitors.observe(**{KEY: 0.9})
            if monitors.rolled_back:
                rolled.append(step)
    assert g.times_fired == 1 and g.last_level == "warn" and g.rollbacks == 0
    assert rolled == []


# ---------------------------------------------------------------------------- transformers.Trainer
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402

VOCAB, T = 48, 12


class ScriptLogs(TrainerCallback):
    """Adds ``values[step]`` under KEY to each step's logs (before EntropyTrainerCallback sees them), and records
    the model and optimizer state at each step end (before the guard judges at the log)."""

    def __init__(self, values) -> None:
        self.values = list(values)
        self.at_step_end: dict[int, tuple] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.at_step_end[state.global_step] = (model_state(model), opt_state(optimizer))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and state.global_step - 1 < len(self.values):
            logs[KEY] = self.values[state.global_step - 1]


class AfterLog(TrainerCallback):
    def __init__(self) -> None:
        self.at_log: dict[int, tuple] = {}
        self.lrs: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        self.at_log[state.global_step] = (model_state(model), opt_state(optimizer),
                                          [p.grad is None for p in model.parameters()])
        self.lrs[state.global_step] = optimizer.param_groups[0]["lr"]


def hf_trainer(tmp_path: Path, steps: int, **overrides) -> Trainer:
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
                  learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                  lr_scheduler_type="linear")
    kwargs.update(overrides)
    return Trainer(model=tiny_gpt2_lm(VOCAB, T, 0), args=TrainingArguments(**kwargs),
                   train_dataset=lm_rows(16, VOCAB, T, 1))


def test_hf_trainer_rolls_back_model_and_adam_state_and_lowers_the_scheduler(tmp_path: Path) -> None:
    trainer = hf_trainer(tmp_path, 5)
    script, after = ScriptLogs([0.9, 0.9, 0.0, 0.9, 0.9]), AfterLog()
    g = guard()
    cb = EntropyTrainerCallback(guards=[g]).attach(trainer)
    handler = trainer.callback_handler.callbacks
    handler.insert(handler.index(cb), script)  # its logs reach the guard
    trainer.add_callback(after)
    with pytest.warns(UserWarning, match="to step 2"):
        trainer.train()
    assert g.rollbacks == 1
    # logged at step 3 (its value values[2] = 0.0): back to the state at the end of step 2
    assert not same(script.at_step_end[3][0], script.at_step_end[2][0])
    assert same(after.at_log[3][0], script.at_step_end[2][0])
    assert same(after.at_log[3][1], script.at_step_end[2][1])  # Adam's moments and steps
    assert all(after.at_log[3][2])
    assert trainer.lr_scheduler.base_lrs == [pytest.approx(1e-2 * 0.5)] * len(trainer.lr_scheduler.base_lrs)
    assert g.held_states.step is None and g._tracked is None


def test_hf_trainer_refuses_fsdp_arguments(tmp_path: Path) -> None:
    """FSDP arguments need a process group (torchrun's environment): in a fresh interpreter."""
    out = run_script(Path(__file__).with_name("rollback_hf_fsdp_run.py"), Path(__file__).resolve().parents[2],
                     str(tmp_path / "out"))
    assert out.strip().splitlines()[-1] == "REFUSED"  # train() raised the EntrotrainError naming fsdp= and reduce_lr


@pytest.mark.parametrize("how", ["trainer", "env"])
def test_hf_trainer_refuses_fsdp_from_accelerate_without_fsdp_arguments(tmp_path: Path, monkeypatch, how) -> None:
    """``accelerate launch`` with an FSDP / DeepSpeed config shards the model while TrainingArguments(fsdp=...) stays
    empty: Trainer says so in ``is_fsdp_enabled`` / ``is_deepspeed_enabled`` (accelerate in ACCELERATE_USE_FSDP /
    ACCELERATE_USE_DEEPSPEED). The model handed to callbacks is the unwrapped one, whose modules show no FSDP."""
    trainer = hf_trainer(tmp_path, 2)
    cb = EntropyTrainerCallback(guards=[guard()]).attach(trainer)
    if how == "env":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(EntrotrainError, match="sharded"):
            trainer.train()
        return
    # Trainer's own FSDP code paths need a process group: drive the callback's train begin directly
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True, raising=False)
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(EntrotrainError, match="sharded"):
        cb.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model, optimizer=opt)


def test_hf_callback_refuses_a_train_begin_without_optimizer(tmp_path: Path) -> None:
    trainer = hf_trainer(tmp_path, 2)
    cb = EntropyTrainerCallback(guards=[guard()]).attach(trainer)
    with pytest.raises(EntrotrainError, match="no optimizer"):
        cb.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model, optimizer=None)
    assert cb.guards[0]._tracked is None


# ---------------------------------------------------------------------------- DDP / FSDP: two gloo ranks
def test_ddp_two_ranks_roll_back_together_fsdp2_is_accepted_and_fsdp1_refused(tmp_path: Path) -> None:
    run_script(Path(__file__).with_name("rollback_ddp_run.py"), Path(__file__).resolve().parents[2], str(tmp_path))
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["rolled"] == [2], r
        assert r["restored_equals_held"], r
        assert r["fsdp2_accepted"], r  # FSDP2 rolls back (test_rollback_fsdp2.py)
        assert r["fsdp1_refused"], r
        zero = r["zero"]  # ZeroRedundancyOptimizer: each rank's shard of Adam's state (in .optim) rolls back, and
        assert zero["rolled"] == [2] and zero["owns_state"] and zero["restored_step_0"], zero  # ranks agree on what
        assert zero["lr"] == zero["inner_lr"] == pytest.approx(LR * 0.5), zero  # is held
        assert zero["overlap_refused"], zero
        # the host memory check fails on rank 1's machine only: both refuse (one alone would hang the other)
        assert "OOM killer" in zero["memory_refused"] or "another process" in zero["memory_refused"], zero
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in range(2))
    assert same(w0, w1)  # identical on both ranks after the rollback


_ = (copy, math)
