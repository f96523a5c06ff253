"""Act when a logged entropy collapses: warn, alert, stop training, lower the learning rate, or roll back.

Watches one key. What counts as an *observation* (one judgement of the key) depends on how the key was logged:

- **Published by an entrotrain monitor** (through :func:`~entrotrain.callbacks._publish.publish_scalars`, which keeps
  the trainer's ledger): one observation per *logging step at which the key was published* — a ledger entry whose
  step is newer than the last one observed. A value that stays the same (a head stuck at 0) is a new observation at
  each publication; the same publication is never counted twice, whichever order the callbacks run in. The guard
  looks at the ledger at every training batch start and end, at validation end and at train end (so a monitor that
  runs after the guard is judged at the next batch start, at the step it published).
- **Logged with** ``self.log`` **in a LightningModule** (not in the ledger): Lightning cannot tell a fresh value from the
  last one it kept, so the guard reads ``trainer.callback_metrics`` once per *Lightning logging step* (every
  ``log_every_n_steps`` optimizer steps, when the loggers write, at the last micro-batch of an accumulation window)
  for keys logged in training hooks, and once per validation run (at ``on_validation_end``, not during the sanity
  check) for keys logged in validation hooks. Staleness cannot be detected for such keys.

Two triggers, either or both:

- ``threshold``: the value falls below it (with ``mode="min"``; above it with ``mode="max"``). A *fall*: by default
  (``arm_on_good=True``) the threshold trigger arms only once the value has been on the good side of the threshold in
  this fit. A value already below it at the first observations is not a collapse that training caused — some models
  have sharp heads at initialisation (Lightning's demo ``Transformer`` scales its embeddings by √d, so a third of its
  heads start near normalised entropy 0.02 and stay there) — and is warned about once instead of fired on.
  ``arm_on_good=False`` judges from the first observation; ``max_drop`` watches a fall from any starting value;
- ``max_drop``: the value falls by more than this fraction of its value ``drop_window`` finite observations earlier.

Two more kinds of bad observation, when ``on_nonfinite`` (default: on, except for ``action="reduce_lr"``):

- **non-finite**: the key was published as NaN/Inf (a monitor whose statistic could not be computed publishes NaN:
  the model or its inputs went non-finite). With ``on_nonfinite=False`` a NaN observation is skipped (it neither
  extends nor breaks a streak) and warned about once.
- **stale**: a ledger key not published for more than ``stale_after`` optimizer steps (default: 3 × the interval
  between its last two publications; off until two publications are seen, and in a resumed run until its first
  publication there: the monitor's cadence may have changed with the resume) — its monitor stopped, or the key
  disappeared. Warned about once per silence; with ``on_nonfinite`` it is a bad observation, and so is each
  further stale limit of silence. The last value is never re-used as if it were current.

The guard does not read the training loss: that costs a device sync every step. A model gone NaN reaches the
monitors' statistics (published as NaN) at their next logging step; watch a ``self.log``-ed loss with a second guard
(``monitor="train/loss", mode="max", threshold=...``) if you want the loss itself judged.

A trigger fires after ``patience`` consecutive bad observations, then re-arms only once an observation is good again
(one action per episode, not one per step). The decision is identical on every DDP rank because monitors reduce
across ranks before they publish. A key you log yourself must be too: ``self.log(..., sync_dist=True)`` (a ``stop``
/ ``reduce_lr`` / ``rollback`` guard on an unsynced one is warned about once); in a plain loop the ranks agree on the
values handed to :meth:`EntropyMonitors.observe <entrotrain.integrations.loop.EntropyMonitors.observe>` (the worst
rank's, a NaN on any rank first).

Every firing, whatever the action, is logged as ``{monitor}/alert`` = 1 to every logger at the step of the watched
value and recorded as an event in the run record (``entrotrain report`` lists it and marks it on the curve); the
threshold is declared to the run record so the report draws it.

A firing's reason ends with the last observation judged good, ``(last good: 0.07496 at step 50)``: the checkpoint to
roll back to is one saved at or before that step, and the message names the newest such checkpoint it finds
(Lightning's ``ModelCheckpoint`` folders, ``step=N`` in the name; ``transformers``' ``output_dir/checkpoint-N``).
A value from a validation inside ``fit`` is judged at ``trainer.global_step``, the weights' optimizer steps, with which
``ModelCheckpoint`` names the checkpoint saved at that validation (and RepresentationEntropyMonitor its history);
Lightning logs it, and the guard its alert, one step earlier, at the step of the training batch before it.
With ``keep_last_good`` (the default) that checkpoint survives checkpoint rotation: the guard hard-links each
checkpoint as it is saved into ``entrotrain-last-good/`` beside it and keeps the one a firing would name
(:mod:`~entrotrain.callbacks.checkpoint_keeper`), so ``ModelCheckpoint(save_top_k=1)`` or ``save_total_limit=2``
cannot delete the checkpoint to roll back to before you read the message.

``notify`` reaches you where you are at 2 a.m., online or not: a callable (or its import path, ``"my_alerts.slack"``,
for a YAML recipe) called on rank zero with the firing's message (``"EntropyCollapseGuard at step 75:
entropy/attn_norm/min = 0.01222 fell below 0.05 (last good: 0.07496 at step 50)."``) at every firing, whatever the
action, in Lightning, in ``transformers.Trainer`` and in a plain loop. An ``Exception`` it raises is warned about
once and never reaches training (``KeyboardInterrupt`` still interrupts). It runs inline on rank zero: keep it quick
(post and return), since the other ranks wait at the next collective meanwhile. No code needed for a chat:
``notify="env:SLACK_WEBHOOK_URL"`` posts each firing to the webhook whose URL that variable holds (Slack, Discord,
Teams, Mattermost, ntfy) from a background thread, so training never waits for the network
(:mod:`~entrotrain.callbacks.notify_webhook`).

Lifecycle: every per-fit state (history, streak, episode, steps) is reset at ``setup(stage="fit")`` — before
Lightning restores callbacks from ``ckpt_path`` (whether the strategy restores before or after ``on_fit_start``) —
so a guard reused for a second ``fit`` starts fresh while a resumed run continues its streak from the checkpoint.
The trainer's ledger is cleared at the same point (:func:`~entrotrain.callbacks._publish.reset_ledger`).
"""

from __future__ import annotations

import importlib
import math
import re
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_str
from entrotrain.callbacks._lifecycle import PerFitCallback
from entrotrain.callbacks._publish import expect_key, ledger, weights_step_of
from entrotrain.callbacks._rate_ignored import capped_note, rate_ignored
from entrotrain.callbacks._worst_parts import worst_parts
from entrotrain.callbacks.checkpoint_keeper import LastGoodCheckpoints
from entrotrain.callbacks.notify_webhook import notifier_from_spec
from entrotrain.callbacks.rollback_frozen import frozen_keys
from entrotrain.callbacks.rollback_history import RollbackHistory, held_module
from entrotrain.callbacks.rollback_state import check_supported
from entrotrain.dashboards.run_record import RecordThreshold, record_event, record_thresholds
from entrotrain.errors import EntrotrainError

__all__ = ["EntropyCollapseGuard", "saved_at"]

GuardAction = Literal["warn", "alert", "stop", "reduce_lr", "rollback"]
_ACTIONS = ("warn", "alert", "stop", "reduce_lr", "rollback")

