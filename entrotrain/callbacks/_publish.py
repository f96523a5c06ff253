"""How every entrotrain callback publishes scalars: ``trainer.callback_metrics`` and every logger, one step."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer

__all__ = ["publish_scalars"]


def publish_scalars(trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> int:
    """Put ``metrics`` in ``trainer.callback_metrics`` (for guards, ``EarlyStopping``, ``ModelCheckpoint``) and send
    them to every logger at the step Lightning logs this batch at (``_batches_that_stepped``); returns that step.

    Values must already be reduced across ranks (no ``sync_dist`` here: one collective per logging step is the
    caller's, not one per key).
    """
    for key, value in metrics.items():
        pl_module.log(key, value, on_step=True, on_epoch=False, logger=False, sync_dist=False)
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return step
