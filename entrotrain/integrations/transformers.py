r"""entrotrain's monitors and collapse guard inside Hugging Face ``transformers.Trainer``.

::

    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.integrations.transformers import EntropyTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=data)
    EntropyTrainerCallback([AttentionEntropyMonitor()]).attach(trainer)
    trainer.train()

:class:`EntropyTrainerCallback` drives the *same* monitor objects the Lightning side uses
(:class:`~entrotrain.callbacks.attention_monitor.AttentionEntropyMonitor`,
:class:`~entrotrain.callbacks.representation_monitor.RepresentationEntropyMonitor`,
:class:`~entrotrain.callbacks.sigma_reparam_monitor.SigmaReparamMonitor`,
:class:`~entrotrain.callbacks.router_monitor.RouterEntropyMonitor`,
:class:`~entrotrain.callbacks.prediction_monitor.PredictionEntropyMonitor`) and
:class:`~entrotrain.callbacks.collapse_guard.EntropyCollapseGuard`: their taps, their trainer-free cores
(``bind`` / ``compute_metrics`` / ``media`` / ``observe``) and their keys. No statistic is computed here (DESIGN.md §8): a key has the same
value from Lightning and from ``Trainer`` on the same model and batches.

When it captures. ``Trainer`` logs at optimizer step ``s`` (``state.global_step`` after the step) when
``s % state.logging_steps == 0``, or ``s == 1`` with ``logging_first_step`` (``DefaultFlowCallback``). The taps are
armed in ``on_step_begin`` of exactly those steps (``state.global_step + 1`` is ``s``), stay armed over every
gradient-accumulation micro-batch (their sums add up), and are disarmed in ``on_step_end``, after the optimizer
step, where the window is reduced (one SUM all-reduce per monitor when ``torch.distributed`` is initialised, as under
``accelerate launch`` / ``torchrun``) and turned into metrics. The monitors' own ``every_n_steps`` is not used:
``TrainingArguments.logging_steps`` decides. ``logging_strategy="epoch"`` is refused (the step that ends an epoch is
not known when it begins); ``"no"`` captures nothing.

Where the numbers go. ``on_log`` of the training log adds the finite scalars to ``logs`` (and to the
``state.log_history`` row ``Trainer`` has just written), so every callback after this one, the ``report_to``
integrations included, receives them. ``Trainer`` puts its ``report_to`` callbacks *before* those passed as
``callbacks=[...]``; :meth:`EntropyTrainerCallback.attach` therefore inserts the callback right after
``DefaultFlowCallback``. Passed through ``callbacks=`` instead, only ``state.log_history`` and later callbacks see the
keys (a warning says so when ``report_to`` is set). A statistic that could not be computed (NaN) never reaches a
backend; a guard sees it as NaN, as in Lightning. Media (attention heatmap / histogram / heads over time,
representation spectra, router load heatmap, probe position × step heatmap) go to the active wandb run (``wandb.run``) on the main process, keyed ``train/{key}`` at
``train/global_step`` like ``WandbCallback``'s scalars.

Guards. After the monitors, each guard observes its key when the key is in this log (an entrotrain key or any other
logged scalar: ``loss``, ``grad_norm``, ...), and checks staleness at each step end, with the Lightning guard's rules.
Actions: ``"warn"``; ``"alert"`` (warn and ``wandb.run.alert`` when a run is active); ``"stop"``
(``control.should_training_stop``, training ends after this step); ``"reduce_lr"`` (every param group of the
optimizer and the scheduler's ``base_lrs`` multiplied by ``lr_factor``, never below ``min_lr``). Each firing adds
``{monitor}/alert = 1`` to the logs.

Resume. The monitors' and guards' ``state_dict()`` go into ``TrainerState.stateful_callbacks["entrotrain"]`` before
each checkpoint (``trainer_state.json``); ``trainer.train(resume_from_checkpoint=...)`` restores them in
``on_train_begin`` (guard streaks, first summaries and histories continue). Without a checkpoint every ``train()``
starts fresh. The callback is not an ``ExportableState`` (Trainer would rebuild it from JSON arguments, and monitor
objects are not JSON); with ``restore_callback_states_from_checkpoint=True`` Trainer only warns that it ignores the
``entrotrain`` entry, which this callback restores itself.

Lifecycle. Taps are armed only inside a logging step and released at ``on_train_end``. ``Trainer`` has no
exception event: :meth:`~EntropyTrainerCallback.attach` wraps ``trainer.train`` so that any exception also releases
them; without ``attach``, call :meth:`~EntropyTrainerCallback.release` in your own ``finally``.

The batch of a micro-batch. ``Trainer`` hands callbacks no batch, but it calls ``model(**inputs)``. While a logging
step is armed, the router and prediction monitors put a forward pre-hook (``with_kwargs=True``) and a forward hook on
the root model: the pre-hook reads the micro-batch's ``attention_mask`` (and ``labels``) keyword tensors, the hook
scores that forward. So:

* :class:`RouterEntropyMonitor`: the :class:`~entrotrain.taps.router_tap.RouterTap` captures the routers (HF
  ``*TopKRouter`` / MoE ``gate``, or ``include``), each forward is scored with its own ``attention_mask`` (padding rows
  excluded; a mask that does not match the router rows is ignored with the Lightning monitor's warning). A model
  without routers is refused at train begin (:class:`~entrotrain.errors.TapError`): there is no ``training_step`` to
  return ``router_logits``. ``top_k`` defaults to the config's ``num_experts_per_tok``. The layer names are printed
  once (not logged: ``{p}/layers`` is a Lightning hyperparameter).
* :class:`PredictionEntropyMonitor`: ``source="head"`` hooks the head (``head`` glob, e.g. ``"**.lm_head"``) inside
  each forward, ``source="output"`` reads the output's ``.logits``; labels are the ``labels`` keyword (HF causal LMs
  take unshifted labels: pass ``shift_labels=True``), the keep mask ``attention_mask & labels != ignore_index``. The
  probe set is the ``probe=`` tensors (there is no datamodule: ``probe=None`` means no probe set), scored, and
  ``generation_prompts`` generated, after the optimizer step in eval mode without gradient, RNG untouched.
  A model called positionally (no keywords) gives no mask and no labels: every position counts, no NLL.

Not supported here: ``RepresentationEntropyMonitor(stage="validation")`` and its ``dsmi`` measure (``Trainer``
hands callbacks no batch; use ``stage="train"`` and the other measures).

Requires ``transformers>=4.48`` and ``accelerate>=1.4`` (the ``entrotrain[hf]`` extra); importing this module
without them raises :class:`~entrotrain.errors.EntrotrainError`. ``import entrotrain`` never imports transformers.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor, nn

from entrotrain.errors import EntrotrainError, TapError

_TRANSFORMERS = RequirementCache("transformers>=4.48")
_ACCELERATE = RequirementCache("accelerate>=1.4")
for _req, _what in ((_TRANSFORMERS, "transformers>=4.48"), (_ACCELERATE, "accelerate>=1.4")):
    if not _req:
        raise EntrotrainError(
            f"entrotrain.integrations.transformers needs {_what}: {_req.message}. Install the extra with "
            "`pip install 'entrotrain[hf]'` (or `pip install -U transformers accelerate`)."
        )

from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # noqa: E402
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_callback import DefaultFlowCallback  # noqa: E402

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor  # noqa: E402
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # noqa: E402
from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor, _logits_of, _Positions  # noqa: E402
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor  # noqa: E402
from entrotrain.callbacks.router_monitor import RouterEntropyMonitor  # noqa: E402
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor  # noqa: E402

__all__ = ["STATE_KEY", "EntropyTrainerCallback"]

#: Key of entrotrain's entry in ``TrainerState.stateful_callbacks`` (saved in ``trainer_state.json``).
STATE_KEY = "entrotrain"

Reduce = Callable[[Tensor], Tensor]


def _distributed() -> tuple[int, int, Reduce | None]:
    """``(world_size, rank, sum over ranks)``; one process when ``torch.distributed`` is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0, None
    import torch.distributed as dist

    def reduce(t: Tensor) -> Tensor:
        t = t.contiguous().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return dist.get_world_size(), dist.get_rank(), reduce


