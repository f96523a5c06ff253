"""``EntropyCollapseGuard(keep_last_good=True)`` under ``transformers.Trainer``, hunted as a user runs it: the
checkpoint a firing names is still there, whole, whatever ``save_total_limit`` did."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER  # noqa: E402
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.integrations.test_hf_trainer import _model, _trainer  # noqa: E402


def _collapse_train(tmp_path: Path, resume: str | None = None, **overrides) -> EntropyCollapseGuard:
    """The learning rate decays linearly over 6 steps: a guard on it is good up to step 4 and fires at step 5."""
    trainer = _trainer(tmp_path, _model(), max_steps=6, save_strategy="steps", **{"save_total_limit": 1, **overrides})
    guard = EntropyCollapseGuard("learning_rate", threshold=0.004)
    EntropyTrainerCallback(guards=[guard]).attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return guard


def test_a_run_resumed_from_the_kept_checkpoint_that_collapses_again_names_it_again(tmp_path: Path) -> None:
    """Roll back to the kept ``checkpoint-4`` (``save_total_limit=1`` deleted the original) and collapse again at
    step 5, before the resumed run saves: the checkpoint to roll back to is the kept one it resumed from; the firing
    named none (the guard looked only at ``output_dir/checkpoint-*``)."""
    first = _collapse_train(tmp_path, save_steps=2)
    kept = tmp_path / "out" / KEEP_FOLDER / "checkpoint-4"
    assert first.rollback_checkpoint == kept and not (tmp_path / "out" / "checkpoint-4").exists()
    again = _collapse_train(tmp_path, resume=str(kept), save_steps=4)
    assert again.times_fired == 1 and again.last_good_step == 4
    assert again.rollback_checkpoint == kept
    assert json.loads((kept / "trainer_state.json").read_text())["global_step"] == 4


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_kept_checkpoint_survives_a_rerun_in_the_same_output_dir(tmp_path: Path) -> None:
    """Trainer keeps every checkpoint by default (``save_total_limit=None``), so the kept ``checkpoint-4`` shares its
    files with ``out/checkpoint-4``. Running the script again with a cure in the same ``output_dir`` (the usual next
    try) rewrites ``out/checkpoint-4/optimizer.pt``, ``scheduler.pt``, ``trainer_state.json`` and
    ``training_args.bin`` in place: the kept checkpoint became the new run's optimizer, schedule and state beside the
    old run's weights, silently."""
    first = _collapse_train(tmp_path, save_steps=2, save_total_limit=None)
    kept = first.rollback_checkpoint
    assert kept == tmp_path / "out" / KEEP_FOLDER / "checkpoint-4"
    before = _digests(kept)
    again = _collapse_train(tmp_path, save_steps=2, save_total_limit=None, learning_rate=5e-3)
    assert again.times_fired == 1  # the second try wrote its own checkpoint-4
    assert _digests(kept) == before
