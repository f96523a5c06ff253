"""A Lightning logger that records what callbacks send it."""

from __future__ import annotations

from lightning.pytorch.loggers import Logger


class SpyLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []
        self.hparams: list[dict] = []

    @property
    def name(self) -> str:
        return "spy"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.append(params)
