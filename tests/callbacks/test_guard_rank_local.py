"""A ``rollback`` / ``reduce_lr`` / ``stop`` guard on several ranks watching a key each rank logs with ``self.log``
unsynced is warned about: each rank would judge its own value, and one rank acting alone makes the replicas drift
apart, or (``stop``) leaves the other ranks waiting for it in their next collective."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from entrotrain.callbacks import EntropyCollapseGuard


def _trainer(world: int, sync: bool) -> SimpleNamespace:
    meta = SimpleNamespace(name="loss", sync=SimpleNamespace(should=sync))
    loop = SimpleNamespace(_batches_that_stepped=5)
    return SimpleNamespace(world_size=world, _results={"training_step.loss": SimpleNamespace(meta=meta)},
                           callback_metrics={"loss": torch.tensor(1.0)}, fit_loop=SimpleNamespace(epoch_loop=loop))


@pytest.mark.parametrize(("action", "world", "sync", "warned"), [
    ("rollback", 2, False, True), ("reduce_lr", 4, False, True), ("rollback", 2, True, False),
    ("rollback", 1, False, False), ("warn", 2, False, False), ("stop", 2, False, True), ("stop", 2, True, False),
])
def test_an_unsynced_key_on_several_ranks_is_warned_about_once(action: str, world: int, sync: bool,
                                                               warned: bool) -> None:
    guard = EntropyCollapseGuard("loss", threshold=5.0, mode="max", action=action, keep_last_good=False)
    trainer = _trainer(world, sync)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard._poll_logged(trainer)
        trainer.fit_loop.epoch_loop._batches_that_stepped = 6
        guard._poll_logged(trainer)
    said = [str(w.message) for w in caught if "without sync_dist=True" in str(w.message)]
    assert len(said) == (1 if warned else 0) and guard.last_seen_step == 6
    if warned:
        assert f"each of the {world} ranks" in said[0] and "self.log('loss', ..., sync_dist=True)" in said[0]
        assert ("wait for it in their next collective" in said[0]) == (action == "stop")  # one rank alone: a hang