#: The rollback guards tracking each model (:meth:`EntropyCollapseGuard.track`): a rollback by one re-holds the others.
_TRACKING: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()

#: The per-fit state that ``state_dict`` saves, with the value a fresh fit (or an old checkpoint) starts from.
_STATE_DEFAULTS: dict[str, Any] = {
    "history": [],
    "bad_streak": 0,
    "fired": False,
    "times_fired": 0,
    "lr_reductions": 0,
    "rollbacks": 0,
    "last_reason": "",
    "last_seen_step": None,  # step of the last publication observed
    "prev_seen_step": None,  # the one before: their difference is the key's cadence
    "last_stale_step": None,  # step of the last 'stale' observation in the current silence
    "stale_warned": False,
    "armed": False,  # the threshold trigger (with arm_on_good): the value has been on the good side in this fit
    "last_good_step": None,  # the last observation judged good (named in a firing's reason: where to roll back to)
    "last_good_value": None,
    "source": None,  # the ledger source that publishes the key (a resumed run expects it from that publisher)
}


def _logged_in(results: Any, key: str) -> bool:
    """Whether ``key`` was logged with ``self.log`` in the hooks of this Lightning result collection."""
    if not results:
        return False
    return any(getattr(getattr(metric, "meta", None), "name", None) == key for metric in results.values())


