"""Act when a logged entropy collapses: warn, alert, stop training, or lower the learning rate.

Watches any key in ``trainer.callback_metrics`` (every ``entrotrain`` monitor puts its keys there, and so does
``self.log`` in a LightningModule). A *new observation* is a value different from the previous one, so a metric
logged every 50 steps is judged once per 50 steps, whichever order the callbacks run in.

Two triggers, either or both:

- ``threshold``: the value falls below it (with ``mode="min"``; above it with ``mode="max"``);
- ``max_drop``: the value falls by more than this fraction of its value ``drop_window`` observations earlier.

A trigger fires after ``patience`` consecutive bad observations, then re-arms only once an observation is good again
(one warning per episode, not one per step). The decision is identical on every DDP rank because monitors reduce
across ranks before they publish.

Every firing, whatever the action, is logged as ``{monitor}/alert`` = 1 to every logger at the step of the watched
value and recorded as an event in the run record (``entrotrain report`` lists it and marks it on the curve); the
threshold is declared to the run record so the report draws it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from entrotrain.errors import EntrotrainError

__all__ = ["EntropyCollapseGuard"]

GuardAction = Literal["warn", "alert", "stop", "reduce_lr"]


class EntropyCollapseGuard(Callback):
    """Watches one logged key and acts when it collapses.

    Args:
        monitor: the key to watch, e.g. ``"entropy/attn_norm/min"`` or ``"entropy/attn/collapse_frac"``.
        threshold: fire when the value goes below it (``mode="min"``) or above it (``mode="max"``); ``None`` = off.
        mode: ``"min"``: low is bad (entropies); ``"max"``: high is bad (``collapse_frac``).
        max_drop: fire when the value falls by more than this fraction (0–1) of its value ``drop_window``
            observations earlier; ``None`` = off. Only with ``mode="min"``.
        drop_window: observations between the two values compared by ``max_drop``.
        patience: consecutive bad observations before firing.
        action: ``"warn"``; ``"alert"`` (warn and send a wandb alert when a ``WandbLogger`` is attached); ``"stop"`` (warn and stop training); ``"reduce_lr"`` (warn and multiply every
            optimizer's learning rates, and schedulers' base rates, by ``lr_factor``).
        lr_factor: factor for ``"reduce_lr"``, in (0, 1).
        min_lr: learning rates are never lowered below this.
        missing_ok: if ``False``, raise when ``monitor`` never appears after ``missing_after`` training steps.
        missing_after: steps to wait for the key before ``missing_ok=False`` raises.

    Example::

        Trainer(callbacks=[AttentionEntropyMonitor(), EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05,
                                                                           action="reduce_lr")])
    """

    def __init__(
        self,
        monitor: str = "entropy/attn_norm/min",
        threshold: float | None = 0.05,
        mode: Literal["min", "max"] = "min",
        max_drop: float | None = None,
        drop_window: int = 1,
        patience: int = 1,
        action: GuardAction = "warn",
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        missing_ok: bool = True,
        missing_after: int = 1000,
    ) -> None:
        if threshold is None and max_drop is None:
            raise EntrotrainError("EntropyCollapseGuard needs a threshold, a max_drop, or both.")
        if mode not in ("min", "max"):
            raise EntrotrainError(f"mode must be 'min' (low is bad) or 'max' (high is bad), got {mode!r}.")
        if max_drop is not None and (mode != "min" or not 0.0 < max_drop < 1.0):
            raise EntrotrainError(f"max_drop is a fraction in (0, 1) and needs mode='min', got {max_drop!r}.")
        if action not in ("warn", "alert", "stop", "reduce_lr"):
            raise EntrotrainError(f"action must be 'warn', 'alert', 'stop' or 'reduce_lr', got {action!r}.")
        if not 0.0 < lr_factor < 1.0:
            raise EntrotrainError(f"lr_factor must be in (0, 1), got {lr_factor}.")
        if drop_window < 1 or patience < 1:
            raise EntrotrainError("drop_window and patience must be at least 1.")
        self.monitor = monitor
        self.threshold = threshold
        self.mode = mode
        self.max_drop = max_drop
        self.drop_window = drop_window
        self.patience = patience
        self.action = action
        self.lr_factor = lr_factor
        self.min_lr = min_lr
        self.missing_ok = missing_ok
        self.missing_after = missing_after
        # state (survives a resume)
        self.history: deque[float] = deque(maxlen=drop_window + 1)
        self.bad_streak = 0
        self.fired = False
        self.times_fired = 0
        self.lr_reductions = 0
        self.last_reason = ""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, action=self.action)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "bad_streak": self.bad_streak,
            "fired": self.fired,
            "times_fired": self.times_fired,
            "lr_reductions": self.lr_reductions,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = deque(state_dict["history"], maxlen=self.drop_window + 1)
        self.bad_streak = state_dict["bad_streak"]
        self.fired = state_dict["fired"]
        self.times_fired = state_dict["times_fired"]
        self.lr_reductions = state_dict["lr_reductions"]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.threshold is not None:
            from entrotrain.dashboards.run_record import record_threshold

            record_threshold(trainer, self.monitor, self.threshold, f"guard ({self.action})")

    # ------------------------------------------------------------------ checks
    def _reason(self, value: float) -> str:
        if not math.isfinite(value):
            return f"{self.monitor} is {value}"
        if self.threshold is not None:
            if self.mode == "min" and value < self.threshold:
                return f"{self.monitor} = {value:.4g} fell below {self.threshold}"
            if self.mode == "max" and value > self.threshold:
                return f"{self.monitor} = {value:.4g} rose above {self.threshold}"
        if self.max_drop is not None and len(self.history) == self.history.maxlen:
            before = self.history[0]
            if before > 0 and (before - value) / before > self.max_drop:
                return (
                    f"{self.monitor} fell by {100 * (before - value) / before:.0f}% "
                    f"({before:.4g} -> {value:.4g}) within {self.drop_window} observation(s)"
                )
        return ""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            if not self.missing_ok and trainer.global_step >= self.missing_after:
                available = sorted(k for k in trainer.callback_metrics)[:20]
                raise EntrotrainError(
                    f"EntropyCollapseGuard: {self.monitor!r} was never logged in {self.missing_after} steps. "
                    f"Logged keys include {available}. Add the monitor that logs it, or fix the key."
                )
            return
        value = float(metric)
        if self.history and value == self.history[-1]:
            return  # not a new observation
        self.history.append(value)
        reason = self._reason(value)
        if not reason:
            self.bad_streak = 0
            self.fired = False
            return
        self.bad_streak += 1
        if self.fired or self.bad_streak < self.patience:
            return
        self.fired = True
        self.times_fired += 1
        self.last_reason = reason
        self._act(trainer, reason)

    # ------------------------------------------------------------------ actions
    def _act(self, trainer: Trainer, reason: str) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step the watched value was logged at
        message = f"EntropyCollapseGuard at step {step}: {reason}."
        if self.action == "stop":
            message += " Stopping training."
            trainer.should_stop = True
        elif self.action == "reduce_lr":
            self._reduce_lr(trainer)
            message += f" Learning rates multiplied by {self.lr_factor} (reduction #{self.lr_reductions})."
        rank_zero_warn(message)
        self._record(trainer, message, step)
        if self.action == "alert":
            self._alert(trainer, message)

    def _record(self, trainer: Trainer, message: str, step: int) -> None:
        """The firing as ``{monitor}/alert`` = 1 in every logger and as an event in the run record."""
        from entrotrain.dashboards.run_record import record_event

        for logger in trainer.loggers:
            logger.log_metrics({f"{self.monitor}/alert": 1.0}, step=step)
        record_event(trainer, self.monitor, message, level=self.action, step=step)

    def _reduce_lr(self, trainer: Trainer) -> None:
        self.lr_reductions += 1
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = max(group["lr"] * self.lr_factor, self.min_lr)
        for config in trainer.lr_scheduler_configs:
            base = getattr(config.scheduler, "base_lrs", None)
            if base is not None:  # schedulers recompute lr from base_lrs at their next step
                config.scheduler.base_lrs = [max(lr * self.lr_factor, self.min_lr) for lr in base]

    def _alert(self, trainer: Trainer, message: str) -> None:
        if not trainer.is_global_zero:
            return
        from entrotrain.dashboards.wandb_media import wandb_loggers

        for logger in wandb_loggers(trainer.loggers):
            alert = getattr(logger.experiment, "alert", None)
            if callable(alert):
                try:
                    alert(title=f"entropy collapse: {self.monitor}", text=message)
                except Exception as err:  # offline runs may refuse alerts; the warning above already went out
                    rank_zero_warn(f"EntropyCollapseGuard: wandb alert failed ({err}); the warning was logged.")