def _wandb_run() -> Any | None:
    """The active wandb run, if wandb is imported and a run is active (never imports wandb)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


# ------------------------------------------------------------------------------------------------ monitor drivers
class _Driver:
    """Drives one Lightning monitor's trainer-free core from ``Trainer`` events."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.model: nn.Module | None = None
        self.step = 0  # the optimizer step being captured (set before arm)

    def bind(self, model: nn.Module) -> None:
        """Fresh per-train state, watching ``model``."""
        self.monitor._reset_fit_state()
        self.model = model

    def arm(self) -> None:
        """First micro-batch of a logging step."""

    def disarm(self) -> None:
        """Safe to call at any time, any number of times."""

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        raise NotImplementedError

    def media(self) -> dict[str, Any]:
        return {}

    def summary(self) -> str | None:
        return None


class _AttentionDriver(_Driver):
    monitor: AttentionEntropyMonitor

    def __init__(self, monitor: AttentionEntropyMonitor) -> None:
        super().__init__(monitor)
        self._normalized: Tensor | None = None

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.monitor.bind(model)

    def arm(self) -> None:
        assert self.monitor.tap is not None
        self.monitor.tap.reset()
        self.monitor.tap.arm()

    def disarm(self) -> None:
        if self.monitor.tap is not None:
            self.monitor.tap.disarm()

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        m = self.monitor
        assert m.tap is not None and self.model is not None
        self._normalized = None
        if not m.tap.stats:
            m._no_capture(self.model)  # TapError when strict, else warned once
            return {}
        metrics, normalized = m.compute_metrics(step, reduce)
        if not m._announced:
            m._announced = True
            names = ", ".join(f"L{i}={name}" for i, name in enumerate(m.site_names))
            rank_zero_info(f"AttentionEntropyMonitor sites: {names}")
        if rank == 0:
            m._history.append(normalized.float())
            m._history_steps.append(step)
        self._normalized = normalized
        return metrics

    def media(self) -> dict[str, Any]:
        if not self.monitor.log_media or self._normalized is None:
            return {}
        return self.monitor.media(self._normalized)

    def summary(self) -> str | None:
        m = self.monitor
        return m.summary_table() if m.print_summary and m.first_summary is not None else None


