"""Entrotrain's Lightning monitors and collapse guards driven without Lightning: the trainer-free session that
:class:`~entrotrain.integrations.transformers.EntropyTrainerCallback` (``transformers.Trainer``) and
:class:`~entrotrain.integrations.loop.EntropyMonitors` (any training loop) map their events onto.

A *driver* runs one monitor's trainer-free core (``bind`` / ``compute_metrics`` / ``media``): arm its taps for a logging
step, disarm them, turn the captured window into metrics (one SUM all-reduce per monitor when ``torch.distributed`` is
initialised). :class:`MonitorSession` holds the drivers and the guards and keeps the rules both integrations share:

* a key a monitor published before and not at this logging step is NaN now (never its last value);
* each guard observes its key at most once per step, and checks staleness with the Lightning guard's rules;
* a guard's action (warn, alert, stop, reduce_lr) runs once per episode; ``{monitor}/alert = 1`` joins the next logs;
* every monitor's and guard's ``state_dict`` by ``state_key`` for a resume;
* with a run record (:meth:`MonitorSession.open_record`), the arrays, thresholds and guard events the Lightning
  callbacks store (each monitor's ``record_arrays`` / ``record_thresholds``), so ``entrotrain report`` shows the same.

No statistic is computed here (DESIGN.md §8): a key has the same value from Lightning, ``Trainer`` and a plain loop.
Nothing here imports transformers or wandb.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from entrotrain.callbacks._guard_keys import warn_misspelt_keys
from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor, _logits_of, _Positions
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor
from entrotrain.dashboards.remedies import what_to_try
from entrotrain.dashboards.run_record import CHECKPOINT_KEY, RecordArray, RunRecordLogger
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional._dist import collective_device, gather_rows, module_device
from entrotrain.integrations.policy_stats import PolicyStatsRecorder
from entrotrain.taps.exclusive import capture_allowed, training_forwards_only

__all__ = ["MonitorSession", "RecordSpec", "Reduce", "check_record", "distributed", "readable_scalar", "wandb_run"]

Reduce = Callable[[Tensor], Tensor]
#: What an integration's ``record=`` takes: a folder for a new record per run, a configured logger, or ``None``.
RecordSpec = str | os.PathLike[str] | RunRecordLogger | None


def check_record(record: Any, owner: str) -> RecordSpec:
    """``owner(record=...)`` as given, or :class:`EntrotrainError` naming what it takes."""
    if record is not None and not isinstance(record, (str, os.PathLike, RunRecordLogger)):
        raise EntrotrainError(
            f"{owner}(record) must be a folder (e.g. 'runs') or a RunRecordLogger, or None; got "
            f"{type(record).__name__}."
        )
    return record


def distributed() -> tuple[int, int, Reduce | None]:
    """``(world_size, rank, sum over ranks)``; one process when ``torch.distributed`` is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0, None
    import torch.distributed as dist

    def reduce(t: Tensor) -> Tensor:
        t = t.contiguous().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return dist.get_world_size(), dist.get_rank(), reduce


def wandb_run() -> Any | None:
    """The active wandb run, if wandb is imported and a run is active (never imports wandb)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


# ------------------------------------------------------------------------------------------------ monitor drivers
class _Driver:
    """Drives one Lightning monitor's trainer-free core from an integration's events (bind, arm, disarm, compute)."""

    def __init__(self, monitor: Any, where: str) -> None:
        self.monitor = monitor
        self.where = where  # "under transformers.Trainer", for messages
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

    @property
    def period(self) -> int:
        """The monitor's own logging period in optimizer steps (``every_n_steps``)."""
        return int(self.monitor.every_n_steps)

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float] | None:
        """The metrics of the window; ``None`` when nothing was handed over this step (no observation: its keys do
        not turn NaN)."""
        raise NotImplementedError

    def media(self) -> dict[str, Any]:
        return {}

    def record_arrays(self) -> list[RecordArray]:
        """The run record's arrays of the window just computed (the Lightning monitor's own ``record_arrays``)."""
        record_arrays = getattr(self.monitor, "record_arrays", None)
        return record_arrays() if record_arrays is not None else []

    def group(self, key: str) -> str:
        """The publication group of ``key`` (Lightning's ``publish_scalars`` source): a key missing at a logging step
        is NaN only when its group published there."""
        return ""

    def summary(self) -> str | None:
        """The table the Lightning monitor prints at fit end, or ``None`` (its own rule:
        :meth:`~entrotrain.callbacks._lifecycle.HookedMonitor._printed_summary`)."""
        printed = getattr(self.monitor, "_printed_summary", None)
        return printed() if printed is not None else None


