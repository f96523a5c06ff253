"""Bug hunt on ``EntropyTrainerCallback(resume_changes=True)`` with real ``transformers.Trainer`` runs (CPU, tiny
GPT-2): each test is a resume a user would run, and failed before its fix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T = 48, 12


def _trainer(root: Path, seed: int, **overrides) -> Trainer:
    kwargs = dict(
        output_dir=str(root / "out"), per_device_train_batch_size=4, logging_steps=1, use_cpu=True,
        report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0, learning_rate=1e-2,
        max_steps=6,
    )
    kwargs.update(overrides)
    return Trainer(model=tiny_gpt2_lm(VOCAB, T, seed), args=TrainingArguments(**kwargs),
                   train_dataset=lm_rows(24, VOCAB, T, 1), eval_dataset=lm_rows(8, VOCAB, T, 2))


def _records(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs").glob("**/meta.json"))


def _lrs(trainer: Trainer) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r}


PLATEAU = dict(lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs={"mode": "min", "patience": 0, "factor": 0.5},
               eval_strategy="steps", eval_steps=1, metric_for_best_model="loss")


def test_a_rate_reduce_lr_on_plateau_has_cut_is_not_a_change(tmp_path: Path, capsys) -> None:
    """``lr_scheduler_type="reduce_lr_on_plateau"``: the saved rate is the cut one, the configured optimizer's the
    initial one. Before the fix an unchanged resume forked (``optimizer.lr: 0.00125 → 0.01``), put the rate back to
    0.01 and wrote a new record; it is Trainer's own resume (the cut rate goes on)."""
    parent = _trainer(tmp_path, 0, **PLATEAU)
    EntropyTrainerCallback(record=str(tmp_path / "runs")).attach(parent)
    parent.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"]
    assert saved < 1e-2  # the plateau did cut the rate
    resumed = _trainer(tmp_path, 5, save_strategy="no", **PLATEAU)
    callback = EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert callback._fork.plan is None and "changed configuration" not in capsys.readouterr().out
    assert _lrs(resumed)[5] == saved
    assert len(_records(tmp_path)) == 1


def test_a_fork_from_a_save_only_model_checkpoint_runs_the_configured_schedule_at_the_saved_step(tmp_path: Path,
                                                                                                 capsys) -> None:
    """``save_only_model=True`` checkpoints have no ``optimizer.pt`` / ``scheduler.pt``. Before the fix the fork
    (a new rate) said nothing about the optimizer and ran the warmup again from a rate of 0 at step 3, although
    the configured schedule at step 2 (warmup 2 done) gives the configured peak; now it does, and says the
    optimizer starts afresh."""
    parent = _trainer(tmp_path, 0, save_only_model=True, warmup_steps=2, max_steps=4)
    EntropyTrainerCallback(record=str(tmp_path / "runs")).attach(parent)
    parent.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert not (checkpoint / "optimizer.pt").exists()
    resumed = _trainer(tmp_path, 5, save_strategy="no", warmup_steps=2, max_steps=4, learning_rate=1e-3)
    EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    out = capsys.readouterr().out
    assert "args.learning_rate: 0.01 → 0.001" in out and "the optimizer starts afresh" in out
    lrs = _lrs(resumed)
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(0.5e-3)  # linear decay from the peak over 2 steps


class _StepRates(TrainerCallback):
    """The rate the optimizer steps with, at each step's begin (Trainer logs the scheduler's ``get_last_lr``)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        self.rates.append(optimizer.param_groups[0]["lr"])


def _own_cosine(root: Path, seed: int, t_max: int, **overrides) -> Trainer:
    """A Trainer given its own AdamW and CosineAnnealingLR(T_max) (``optimizers=(opt, scheduler)``): the scheduler
    holds the optimizer accelerate wraps afterwards."""
    model = tiny_gpt2_lm(VOCAB, T, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    kwargs = dict(output_dir=str(root / "out"), per_device_train_batch_size=4, logging_steps=1, use_cpu=True,
                  report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0, max_steps=4)
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=lm_rows(24, VOCAB, T, 1),
                   optimizers=(optimizer, scheduler))


def test_a_changed_schedule_passed_to_trainer_is_the_rate_stepped_with(tmp_path: Path, capsys) -> None:
    """``Trainer(optimizers=(AdamW, CosineAnnealingLR(T_max=4 → 8)))``: before the fix the fork set the scheduler's
    ``_last_lr`` (the logged rate) to the configured cosine at step 2 but left the optimizer at the saved schedule's
    rate (the scheduler's optimizer is the unwrapped one), so step 3 trained at 0.005, logged 0.0085, and the note
    named the unused ``lr_scheduler_type`` ("linear")."""
    parent = _own_cosine(tmp_path, 0, 4)
    EntropyTrainerCallback(record=str(tmp_path / "runs")).attach(parent)
    parent.train()
    resumed = _own_cosine(tmp_path, 5, 8, save_strategy="no")
    EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(resumed)
    rates = _StepRates()
    resumed.add_callback(rates)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    out = capsys.readouterr().out
    assert "lr_scheduler.T_max: 4 → 8" in out and "schedule: CosineAnnealingLR as configured, at step 2" in out
    expected = [1e-2 * (1 + math.cos(math.pi * step / 8)) / 2 for step in (2, 3)]
    assert rates.rates == pytest.approx(expected)
    assert [_lrs(resumed)[step] for step in (3, 4)] == pytest.approx(expected)


def test_an_unchanged_moe_resume_is_trainers_own(tmp_path: Path, capsys) -> None:
    """transformers 5 saves a Mixtral's fused experts (``mlp.experts.gate_up_proj``) under the checkpoint format's
    names (``block_sparse_moe.experts.0.w1.weight``) and converts them back on load. Before the fix the model's
    expert and router parameters looked new (not in the checkpoint by name): the unchanged resume forked, said they
    start "from their initial values" (they were loaded) and wrote a new record."""
    from tests.helpers.tiny_hf_lms import tiny_mixtral_lm

    def mixtral(seed: int, **overrides) -> Trainer:
        kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, logging_steps=1,
                      use_cpu=True, report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0,
                      learning_rate=1e-2, max_steps=4)
        kwargs.update(overrides)
        return Trainer(model=tiny_mixtral_lm(VOCAB, seed=seed), args=TrainingArguments(**kwargs),
                       train_dataset=lm_rows(24, VOCAB, T, 1))

    parent = mixtral(0)
    EntropyTrainerCallback(record=str(tmp_path / "runs")).attach(parent)
    parent.train()
    resumed = mixtral(3, save_strategy="no")
    callback = EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert callback._fork.plan is None and "changed configuration" not in capsys.readouterr().out
    assert len(_records(tmp_path)) == 1