class _RepresentationDriver(_Driver):
    monitor: RepresentationEntropyMonitor

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.monitor.bind(model)

    def arm(self) -> None:
        assert self.monitor.tap is not None
        self.monitor._begin_window()
        self.monitor.tap.arm()

    def disarm(self) -> None:
        if self.monitor.tap is not None:
            self.monitor.tap.disarm()

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        return self.monitor.compute_metrics(step, world, rank, reduce)

    def media(self) -> dict[str, Any]:
        m = self.monitor
        return m.media() if m.log_spectrum and m.spectra else {}

    def summary(self) -> str | None:
        m = self.monitor
        return m.summary_table() if m.print_summary and m.history else None


class _SigmaReparamDriver(_Driver):
    monitor: SigmaReparamMonitor

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        assert self.model is not None
        return self.monitor.compute_metrics(self.model, step)  # weights are the same on every rank: no reduction


class _BatchWatch:
    """Forward pre/post hooks on the root model during a logging step: ``Trainer`` hands callbacks no batch, but it
    calls ``model(**inputs)``, so the pre-hook reads the micro-batch's tensors from the keyword arguments (the
    ``attention_mask``, the ``labels``) and the post-hook sees the output, once per micro-batch forward."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.fields: dict[str, Tensor | None] = {}

    def arm(self, model: nn.Module, keys: Sequence[str], before: Callable[[], None], after: Callable[[Any], None]) -> None:
        self.disarm()

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.fields = {k: kwargs[k] if isinstance(kwargs.get(k), Tensor) else None for k in keys}
            before()

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            after(output)

        self._handles = [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.fields = {}


class _RouterDriver(_Driver):
    """Router statistics from the monitor's :class:`~entrotrain.taps.router_tap.RouterTap`, one micro-batch forward
    at a time; the keep mask is the forward's ``attention_mask`` keyword argument (``mask_key``)."""

    monitor: RouterEntropyMonitor

    def __init__(self, monitor: RouterEntropyMonitor) -> None:
        super().__init__(monitor)
        self._watch = _BatchWatch()
        self._mask: Tensor | None = None

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.monitor.bind(model)
        if self.monitor.tap is None:  # no training_step under Trainer: the tap is the only source
            raise TapError(f"RouterEntropyMonitor under transformers.Trainer: {self.monitor._tap_error}")

    def _consume(self) -> None:
        """Score what the routers captured since the last call, with the mask of the forward that produced it."""
        m = self.monitor
        if m.tap is None or not m.tap.captures:
            return
        key = m.mask_key
        m._consume(None, {key: self._mask} if key is not None and self._mask is not None else {}, self.step)
        m.tap.reset()

    def arm(self) -> None:
        m = self.monitor
        assert m.tap is not None and self.model is not None
        m._sums = {}
        m.tap.reset()
        self._mask = None

        def before() -> None:
            self._consume()  # captures left by a recomputation in backward belong to the previous forward
            self._mask = self._watch.fields.get(m.mask_key) if m.mask_key is not None else None

        self._watch.arm(self.model, [m.mask_key] if m.mask_key is not None else [], before, lambda _: self._consume())
        m.tap.arm()

    def disarm(self) -> None:
        self._watch.disarm()
        if self.monitor.tap is not None:
            self.monitor.tap.disarm()

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        m = self.monitor
        self._consume()
        metrics = m.compute_metrics(step, reduce)
        if not m._announced:
            m._announced = True
            rank_zero_info("RouterEntropyMonitor layers: " + ", ".join(f"L{i}={n}" for i, n in enumerate(m.layer_names)))
        return metrics

    def media(self) -> dict[str, Any]:
        return self.monitor.media() if self.monitor.log_media else {}

    def summary(self) -> str | None:
        m = self.monitor
        return m.summary_table() if m.print_summary and m.history else None