class _AttentionDriver(_Driver):
    monitor: AttentionEntropyMonitor

    def __init__(self, monitor: AttentionEntropyMonitor, where: str) -> None:
        super().__init__(monitor, where)
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
        # under torch.distributed every rank joins the reduce, one that captured nothing too (else the others hang)
        computed = m.compute_metrics(step, reduce, module_device(self.model)) if m.tap.stats or world > 1 else None
        if computed is None:  # no rank captured anything
            m._no_capture(self.model)  # TapError when strict, else warned once
            return {}
        metrics, normalized = computed
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

    def record_arrays(self) -> list[RecordArray]:
        return [] if self._normalized is None else self.monitor.record_arrays(self._normalized)


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
        device = module_device(self.model) if self.model is not None else None  # a rank with no capture joins there
        return self.monitor.compute_metrics(step, world, rank, reduce, device)

    def media(self) -> dict[str, Any]:
        m = self.monitor
        return m.media() if m.log_spectrum and m.spectra else {}


class _SigmaReparamDriver(_Driver):
    monitor: SigmaReparamMonitor

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        assert self.model is not None
        return self.monitor.compute_metrics(self.model, step)  # weights are the same on every rank: no reduction


class _BatchWatch:
    """Forward pre/post hooks on the root model during a logging step: ``Trainer`` hands callbacks no batch (nor does
    a plain loop), but the model is called as ``model(**inputs)``, so the pre-hook reads the micro-batch's tensors
    from the keyword arguments (the ``attention_mask``, the ``labels``) and the post-hook sees the output, once per
    micro-batch forward."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.fields: dict[str, Tensor | None] = {}
        self.live = True  # whether the forward under way is one to read (:func:`capture_allowed` at its pre-hook)
        self.fused_head = False  # the forward runs TRL's fused LM head (``fused_lm_head=True``): no logits

    def arm(
        self, model: nn.Module, keys: Sequence[str], before: Callable[[], None], after: Callable[[Any], None]
    ) -> None:
        self.disarm()

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # a forward no tap may record (a no-grad one under training_forwards_only, whose hooks run before these
            # and have noted it by now; one in another monitor's exclusive_capture) is not a micro-batch either
            self.live = capture_allowed(self)
            if not self.live:
                return
            self.fields = {k: kwargs[k] if isinstance(kwargs.get(k), Tensor) else None for k in keys}
            self.fused_head = kwargs.get("fused_lm_head") is True
            before()

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self.live:
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

    def __init__(self, monitor: RouterEntropyMonitor, where: str) -> None:
        super().__init__(monitor, where)
        self._watch = _BatchWatch()
        self._mask: Tensor | None = None

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.monitor.bind(model)
        if self.monitor.tap is None:  # no training_step hands router logits over: the tap is the only source
            raise TapError(f"RouterEntropyMonitor {self.where}: {self.monitor._tap_error}")

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
        device = module_device(self.model) if self.model is not None else None
        metrics = m.compute_metrics(step, reduce, device)  # under torch.distributed every rank joins the reduce
        if not m._announced:
            m._announced = True
            names = ", ".join(f"L{i}={n}" for i, n in enumerate(m.layer_names))
            rank_zero_info(f"RouterEntropyMonitor layers: {names}")
        return metrics

    def media(self) -> dict[str, Any]:
        return self.monitor.media() if self.monitor.log_media else {}


def _causal_lm(model: nn.Module | None) -> bool:
    """Whether ``model`` is an HF causal LM by its class name (``*ForCausalLM``, ``*LMHeadModel``; a PEFT wrapper's
    too), which shifts its ``labels`` inside; read without importing transformers."""
    return _causal_lm_name(model).endswith(("ForCausalLM", "LMHeadModel"))


def _causal_lm_name(model: nn.Module | None) -> str:
    """The class name of ``model``, of the module inside a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return type(getattr(model, "_orig_mod", model)).__name__


