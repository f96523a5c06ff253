"""False forks of ``EntropyTrainerCallback(resume_changes=True)`` (real ``transformers.Trainer`` runs, CPU, tiny
GPT-2): an unchanged resume must be ``Trainer``'s own, a changed one a fork. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from entrotrain.regularizers.sigma_reparam import sigma_reparam  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T = 48, 12


def _trainer(root: Path, model: torch.nn.Module, **overrides) -> Trainer:
    kwargs = dict(
        output_dir=str(root / "out"), per_device_train_batch_size=4, logging_steps=1, use_cpu=True,
        report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0, learning_rate=1e-2,
        warmup_steps=2, max_steps=4,
    )
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=lm_rows(24, VOCAB, T, 1))


def _records(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs").glob("**/meta.json"))


def _parent(root: Path, model: torch.nn.Module | None = None, **args) -> Path:
    trainer = _trainer(root, model if model is not None else tiny_gpt2_lm(VOCAB, T, 0), **args)
    EntropyTrainerCallback(record=str(root / "runs")).attach(trainer)
    trainer.train()
    return root / "out" / "checkpoint-2"


def _resume(root: Path, checkpoint: Path, model: torch.nn.Module | None = None, **args
            ) -> tuple[Trainer, EntropyTrainerCallback]:
    args.setdefault("save_strategy", "no")
    trainer = _trainer(root, model if model is not None else tiny_gpt2_lm(VOCAB, T, 5), **args)
    callback = EntropyTrainerCallback(record=str(root / "runs"), resume_changes=True).attach(trainer)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, callback


def test_a_transformers_4_adamw_torch_checkpoint_resumed_as_adamw_torch_fused_is_not_a_change(tmp_path, capsys):
    """transformers 4's default ``optim="adamw_torch"`` saved; transformers 5's default ``adamw_torch_fused`` resumes
    it: the same ``torch.optim.AdamW``, ``fused=True`` only. Before the fix this forked (``args.optim: adamw_torch →
    adamw_torch_fused``, and without saved arguments ``optimizer.fused: None → True``) and wrote a new record."""
    checkpoint = _parent(tmp_path, optim="adamw_torch")
    (parent,) = _records(tmp_path)
    _, callback = _resume(tmp_path, checkpoint, optim="adamw_torch_fused")
    assert callback._fork.plan is None
    assert "changed configuration" not in capsys.readouterr().out
    assert _records(tmp_path) == [parent]  # the parent's record continues


def test_without_saved_arguments_the_fused_flag_is_not_a_change(tmp_path, capsys):
    """A parent trained without the callback: only the optimizer states compare (``fused: None → True``)."""
    trainer = _trainer(tmp_path, tiny_gpt2_lm(VOCAB, T, 0), optim="adamw_torch")
    trainer.train()
    _, callback = _resume(tmp_path, tmp_path / "out" / "checkpoint-2", optim="adamw_torch_fused")
    assert callback._fork.plan is None


def test_a_fork_under_adamw_torch_fused_does_not_list_the_flag(tmp_path, capsys):
    checkpoint = _parent(tmp_path, optim="adamw_torch")
    trainer, callback = _resume(tmp_path, checkpoint, optim="adamw_torch_fused", learning_rate=1e-3)
    assert [key for key, _, _ in callback._fork.plan.changes] == ["args.learning_rate"]
    assert "fused" not in "\n".join(callback._fork.plan.lines())
    assert trainer.optimizer.param_groups[0]["fused"] is True  # the configured implementation runs the fork


def test_another_optimizer_still_forks(tmp_path, capsys):
    checkpoint = _parent(tmp_path, optim="adamw_torch")
    _, callback = _resume(tmp_path, checkpoint, optim="sgd")
    assert ("args.optim", "adamw_torch", "sgd") in callback._fork.plan.changes


def test_a_refused_resume_leaves_no_record(tmp_path):
    """σReparam removed at the resume is refused; no new record folder is left beside the parent's."""
    checkpoint = _parent(tmp_path, model=sigma_reparam(tiny_gpt2_lm(VOCAB, T, 0), exclude="lm_head"))
    before = _records(tmp_path)
    with pytest.raises(EntrotrainError, match="σReparam cannot be removed"):
        _resume(tmp_path, checkpoint)
    assert _records(tmp_path) == before


def _as_transformers_4(checkpoint: Path, **args) -> None:
    """Rewrite the checkpoint's saved arguments (``trainer_state.json``) as a transformers 4 run wrote them."""
    import json

    from entrotrain.integrations.hf_resume import ARGS_KEY
    from entrotrain.integrations.transformers import STATE_KEY

    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state["stateful_callbacks"][STATE_KEY][ARGS_KEY].update(args)
    path.write_text(json.dumps(state))


def test_a_transformers_4_warmup_ratio_resumed_as_transformers_5_warmup_steps_is_not_a_change(tmp_path, capsys):
    """transformers 4 saved ``warmup_steps=0, warmup_ratio=0.25``; transformers 5 has no ``warmup_ratio`` and says
    the same with ``warmup_steps=0.25``. Before the fix: ``args.warmup_steps: 0 → 0.25``, a fork."""
    checkpoint = _parent(tmp_path, warmup_steps=0.25)
    _as_transformers_4(checkpoint, warmup_steps=0, warmup_ratio=0.25, optim="adamw_torch")
    _, callback = _resume(tmp_path, checkpoint, warmup_steps=0.25)
    assert callback._fork.plan is None


def test_a_changed_warmup_ratio_across_versions_still_forks(tmp_path, capsys):
    checkpoint = _parent(tmp_path, warmup_steps=0.25)
    _as_transformers_4(checkpoint, warmup_steps=0, warmup_ratio=0.25)
    _, callback = _resume(tmp_path, checkpoint, warmup_steps=0.5)
    assert callback._fork.plan.changes == [("args.warmup_steps", 0.25, 0.5)]
