"""A real Lightning run killed with SIGKILL mid-run (``keeper_killed_run.py``), and a second run that resumes in the
same folder: the killed run's provisional pins are freed (or adopted and named), its frozen pin stays, and the pin a
run resumes from is kept.

The killed run (``save_top_k=1``, a save every 3 steps) is good until step 7, bad after; killed at step 10. It left
``epoch=0-step=9.ckpt`` and, kept: ``step=6`` (its first guard's newest good save, provisional), ``step=9`` (the
newest save, provisional), and ``step=3`` (its second guard fired at step 5: frozen); one link each, shared by its two
guards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER, list_pins
from tests.callbacks.test_guard_scenarios import KEY, Lin, Script, loader
from tests.helpers.lightning_models import quiet_trainer

_CASES = ("lazy", "start", "from_pin")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, Path]:
    """One killed run per case (forked from one process: each folder's pins must be its own inodes)."""
    root = tmp_path_factory.mktemp("killed")
    script = Path(__file__).with_name("keeper_killed_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(script), str(root), *_CASES], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    pids: list[int] = []
    try:
        for case in _CASES:
            while not (root / f"{case}.ready").exists():
                assert parent.poll() is None, parent.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the run to kill never reached its step"
                time.sleep(0.2)
            pids.append(int((root / f"{case}.ready").read_text()))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        if len(pids) < len(_CASES):  # failed before every run was ready: end the runs this fixture started
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=60)
    return {case: root / case for case in _CASES}


def _states(folder: Path) -> dict[str, str]:
    return {pin.path.name: pin.state for pin in list_pins(folder)}


class _StartKeepers(L.Callback):
    """The guard's own ``on_fit_start`` call, made again: tell the keeper the checkpoint folders and the resume (a
    folder already looked at is not looked at again, so both tests see the guard's glue at work)."""

    def __init__(self, guard: EntropyCollapseGuard) -> None:
        self.guard = guard

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath]
            self.guard.keeper.start(folders, resumed_from=trainer.ckpt_path)


def _resume(folder: Path, ckpt: Path, values, start: bool) -> EntropyCollapseGuard:
    """Resume to step 15 with the first guard (patience 3: its restored bad streak of 2 fires at step 10 if the
    values stay bad)."""
    L.seed_everything(0)
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=3)
    callbacks = [Script(values), guard, *([_StartKeepers(guard)] if start else []),
                 ModelCheckpoint(dirpath=folder, every_n_train_steps=3)]
    trainer = quiet_trainer(callbacks=callbacks, max_steps=15, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lin(), loader(), ckpt_path=ckpt)
    return guard


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_the_killed_run_left_its_pins_listed(killed) -> None:
    assert _states(killed["lazy"]) == {"epoch=0-step=3.ckpt": "kept", "epoch=0-step=6.ckpt": "abandoned",
                                       "epoch=0-step=9.ckpt": "abandoned"}  # one link, not one per guard
    (manifest,) = (killed["lazy"] / KEEP_FOLDER).glob(".entrotrain-pins.*")  # one manifest, not one per guard
    assert [r["name"] for r in json.loads(manifest.read_text())["pins"]] == ["epoch=0-step=6.ckpt",
                                                                           "epoch=0-step=9.ckpt"]
    assert sorted(p.name for p in killed["lazy"].glob("*.ckpt")) == ["epoch=0-step=9.ckpt"]


def test_a_resumed_run_frees_the_killed_runs_pins_at_its_normal_end(killed) -> None:
    """The killed run's pins are held while the resumed run trains, and freed when it ends normally; the frozen one
    stays, whole. Before manifests they stayed forever: each kill and resume left up to four more, a whole checkpoint each once rotation deleted the original (step 6 here)."""
    folder = killed["lazy"]
    guard = _resume(folder, folder / "epoch=0-step=9.ckpt", [{KEY: 0.5}] * 16, start=False)
    assert guard.times_fired == 0
    kept = folder / KEEP_FOLDER
    assert sorted(p.name for p in kept.iterdir()) == ["epoch=0-step=3.ckpt"]
    assert _step(kept / "epoch=0-step=3.ckpt") == 3


def test_a_resumed_run_told_of_its_resume_adopts_and_names_the_killed_runs_pin(killed) -> None:
    """With ``keeper.start(folders, resumed_from=ckpt_path)`` at fit start, the resumed run's guard (restored: last
    good at step 7) fires at step 10, before its first save, and names the killed run's pin of step 6, whose
    original ``save_top_k=1`` deleted; it is frozen and stays; the other pins are freed."""
    folder = killed["start"]
    guard = _resume(folder, folder / "epoch=0-step=9.ckpt", [{KEY: 0.5}] * 8 + [{KEY: 0.01}] * 8, start=True)
    assert guard.times_fired == 1 and guard.last_good_step == 7
    assert guard.rollback_checkpoint == folder / KEEP_FOLDER / "epoch=0-step=6.ckpt"
    assert _step(guard.rollback_checkpoint) == 6
    assert _states(folder) == {"epoch=0-step=3.ckpt": "kept", "epoch=0-step=6.ckpt": "kept"}


def test_the_pin_a_run_resumes_from_is_never_deleted_under_it(killed) -> None:
    """Resumed from the killed run's provisional pin of step 6: it is kept for good; the pins saved after step 6
    (a future the resumed run replaces) are freed at once."""
    folder = killed["from_pin"]
    pin = folder / KEEP_FOLDER / "epoch=0-step=6.ckpt"
    guard = _resume(folder, pin, [{KEY: 0.5}] * 16, start=True)
    assert guard.times_fired == 0
    assert _states(folder) == {"epoch=0-step=3.ckpt": "kept", "epoch=0-step=6.ckpt": "kept"}
    assert _step(pin) == 6 and pin.stat().st_nlink == 1