class _PredictionDriver(_Driver):
    """Prediction entropy of each micro-batch forward of a logging step: the head hook (``source="head"``) or the
    model's output logits (``source="output"``); ``labels`` / ``attention_mask`` are the forward's keyword arguments.
    The probe set (``probe=``) and generation run on the model after the step's optimizer update."""

    monitor: PredictionEntropyMonitor

    def __init__(self, monitor: PredictionEntropyMonitor, where: str) -> None:
        super().__init__(monitor, where)
        self._watch = _BatchWatch()

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.monitor.bind(model)
        self._warned_unshifted = False

    def _check_forward(self) -> None:
        """Refuse a forward whose predictions cannot be read; warn once about unshifted causal-LM labels."""
        m, found = self.monitor, self._watch.fields
        if self._watch.fused_head:
            raise TapError(
                f"PredictionEntropyMonitor {self.where}: the model was called with fused_lm_head=True (TRL's "
                "trainers, SFTTrainer, GRPOTrainer, RLOOTrainer, DPOTrainer, compute their loss through a fused LM "
                "head): that forward returns no logits and never calls the output head, so neither source='output' "
                "nor source='head' sees a prediction. Drop PredictionEntropyMonitor from this callback: TRL logs its "
                "own token entropy ('entropy'), EntrotrainGRPOTrainer / EntrotrainRLOOTrainer the policy's "
                "entropy/policy/*; for entropy/pred/* train with transformers.Trainer."
            )
        labels, ids = found.get("labels"), found.get("input_ids")
        if (
            m.shift_labels
            or self._warned_unshifted
            or not _causal_lm(self.model)
            or not isinstance(labels, Tensor)
            or not isinstance(ids, Tensor)
            or labels.shape != ids.shape
        ):
            return
        real = labels != m.ignore_index
        if bool(real.any()) and bool((labels[real] == ids[real].to(labels.dtype)).all()):
            self._warned_unshifted = True
            rank_zero_warn(
                f"PredictionEntropyMonitor {self.where}: {_causal_lm_name(self.model)} is a causal LM called with "
                "labels = input_ids, which it shifts itself (the target of position t is labels[t + 1]), but the "
                "monitor has shift_labels=False: entropy/pred/train/nll scores each position against its own token "
                "and the positions kept are off by one. Pass PredictionEntropyMonitor(shift_labels=True)."
            )

    def arm(self) -> None:
        m = self.monitor
        assert self.model is not None
        m._train = _Positions()

        def before() -> None:
            self._check_forward()
            if m.source == "head":
                m._disarm()
                m._arm(m._labels_only(self._watch.fields)[1])

        def after(output: Any) -> None:
            found = self._watch.fields
            if m.source == "head":
                captured = m._disarm()
                if len(captured) != 1:
                    raise TapError(
                        f"PredictionEntropyMonitor: the head {m.head!r} ran {len(captured)} times in one model "
                        "forward; it must run exactly once. Use source='output'."
                    )
                lead, stats = captured[0]
                keep, labels = m._keep(lead, found, stats.entropy.device)
                m._score(m._train, lead, keep, labels, head_stats=stats)
            else:
                logits = _logits_of(output)
                lead = tuple(logits.shape[:-1])
                keep, labels = m._keep(lead, found, logits.device)
                m._score(m._train, lead, keep, labels, logits=logits)

        self._watch.arm(self.model, ("attention_mask", "labels", "mask", "input_ids"), before, after)

    def disarm(self) -> None:
        self._watch.disarm()
        self.monitor._disarm()

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float]:
        assert self.model is not None
        metrics, gen = self.monitor.compute_metrics(self.model, step, world, rank, reduce)
        return {**metrics, **gen}

    def media(self) -> dict[str, Any]:
        return self.monitor.media() if self.monitor.log_media else {}

    def group(self, key: str) -> str:
        # Lightning publishes the generation metrics as their own source, only at generate_every_n_steps
        return "gen" if key.startswith(f"{self.monitor.prefix}/gen/") else ""


