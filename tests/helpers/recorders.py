"""Read-only Lightning callbacks that keep what each training step produced, for tests that compare runs: they
copy, never change, what they see (put them after the callbacks whose effect they record)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class LossRecorder(L.Callback):
    """Keeps every training step's loss (a detached copy)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


class OutputsRecorder(L.Callback):
    """Keeps every training step's ``outputs`` (what ``training_step`` returned), as they are."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outputs.append(outputs)


class Snapshot(L.Callback):
    """``trainer.callback_metrics`` as floats after every batch end (put it after the monitors)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})
