"""How every entrotrain callback publishes scalars: ``trainer.callback_metrics`` and every logger, one step."""

from __future__ import annotations

from collections.abc import Collection

from lightning.pytorch import LightningModule, Trainer

__all__ = ["HEADLINE_KEYS", "publish_scalars"]

#: Keys shown on the progress bar by default (one or two headline figures per monitor, short enough to read).
HEADLINE_KEYS: frozenset[str] = frozenset(
    {
        "entropy/attn_norm/min",
        "entropy/attn/collapse_frac",
        "entropy/policy/mean",
        "entropy/policy/reward_mean",
        "sigma_reparam/qk_norm/max",
    }
)


def publish_scalars(
    trainer: Trainer,
    pl_module: LightningModule,
    metrics: dict[str, float],
    prog_bar: Collection[str] | None = None,
) -> int:
    """Put ``metrics`` in ``trainer.callback_metrics`` (for guards, ``EarlyStopping``, ``ModelCheckpoint``) and send
    them to every logger at the step Lightning logs this batch at (``_batches_that_stepped``); returns that step.

    Values must already be reduced across ranks (no ``sync_dist`` here: one collective per logging step is the
    caller's, not one per key).

    Args:
        trainer: the running trainer.
        pl_module: the module being trained (its ``log`` fills ``callback_metrics`` and the progress bar).
        metrics: reduced scalars by key.
        prog_bar: keys to show on the progress bar; ``None`` = those of :data:`HEADLINE_KEYS` present in
            ``metrics``; ``()`` = none.
    """
    shown = HEADLINE_KEYS if prog_bar is None else frozenset(prog_bar)
    for key, value in metrics.items():
        pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key in shown, logger=False, sync_dist=False)
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return step