class _PolicyDriver(_Driver):
    """:class:`PolicyEntropyMonitor` from the per-token tensors a training loop hands over
    (:meth:`~entrotrain.integrations.loop.EntropyMonitors.record_policy`) on its logging steps, through
    :class:`~entrotrain.integrations.policy_stats.PolicyStatsRecorder` (the monitor's own statistics, gathered over
    ranks: every rank hands its tensors over at the same steps)."""

    monitor: PolicyEntropyMonitor

    def __init__(self, monitor: PolicyEntropyMonitor, where: str) -> None:
        super().__init__(monitor, where)
        self.recorder = PolicyStatsRecorder.of(monitor)
        self.recorder.handed_with, self.recorder.where = "record_policy()", f" {where}"
        self.armed = False

    @property
    def period(self) -> int:
        return int(self.monitor.every_n_batches)

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.recorder.clear()
        self.recorder.temperature = None

    def arm(self) -> None:
        self.recorder.clear()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False  # what was handed over stays until compute

    def add(self, **tensors: Any) -> None:
        if self.armed:
            self.recorder.add(**tensors)

    def compute(self, step: int, world: int, rank: int, reduce: Reduce | None) -> dict[str, float] | None:
        # under torch.distributed every rank joins the recorder's exchange, one that handed nothing over too: a rank
        # that did while another did not (or rewards on some ranks only) is an error on every rank, not a hang
        if world == 1 and not self.recorder.pending:
            return None
        return self.recorder.compute(step) or None  # {}: no rank handed anything over (no observation)

    def record_arrays(self) -> list[RecordArray]:
        return self.recorder.last_arrays

    def summary(self) -> str | None:
        m = self.monitor
        return self.recorder.summary_table() if m.print_summary and m.first_logged is not None else None


_DRIVERS: dict[type, type[_Driver]] = {
    AttentionEntropyMonitor: _AttentionDriver,
    RepresentationEntropyMonitor: _RepresentationDriver,
    SigmaReparamMonitor: _SigmaReparamDriver,
    RouterEntropyMonitor: _RouterDriver,
    PredictionEntropyMonitor: _PredictionDriver,
    PolicyEntropyMonitor: _PolicyDriver,
}


def make_driver(monitor: Any, index: int, owner: str, where: str, policy: bool = False) -> _Driver:
    """The driver of ``monitor`` (``owner(monitors[index])`` in messages), or an error naming what is supported;
    :class:`PolicyEntropyMonitor` only with ``policy`` (an owner through which the loop hands its tensors over)."""
    drivers = {cls: d for cls, d in _DRIVERS.items() if policy or cls is not PolicyEntropyMonitor}
    for cls, driver in drivers.items():
        if isinstance(monitor, cls):
            break
    else:
        supported = ", ".join(cls.__name__ for cls in drivers)
        raise EntrotrainError(
            f"{owner}(monitors[{index}]) must be one of {supported}, got {type(monitor).__name__}. "
            "Guards go in guards=[...]; other monitors run in Lightning only for now."
        )
    if isinstance(monitor, RepresentationEntropyMonitor):
        if monitor.stage != "train":
            raise EntrotrainError(
                f"{owner}(monitors[{index}]): RepresentationEntropyMonitor(stage={monitor.stage!r}) is not supported "
                f"{where} (only training forwards are seen, no validation batches); use stage='train'."
            )
        if "dsmi" in monitor.measures:
            raise EntrotrainError(
                f"{owner}(monitors[{index}]): measure 'dsmi' needs the batch labels, which are not handed over "
                f"{where}; drop 'dsmi' from measures."
            )
    return driver(monitor, where)


def agreed_value(given: Sequence[float], mode: str) -> float | None:
    """The one value a guard of ``mode`` judges for the values the ranks handed over, in rank order
    (:meth:`MonitorSession.agree`): the first non-finite one, else the lowest (``mode="min"``) or the highest
    (``"max"``); ``None`` for none."""
    bad = [value for value in given if not math.isfinite(value)]
    if bad or not given:
        return bad[0] if bad else None
    return min(given) if mode == "min" else max(given)




