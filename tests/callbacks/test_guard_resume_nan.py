"""A model that goes NaN at the first logging step after a resume: the restored guard sees its key go non-finite
at that step, as in one uninterrupted run (before, the publisher's key set was per process: after a resume the key
was simply missing, and the guard fired only later as "stale" in a loop and HF, never in Lightning)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.models import TinyGPT

KEY = "entropy/attn_norm/min"


def _gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)


class _LM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _gpt()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return F.cross_entropy(self.net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _NaNFrom(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def _fit(folder: Path, max_steps: int, nan_from: int | None, ckpt: Path | None = None) -> list[str]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 16, (512, 9))), batch_size=8)
    callbacks = [AttentionEntropyMonitor(every_n_steps=4), EntropyCollapseGuard(KEY, threshold=0.01),
                 ModelCheckpoint(dirpath=folder, every_n_train_steps=8, save_top_k=-1)]
    if nan_from is not None:
        callbacks.append(_NaNFrom(nan_from))
    trainer = pl.Trainer(max_steps=max_steps, log_every_n_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_LM(), data, ckpt_path=ckpt)
    return [str(w.message) for w in caught if "EntropyCollapseGuard at step" in str(w.message)]


def test_lightning_guard_sees_nan_at_the_first_logging_step_after_a_resume(tmp_path: Path) -> None:
    (one_run,) = _fit(tmp_path / "a", 16, nan_from=8)
    assert one_run.startswith(f"EntropyCollapseGuard at step 8: {KEY} is nan")
    assert _fit(tmp_path / "b", 8, nan_from=None) == []
    (resumed,) = _fit(tmp_path / "b", 16, nan_from=8, ckpt=tmp_path / "b" / "epoch=0-step=8.ckpt")
    assert resumed.startswith(f"EntropyCollapseGuard at step 8: {KEY} is nan")


def loop_run(steps: range, saved: dict | None, nan_from: int = 10**9) -> tuple[list[str], dict]:
    """A plain loop on the tiny GPT over ``steps`` (its weights NaN from step ``nan_from``) with an attention monitor
    every 4 steps and a guard on its least entropy, the monitors' state ``saved`` loaded first: the guard's firings
    and the monitors' state at the end."""
    model = _gpt()
    sent: list[str] = []
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=4)],
                               guards=[EntropyCollapseGuard(KEY, threshold=0.01, notify=sent.append)],
                               print_summary=False)
    if saved is not None:
        monitors.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monitors.watch(model):
            for step in steps:
                if step >= nan_from:
                    with torch.no_grad():
                        next(model.parameters()).fill_(float("nan"))
                with monitors.step(step):
                    model(torch.randint(0, 16, (4, 8))).sum().backward()
            state = monitors.state_dict()
    return sent, state


def test_loop_guard_sees_nan_at_the_first_logging_step_after_a_resume() -> None:
    one_run, _ = loop_run(range(16), None, nan_from=8)
    assert len(one_run) == 1 and one_run[0].startswith(f"EntropyCollapseGuard at step 8: {KEY} is nan")
    _, saved = loop_run(range(8), None)
    resumed, _ = loop_run(range(8, 16), saved, nan_from=8)
    assert len(resumed) == 1 and resumed[0].startswith(f"EntropyCollapseGuard at step 8: {KEY} is nan"), resumed