def _current_step(trainer: Trainer) -> int:
    """The step Lightning logs this batch at (the one ``publish_scalars`` files its entries under)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class EntropyCollapseGuard(PerFitCallback):
    """Watches one logged key and acts when it collapses, goes non-finite, or stops being published.

    Args:
        monitor: the key to watch, e.g. ``"entropy/attn_norm/min"`` or ``"entropy/attn/collapse_frac"``.
        threshold: fire when the value goes below it (``mode="min"``) or above it (``mode="max"``); ``None`` = off.
        mode: ``"min"``: low is bad (entropies); ``"max"``: high is bad (``collapse_frac``).
        max_drop: fire when the value falls by more than this fraction (0–1) of its value ``drop_window``
            finite observations earlier; ``None`` = off. Only with ``mode="min"``.
        drop_window: finite observations between the two values compared by ``max_drop``.
        patience: consecutive bad observations before firing.
        action: ``"warn"``; ``"alert"`` (warn and send a wandb alert when a ``WandbLogger`` is attached; a refused
            alert, e.g. offline, is warned about once); ``"stop"`` (warn and stop training); ``"reduce_lr"`` (warn and
            multiply every optimizer's learning rates, and schedulers' base rates, by ``lr_factor``, never below
            ``min_lr``); ``"rollback"`` (warn, copy back the model's and optimizers' state held in host memory at the
            last good observation, and go on with learning rates multiplied by ``lr_factor``: the clock, the data
            order and the schedulers' position go on; at most ``max_rollbacks`` times, then stop; see
            :mod:`~entrotrain.callbacks.rollback_state`).
        lr_factor: factor for ``"reduce_lr"`` and ``"rollback"``, in (0, 1). A param group whose ``lr`` is not a
            number is left (``transformers.Adafactor(relative_step=True)``, which computes its own step size: warned
            about once at the start, :mod:`~entrotrain.callbacks._rate_ignored`).
        min_lr: learning rates are never lowered below this (finite, >= 0).
        missing_ok: if ``False``, raise when ``monitor`` never appears after ``missing_after`` training steps.
        missing_after: steps (>= 0) to wait for the key before ``missing_ok=False`` raises.
        on_nonfinite: count a NaN/Inf observation and a stale key as bad observations. ``None`` = ``True`` for
            ``"warn"``, ``"alert"``, ``"stop"`` and ``"rollback"`` (a model gone NaN is rolled back), ``False`` for
            ``"reduce_lr"`` (a lower learning rate cannot bring back a model that went NaN).
        stale_after: optimizer steps without a new publication after which a ledger key is stale; ``None`` = 3 × the
            interval between its last two publications.
        arm_on_good: the ``threshold`` trigger arms once a finite observation has been on the good side of the
            threshold in this fit (a collapse is a fall, not a starting point: heads sharp at initialisation are
            warned about once, not fired on). ``False``: judge from the first observation. ``max_drop``, non-finite
            and stale observations are judged from the start either way.
        notify: called on rank zero with the message of each firing (any action): a callable taking one string, or
            its import path (``"package.module.function"`` or ``"package.module:function"``); an ``Exception`` it
            raises is warned about once, never raised into training. Runs inline: keep it quick. Or a chat webhook
            posted from a background thread: ``"env:SLACK_WEBHOOK_URL"`` (the URL read from that environment
            variable; the URL is a secret, and only this text is saved with the run) or the ``https://`` URL
            itself (:mod:`~entrotrain.callbacks.notify_webhook`: Slack, Discord, Teams, Mattermost, ntfy).
            ``None``: nothing.
        keep_last_good: keep the checkpoint to roll back to from checkpoint rotation: each checkpoint saved (with
            its step in the name) is hard-linked into ``entrotrain-last-good/`` beside it, and the guard keeps the
            newest one at or before the last good observation, for good once it fires; the others go as later
            observations judge them, and at a normal end of training. No disk space while the original exists;
            one checkpoint's worth once a rotation deleted it (:mod:`~entrotrain.callbacks.checkpoint_keeper`).
        max_rollbacks: with ``action="rollback"``, the firings that roll back (>= 1); the next one stops training.
        rollback_states: with ``action="rollback"``, the good observations whose state is held (>= 1; host memory
            ``rollback_states`` × one copy of the model and its optimizer state). A fall that comes back after fewer
            good observations than that since a rollback is the same fall: the next rollback goes one held state
            further back, or with none held, to the same one again (:mod:`~entrotrain.callbacks.rollback_history`).
        hold: with ``action="rollback"``, what is held: ``"all"`` (every tensor of ``state_dict()`` and the optimizer
            state) or ``"trainable"`` (not the parameters with ``requires_grad=False``: a LoRA run holds its adapters
            only; a frozen parameter that changes is refused, never silently left out:
            :mod:`~entrotrain.callbacks.rollback_frozen`).

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
        on_nonfinite: bool | None = None,
        stale_after: int | None = None,
        arm_on_good: bool = True,
        notify: Any = None,  # Callable[[str], Any] | str | None, typed loosely: LightningCLI saves a str as written
        keep_last_good: bool = True,
        max_rollbacks: int = 3,
        rollback_states: int = 1,
        hold: Literal["all", "trainable"] = "all",
    ) -> None:
        self.monitor = check_str(monitor, "EntropyCollapseGuard(monitor)")
        self.threshold = check_real(threshold, "EntropyCollapseGuard(threshold)", none_ok=True)
        self.mode = check_choice(mode, "EntropyCollapseGuard(mode) ('min': low is bad, 'max': high is bad)", ("min", "max"))
        self.max_drop = check_real(
            max_drop, "EntropyCollapseGuard(max_drop)", low=0.0, high=1.0, low_open=True, high_open=True, none_ok=True
        )
        if self.threshold is None and self.max_drop is None:
            raise EntrotrainError(
                "EntropyCollapseGuard needs a threshold, a max_drop, or both; got threshold=None and max_drop=None. "
                "Give e.g. threshold=0.05."
            )
        if self.max_drop is not None and self.mode != "min":
            raise EntrotrainError(
                f"EntropyCollapseGuard(max_drop={self.max_drop}) watches a fall and needs mode='min', got "
                f"mode={self.mode!r}; use threshold with mode='max'."
            )
        self.drop_window = check_int(drop_window, "EntropyCollapseGuard(drop_window)", low=1)
        self.patience = check_int(patience, "EntropyCollapseGuard(patience)", low=1)
        self.action: GuardAction = check_choice(action, "EntropyCollapseGuard(action)", _ACTIONS)
        self.lr_factor = check_real(
            lr_factor, "EntropyCollapseGuard(lr_factor)", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.min_lr = check_real(min_lr, "EntropyCollapseGuard(min_lr)", low=0.0)
        self.missing_ok = check_bool(missing_ok, "EntropyCollapseGuard(missing_ok)")
        self.missing_after = check_int(missing_after, "EntropyCollapseGuard(missing_after)", low=0)
        on_nonfinite = check_bool(on_nonfinite, "EntropyCollapseGuard(on_nonfinite)", none_ok=True)
        self.on_nonfinite: bool = self.action != "reduce_lr" if on_nonfinite is None else on_nonfinite
        self.stale_after = check_int(stale_after, "EntropyCollapseGuard(stale_after)", low=1, none_ok=True)
        self.arm_on_good = check_bool(arm_on_good, "EntropyCollapseGuard(arm_on_good)")
        self.notify = _resolve_notify(notify)
        self.keep_last_good = check_bool(keep_last_good, "EntropyCollapseGuard(keep_last_good)")
        self.max_rollbacks = check_int(max_rollbacks, "EntropyCollapseGuard(max_rollbacks)", low=1)
        self.rollback_states = check_int(rollback_states, "EntropyCollapseGuard(rollback_states)", low=1)
        self.hold = check_choice(hold, "EntropyCollapseGuard(hold)", ("all", "trainable"))
        self._reset_fit_state()

    # ------------------------------------------------------------------ state
    def _reset_fit_state(self) -> None:
        """Per-fit state to its defaults (a fresh fit; missing keys of an old checkpoint)."""
        self.load_state_dict({})
        self._nonfinite_warned = False
        self._alert_failed_warned = False
        self._notify_failed_warned = False
        self._unarmed_warned = False
        self._rank_local_warned = False  # (:meth:`_warn_if_rank_local`)
        self._rate_ignored_warned = False  # (:meth:`_warn_if_rate_ignored`)
        self._run_start: float | None = None  # rollback_hint's since (set when a run starts)
        #: The checkpoint the last firing named to roll back to (``None``: none named in this fit).
        self.rollback_checkpoint: Path | None = None
        #: The checkpoints kept from rotation (``keep_last_good``): the pins of this fit.
        self.keeper = LastGoodCheckpoints()
        self._save_pending = False  # a checkpoint was saved since the last look at ModelCheckpoint's files
        self._seen_saves: set[str] = set()
        #: ``action="rollback"``: the model's and optimizers' states at the last ``rollback_states`` good observations
        #: (host memory), each with the ``history`` it goes with.
        self.held_states = RollbackHistory(self.rollback_states, trainable_only=self.hold == "trainable")
        self._tracked: tuple[nn.Module, list[Any]] | None = None  # what a rollback restores (:meth:`track`)
        self._tracked_model: nn.Module | None = None  # the model itself (without its averages)
        self._good_since_rollback = 0  # good observations since the last rollback (a fall within the window escalates)
        self._not_held_step: int | None = None  # the last good observation's state was not finite: not held
        #: Whether the last firing stops training (``action="stop"``, or a rollback that could not roll back).
        self.stopping = False
        #: The run record's level of the last firing: the action, or ``"stop"`` / ``"warn"`` when a rollback guard
        #: stopped or only warned instead.
        self.last_level: str = self.action
        self._stale_bad = False  # the bad streak's last observation was a silent key (check_stale), not a value
        #: The episode's firing was a silence a rollback guard did not act on: a bad value in the same streak fires.
        self._unacted = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, action=self.action)

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in _STATE_DEFAULTS}
        state["history"] = list(self.history)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state; keys an older checkpoint lacks take their fresh-fit defaults. Values of the wrong
        type are refused (a corrupted checkpoint); non-finite values in an old ``history`` are dropped (they were
        never comparable for ``max_drop``)."""
        if not isinstance(state_dict, dict):
            raise EntrotrainError(
                f"EntropyCollapseGuard.load_state_dict(state_dict) must be a dict (from state_dict()), got "
                f"{type(state_dict).__name__}."
            )
        state = {**_STATE_DEFAULTS, **state_dict}
        if state_dict and "armed" not in state_dict:  # a checkpoint from before arm_on_good: it judged from the start
            state["armed"] = True
        where = "EntropyCollapseGuard.load_state_dict: "
        history = state["history"]
        if not isinstance(history, (list, tuple, deque)):
            raise EntrotrainError(f"{where}history must be a list of numbers, got {type(history).__name__}.")
        for name in ("bad_streak", "times_fired", "lr_reductions", "rollbacks"):
            check_int(state[name], where + name, low=0)
        for name in ("last_seen_step", "prev_seen_step", "last_stale_step", "last_good_step"):
            check_int(state[name], where + name, none_ok=True)
        check_real(state["last_good_value"], where + "last_good_value", none_ok=True)
        if state["source"] is not None:
            check_str(state["source"], where + "source")
        for name in ("fired", "stale_warned", "armed"):
            check_bool(state[name], where + name)
        for name in _STATE_DEFAULTS:
            setattr(self, name, state[name])
        self.last_reason = str(self.last_reason)
        # restored from a checkpoint: the cadence its steps give is the saved run's; the key's monitor may publish at
        # another one now (every_n_steps changed on resume), so staleness waits for the first publication here
        self._restored_silence = bool(state_dict) and self.last_seen_step is not None
        finite = [float(v) for v in history if isinstance(v, (int, float)) and math.isfinite(v)]
        self.history: deque[float] = deque(finite, maxlen=self.drop_window + 1)


    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run_start = run_start(resumed=trainer.ckpt_path is not None)
        record_thresholds(trainer, self.record_thresholds())
        if self.keep_last_good and trainer.is_global_zero:  # take over what a killed run left in the keep folders
            folders = [getattr(cb, "dirpath", None) for cb in getattr(trainer, "checkpoint_callbacks", [])]
            self.keeper.start(folders, resumed_from=trainer.ckpt_path, resumed_from_protected=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
        if self.action == "rollback" and isinstance(wrapped, nn.Module) and wrapped is not pl_module:
            check_supported(wrapped)  # FSDPStrategy / DeepSpeedStrategy wrap the LightningModule from outside
        self.track(pl_module, trainer.optimizers, averaged=_weight_averages(trainer))
        self.held_states.processes = getattr(trainer, "num_devices", None)  # (each holds its own states)
        if self.source is not None and self.last_seen_step is not None:  # resumed: its publisher published it before
            expect_key(trainer, self.source, self.monitor)
            self.warn_if_publisher_gone([getattr(cb, "state_key", None) for cb in trainer.callbacks],
                                        "callback of this trainer", "a callback publishes it")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.untrack()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A fit ended by an exception: Lightning calls no ``teardown``, so the held state (one host copy of the
        model and its optimizer state) and the model are let go here."""
        self.untrack()

    def track(self, model: nn.Module, optimizers: Sequence[Any], averaged: Sequence[nn.Module] = ()) -> None:
        """The model and optimizers an ``action="rollback"`` guard holds the state of and restores (nothing for the
        other actions). ``averaged``: modules holding averaged weights of the model (an EMA / SWA ``AveragedModel``)
        held and rolled back with it (:class:`~entrotrain.callbacks.rollback_history.HeldTogether`; Lightning's
        ``WeightAveraging`` / ``EMAWeightAveraging`` callbacks are found by the guard). The glue for Lightning,
        ``transformers.Trainer`` and :class:`~entrotrain.integrations.loop.EntropyMonitors` calls it at the start of
        training. A rate action (``"reduce_lr"``, ``"rollback"``) on an optimizer that never reads ``lr``
        (``transformers.Adafactor(relative_step=True)``) is warned about here (:mod:`._rate_ignored`)."""
        self._warn_if_rate_ignored(optimizers)
        if self.action != "rollback":
            return
        for name, module in (("model", model), *(("averaged", module) for module in averaged)):
            if not isinstance(module, nn.Module):
                raise EntrotrainError(
                    f"EntropyCollapseGuard.track({name}) needs the nn.Module(s) to roll back, got "
                    f"{type(module).__name__}."
                )
        held = held_module(model, averaged)
        check_supported(held, optimizers)  # refused at the start, not at the first good observation
        if self.hold == "trainable":
            frozen_keys(held, held.state_dict())  # (refuses frozen FSDP2 shards)
        self.untrack()
        self._tracked = (held, list(optimizers))
        self._tracked_model = model
        _TRACKING.setdefault(model, weakref.WeakSet()).add(self)

    def _warn_if_rate_ignored(self, optimizers: Sequence[Any]) -> None:
        """Warn once per fit when lowering ``lr`` would not lower the step of one of ``optimizers``."""
        why = rate_ignored(optimizers) if self.action in ("reduce_lr", "rollback") else None
        if why is None or self._rate_ignored_warned:
            return
        self._rate_ignored_warned = True
        what = "reduce_lr" if self.action == "reduce_lr" else "rollback (which also multiplies lr by lr_factor)"
        rank_zero_warn(
            f"EntropyCollapseGuard(action={what}): {why}, so multiplying lr by lr_factor={self.lr_factor} does "
            "nothing there. Give it an explicit rate, Adafactor(lr=..., relative_step=False, warmup_init=False), "
            "for the guard's reduction to lower the step; or keep it and know that a firing only rolls back "
            "(action='rollback') or only warns (action='reduce_lr')."
        )

    def warn_if_publisher_gone(self, publishers: Iterable[str | None], among: str, until: str) -> None:
        """Restored from a checkpoint, the guard knows which publisher's ``state_key`` published its key (``source``):
        warn when none of ``publishers`` is it (the monitor was removed, or configured differently), since the key is
        then judged only ``until`` that happens. ``among``: what ``publishers`` are, for the message."""
        source = self.source if self.last_seen_step is not None else None
        if source and not any(key and (source == key or source.startswith(f"{key}/")) for key in publishers):
            rank_zero_warn(
                f"EntropyCollapseGuard: {self.monitor} was published by {source} in the run this one resumed from, "
                f"and no {among} has that state_key (the monitor was removed, or configured differently): the guard "
                f"judges the key once {until}. Add the monitor back, or drop the guard."
            )

    def untrack(self) -> None:
        """Drop the tracked model and the held state (its host memory): the end of training."""
        if self._tracked_model is not None:
            _TRACKING.get(self._tracked_model, weakref.WeakSet()).discard(self)
        self._tracked, self._tracked_model = None, None
        self.held_states.clear()

    def record_thresholds(self) -> list[RecordThreshold]:
        """The run record's reference line on the watched key: the guard's ``threshold`` (none without one)."""
        if self.threshold is None:
            return []
        return [RecordThreshold(self.monitor, self.threshold, f"guard ({self.action})")]

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._pin_saves(trainer)
        self._poll_ledger(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._pin_saves(trainer)
        published = ledger(trainer).get(self.monitor) is not None
        if not published and self._is_logging_step(trainer) and _logged_in(trainer._results, self.monitor):
            self._poll_logged(trainer)  # (also for a restored guard whose key a monitor published before the resume)
        elif published or self.source is not None:
            self._poll_ledger(trainer)
            self._check_stale(trainer)
        self._check_missing(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._poll_ledger(trainer)  # a publication at the last step by a callback that runs after the guard
        self.keeper.release()  # a normal end: only what a firing froze stays
        self.flush_notifications()

    def flush_notifications(self) -> None:
        """Wait for a webhook's posts under way (``notify="env:..."``), and warn if one failed; nothing for a
        callable ``notify`` (it ran inline)."""
        flush = getattr(self.notify, "flush", None)
        if callable(flush):
            flush()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._save_pending = self.keep_last_good  # the file is written after this hook: pinned at the next hook

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._pin_saves(trainer)
        if ledger(trainer).get(self.monitor) is not None:
            self._poll_ledger(trainer)
        elif _logged_in(trainer._results, self.monitor):
            self._poll_logged(trainer)

    def _pin_saves(self, trainer: Trainer) -> None:
        """After a save: pin the checkpoints ``ModelCheckpoint`` wrote since the last look (rank zero, which writes
        them), before a later save's rotation can delete them."""
        if not self._save_pending:
            return
        self._save_pending = False
        if not trainer.is_global_zero:
            return
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            written = [getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", ""),
                       *getattr(callback, "best_k_models", {})]
            for path in written:
                if path and path not in self._seen_saves:
                    self._seen_saves.add(path)
                    self.checkpoint_saved(path)

    def checkpoint_saved(self, path: str | Path, step: int | None = None) -> Path | None:
        """A checkpoint was just saved at ``path`` (a file or folder; ``step``: default the step in its name): pin
        it when ``keep_last_good``. Call it on the process that wrote it. The glue for Lightning,
        ``transformers.Trainer`` and :class:`~entrotrain.integrations.loop.EntropyMonitors` calls it for you."""
        return self.keeper.saved(path, step) if self.keep_last_good else None

    # ------------------------------------------------------------------ observations
    @staticmethod
    def _is_logging_step(trainer: Trainer) -> bool:
        """A step at which Lightning writes ``self.log`` values to the loggers (last micro-batch of the window)."""
        return not trainer.fit_loop.epoch_loop._should_accumulate() and trainer._logger_connector.should_update_logs

    def _poll_ledger(self, trainer: Trainer) -> None:
        """Observe the ledger entry of ``monitor`` if it was published at a step newer than the last observed."""
        entry = ledger(trainer).get(self.monitor)
        if entry is not None and (self.last_seen_step is None or entry.judged_step > self.last_seen_step):
            self.source = entry.source or self.source
            self._observe(trainer, entry.value, entry.judged_step, entry.step)

    def _poll_logged(self, trainer: Trainer) -> None:
        """Observe a ``self.log``-ed key once per step (the value in ``callback_metrics``)."""
        step = weights_step_of(trainer)
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is not None and (self.last_seen_step is None or step > self.last_seen_step):
            self.source = None  # logged with self.log now, not published by a monitor
            self._warn_if_rank_local(trainer)
            self._observe(trainer, float(metric), step, _current_step(trainer))

    def _warn_if_rank_local(self, trainer: Trainer) -> None:
        """Once per fit: a ``rollback`` / ``reduce_lr`` / ``stop`` guard on several ranks watching a key each rank
        logs with ``self.log`` unsynced judges a different value on each rank: one rank can roll back (or lower its
        rates) while another does not, and the replicas drift apart without an error; or one rank stops
        (``trainer.should_stop``, which Lightning does not reduce over ranks) while the others wait for it in their
        next collective, a hang. Warned, not reduced here: a key logged on some ranks only (``rank_zero_only=True``)
        would leave a reducing rank waiting alone."""
        world = getattr(trainer, "world_size", 1)
        if self._rank_local_warned or self.action not in ("rollback", "reduce_lr", "stop") or world < 2:
            return
        metas = [getattr(m, "meta", None) for m in (getattr(trainer, "_results", None) or {}).values()]
        synced = [bool(getattr(getattr(meta, "sync", None), "should", False)) for meta in metas
                  if getattr(meta, "name", None) == self.monitor]
        if synced and not any(synced):
            self._rank_local_warned = True
            rank_zero_warn(
                f"EntropyCollapseGuard(action={self.action!r}) watches {self.monitor!r}, which each of the "
                f"{world} ranks logs with self.log without sync_dist=True: each rank judges its own value, so one "
                "rank can act while another does not: " + (
                    "one rank stops while the others wait for it in their next collective (a hang)" if
                    self.action == "stop" else "the replicas drift apart silently") + ". Log it "
                f"with self.log({self.monitor!r}, ..., sync_dist=True), or watch a monitor's key (the monitors "
                "reduce across ranks)."
            )

    def _observe(self, trainer: Trainer, value: float, step: int, logged: int) -> None:
        """One publication of the key, judged at ``step`` (the weights' optimizer steps: a checkpoint saved with them
        has it in its name) and logged at ``logged`` (one less at a validation in ``fit``: Lightning logs it at the
        previous training batch's step); act when the guard fires."""
        published = {key: entry.value for key, entry in ledger(trainer).entries.items() if entry.step == logged}
        reason = self.observe(value, step, published)
        if reason is not None:
            self._act(trainer, reason, step, logged)

    def observe(self, value: float, step: int, beside: Mapping[str, Any] | None = None) -> str | None:
        """The trainer-free core: one publication of the key at ``step``; judge it, extend or end the bad streak.
        ``beside``: the other values published with it, where a reason names the heads (or layers) an aggregate key
        such as ``entropy/attn_norm/min`` fell on (:mod:`~entrotrain.callbacks._worst_parts`).

        Returns the reason when the guard fires (``patience`` bad observations, first of the episode): the caller
        then acts. Used by the Lightning hooks and by :mod:`entrotrain.integrations.transformers`.
        """
        self.prev_seen_step, self.last_seen_step = self.last_seen_step, step
        self.last_stale_step, self.stale_warned = None, False
        self._restored_silence = False
        if not math.isfinite(value):
            if not self.on_nonfinite:
                self._warn_nonfinite_ignored(step)
                return None
            return self._bad(f"{self.monitor} is {value}: the model or its inputs went non-finite", step)
        reason = self._reason(value, step, beside)
        self.history.append(value)
        if reason:
            return self._bad(reason, step)
        self.bad_streak = 0
        self.fired = False  # re-armed: the next bad streak is a new episode
        self._unacted = False
        self.last_good_step, self.last_good_value = step, float(value)
        self._good_since_rollback += 1
        self.keeper.judged(step, step)
        self._hold(step)
        return None

    def _hold(self, step: int) -> None:
        """``action="rollback"``: hold the tracked state as the one to come back to (with the history it goes with),
        unless the step's update made it non-finite (the value was measured before it): the state held before stays."""
        if self._tracked is not None:
            held = self.held_states.take(*self._tracked, step=step, extra=list(self.history))
            self._not_held_step = None if held else step

    def _reason(self, value: float, step: int, beside: Mapping[str, Any] | None = None) -> str:
        """Why a finite ``value`` is bad ('' when it is good); ``history`` holds the earlier finite values, ``beside``
        the values published with it."""
        if self.threshold is not None:
            below = self.mode == "min" and value < self.threshold
            above = self.mode == "max" and value > self.threshold
            if not (below or above):
                self.armed = True
            elif self.armed or not self.arm_on_good:
                shown = _beside(value, self.threshold)
                where = worst_parts(self.monitor, beside, self.threshold, below)
                return f"{self.monitor} = {shown} {'fell below' if below else 'rose above'} {self.threshold}{where}"
            else:
                self._warn_unarmed(value, step)
        if self.max_drop is not None and len(self.history) >= self.drop_window:
            before = self.history[-self.drop_window]  # drop_window finite observations before this one
            if before > 0 and (before - value) / before > self.max_drop:
                return (
                    f"{self.monitor} fell by {100 * (before - value) / before:.0f}% "
                    f"({before:.4g} -> {value:.4g}) within {self.drop_window} observation(s)"
                )
        return ""

    def _bad(self, reason: str, step: int, stale: bool = False) -> str | None:
        """One bad observation at ``step`` (``stale``: a silent key); ``reason`` when the guard fires now (else
        ``None``)."""
        self._stale_bad = stale
        self.keeper.judged(step, self.last_good_step)
        self.bad_streak += 1
        acted = self.fired and not (self._unacted and not stale)
        if acted or self.bad_streak < self.patience:
            return None
        self._unacted = False
        self.fired = True
        self.times_fired += 1
        if self.last_good_step is not None and self.last_good_value is not None:
            good = (f"{self.last_good_value:.4g}" if self.threshold is None
                    else _beside(self.last_good_value, self.threshold))
            reason += f" (last good: {good} at step {self.last_good_step})"
        self.last_reason = reason
        return reason

    def _warn_unarmed(self, value: float, step: int) -> None:
        if not self._unarmed_warned:
            self._unarmed_warned = True
            side = "below" if self.mode == "min" else "above"
            rank_zero_warn(
                f"EntropyCollapseGuard: {self.monitor} = {value:.4g} is already {side} the threshold "
                f"{self.threshold} at step {step}, before it has ever been on the good side in this fit: that is where "
                "the model starts, not a collapse (heads can be sharp at initialisation, e.g. embeddings scaled by "
                f"sqrt(d)). The threshold arms once {self.monitor} has been on the good side; pass arm_on_good=False "
                "to fire from the first observation, or max_drop=... to watch a fall from here."
            )

    def _warn_nonfinite_ignored(self, step: int) -> None:
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            rank_zero_warn(
                f"EntropyCollapseGuard: {self.monitor} is NaN at step {step} (the model or its inputs went "
                "non-finite); skipped because on_nonfinite=False. Pass on_nonfinite=True to count it as bad."
            )

    def _stale_limit(self) -> int | None:
        """Steps of silence after which the key is stale: ``stale_after``, or 3 × its last publication interval."""
        if self.stale_after is not None:
            return self.stale_after
        if self.last_seen_step is None or self.prev_seen_step is None:
            return None
        return 3 * max(self.last_seen_step - self.prev_seen_step, 1)

    def _check_stale(self, trainer: Trainer) -> None:
        now = _current_step(trainer)
        reason = self.check_stale(now)
        if reason is not None:
            self._act(trainer, reason, now)

    def check_stale(self, now: int) -> str | None:
        """The trainer-free core of the staleness check at step ``now``: a key silent for more than the stale limit
        is warned about once; with ``on_nonfinite`` it is one bad observation per further stale limit of silence.
        Returns the reason when the guard fires now."""
        limit = self._stale_limit()
        if limit is None or self.last_seen_step is None or self._restored_silence:
            return None
        since = self.last_seen_step if self.last_stale_step is None else self.last_stale_step
        if now - since <= limit:
            return None
        self.last_stale_step = now
        reason = (
            f"{self.monitor} was not published for {now - self.last_seen_step} steps (last at step "
            f"{self.last_seen_step}, stale after {limit}): its monitor stopped or the key disappeared"
        )
        if not self.stale_warned:
            self.stale_warned = True
            rank_zero_warn(f"EntropyCollapseGuard: {reason}; its last value is not treated as current.")
        return self._bad(reason, now, stale=True) if self.on_nonfinite else None

    def _check_missing(self, trainer: Trainer) -> None:
        if self.missing_ok or self.last_seen_step is not None or trainer.global_step < self.missing_after:
            return
        if self.monitor in trainer.callback_metrics:
            return
        available = sorted(k for k in trainer.callback_metrics)[:20]
        raise EntrotrainError(
            f"EntropyCollapseGuard: {self.monitor!r} was never logged in {self.missing_after} steps. "
            f"Logged keys include {available}. Add the monitor that logs it, or fix the key."
        )

    # ------------------------------------------------------------------ actions
    def _act(self, trainer: Trainer, reason: str, step: int, logged: int | None = None) -> None:
        """The configured action, once per episode; ``step`` is the step the watched value was judged at, ``logged``
        (default ``step``) the one it was logged at, where the alert row goes."""
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        message = self.fire(
            reason, step, trainer.optimizers, schedulers, _lightning_checkpoints(trainer), self._run_start
        )
        if self.stopping:
            trainer.should_stop = True
        rank_zero_warn(message)
        self._record(trainer, message, step if logged is None else logged)
        if self.action == "alert":
            self._alert(trainer, message)
        if trainer.is_global_zero:
            self.send_notification(message)

    def fire(
        self, reason: str, step: int, optimizers: Sequence[Any] = (), schedulers: Sequence[Any] = (),
        checkpoints: Iterable[str | Path] = (), since: float | None = None,
    ) -> str:
        """The firing's message for ``reason`` at ``step``, running ``"reduce_lr"`` on ``optimizers`` /
        ``schedulers`` and naming the checkpoint to roll back to (:meth:`rollback_hint`); the one builder of the
        message for Lightning, ``transformers.Trainer`` and a plain loop. The caller stops training, warns, records
        and notifies."""
        message = f"EntropyCollapseGuard at step {step}: {reason}."
        self.stopping = self.action == "stop"
        self.last_level = self.action
        if self.action == "stop":
            message += " Stopping training."
        elif self.action == "rollback" and self._stale_bad:
            self.last_level = "warn"
            self._unacted = True  # the key coming back bad in this streak is a firing that rolls back
            message += (" Not rolled back: a key that stopped being published says nothing about the model (its "
                        "monitor stopped, or the key was renamed); the held state stays.")
        elif self.action == "rollback":
            message += self._roll_back(optimizers, schedulers)
            self.last_level = "stop" if self.stopping else "rollback"
        elif self.action == "reduce_lr":
            if self.reduce_lr(optimizers, schedulers):
                message += (f" Learning rates multiplied by {self.lr_factor}{self._floor_note(optimizers)}"
                            f"{_rates_now(optimizers)}{capped_note(optimizers)} "
                            f"(reduction #{self.lr_reductions}).")
            elif any(getattr(opt, "param_groups", None) for opt in optimizers):
                reason = _not_lowered(optimizers, self.min_lr)
                message += f" {reason[0].upper()}{reason[1:]}; left as they are."
            else:
                message += " No optimizer learning rate to lower (none configured)."
        return message + self.rollback_hint(checkpoints, since, kept=self.keeper.freeze(self.last_good_step))

    def _roll_back(self, optimizers: Sequence[Any], schedulers: Sequence[Any]) -> str:
        """Restore the held state, lower the learning rates and re-arm the guard (the next fall is a new episode);
        stop instead when ``max_rollbacks`` is spent or nothing is held. Returns the message's sentence."""
        if self.rollbacks >= self.max_rollbacks:
            self.stopping = True
            return (f" Rolled back {self.rollbacks} time(s) already (max_rollbacks={self.max_rollbacks}): stopping "
                    "training.")
        if self._tracked is None or self.held_states.step is None:
            self.stopping = True
            return (" No good state is held to roll back to (none was judged good since training started or "
                    "resumed): stopping training.")
        model, tracked_optimizers = self._tracked
        good = self._good_since_rollback
        last_target = self.held_states.restored_step  # (None: no rollback since the states were first held)
        came_back = last_target is not None and good < self.rollback_states
        picked = self.held_states.pick(further_back=came_back)
        assert picked is not None  # something is held (checked above)
        refused: list[str] = []  # held states a restore refused before copying (hold='trainable': a frozen one moved)
        for held in self.held_states.from_state(picked):
            try:
                held_step = self.held_states.restore(model, tracked_optimizers, held)
                break
            except EntrotrainError as error:
                refused.append(str(error))
        else:
            self.stopping = True
            return f" Could not roll back: {refused[-1]} Stopping training."
        further = came_back and held_step < last_target  # (not when the older ones were refused, or none held)
        self.rollbacks += 1
        self.bad_streak, self.fired, self._good_since_rollback = 0, False, 0
        self.history = deque(held.extra or [], maxlen=self.drop_window + 1)
        # the model is now the state judged good at held_step: the checkpoint hint, the pin this firing keeps and the
        # next firing's "last good" name it, not a good observation of the trajectory left (after a step further back)
        self.last_good_step = held_step
        if held.extra:
            self.last_good_value = float(held.extra[-1])
        self._rehold_others(held_step)
        sentence = f" Rolled back the model and optimizer state to step {held_step}"
        if came_back:
            count = f"{good} good observation{'' if good == 1 else 's'}" if good else "with no good observation"
            after = f"{count} after the last rollback (to step {last_target})"
            sentence += (f", one held state further back: the fall came back {after}" if further else
                         f"; the fall came back {after}, and no older state is held (raise rollback_states to hold "
                         "older ones)")
        sentence += (f" (rollback {self.rollbacks} of {self.max_rollbacks}; the batches since are skipped, not "
                     "replayed")
        if not further and self._not_held_step is not None:
            sentence += f"; the state after step {self._not_held_step} was not finite, so it was not held"
        if refused:
            sentence += f"; {len(refused)} older held state(s) could not be restored: {refused[0]}"
        sentence += ")"
        if self.reduce_lr(optimizers, schedulers):
            return (sentence + f"; learning rates multiplied by {self.lr_factor}{self._floor_note(optimizers)}"
                    f"{_rates_now(optimizers)}{capped_note(optimizers)}.")
        return sentence + f"; {_not_lowered(optimizers, self.min_lr)}, left as they are."

    def _rehold_others(self, step: int) -> None:
        """The other rollback guards on the model hold the state just restored and drop the states they held after its
        step (:meth:`RollbackHistory.rehold`): those are of the trajectory left (taken while this guard's bad streak
        ran), which their next firing, or one going further back, must not bring back. Their ``max_drop`` history
        goes back with them and their bad streak ends (the values after it were measured on the trajectory left)."""
        model = self._tracked_model
        for other in list(_TRACKING.get(model, ())) if model is not None else ():
            if other is not self and other._tracked is not None and other._tracked_model is model:
                held = other.held_states.rehold(*other._tracked, step=step)
                other.history = deque(held.extra or [] if held else [], maxlen=other.drop_window + 1)
                other._not_held_step = None  # what it holds is older for another reason
                other.bad_streak = 0  # its bad observations were of the weights gone

    def rollback_hint(
        self, checkpoints: Iterable[str | Path], since: float | None = None, kept: Path | None = None
    ) -> str:
        """`` Newest checkpoint at or before step S: PATH.`` for the newest of ``checkpoints`` whose name says it was
        saved at or before the last step judged good (``step=N`` in Lightning's names, ``checkpoint-N`` in
        ``transformers``', ``global_stepN``, ``step_N``, ``ckpt_N``); ``""`` when none is known. ``since``: ignore
        files modified before this time (seconds since the epoch): an earlier run's checkpoints left in the folder.
        ``kept``: the pin :meth:`LastGoodCheckpoints.freeze` kept for this firing, named instead of a checkpoint of
        the same step (a rotation may delete that one)."""
        if self.last_good_step is None:
            return ""
        checkpoints = [p for p in checkpoints if of_this_run(p, since)]
        dated = [(step, 0, Path(p)) for p in checkpoints if (step := saved_at(p)) is not None]
        if kept is not None:
            dated.append((saved_at(kept) or 0, 1, kept))
        before = [entry for entry in dated if entry[0] <= self.last_good_step]
        if not before:
            return ""
        _, is_kept, self.rollback_checkpoint = max(before)
        where = " (kept by the guard where checkpoint rotation cannot delete it)" if is_kept else ""
        return f" Newest checkpoint at or before step {self.last_good_step}: {self.rollback_checkpoint}{where}."

    def send_notification(self, message: str) -> None:
        """Call ``notify`` with ``message`` (the caller runs it on rank zero); a failure is warned about once."""
        if self.notify is None:
            return
        try:
            self.notify(message)
        except Exception as err:  # a dead webhook never stops training
            if not self._notify_failed_warned:
                self._notify_failed_warned = True
                rank_zero_warn(
                    f"EntropyCollapseGuard: notify failed ({type(err).__name__}: {err}); the warning was logged. "
                    "Further failures are not reported."
                )

    def _record(self, trainer: Trainer, message: str, step: int) -> None:
        """The firing as ``{monitor}/alert`` = 1 in every logger and as an event in the run record."""
        for logger in trainer.loggers:
            logger.log_metrics({f"{self.monitor}/alert": 1.0}, step=step)
        record_event(trainer, self.monitor, message, level=self.last_level, step=step)

    def reduce_lr(self, optimizers: Sequence[Any], schedulers: Sequence[Any] = ()) -> bool:
        """``lr ← max(lr · lr_factor, min_lr)`` for every param group of ``optimizers`` and every base rate of
        ``schedulers`` (they recompute lr from ``base_lrs`` at their next step; their floors too, ``eta_min`` of the
        cosine schedules and ``OneCycleLR``'s ``min_lr``, and the rate ``SWALR`` anneals to, so the lowered rate stays
        lowered to the end) and of the schedulers they step (``SequentialLR`` / ``ChainedScheduler`` children,
        accelerate's wrapped scheduler); whether any rate fell. A ``ReduceLROnPlateau`` counts its patience from the
        lowered rate, as after its own reduction (the bad epochs before it would lower the rate once more)."""
        lowered = False
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                if not _is_rate(group.get("lr")):  # Adafactor(relative_step=True): lr=None, its own step size
                    continue
                new = self._lowered(group["lr"])
                lowered |= new < group["lr"]
                group["lr"] = new
        lower = self._lowered
        for scheduler in _with_inner_schedulers(schedulers):
            base = getattr(scheduler, "base_lrs", None)
            if base is not None:
                scheduler.base_lrs = [lower(lr) for lr in base]
            if isinstance(getattr(scheduler, "max_lrs", None), list):  # CyclicLR cycles between base and max
                scheduler.max_lrs = [lower(lr) for lr in scheduler.max_lrs]
            eta_min = getattr(scheduler, "eta_min", None)  # CosineAnnealingLR / WarmRestarts decay towards it
            if isinstance(eta_min, (int, float)) and not isinstance(eta_min, bool):
                scheduler.eta_min = lower(eta_min)
            for group in scheduler.optimizer.param_groups if type(scheduler).__name__ in _GROUP_RATES else ():
                for key in _GROUP_RATES[type(scheduler).__name__]:
                    if isinstance(group.get(key), (int, float)):
                        group[key] = lower(group[key])
            if type(scheduler).__name__ == "ReduceLROnPlateau":  # as after its own reduction: patience counts anew
                scheduler.num_bad_epochs, scheduler.cooldown_counter = 0, scheduler.cooldown
            _report_current_rates(scheduler)
        if lowered:
            self.lr_reductions += 1
        return lowered

    def _floor_note(self, optimizers: Sequence[Any]) -> str:
        """`` (held at min_lr=0.3)`` when a rate just lowered stopped at ``min_lr``: the factor alone would misstate
        it (``multiplied by 0.5, now 0.3``)."""
        rates = _rates(optimizers)
        return f" (held at min_lr={self.min_lr})" if self.min_lr > 0 and self.min_lr in rates else ""

    def _lowered(self, lr: float) -> float:
        """``lr · lr_factor``, never below ``min_lr`` and never above ``lr``."""
        return min(max(lr * self.lr_factor, self.min_lr), lr)

    def _alert(self, trainer: Trainer, message: str) -> None:
        if not trainer.is_global_zero:
            return
        from entrotrain.dashboards.wandb_media import wandb_loggers

        for logger in wandb_loggers(trainer.loggers):
            alert = getattr(logger.experiment, "alert", None)
            if callable(alert):
                try:
                    alert(title=f"entropy collapse: {self.monitor}", text=message)
                except Exception as err:  # offline runs refuse alerts; the warning above already went out
                    if not self._alert_failed_warned:
                        self._alert_failed_warned = True
                        rank_zero_warn(
                            f"EntropyCollapseGuard: wandb alert failed ({err}); the warning was logged. "
                            "Further refused alerts are not reported."
                        )


def _weight_averages(trainer: Trainer) -> list[nn.Module]:
    """The averaged models of the trainer's ``WeightAveraging`` callbacks (``EMAWeightAveraging``), created at setup:
    a rollback restores them with the model. (``StochasticWeightAveraging`` keeps its count outside its module and
    averages per epoch late in training: not rolled back.)"""
    averaging = getattr(lightning_callbacks, "WeightAveraging", None)
    callbacks = getattr(trainer, "callbacks", None) or []
    found = [getattr(cb, "_average_model", None) for cb in callbacks if averaging and isinstance(cb, averaging)]
    return [module for module in found if isinstance(module, nn.Module)]


#: The schedulers that recompute the rate from their optimizer's param groups, not from ``base_lrs``, and the group
#: keys they read: OneCycleLR its bounds, SWALR (Lightning's ``StochasticWeightAveraging``) the rate it anneals to.
_GROUP_RATES: dict[str, tuple[str, ...]] = {"OneCycleLR": ("initial_lr", "max_lr", "min_lr"), "SWALR": ("swa_lr",)}


def _with_inner_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    """``schedulers`` and the ones they step: the children of ``SequentialLR`` / ``ChainedScheduler`` (each
    recomputes its rate from its own ``base_lrs``) and the scheduler inside accelerate's ``AcceleratedScheduler``;
    each once."""
    out: list[Any] = []
    todo = list(schedulers)
    while todo:
        scheduler = todo.pop(0)
        if scheduler is None or any(scheduler is seen for seen in out):
            continue
        out.append(scheduler)
        todo.extend(getattr(scheduler, "_schedulers", None) or ())
        inner = getattr(scheduler, "scheduler", None)
        if inner is not None and inner is not scheduler:
            todo.append(inner)
    return out


def _report_current_rates(scheduler: Any) -> None:
    """``scheduler.get_last_lr()`` reports its optimizer's rates as they are now, lowered: a scheduler updates it only
    at its next step, and ``transformers.Trainer`` logs ``learning_rate`` from it."""
    groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(groups, list) and isinstance(last, list) and len(last) == len(groups):
        scheduler._last_lr = [group["lr"] for group in groups]


def _beside(value: float, threshold: float) -> str:
    """``value`` to 4 significant digits, or more where 4 would print it as the threshold (``= 1 fell below 1.0``
    for 0.99996 below 1.0)."""
    for digits in (4, 6, 9, 17):
        shown = f"{value:.{digits}g}"
        if float(shown) != float(f"{threshold:.{digits}g}") or value == threshold:
            return shown
    return repr(value)


def _is_rate(lr: Any) -> bool:
    """Whether a param group's ``lr`` is a rate the guard can lower (a number or a one-element tensor; not ``None``,
    which ``transformers.Adafactor(relative_step=True)`` keeps)."""
    if isinstance(lr, bool):
        return False
    return isinstance(lr, (int, float)) or (getattr(lr, "numel", None) is not None and lr.numel() == 1)


def _rates(optimizers: Sequence[Any]) -> list[float]:
    """The learning rates of ``optimizers``' param groups that are rates (:func:`_is_rate`)."""
    return [float(group["lr"]) for opt in optimizers for group in getattr(opt, "param_groups", ())
            if _is_rate(group.get("lr"))]


def _not_lowered(optimizers: Sequence[Any], min_lr: float) -> str:
    """Why a reduction lowered no rate of ``optimizers`` (which have param groups): ``already at min_lr=...``, or
    none has a rate to lower."""
    if _rates(optimizers):
        return f"learning rates already at min_lr={min_lr}"
    return "no learning rate to lower (the optimizer sets its own step size: lr is None)"


def _rates_now(optimizers: Sequence[Any]) -> str:
    """``, now 0.001``: the learning rates after a reduction (their range when the groups differ)."""
    rates = sorted(set(_rates(optimizers)))
    if not rates:
        return ""
    return f", now {rates[0]:.3g}" if len(rates) == 1 else f", now {rates[0]:.3g} to {rates[-1]:.3g}"


def _resolve_notify(notify: Callable[[str], Any] | str | None) -> Callable[[str], Any] | None:
    """``notify`` as a callable: itself, or the function its import path names."""
    if notify is None or (callable(notify) and not isinstance(notify, str)):
        return notify
    if not isinstance(notify, str) or not notify.strip():
        raise EntrotrainError(
            f"EntropyCollapseGuard(notify) must be a callable taking the message, its import path such as "
            f"'my_alerts.slack', or a webhook ('env:SLACK_WEBHOOK_URL' or its URL); got {type(notify).__name__} "
            f"{notify!r}."
        )
    webhook = notifier_from_spec(notify.strip())
    if webhook is not None:
        return webhook
    module_name, sep, attr = notify.partition(":") if ":" in notify else notify.rpartition(".")
    if not sep or not module_name or not attr:
        raise EntrotrainError(
            f"EntropyCollapseGuard(notify={notify!r}) is not an import path: give 'package.module.function' or "
            "'package.module:function'."
        )
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise EntrotrainError(
            f"EntropyCollapseGuard(notify={notify!r}): cannot import it ({type(err).__name__}: {err}). Check the "
            "module is importable from where training runs (installed, or on PYTHONPATH) and the function's name."
        ) from err
    if not callable(target):
        raise EntrotrainError(
            f"EntropyCollapseGuard(notify={notify!r}) names a {type(target).__name__}, not a callable."
        )
    return target


_SAVED_AT = re.compile(r"(?:step[=_-]?|checkpoint-|ckpt[_-]?)(\d+)")


def saved_at(path: str | Path) -> int | None:
    """The optimizer step a checkpoint's name says it was saved at: the last ``step=N`` (Lightning), ``checkpoint-N``
    (``transformers``), ``global_stepN`` (DeepSpeed), ``step_N`` / ``ckpt_N`` (hand-written loops)."""
    found = _SAVED_AT.findall(Path(path).name)
    return int(found[-1]) if found else None


def of_this_run(path: str | Path, since: float | None) -> bool:
    """Whether the checkpoint at ``path`` belongs to the run that started at ``since`` (:func:`run_start`): modified
    at or after it (``None``: every file, a resumed run's earlier checkpoints are its own). A file that cannot be read
    is not."""
    if since is None:
        return True
    try:
        return Path(path).stat().st_mtime >= since
    except OSError:
        return False


def run_start(resumed: bool) -> float | None:
    """The ``since`` of :meth:`EntropyCollapseGuard.rollback_hint` for a run starting now: ``None`` (every file) when
    it resumes, whose earlier checkpoints are its own; else now, less 2 s (file times come from a coarser clock)."""
    return None if resumed else time.time() - 2.0


def _lightning_checkpoints(trainer: Trainer) -> list[Path]:
    """The ``.ckpt`` files in the folders of the trainer's ``ModelCheckpoint`` callbacks (rank zero reads them), and
    the checkpoint this fit resumed from (``ckpt_path``: a kept one in ``entrotrain-last-good/``, after a roll back,
    is where to roll back to again when the run collapses before its own next save)."""
    folders = {Path(cb.dirpath) for cb in getattr(trainer, "checkpoint_callbacks", []) if getattr(cb, "dirpath", None)}
    found = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    ckpt_path = getattr(trainer, "ckpt_path", None)
    resumed = Path(ckpt_path) if isinstance(ckpt_path, (str, Path)) else None
    return found + [resumed] if resumed is not None and resumed.is_file() and resumed not in found else found