def readable_scalar(value: Any) -> bool:
    """Whether a guard can read ``value``: a real number (not a bool) or a one-element tensor (not read here)."""
    if isinstance(value, Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ the session
#: Where :meth:`MonitorSession.state_dict` keeps the keys each monitor has published (by its ``state_key``).
PUBLISHED_KEY = "entrotrain_published_keys"


def _nothing() -> None:
    return None


class MonitorSession:
    """The drivers of ``monitors`` and the ``guards``, with the rules every non-Lightning integration shares.

    Args:
        monitors: configured monitor objects (one driver each; :func:`make_driver` says which are supported).
        guards: configured :class:`EntropyCollapseGuard` objects.
        owner: the integration's class name, for messages (``"EntropyTrainerCallback"``).
        where: where it runs, for messages (``"under transformers.Trainer"``).
        policy: accept :class:`PolicyEntropyMonitor` (the integration hands the per-token tensors over).
        empty_ok: allow no monitor and no guard (the integration has other work, e.g. a run record).

    Raises:
        EntrotrainError: no monitor and no guard, an unsupported monitor or guard, or two sharing a ``state_key``.
    """

    def __init__(
        self, monitors: Sequence[Any], guards: Sequence[Any], owner: str, where: str, policy: bool = False,
        empty_ok: bool = False,
    ) -> None:
        monitors, guards = list(monitors), list(guards)
        if not monitors and not guards and not empty_ok:
            raise EntrotrainError(f"{owner} needs at least one monitor or guard; got none.")
        for i, guard in enumerate(guards):
            if not isinstance(guard, EntropyCollapseGuard):
                raise EntrotrainError(
                    f"{owner}(guards[{i}]) must be an EntropyCollapseGuard, got {type(guard).__name__}."
                )
        self.drivers = [make_driver(m, i, owner, where, policy) for i, m in enumerate(monitors)]
        keys = [m.state_key for m in monitors] + [g.state_key for g in guards]
        if len(set(keys)) != len(keys):
            raise EntrotrainError(
                f"{owner}: two monitors/guards share a configuration ({keys}); their states would collide. Give them "
                "different include / prefix / monitor arguments, or drop the duplicate."
            )
        self.monitors: list[Any] = monitors
        self.guards: list[EntropyCollapseGuard] = guards
        self.owner = owner
        self._published: list[set[str]] = [set() for _ in self.drivers]
        self._misspelt: set[str] = set()  # guard keys already warned about as typos in this run
        self._armed: list[int] = []
        self._model: nn.Module | None = None
        self._unwatch_grad: Callable[[], None] = _nothing  # training_forwards_only's hooks while armed
        #: The run record written to (rank zero), or ``None``: see :meth:`open_record`.
        self.record: RunRecordLogger | None = None

    # ------------------------------------------------------------------ lifecycle
    def bind(self, model: nn.Module) -> None:
        """A fresh run watching ``model``: taps released, every monitor's and guard's per-run state reset."""
        self.release()
        self._model = model
        self._published = [set() for _ in self.drivers]
        self._misspelt = set()
        for driver in self.drivers:
            driver.bind(model)
        for guard in self.guards:
            guard._reset_fit_state()

    def arm(self, step: int, which: Sequence[int] | None = None, training_only: bool = False) -> None:
        """Arm the drivers ``which`` (default: all) for optimizer step ``step``; their taps capture until
        :meth:`collect` or :meth:`release`. ``training_only``: only forwards run with gradient enabled (the step's
        training forwards; not a trainer's generation or no-grad log-prob passes in the same step)."""
        self.release()
        self._armed = list(range(len(self.drivers))) if which is None else list(which)
        for i in self._armed:
            self.drivers[i].step = step
            self.drivers[i].arm()
        if training_only and self._model is not None:  # after the taps: its post-hooks run after theirs
            self._unwatch_grad = training_forwards_only(self._model)

    @property
    def armed(self) -> bool:
        return bool(self._armed)

    def release(self) -> None:
        """Disarm every tap (idempotent): no hook, no attention interception is left on the model."""
        for driver in self.drivers:
            driver.disarm()
        self._armed = []
        self._unwatch_grad()
        self._unwatch_grad = _nothing

    def collect(self, step: int, media: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
        """Disarm, reduce over ranks and compute the armed drivers' metrics at ``step``, and with ``media`` their wandb
        media on rank zero; a key an armed monitor published before and not now is NaN. ``({}, {})`` when none is
        armed. The run record (if open) gets each computed driver's arrays at ``step``; scalars are the caller's to
        write (:meth:`record_scalars`), with whatever else it logs."""
        armed = self._armed
        self.release()
        if not armed:
            return {}, {}
        world, rank, reduce = distributed()
        metrics: dict[str, float] = {}
        images: dict[str, Any] = {}
        for i in armed:
            driver = self.drivers[i]
            values = driver.compute(step, world, rank, reduce)
            if values is None:  # nothing handed over this step: no observation
                continue
            groups = {""} | {driver.group(key) for key in values}  # the main group publishes at every logging step
            for key in self._published[i] - values.keys():  # published before, not now (in a group that published
                if driver.group(key) in groups:  # now): gone, not current
                    values[key] = math.nan
            self._published[i].update(values)
            metrics.update(values)
            if media and rank == 0:
                images.update(driver.media())
            if self.record is not None and rank == 0:
                self.record.log_arrays(driver.record_arrays(), step)
        return metrics, images

    # ------------------------------------------------------------------ run record
    def open_record(
        self, spec: RecordSpec, hparams: dict[str, Any] | None = None, resume: dict[str, Any] | None = None,
        ckpt_path: Any = None, run_name: str | None = None,
    ) -> None:
        """Write to the record ``spec`` names from now on (rank zero; its methods are no-ops elsewhere): a folder
        (``RunRecordLogger(spec, run_name=run_name)``, a new record) or a configured logger; ``None``: no record.
        Continue the record a checkpoint's ``resume`` entry names (:meth:`RunRecordLogger.checkpoint_entry`;
        ``ckpt_path``, when known, is noted in ``meta["resumes"]``), merge ``hparams``, and declare every monitor's and
        guard's thresholds, as a Lightning fit does at its start.

        Raises:
            EntrotrainError: the logger already holds a finished run (and this is not its resume).
        """
        if spec is None:
            return
        record = spec if isinstance(spec, RunRecordLogger) else RunRecordLogger(spec, run_name=run_name)
        if record.closed and resume is None:
            raise EntrotrainError(
                f"{self.owner}: the RunRecordLogger given as record= already holds a run that ended "
                f"({record.log_dir}); a RunRecordLogger records one run. Pass a folder (record='runs': a new record "
                "per run) or a new RunRecordLogger."
            )
        self.record = record
        if distributed()[1] != 0:  # one writer; the record's own rank_zero_only guards a mis-set rank too
            return
        record.resume_from_entry(resume, ckpt_path)
        if hparams:
            record.log_hyperparams(hparams)
        for obj in [*self.monitors, *self.guards]:
            thresholds = getattr(obj, "record_thresholds", None)
            if thresholds is not None:
                record.log_thresholds(thresholds())

    def record_scalars(self, values: dict[str, Any], step: int) -> None:
        """Write the numbers among ``values`` (numbers and one-element tensors) to the run record at ``step``."""
        if self.record is None or distributed()[1] != 0:
            return
        numbers = {k: float(v) for k, v in values.items() if readable_scalar(v)}
        if numbers:
            self.record.log_metrics(numbers, step=step)

    def close_record(self, exc: BaseException | None = None) -> list[str]:
        """Mark the run record ``finished`` (no ``exc``) or ``failed`` / ``interrupted`` with the reason, and stop
        writing to it. Returns what the run's end prints on rank zero: the record's folder and, without ``exc``,
        :func:`~entrotrain.dashboards.remedies.what_to_try` (``[]`` without a record or off rank zero)."""
        record, self.record = self.record, None
        if record is None or distributed()[1] != 0:
            return []
        record.finalize("success" if exc is None else "failed", exc)
        if not record.started:
            return []
        lines = [f"entrotrain run record: {record.log_dir}   (entrotrain report {record.log_dir})"]
        return lines + (what_to_try(record.log_dir) if exc is None else [])

    def record_policy(self, **tensors: Any) -> bool:
        """Hand a micro-batch's per-token tensors to every :class:`PolicyEntropyMonitor` (kept only by those armed);
        whether there is any."""
        drivers = [d for d in self.drivers if isinstance(d, _PolicyDriver)]
        for driver in drivers:
            driver.add(**tensors)
        return bool(drivers)

    def summaries(self) -> list[str]:
        """Each monitor's first / last summary table, where it has one."""
        return [table for table in (driver.summary() for driver in self.drivers) if table]

    # ------------------------------------------------------------------ guards
    def checkpoint_saved(self, path: str | os.PathLike[str], step: int | None = None) -> None:
        """A checkpoint was just saved at ``path``: every guard with ``keep_last_good`` keeps it from rotation until
        its judgements let it go (call on the process that wrote it)."""
        for guard in self.guards:
            guard.checkpoint_saved(path, step)

    def track(self, model: nn.Module, optimizers: Sequence[Any], averaged: Sequence[nn.Module] = ()) -> None:
        """The model and optimizers (and averaged copies of the model) the ``action="rollback"`` guards hold the state
        of and restore."""
        for guard in self.guards:
            guard.track(model, optimizers, averaged)

    def start_keepers(self, folders: Iterable[Any], resumed_from: Any = None) -> None:
        """Training starts, saving checkpoints into ``folders`` (resumed from ``resumed_from``): the guards that keep
        checkpoints take over the pins a killed run left there (call on the process that writes checkpoints)."""
        folders = list(folders)
        for guard in self.guards:
            if guard.keep_last_good:
                guard.keeper.start(folders, resumed_from=resumed_from)

    def untrack(self) -> None:
        """Training ended (or failed): the guards drop the model and the state they held."""
        for guard in self.guards:
            guard.untrack()

    def release_checkpoints(self) -> None:
        """Training ended normally: the guards drop the kept checkpoints no firing froze."""
        for guard in self.guards:
            guard.keeper.release()

    def flush_notifications(self) -> None:
        """Training ended: wait for the guards' webhook posts under way (warned about if one failed)."""
        for guard in self.guards:
            guard.flush_notifications()

    def observe(
        self, values: dict[str, Any], step: int, local: dict[str, Any] | None = None
    ) -> list[tuple[EntropyCollapseGuard, str]]:
        """Each guard whose key is a number in ``values`` observes it at ``step`` (once per step); the guards that
        fire, with their reasons. A guard key that is a typo of a key in ``values`` is warned about once.
        ``local``: values this rank handed over itself (a loop's :meth:`EntropyMonitors.observe`), which can differ
        between ranks; ``values`` wins for a key in both. Under ``torch.distributed`` the guards judge the values
        the ranks agree on (:meth:`agree`, a collective: given ``local``, call it at the same steps on every rank),
        so that every rank fires, stops, lowers its rates or rolls back alike."""
        agreed = self.agree(local, values) if local is not None else {}
        values = {**(local or {}), **values}
        warn_misspelt_keys(self.guards, values.keys(), step, self._misspelt)
        fired = []
        for i, guard in enumerate(self.guards):
            value = agreed[i] if i in agreed else values.get(guard.monitor)
            if not readable_scalar(value):
                continue
            if guard.last_seen_step is not None and step <= guard.last_seen_step:
                continue  # one observation per step (an evaluation log at the same step does not count twice)
            guard.source = self._source_of(guard.monitor) or guard.source
            reason = guard.observe(float(value.detach() if isinstance(value, Tensor) else value), step, values)
            if reason is not None:
                fired.append((guard, reason))
        return fired

    def agree(self, local: dict[str, Any], reduced: dict[str, Any]) -> dict[int, float | None]:
        """The value each guard judges, the same on every rank, by guard index: for the guards whose key is neither
        in ``reduced`` (the monitors' statistics, reduced over ranks before they are published: the same on every
        rank) nor a key a monitor published earlier in the run; ``None``: no rank handed it over (nothing to judge).
        ``{}`` in one process.

        Under ``torch.distributed`` with 2+ ranks, one ``all_gather`` of each such guard's value in ``local`` (or its
        absence) at every call, whether this rank handed a value over or not (so a rank that did not is no hang):
        every rank calls it at the same steps, as it runs the same ``step()`` blocks. Agreed on: the first non-finite
        value in rank order (a rank whose loss went NaN makes every rank judge NaN, and act on it), else the worst
        value for the guard's ``mode`` (the lowest with ``"min"``, the highest with ``"max"``). Every rank so takes
        the decision that any rank alone would take on its own value: reducing the decision instead of the value
        would leave each rank's streak, history and last good step its own. A value already the same on every rank
        (one you all-reduced) is judged as it is, bit for bit; a mean would not be (``(x + x + x) / 3`` can round)."""
        world, _, _ = distributed()
        pending = [i for i, guard in enumerate(self.guards)
                   if guard.monitor not in reduced and not any(guard.monitor in keys for keys in self._published)]
        if world < 2 or not pending:
            return {}
        mine = []  # (handed over, value) per pending guard
        for i in pending:
            value = local.get(self.guards[i].monitor)
            here = readable_scalar(value)
            mine.append((1.0 if here else 0.0, float(value.detach() if isinstance(value, Tensor) else value)
                         if here else 0.0))
        # [rank][pending guard] = (handed over, value): one all_gather on the device the default group's backend serves
        gathered = gather_rows(torch.tensor(mine, dtype=torch.float64), device=collective_device()).tolist()
        return {i: agreed_value([row[j][1] for row in gathered if row[j][0] == 1.0], self.guards[i].mode)
                for j, i in enumerate(pending)}

    def _source_of(self, key: str) -> str | None:
        """The publisher of ``key`` as Lightning names it (``publish_scalars``'s ``source``: the monitor's
        ``state_key``, plus ``/group`` for a group of its own), or ``None`` for a key no monitor publishes."""
        for monitor, driver, published in zip(self.monitors, self.drivers, self._published):
            if key in published:
                group = driver.group(key)
                return f"{monitor.state_key}/{group}" if group else monitor.state_key
        return None

    def check_stale(self, step: int) -> list[tuple[EntropyCollapseGuard, str]]:
        """The guards whose key was not published for too long at ``step`` and fire for it (Lightning's rule)."""
        fired = []
        for guard in self.guards:
            if guard.last_seen_step is not None:
                reason = guard.check_stale(step)
                if reason is not None:
                    fired.append((guard, reason))
        return fired

    def act(
        self, guard: EntropyCollapseGuard, reason: str, step: int, optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (), checkpoints: Iterable[Any] = (), since: float | None = None,
    ) -> bool:
        """Run ``guard``'s action for ``reason`` (judged by its own ``observe`` / ``check_stale``): warn, alert the
        active wandb run, lower the learning rates of ``optimizers`` / ``schedulers``, name the newest of
        ``checkpoints`` saved at or before the last good observation (files modified before ``since`` are another
        run's), record the event, call the guard's ``notify``; whether training must stop."""
        message = guard.fire(reason, step, list(optimizers), list(schedulers), checkpoints, since)
        rank_zero_warn(message)
        if self.record is not None:
            self.record.log_event(guard.monitor, message, step, level=guard.last_level)
        if distributed()[1] == 0:
            guard.send_notification(message)
        if guard.action == "alert":
            run = wandb_run()
            if run is not None and callable(getattr(run, "alert", None)) and distributed()[1] == 0:
                try:
                    run.alert(title=f"entropy collapse: {guard.monitor}", text=message)
                except Exception as err:  # offline runs refuse alerts; the warning above already went out
                    rank_zero_warn(f"EntropyCollapseGuard: wandb alert failed ({err}); the warning was logged.")
        return guard.stopping

    # ------------------------------------------------------------------ state (resume)
    def _entries(self) -> list[tuple[str, Any]]:
        return [(m.state_key, m) for m in self.monitors] + [(g.state_key, g) for g in self.guards]

    def state_dict(self, step: int = 0) -> dict[str, Any]:
        """Every monitor's and guard's ``state_dict()`` by ``state_key`` (JSON-able), and with an open run record its
        :meth:`~RunRecordLogger.checkpoint_entry` at optimizer step ``step`` (under ``CHECKPOINT_KEY``)."""
        state = {key: obj.state_dict() for key, obj in self._entries()}
        state[PUBLISHED_KEY] = {m.state_key: sorted(keys) for m, keys in zip(self.monitors, self._published) if keys}
        entry = self.record.checkpoint_entry(step) if self.record is not None else None
        if entry is not None:
            state[CHECKPOINT_KEY] = entry
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (entries of monitors or guards not configured here are ignored).
        The keys each monitor published before are restored too: one it does not publish at its first logging step
        after the resume (a model gone NaN) is NaN then, as in the run that saved the state."""
        for key, obj in self._entries():
            if key in state_dict:
                obj.load_state_dict(state_dict[key])
        published = state_dict.get(PUBLISHED_KEY)
        if isinstance(published, dict):
            for i, monitor in enumerate(self.monitors):
                keys = published.get(monitor.state_key)
                if isinstance(keys, (list, tuple)):
                    self._published[i].update(str(key) for key in keys)
        publishers = [monitor.state_key for monitor in self.monitors]
        for guard in self.guards:
            guard.warn_if_publisher_gone(publishers, f"monitor of this {self.owner}",
                                         "a monitor publishes it (or you observe it)")
