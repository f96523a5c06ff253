"""How every entrotrain callback publishes scalars: ``trainer.callback_metrics`` and every logger, one step.

A :class:`MetricLedger` attached to the trainer remembers, for every key an entrotrain callback publishes, the step
it was last published at and whether its value was finite there. It is what keeps a stale value from looking current:

- a non-finite value is never sent to a logger; ``trainer.callback_metrics`` gets NaN for it (so a guard, and
  ``EarlyStopping(check_finite=True)``, see that the statistic is gone, not the last healthy number);
- a key the same callback published before but not at this logging step (a mean with no finite row left) is
  treated the same way: NaN in ``callback_metrics``, nothing to the loggers, ``finite=False`` in the ledger.

:class:`~entrotrain.callbacks.EntropyCollapseGuard` reads the ledger to count one observation per logging step.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

from lightning.pytorch import LightningModule, Trainer

from entrotrain.callbacks._guard_keys import warn_misspelt_keys

__all__ = [
    "HEADLINE_KEYS", "LedgerEntry", "MetricLedger", "expect_key", "ledger", "publish_scalars", "reset_ledger",
    "weights_step_of",
]

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


@dataclass(frozen=True)
class LedgerEntry:
    """The last publication of one key: the step, its value (NaN when it was not finite), whether it was finite, and
    who published it (``publish_scalars``'s ``source``).

    ``step`` is the step Lightning logs it at; ``weights_step`` the optimizer steps the weights it measured had taken
    (``trainer.global_step``: what ``ModelCheckpoint`` names a checkpoint saved then). They differ at a validation
    inside ``fit``: Lightning logs it at the step of the training batch before it, one less."""

    step: int
    value: float
    finite: bool
    source: str | None = None
    weights_step: int | None = None  # None: the same as step

    @property
    def judged_step(self) -> int:
        """The step a guard judges this value at: the weights' step (a checkpoint saved then has it in its name)."""
        return self.step if self.weights_step is None else self.weights_step


@dataclass
class MetricLedger:
    """Per trainer: ``entries[key]`` = the last publication of ``key``; ``keys_by_source[source]`` = the keys that
    publisher has ever published (a key it drops later is marked non-finite, never left standing)."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    keys_by_source: dict[str, set[str]] = field(default_factory=dict)
    misspelt: set[str] = field(default_factory=set)  # guard keys already warned about as typos in this fit

    def get(self, key: str) -> LedgerEntry | None:
        return self.entries.get(key)

    def clear(self) -> None:
        self.entries.clear()
        self.keys_by_source.clear()
        self.misspelt.clear()


def ledger(trainer: Trainer) -> MetricLedger:
    """The trainer's ledger (created on first use; one per trainer, shared by every entrotrain callback)."""
    book = getattr(trainer, "_entrotrain_ledger", None)
    if book is None:
        book = MetricLedger()
        trainer._entrotrain_ledger = book  # type: ignore[attr-defined]
    return book


def expect_key(trainer: Trainer, source: str, key: str) -> None:
    """``source`` published ``key`` before this process (a run resumed from a checkpoint): a publication of ``source``
    without ``key`` publishes it as NaN, as if this process had seen it (a guard restored from a checkpoint sees its
    statistic go non-finite at the first logging step, not some steps later as stale)."""
    ledger(trainer).keys_by_source.setdefault(source, set()).add(key)


def reset_ledger(trainer: Trainer) -> None:
    """Forget every publication of the previous ``fit`` of this trainer (entries and publishers' key sets).

    Call it at fit start — ``setup(stage="fit")`` or ``on_fit_start`` — from any callback that reads or writes the
    ledger: nothing is published before ``on_fit_start`` returns (the sanity check runs after it), so any number of
    callbacks may call it in the same fit and the result is the same (idempotent). Without it a second ``fit`` with
    the same trainer would see the last fit's entries, whose steps may look newer than this fit's first ones.
    """
    ledger(trainer).clear()


def weights_step_of(trainer: Trainer) -> int:
    """The optimizer steps taken by the weights a value logged now measures: ``trainer.global_step`` in a validation
    inside ``fit`` (Lightning logs it at ``_batches_that_stepped``, the step of the training batch before it: one
    less), else the logging step ``_batches_that_stepped``."""
    logged = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    from lightning.pytorch.trainer.states import TrainerFn

    validating = getattr(trainer, "validating", False) and not getattr(trainer, "sanity_checking", False)
    if validating and getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.FITTING:
        return int(trainer.global_step)
    return logged


def publish_scalars(
    trainer: Trainer,
    pl_module: LightningModule,
    metrics: dict[str, float],
    prog_bar: Collection[str] | None = None,
    *,
    source: str | None = None,
) -> int:
    """Put ``metrics`` in ``trainer.callback_metrics`` (for guards, ``EarlyStopping``, ``ModelCheckpoint``) and send
    the finite ones to every logger at the step Lightning logs this batch at (``_batches_that_stepped``); returns
    that step.

    Values must already be reduced across ranks (no ``sync_dist`` here: one collective per logging step is the
    caller's, not one per key).

    Args:
        trainer: the running trainer.
        pl_module: the module being trained (its ``log`` fills ``callback_metrics`` and the progress bar).
        metrics: reduced scalars by key. NaN/Inf values go to ``callback_metrics`` as NaN and to no logger.
        prog_bar: keys to show on the progress bar; ``None`` = those of :data:`HEADLINE_KEYS` present in
            ``metrics``; ``()`` = none.
        source: who publishes (e.g. the callback's ``state_key``). Keys this source published at an earlier step
            but not now are published as NaN (their statistic could not be computed: stale, not current).
    """
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    weights_step = weights_step_of(trainer)
    book = ledger(trainer)
    values = {key: float(value) for key, value in metrics.items()}
    if source is not None:
        known = book.keys_by_source.setdefault(source, set())
        for key in known - values.keys():
            values[key] = math.nan
        known.update(values)
    shown = HEADLINE_KEYS if prog_bar is None else frozenset(prog_bar)
    finite: dict[str, float] = {}
    for key, value in values.items():
        ok = math.isfinite(value)
        if not ok:
            value = math.nan
        else:
            finite[key] = value
        book.entries[key] = LedgerEntry(step, value, ok, source, None if weights_step == step else weights_step)
        pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key in shown, logger=False, sync_dist=False)
    if finite:
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=step)
    _warn_misspelt_guards(trainer, values.keys(), step)
    return step


def _warn_misspelt_guards(trainer: Trainer, published: Collection[str], step: int) -> None:
    """Warn once per fit about each :class:`~entrotrain.callbacks.EntropyCollapseGuard` of ``trainer`` whose key is a
    typo of one just published (:mod:`entrotrain.callbacks._guard_keys`)."""
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # (it imports this module)

    guards = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, EntropyCollapseGuard)]
    if guards:
        warn_misspelt_keys(guards, published, step, ledger(trainer).misspelt)