class _PredictionDriver(_Driver):
    """Prediction entropy of each micro-batch forward of a logging step: the head hook (``source="head"``) or the
    model's output logits (``source="output"``); ``labels`` / ``attention_mask`` are the forward's keyword arguments.
    The probe set (``probe=``) and generation run on the model after the step's optimizer update."""

    monitor: PredictionEntropyMonitor

    def __init__(self, monitor: PredictionEntropyMonitor) -> None:
        super().__init__(monitor)
        self._watch = _BatchWatch()

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.monitor.bind(model)

    def arm(self) -> None:
        m = self.monitor
        assert self.model is not None
        m._train = _Positions()

        def before() -> None:
            if m.source == "head":
                m._disarm()
                m._arm(m._labels_only(self._watch.fields)[1])

        def after(output: Any) -> None:
            found = self._watch.fields
            if m.source == "head":
                captured = m._disarm()
                if len(captured) != 1:
                    raise TapError(
                        f"PredictionEntropyMonitor: the head {m.head!r} ran {len(captured)} times in one model forward; "
                        "it must run exactly once. Use source='output'."
                    )
                lead, stats = captured[0]
                keep, labels = m._keep(lead, found, stats.entropy.device)
                m._score(m._train, lead, keep, labels, head_stats=stats)
            else:
                logits = _logits_of(output)
                lead = tuple(logits.shape[:-1])
                keep, labels = m._keep(lead, found, logits.device)
                m._score(m._train, lead, keep, labels, logits=logits)

        self._watch.arm(self.model, ("attention_mask", "labels", "mask"), before, after)

    def disarm(self) -> None:
        self._watch.disarm()
        self.monitor._disarm()

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        assert self.model is not None
        metrics, gen = self.monitor.compute_metrics(self.model, step, world, rank, reduce)
        return {**metrics, **gen}

    def media(self) -> dict[str, Any]:
        return self.monitor.media() if self.monitor.log_media else {}

    def summary(self) -> str | None:
        m = self.monitor
        return m.summary_table() if m.print_summary and m.history else None


