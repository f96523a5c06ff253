"""Findings (session 27) on a guard restored from a checkpoint.

A resumed run whose monitor logs at another cadence (``every_n_steps=4`` before the crash, ``32`` after: "log less
often now") was stopped by an ``action="stop"`` guard as *stale* at the first steps after the resume: the stale limit
came from the saved run's publication interval (3 × 4 steps) while the monitor of the resumed run publishes every 32.
One uninterrupted run at either cadence never calls the key stale. Now a restored guard judges staleness once the
key was published in the resumed run (a model gone NaN is still seen at that first publication: the publisher's
key set is restored), and a guard whose publisher is not among the trainer's callbacks is warned about.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.integrations.loop import EntropyMonitors
from tests.callbacks.test_guard_resume_nan import _LM, _gpt

KEY = "entropy/attn_norm/min"


def _fit(folder: Path, max_steps: int, every: int | None, ckpt: Path | None = None) -> tuple[int, list[str]]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 16, (512, 9))), batch_size=8)
    monitors = [AttentionEntropyMonitor(every_n_steps=every)] if every is not None else []
    callbacks = [*monitors, EntropyCollapseGuard(KEY, threshold=0.001, action="stop"),
                 ModelCheckpoint(dirpath=folder, every_n_train_steps=8, save_top_k=-1)]
    trainer = pl.Trainer(max_steps=max_steps, log_every_n_steps=every or 4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_LM(), data, ckpt_path=ckpt)
    return trainer.global_step, [str(w.message) for w in caught if "EntropyCollapseGuard" in str(w.message)]


def test_lightning_resume_at_a_slower_cadence_is_not_stale(tmp_path: Path) -> None:
    assert _fit(tmp_path, 8, 4) == (8, [])
    steps, messages = _fit(tmp_path, 40, 32, ckpt=tmp_path / "epoch=0-step=8.ckpt")
    assert steps == 40 and messages == [], messages


def test_lightning_resume_without_the_monitor_is_warned_about(tmp_path: Path) -> None:
    assert _fit(tmp_path, 8, 4) == (8, [])
    steps, messages = _fit(tmp_path, 16, None, ckpt=tmp_path / "epoch=0-step=8.ckpt")
    assert steps == 16
    assert any("no callback of this trainer has that state_key" in m for m in messages), messages


def test_core_restored_guard_waits_for_the_first_publication() -> None:
    guard = EntropyCollapseGuard(KEY, threshold=0.001, action="stop")
    for step in (0, 4):
        assert guard.observe(0.5, step) is None
    assert guard.check_stale(17) is not None  # one run: 13 steps of silence at a 4-step cadence is stale
    saved = EntropyCollapseGuard(KEY, threshold=0.001, action="stop")
    for step in (0, 4):
        saved.observe(0.5, step)
    resumed = EntropyCollapseGuard(KEY, threshold=0.001, action="stop")
    resumed.load_state_dict(saved.state_dict())
    assert resumed.check_stale(17) is None and resumed.check_stale(31) is None
    assert resumed.observe(0.5, 32) is None
    assert resumed.check_stale(32 + 3 * 28 + 1) is not None  # judged again from the first publication on


def test_loop_resume_at_a_slower_cadence_is_not_stale() -> None:
    def run(steps: range, every: int, saved: dict | None) -> tuple[list[str], dict]:
        sent: list[str] = []
        model = _gpt()
        monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=every)],
                                   guards=[EntropyCollapseGuard(KEY, threshold=0.001, action="stop",
                                                                notify=sent.append)], print_summary=False)
        if saved is not None:
            monitors.load_state_dict(saved)
        state: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with monitors.watch(model):
                for step in steps:
                    with monitors.step(step):
                        model(torch.randint(0, 16, (4, 8))).sum().backward()
                    if step == 8:
                        state = monitors.state_dict()
        return sent, state

    _, saved = run(range(9), 4, None)
    resumed, _ = run(range(9, 40), 32, saved)
    assert resumed == []


def test_loop_resume_without_the_monitor_is_warned_about() -> None:
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=4)], guards=[EntropyCollapseGuard(KEY)],
                               print_summary=False)
    model = _gpt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monitors.watch(model):
            for step in range(5):
                with monitors.step(step):
                    model(torch.randint(0, 16, (4, 8))).sum().backward()
            saved = monitors.state_dict()
    other = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=4, prefix="other/")],
                            guards=[EntropyCollapseGuard(KEY)], print_summary=False)
    other.load_state_dict(saved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with other.watch(_gpt()):
            pass
    assert any("no monitor of this" in str(w.message) for w in caught), [str(w.message) for w in caught]


class _LoggingLM(_LM):
    """Logs the watched key itself (``self.log``), collapsed from step 12 on."""

    def training_step(self, batch, batch_idx):
        self.log(KEY, 0.5 if self.global_step < 12 else 0.0001)
        return super().training_step(batch, batch_idx)


def test_lightning_resume_where_the_key_is_now_self_logged_is_still_judged(tmp_path: Path) -> None:
    assert _fit(tmp_path, 8, 4) == (8, [])
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 16, (512, 9))), batch_size=8)
    trainer = pl.Trainer(max_steps=40, log_every_n_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[EntropyCollapseGuard(KEY, threshold=0.001, action="stop"),
                                    ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_LoggingLM(), data, ckpt_path=tmp_path / "epoch=0-step=8.ckpt")
    fired = [str(w.message) for w in caught if "EntropyCollapseGuard at step" in str(w.message)]
    assert len(fired) == 1 and "fell below 0.001" in fired[0] and trainer.global_step < 20, fired
