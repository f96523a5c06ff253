"""``EntropyCollapseGuard(keep_last_good=True)`` hunted with real Lightning trainers, as a user runs them.

Each test is a scenario that broke a promise of the guard paragraph in the README ("When the run goes wrong"): the
checkpoint a firing names is still there, whole; at most what a firing could still name is held; training is
unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER, LastGoodCheckpoints
from tests.callbacks.test_guard_scenarios import KEY, Lin, Script, loader
from tests.helpers.lightning_models import quiet_trainer


class _MostPins(L.Callback):
    """The most pins a guard held (on disk, in its keeper) at any step."""

    def __init__(self, guard: EntropyCollapseGuard) -> None:
        self.guard, self.most = guard, 0

    def on_train_batch_start(self, trainer, *args) -> None:
        self.most = max(self.most, len(self.guard.keeper.pins))


def _quiet_fit(trainer: L.Trainer, model: L.LightningModule, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), **kwargs)


def test_pins_do_not_pile_up_while_the_guards_key_is_not_published(tmp_path: Path) -> None:
    """A guard whose key is never published (a typo, a monitor not attached: ``missing_ok=True`` is the default) or
    published rarely never judges the saves of every step: each was pinned and kept to the end of the run, and once
    ``save_top_k=1`` deleted its original each pin held a whole checkpoint: 29 checkpoints' worth in a 30-step run,
    one per save however long the run. Only the newest unjudged saves can ever be named (an observation comes at a
    step no older than the save before the newest), so at most two are held beyond the judged ones."""
    guard = EntropyCollapseGuard("entropy/attn_norm/mni", threshold=0.05)  # never published
    most = _MostPins(guard)
    trainer = quiet_trainer(callbacks=[Script([0.5] * 40), guard, most,
                                       ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)],
                            max_steps=30, enable_checkpointing=True)
    _quiet_fit(trainer, Lin())
    assert most.most <= 2
    assert not (tmp_path / KEEP_FOLDER).exists()  # a normal end without a firing: nothing left


def test_the_unjudged_pins_kept_are_the_ones_a_late_observation_names(tmp_path: Path) -> None:
    """A Lightning monitor that runs after the guard is observed at the next batch start, after the checkpoint of the
    next step was saved: the save before the newest must stay until that observation comes."""
    keeper = LastGoodCheckpoints()
    saved = {}
    for step in (10, 20, 30, 31):
        path = tmp_path / f"step_{step}.pt"
        path.write_bytes(f"weights at {step}".encode())
        saved[step] = keeper.saved(path)
    assert keeper.pins == [saved[30], saved[31]]  # 10 and 20: an observation at 30 or later names 30 or 31
    keeper.judged(30, 30)
    assert keeper.freeze(30) == saved[30] and saved[30].read_bytes() == b"weights at 30"


def _collapse_fit(folder: Path, ckpt_path: Path | None = None) -> EntropyCollapseGuard:
    """Good until step 9, collapsed from step 10; a checkpoint every 3 steps, Lightning's default ``save_top_k=1``."""
    L.seed_everything(0)
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    trainer = quiet_trainer(callbacks=[Script([0.5] * 10 + [0.01] * 6), guard,
                                       ModelCheckpoint(dirpath=folder, every_n_train_steps=3)],
                            max_steps=15, enable_checkpointing=True)
    _quiet_fit(trainer, Lin(), ckpt_path=ckpt_path)
    return guard


def test_a_run_resumed_from_the_kept_checkpoint_that_collapses_again_names_it_again(tmp_path: Path) -> None:
    """The README's roll back: resume from the kept ``step=9`` (with a cure that does not work) and the run collapses
    again at step 10, before it saved a checkpoint of its own. The checkpoint to roll back to is the one it resumed
    from, still there in ``entrotrain-last-good/``; the firing named none (the guard looked only at the
    ``ModelCheckpoint`` folder, whose ``step=9`` rotation deleted, and at its own pins)."""
    first = _collapse_fit(tmp_path)
    pin = tmp_path / KEEP_FOLDER / "epoch=0-step=9.ckpt"
    assert first.rollback_checkpoint == pin
    again = _collapse_fit(tmp_path, ckpt_path=pin)
    assert again.times_fired == 1 and again.last_good_step == 9
    assert again.rollback_checkpoint == pin
    assert torch.load(pin, weights_only=True)["global_step"] == 9


def test_a_kept_checkpoint_is_not_changed_by_a_save_in_place_under_its_name(tmp_path: Path) -> None:
    """A plain loop run again (``torch.save`` to ``step_30.pt``, which exists: written in place, the same inode) must
    not change the checkpoint a firing of the first run kept: it was a hard link to that inode."""
    original = tmp_path / "step_30.pt"
    torch.save({"w": torch.zeros(3)}, original)
    guard = EntropyCollapseGuard(KEY, threshold=0.5)
    guard.checkpoint_saved(original)
    guard.observe(0.9, 30)
    guard.fire(guard.observe(0.1, 31), 31, checkpoints=[original])
    kept = guard.rollback_checkpoint
    assert kept == tmp_path / KEEP_FOLDER / original.name
    guard.keeper.wait()  # its own copy (made in the background while training goes on)
    torch.save({"w": torch.ones(3)}, original)  # the second try, same name
    assert torch.equal(torch.load(kept)["w"], torch.zeros(3))


def test_two_rank_ddp_keeps_on_rank_zero_only(tmp_path: Path) -> None:
    """2 CPU ranks (gloo): the guards fire together; only rank zero links files; the kept ``step=9`` is whole."""
    import json

    from tests.helpers.scripts import run_script

    folder = tmp_path / "ckpts"
    run_script(Path(__file__).with_name("keeper_ddp_run.py"), tmp_path, str(tmp_path), str(folder))
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    pin = folder / KEEP_FOLDER / "epoch=0-step=9.ckpt"
    assert zero["fired"] == one["fired"] == 1
    assert zero["named"] == str(pin) and zero["linked"] and one["linked"] == []
    assert sorted(p.name for p in pin.parent.iterdir()) == [pin.name]
    assert torch.load(pin, weights_only=True)["global_step"] == 9


@pytest.mark.parametrize("publish_every, save_every", [(1, 1), (1, 2), (2, 1), (3, 2), (1, 3)])
@pytest.mark.parametrize("monitor_first", [True, False])
def test_the_bound_on_unjudged_pins_never_loses_the_checkpoint_to_name(
    tmp_path: Path, publish_every: int, save_every: int, monitor_first: bool
) -> None:
    """A monitor listed after the guard is observed at the next batch start, after the next save: the checkpoint
    named is still the newest saved at or before the last good step, kept whole, whatever the cadences."""
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    script = Script([0.5] * (10 // publish_every) + [0.01] * 10, every=publish_every)
    trainer = quiet_trainer(callbacks=[*([script, guard] if monitor_first else [guard, script]),
                                       ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every)],
                            max_steps=16, enable_checkpointing=True)
    _quiet_fit(trainer, Lin())
    assert guard.times_fired == 1 and guard.last_good_step is not None
    expected = max(s for s in range(save_every, 17, save_every) if s <= guard.last_good_step)
    assert guard.rollback_checkpoint == tmp_path / KEEP_FOLDER / f"epoch=0-step={expected}.ckpt"
    assert torch.load(guard.rollback_checkpoint, weights_only=True)["global_step"] == expected