_DRIVERS: dict[type, type[_Driver]] = {
    AttentionEntropyMonitor: _AttentionDriver,
    RepresentationEntropyMonitor: _RepresentationDriver,
    SigmaReparamMonitor: _SigmaReparamDriver,
    RouterEntropyMonitor: _RouterDriver,
    PredictionEntropyMonitor: _PredictionDriver,
}


def _driver(monitor: Any, index: int) -> _Driver:
    for cls, driver in _DRIVERS.items():
        if isinstance(monitor, cls):
            break
    else:
        supported = ", ".join(cls.__name__ for cls in _DRIVERS)
        raise EntrotrainError(
            f"EntropyTrainerCallback(monitors[{index}]) must be one of {supported}, got {type(monitor).__name__}. "
            "Guards go in guards=[...]; other monitors run in Lightning only for now."
        )
    if isinstance(monitor, RepresentationEntropyMonitor):
        if monitor.stage != "train":
            raise EntrotrainError(
                f"EntropyTrainerCallback(monitors[{index}]): RepresentationEntropyMonitor(stage={monitor.stage!r}) is "
                "not supported under transformers.Trainer (callbacks see no validation batches); use stage='train'."
            )
        if "dsmi" in monitor.measures:
            raise EntrotrainError(
                f"EntropyTrainerCallback(monitors[{index}]): measure 'dsmi' needs the batch labels, which "
                "transformers.Trainer does not hand to callbacks; drop 'dsmi' from measures."
            )
    return driver(monitor)


# ------------------------------------------------------------------------------------------------ the callback
class EntropyTrainerCallback(TrainerCallback):
    """Runs entrotrain monitors and collapse guards inside ``transformers.Trainer`` (see the module docstring).

    Args:
        monitors: configured :class:`AttentionEntropyMonitor`, :class:`RepresentationEntropyMonitor` (``stage="train"``,
            no ``dsmi``), :class:`SigmaReparamMonitor`, :class:`RouterEntropyMonitor` and
            :class:`PredictionEntropyMonitor` (``probe=`` tensors, not a datamodule) objects; their arguments mean what they mean in Lightning,
            except ``every_n_steps`` (``TrainingArguments.logging_steps`` decides).
        guards: configured :class:`EntropyCollapseGuard` objects; each watches one key of the logs.
        log_media: send the monitors' wandb media to the active wandb run (main process only).

    Raises:
        EntrotrainError: an unsupported monitor or guard, a monitor given twice, or ``logging_strategy="epoch"``.

    Example::

        cb = EntropyTrainerCallback([AttentionEntropyMonitor()],
                                    guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05, action="stop")])
        cb.attach(trainer)
        trainer.train()
    """

    def __init__(
        self,
        monitors: Sequence[Callback] = (),
        guards: Sequence[EntropyCollapseGuard] = (),
        log_media: bool = True,
    ) -> None:
        monitors, guards = list(monitors), list(guards)
        if not monitors and not guards:
            raise EntrotrainError("EntropyTrainerCallback needs at least one monitor or guard; got none.")
        for i, guard in enumerate(guards):
            if not isinstance(guard, EntropyCollapseGuard):
                raise EntrotrainError(
                    f"EntropyTrainerCallback(guards[{i}]) must be an EntropyCollapseGuard, got {type(guard).__name__}."
                )
        self.drivers = [_driver(m, i) for i, m in enumerate(monitors)]
        keys = [m.state_key for m in monitors] + [g.state_key for g in guards]
        if len(set(keys)) != len(keys):
            raise EntrotrainError(
                f"EntropyTrainerCallback: two monitors/guards share a configuration ({keys}); their states would "
                "collide. Give them different include / prefix / monitor arguments, or drop the duplicate."
            )
        self.monitors = monitors
        self.guards = guards
        self.log_media = bool(log_media)
        self.last_metrics: dict[str, float] = {}
        self._pending: dict[str, float] | None = None
        self._alerts: dict[str, float] = {}
        self._published: set[str] = set()
        self._armed = False
        self._attached = False

    # ------------------------------------------------------------------ attaching
    def attach(self, trainer: Any) -> EntropyTrainerCallback:
        """Add this callback to ``trainer`` right after ``DefaultFlowCallback`` (before the ``report_to``
        integrations, so that they log entrotrain's keys) and make ``trainer.train`` release the taps on any
        exception. Returns ``self``."""
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        flow = [i for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)]
        handler.callbacks.insert(flow[0] + 1 if flow else 0, self)
        train = trainer.train
        if not getattr(train, "_entrotrain_release", False):

            @functools.wraps(train)
            def guarded_train(*args: Any, **kwargs: Any) -> Any:
                try:
                    return train(*args, **kwargs)
                finally:
                    self.release()

            guarded_train._entrotrain_release = True  # type: ignore[attr-defined]
            trainer.train = guarded_train
        self._attached = True
        return self

    def release(self) -> None:
        """Disarm every tap (idempotent): no hook, no attention interception is left on the model."""
        for driver in self.drivers:
            driver.disarm()
        self._armed = False

    # ------------------------------------------------------------------ state (resume)
    def _entries(self) -> list[tuple[str, Any]]:
        return [(m.state_key, m) for m in self.monitors] + [(g.state_key, g) for g in self.guards]

    def state_dict(self) -> dict[str, Any]:
        """Every monitor's and guard's ``state_dict()`` by ``state_key`` (JSON-able)."""
        return {key: obj.state_dict() for key, obj in self._entries()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, obj in self._entries():
            if key in state_dict:
                obj.load_state_dict(state_dict[key])

    def _stash(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Put the state where ``Trainer`` saves it (``trainer_state.json``) before a checkpoint is written: at the
        events after which ``Trainer`` may save (``save_strategy="best"`` decides only after evaluating)."""
        best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
        if control.should_save or best:
            if not isinstance(state.stateful_callbacks, dict):
                state.stateful_callbacks = {}
            state.stateful_callbacks[STATE_KEY] = self.state_dict()

    # ------------------------------------------------------------------ events
    @staticmethod
    def _logging_step(args: TrainingArguments, state: TrainerState, step: int) -> bool:
        """Whether ``Trainer`` logs at optimizer step ``step`` (``DefaultFlowCallback.on_step_end``'s rule)."""
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            return False
        every = state.logging_steps or args.logging_steps
        return (step == 1 and bool(args.logging_first_step)) or (bool(every) and step % int(every) == 0)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "epoch" and self.drivers:
            raise EntrotrainError(
                "EntropyTrainerCallback needs TrainingArguments(logging_strategy='steps') (the step that ends an epoch "
                "is not known when it begins, so the taps cannot be armed for it); got logging_strategy='epoch'."
            )
        if model is None:
            raise EntrotrainError("EntropyTrainerCallback.on_train_begin got no model from the Trainer.")
        self.release()
        self.last_metrics, self._pending, self._published, self._alerts = {}, None, set(), {}
        for driver in self.drivers:
            driver.bind(model)
        for guard in self.guards:
            guard._reset_fit_state()
        saved = state.stateful_callbacks.get(STATE_KEY) if isinstance(state.stateful_callbacks, dict) else None
        if saved:  # resume_from_checkpoint: trainer_state.json held our state
            self.load_state_dict(saved)
        report_to = [r for r in (args.report_to or []) if r != "none"]
        if report_to and not self._attached and self.drivers:
            warnings.warn(
                f"EntropyTrainerCallback was passed in callbacks=[...]: Trainer runs the report_to integrations "
                f"{report_to} before it, so they will not log entrotrain's keys (state.log_history gets them). Use "
                "EntropyTrainerCallback(...).attach(trainer) instead.",
                stacklevel=2,
            )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.release()  # a window left open (an interrupted step) never leaks into this one
        if self.drivers and self._logging_step(args, state, state.global_step + 1):
            for driver in self.drivers:
                driver.step = state.global_step + 1
                driver.arm()
            self._armed = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        armed = self._armed
        self.release()
        if armed:
            world, rank, reduce = _distributed()
            metrics: dict[str, float] = {}
            for driver in self.drivers:
                metrics.update(driver.compute(state.global_step, world, rank, reduce))
            self._pending = metrics
            if self.log_media and state.is_world_process_zero:
                self._send_media(state.global_step)
        for guard in self.guards:  # a key not published for too long (its monitor stopped): Lightning's rule
            if guard.last_seen_step is not None:
                reason = guard.check_stale(state.global_step)
                if reason is not None:
                    self._act(guard, reason, state.global_step, control, kwargs, None)
        self._stash(args, state, control)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        values: dict[str, float] = {}
        added: dict[str, float] = dict(self._alerts)
        self._alerts = {}
        if self._pending is not None:
            values = dict(self._pending)
            self._pending = None
            for key in self._published - values.keys():  # published before, not now: gone, not current
                values[key] = math.nan
            self._published.update(values)
            finite = {k: float(v) for k, v in values.items() if math.isfinite(v)}
            self.last_metrics = finite
            added.update(finite)
        logs.update(added)
        for guard in self.guards:
            if guard.monitor in values:
                value = values[guard.monitor]
            elif isinstance(logs.get(guard.monitor), (int, float)):
                value = float(logs[guard.monitor])
            else:
                continue
            if guard.last_seen_step is not None and state.global_step <= guard.last_seen_step:
                continue  # one observation per step (an evaluation log at the same step does not count twice)
            reason = guard.observe(value, state.global_step)
            if reason is not None:
                added[f"{guard.monitor}/alert"] = 1.0
                self._act(guard, reason, state.global_step, control, kwargs, logs)
        history = state.log_history[-1] if state.log_history else None
        if added and isinstance(history, dict) and history.get("step") == state.global_step:
            history.update(added)  # Trainer wrote this row before calling on_log
        self._stash(args, state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._stash(args, state, control)  # save_strategy="epoch" decides here

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._stash(args, state, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.release()
        if state.is_world_process_zero:
            for driver in self.drivers:
                table = driver.summary()
                if table:
                    print(table)

    # ------------------------------------------------------------------ media and actions
    def _send_media(self, step: int) -> None:
        run = _wandb_run()
        if run is None:
            return
        media: dict[str, Any] = {}
        for driver in self.drivers:
            media.update({f"train/{k}": v for k, v in driver.media().items()})
        if media:
            run.log({**media, "train/global_step": step})

    def _act(
        self, guard: EntropyCollapseGuard, reason: str, step: int, control: TrainerControl, kwargs: dict[str, Any],
        logs: dict[str, Any] | None,
    ) -> None:
        """The guard's action, once per episode (the judgement is the guard's own ``observe`` / ``check_stale``)."""
        message = f"EntropyCollapseGuard at step {step}: {reason}."
        if guard.action == "stop":
            message += " Stopping training."
            control.should_training_stop = True
        elif guard.action == "reduce_lr":
            optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
            optimizers = [optimizer] if optimizer is not None else []
            if guard.reduce_lr(optimizers, [scheduler] if scheduler is not None else []):
                message += f" Learning rates multiplied by {guard.lr_factor} (reduction #{guard.lr_reductions})."
            elif optimizers:
                message += f" Learning rates already at min_lr={guard.min_lr}; left as they are."
            else:
                message += " No optimizer learning rate to lower (none configured)."
        rank_zero_warn(message)
        if logs is not None:
            logs[f"{guard.monitor}/alert"] = 1.0
        else:  # fired at a step end: goes out with the next log
            self._alerts[f"{guard.monitor}/alert"] = 1.0
        if guard.action == "alert":
            run = _wandb_run()
            if run is not None and callable(getattr(run, "alert", None)) and _is_main_process():
                try:
                    run.alert(title=f"entropy collapse: {guard.monitor}", text=message)
                except Exception as err:  # offline runs refuse alerts; the warning above already went out
                    rank_zero_warn(f"EntropyCollapseGuard: wandb alert failed ({err}); the warning was logged.")


def _is_main_process() -> bool:
    world, rank, _ = _distributed()
    return rank == 0
