r"""entrotrain's monitors and collapse guards in any training loop: plain PyTorch, nanoGPT, torchtitan, Accelerate.

::

    from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
    from entrotrain.integrations.loop import EntropyMonitors

    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=50)],
                               guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05, action="stop")],
                               log=wandb.log)                    # or any callable(metrics, step=...); optional
    with monitors.watch(model, optimizer):                      # hooks released on every exit, summary printed
        for step, (x, y) in enumerate(loader):                  # step: the optimizer step, across epochs
            with monitors.step(step):                           # taps armed only on the steps that log
                loss = model(x, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            if monitors.should_stop:                            # a guard with action="stop" fired
                break

:class:`EntropyMonitors` drives the *same* monitor objects as Lightning and ``transformers.Trainer``
(:class:`~entrotrain.callbacks.AttentionEntropyMonitor`, :class:`~entrotrain.callbacks.RepresentationEntropyMonitor`
with ``stage="train"``, :class:`~entrotrain.callbacks.SigmaReparamMonitor`,
:class:`~entrotrain.callbacks.RouterEntropyMonitor`, :class:`~entrotrain.callbacks.PredictionEntropyMonitor`) and
:class:`~entrotrain.callbacks.EntropyCollapseGuard`, through the session shared with
:mod:`entrotrain.integrations.transformers` (:mod:`entrotrain.integrations._monitor_session`): same keys, same values,
same guard rules. No statistic is computed here.

When it captures. ``step`` is the index of the optimizer step the block runs, counted from 0 across epochs
(Lightning's ``global_step`` before the step); it must increase from block to block. A monitor captures at the steps
``0, n, 2n, ...`` of its own ``every_n_steps`` (or of ``EntropyMonitors(every_n_steps=)`` for all of them); on other
steps ``step()`` arms nothing and costs a modulo.
Put every micro-batch of a gradient-accumulation window inside one ``step()`` block: the monitors' sums add up over
them. At the block's end the taps are disarmed and the window is reduced (one SUM all-reduce per monitor when
``torch.distributed`` is initialised: every rank must run the same steps) and turned into metrics. Put
``optimizer.step()`` inside the block, as above: the σReparam monitor and the prediction monitor's probe then read
the updated weights, as in Lightning.

Where the numbers go. After each block, :attr:`EntropyMonitors.logs` holds that step's finite scalars (``{}`` on
steps that do not log) plus ``{monitor}/alert = 1.0`` for a guard that fired; a statistic that could not be computed
is left out, never replaced by its last value. With wandb imported and a run active, :attr:`EntropyMonitors.media`
holds the monitors' images and histograms (rank zero). ``log=`` is called on rank zero as
``log({**logs, **media}, step=step)`` whenever there is something to log: ``wandb.log`` fits, and so does a
:class:`~entrotrain.dashboards.RunRecordLogger`'s ``log_metrics`` for ``entrotrain report``. When ``log`` is wandb's own
(``wandb.log``, also taken before ``wandb.init``, ``run.log``, or
:func:`~entrotrain.dashboards.wandb_media.wandb_log`), each row also carries ``trainer/global_step``, the x-axis
entrotrain's keys are declared against, and a step below the wandb run's current one (a resume from an older checkpoint
into the same run), which wandb would drop, or equal to it with this payload's keys already in its row, which wandb
would overwrite, is logged just after it, warned once (:func:`entrotrain.dashboards.wandb_media.log_to`). A ``log=``
wrapper of your own (several sinks) is called as ``log(metrics, step=step)``: have it log to wandb through
``wandb_log()`` (a ``log(metrics, step=step)`` that does the same; also for your loop's own numbers), not
``wandb.log(metrics, step=step)``.

Run record. ``record="runs"`` (or a :class:`~entrotrain.dashboards.RunRecordLogger` you configured) writes the
local run record ``entrotrain report`` reads, as a Lightning run does: at each step with something to log its
scalars, guard alerts and the monitors' arrays (attention heatmap, spectra, router load, probe profile, policy
histogram), the thresholds at :meth:`EntropyMonitors.watch`, each guard firing as an event, and at the end the status
(``finished``, or ``failed`` / ``interrupted`` with the exception). Log your own scalars beside them with
``monitors.record.log_metrics({"train/loss": loss.item()}, step=step)``; :meth:`state_dict` carries the record's
folder, so a resumed run continues it. Rank zero writes; the calls are no-ops on other ranks.

Guards. Each guard observes its key when a monitor publishes it, or when you hand it over with
:meth:`EntropyMonitors.observe` inside the block (``monitors.observe(loss=loss)``: a tensor is read only when a guard
watches that key; under DDP / FSDP each rank hands over its own, and every rank judges the worst of them, a NaN on
any rank first, so the ranks act alike). Staleness, patience, episodes and ``on_nonfinite`` follow the Lightning
guard. Actions:
``"warn"``; ``"alert"`` (also ``wandb.run.alert`` when a run is active); ``"stop"`` (:attr:`should_stop` becomes
True: leave your loop); ``"reduce_lr"`` (the optimizers and schedulers given to :meth:`watch`); ``"rollback"`` (the
model's and those optimizers' state go back to the last good observation, held in host memory, and their learning
rates are lowered; an EMA copy of the weights given as ``watch(..., averaged=ema)`` goes back with them;
:attr:`rolled_back` is then True for that step: nothing to do in your loop unless you keep other state of your own).

Resume. :meth:`EntropyMonitors.state_dict` (JSON-able) goes into your checkpoint; :meth:`load_state_dict` before or
after :meth:`watch` restores guard streaks, first summaries and histories. Without it every :meth:`watch` starts
fresh.

RL. :class:`~entrotrain.callbacks.PolicyEntropyMonitor` (``every_n_batches`` counts steps here) takes the per-token
tensors of your update through :meth:`EntropyMonitors.record_policy` inside the block (``entropy``, ``logprobs``,
``advantages``, ``mask``, optional ``rewards``): the statistics of the Lightning monitor over the union of the
step's micro-batches and ranks (``entropy/policy/mean``, ``cov_mean``, the ``R = -a·e^H + b`` fit, ...). A step where
nothing was handed over publishes nothing for it (no NaN).

Not supported: ``RepresentationEntropyMonitor(stage="validation")`` and its ``dsmi`` measure. The router and
prediction monitors read ``attention_mask`` / ``labels`` from the model's keyword arguments; a model called
positionally (``model(x, y)``) gives them no mask: every position counts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_int
from entrotrain.callbacks.collapse_guard import of_this_run, run_start, saved_at
from entrotrain.dashboards.run_record import CHECKPOINT_KEY, RunRecordLogger
from entrotrain.errors import EntrotrainError
from entrotrain.integrations._monitor_session import (
    MonitorSession, RecordSpec, check_record, distributed, readable_scalar, wandb_run,
)

__all__ = ["EntropyMonitors"]


class EntropyMonitors:
    """entrotrain's monitors and collapse guards in a training loop you write yourself (see the module docstring).

    Args:
        monitors: configured :class:`~entrotrain.callbacks.AttentionEntropyMonitor`,
            :class:`~entrotrain.callbacks.RepresentationEntropyMonitor` (``stage="train"``, no ``dsmi``),
            :class:`~entrotrain.callbacks.SigmaReparamMonitor`, :class:`~entrotrain.callbacks.RouterEntropyMonitor`,
            :class:`~entrotrain.callbacks.PredictionEntropyMonitor` (``probe=`` tensors) and
            :class:`~entrotrain.callbacks.PolicyEntropyMonitor` (tensors through :meth:`record_policy`) objects; their
            arguments mean what they mean in Lightning.
        guards: configured :class:`~entrotrain.callbacks.EntropyCollapseGuard` objects; each watches one key.
        every_n_steps: capture every monitor at steps ``0, n, 2n, ...``; ``None`` (default) keeps each monitor's own
            ``every_n_steps``.
        log: called on rank zero as ``log(metrics, step=step)`` after every step with something to log (scalars,
            alerts and, with an active wandb run, media); e.g. ``wandb.log`` (then with ``trainer/global_step``, see
            the module docstring). ``None``: read :attr:`logs` yourself.
        print_summary: print each monitor's first / last summary table at :meth:`close` (rank zero).
        record: write a run record for ``entrotrain report``: a folder (``RunRecordLogger(record)``: the run goes to
            ``record/records/run-<time>``) or a configured :class:`~entrotrain.dashboards.RunRecordLogger` (one per
            run); ``None`` (default): none.
        checkpoint_dir: where your loop saves checkpoints: a guard's message names the newest one saved at or before
            its last good observation (the step in the name: ``step_N``, ``ckpt_N``, ``step=N``, ``checkpoint-N``).
            Guards with ``keep_last_good`` keep that one from your rotation: the new checkpoints in the folder are
            pinned at each logging step; call :meth:`checkpoint_saved` right after a save to pin it at once (when
            you save and rotate more often than the monitors log).
        training_forwards_only: capture only inside forwards of the model called with gradient enabled, the step's
            training forwards: a no-grad forward in the block (an RL loop's sampling or rollout log-probs, an
            evaluation) is not captured. ``False``: every forward in the block (what :func:`entropy_snapshot` uses).

    Raises:
        EntrotrainError: no monitor and no guard, an unsupported monitor or guard, two sharing a configuration, or a
            bad ``every_n_steps`` / ``log`` / ``record``.

    Example::

        monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=50)], log=wandb.log)
        with monitors.watch(model, optimizer):
            for step, batch in enumerate(loader):       # step: the optimizer step, counted across epochs
                with monitors.step(step):
                    loss = model(**batch).loss
                    loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        monitors: Sequence[Any] = (),
        guards: Sequence[Any] = (),
        *,
        every_n_steps: int | None = None,
        log: Callable[..., Any] | None = None,
        print_summary: bool = True,
        record: RecordSpec = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        training_forwards_only: bool = True,
    ) -> None:
        self.session = MonitorSession(monitors, guards, "EntropyMonitors", "in a plain training loop", policy=True)
        check_int(every_n_steps, "EntropyMonitors(every_n_steps)", low=1, none_ok=True)
        if log is not None and not callable(log):
            raise EntrotrainError(
                f"EntropyMonitors(log) must be a callable such as wandb.log, or None; got {type(log).__name__}."
            )
        self.every_n_steps = every_n_steps
        self.log = log
        self.print_summary = check_bool(print_summary, "EntropyMonitors(print_summary)")
        self._record_spec = check_record(record, "EntropyMonitors")
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise EntrotrainError(
                f"EntropyMonitors(checkpoint_dir) must be a folder path or None; got {type(checkpoint_dir).__name__}."
            )
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.training_forwards_only = check_bool(training_forwards_only, "EntropyMonitors(training_forwards_only)")
        #: The finite scalars of the last step (``{}`` when it did not log), plus ``{monitor}/alert`` for a firing.
        self.logs: dict[str, float] = {}
        #: The last step's statistics as computed: :attr:`logs` without the alerts, NaN kept for one that could not
        #: be computed (``{}`` when the step did not log).
        self.computed: dict[str, float] = {}
        #: The last step's wandb media (rank zero, with an active wandb run), keyed as the Lightning monitors log them.
        self.media: dict[str, Any] = {}
        #: Whether a guard with ``action="rollback"`` rolled the model and optimizers back at the last step.
        self.rolled_back = False
        #: True once a guard with ``action="stop"`` has fired: leave the training loop.
        self.should_stop = False
        self._model: nn.Module | None = None
        self._optimizers: list[Any] = []
        self._schedulers: list[Any] = []
        self._observed: dict[str, Any] = {}
        self._saved: dict[str, Any] | None = None
        self._saved_record: dict[str, Any] | None = None  # the record a loaded checkpoint names, until watch
        self._run_start: float | None = None  # checkpoints modified before it belong to an earlier run
        self._pinned: set[Path] = set()  # the checkpoints handed to the guards' keepers (or an earlier run's)
        self._resumed_from: Path | None = None  # the checkpoint watch() was told this run resumed from
        self._step: int | None = None
        self._done: int | None = None  # the last step whose block completed (steps must increase)

    @property
    def monitors(self) -> list[Any]:
        return self.session.monitors

    @property
    def guards(self) -> list[Any]:
        return self.session.guards

    @property
    def record(self) -> RunRecordLogger | None:
        """The run record of the current run (a :class:`~entrotrain.dashboards.RunRecordLogger`, writing on rank
        zero) while watching with ``record=``, else ``None``. Log your own scalars to it with ``log_metrics``."""
        return self.session.record

    # ------------------------------------------------------------------ lifecycle
    def watch(
        self,
        model: nn.Module,
        optimizer: Any | Sequence[Any] | None = None,
        scheduler: Any | Sequence[Any] | None = None,
        resumed_from: str | os.PathLike[str] | None = None,
        averaged: nn.Module | Sequence[nn.Module] | None = None,
    ) -> EntropyMonitors:
        """Start a run on ``model``: fresh monitor and guard state (or what :meth:`load_state_dict` was given before).
        A ``DistributedDataParallel`` / ``DataParallel`` wrapper (``accelerator.prepare``) is watched through its
        ``.module``, so module names, globs and keys are those of the bare model; ``torch.compile``'s ``_orig_mod``
        never appears in names either. ``optimizer`` / ``scheduler`` (one or a list) are what a ``reduce_lr`` guard
        lowers. ``resumed_from``: the checkpoint this run resumed from, if any: a firing before the run's first save
        names it as the one to roll back to, and the guards' keepers (``checkpoint_dir``) keep it and adopt the pins
        a killed run left up to its step. ``averaged``: the module(s) holding averaged weights of the model (an EMA,
        ``torch.optim.swa_utils.AveragedModel``) that a rollback guard rolls back with it. Returns ``self``, a context
        manager whose exit calls :meth:`close`."""
        if resumed_from is not None and not isinstance(resumed_from, (str, os.PathLike)):
            raise EntrotrainError(
                "EntropyMonitors.watch(resumed_from) must be a checkpoint path or None; got "
                f"{type(resumed_from).__name__}."
            )
        if resumed_from is not None and not Path(resumed_from).exists():
            raise EntrotrainError(
                f"EntropyMonitors.watch(resumed_from={str(resumed_from)!r}): no such file or folder. Pass the path of "
                "the checkpoint your loop loaded (or None for a fresh run)."
            )
        if not isinstance(model, nn.Module):
            raise EntrotrainError(f"EntropyMonitors.watch(model) needs an nn.Module, got {type(model).__name__}.")
        if self._model is not None:  # watched again without close(): end the previous run (record included) first
            self._close(False, None)
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # names and keys as in one process (no "module." prefix); its hooks still run
        world, rank, _ = distributed()
        if world > 1:  # as Lightning's strategies do: rank-zero warnings print once, also without RANK (mp.spawn)
            rank_zero_only.rank = rank
        optimizers = _as_list(optimizer)
        if any(guard.action == "rollback" for guard in self.session.guards) and not optimizers:
            raise EntrotrainError(
                "EntropyMonitors: a guard with action='rollback' restores the optimizer state too; pass it: "
                "monitors.watch(model, optimizer=optimizer, scheduler=scheduler)."
            )
        self.session.bind(model)  # (resets the guards)
        self.session.track(model, optimizers, _as_list(averaged))  # refuses FSDP1 / DeepSpeed before the run starts
        self._model = model
        self._optimizers = optimizers
        self._schedulers = _as_list(scheduler)
        self.rolled_back = False
        self.logs, self.media, self.should_stop, self._observed, self._step, self._done = {}, {}, False, {}, None, None
        self._pinned = set()
        self._resumed_from = None if resumed_from is None else Path(resumed_from)
        if rank == 0 and self.checkpoint_dir is not None:  # the pins a killed run left there: taken over
            self.session.start_keepers([self.checkpoint_dir], resumed_from=self._resumed_from)
        # older files are another run's checkpoints, unless this run resumed
        self._run_start = run_start(resumed=self._saved is not None or resumed_from is not None)
        if self._saved is not None:
            self.session.load_state_dict(self._saved)
            self._saved = None
        run = wandb_run()
        if run is not None and rank == 0:  # the run table shows how low each entropy went, as under Lightning
            from entrotrain.dashboards.wandb_media import STEP_METRIC, define_entropy_summaries, is_wandb_log

            # plotted against the loop's step when log= is wandb's own (it then carries trainer/global_step)
            define_entropy_summaries(run, step_metric=STEP_METRIC if is_wandb_log(self.log, run) else None)
        self.session.open_record(self._record_spec, resume=self._saved_record)
        self._saved_record = None
        return self

    def close(self, summary: bool = True) -> None:
        """Release every tap and hook (idempotent), mark the run record ``finished`` and, with ``summary``, print the
        monitors' summaries once (rank zero, ``print_summary``). Leaving ``watch``'s ``with`` block calls it; on an
        exception without summary, and the record says ``failed`` / ``interrupted``."""
        self._close(summary, None)

    def _close(self, summary: bool, exc: BaseException | None) -> None:
        self.session.release()
        self.session.untrack()
        if self._model is None:
            return
        self._model = None
        if distributed()[1] == 0:
            self.session.flush_notifications()
            if exc is None:
                self.session.release_checkpoints()
        closing = self.session.close_record(exc)
        if distributed()[1] != 0:
            return
        if summary and self.print_summary:
            for table in self.session.summaries():
                print(table)
        for line in closing:
            print(line)

    def __enter__(self) -> EntropyMonitors:
        if self._model is None:
            raise EntrotrainError(
                "EntropyMonitors: use `with monitors.watch(model, optimizer):`, not `with monitors:`."
            )
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        self._close(exc_type is None, exc)

    # ------------------------------------------------------------------ steps
    @contextmanager
    def step(self, step: int) -> Iterator[EntropyMonitors]:
        """The block of optimizer step ``step`` (from 0): forward(s), backward(s), ``optimizer.step()``. Arms the taps
        of the monitors that log at ``step``; at the end computes :attr:`logs` / :attr:`media`, lets the guards judge,
        and calls ``log``. An exception inside the block releases the taps and computes nothing."""
        check_int(step, "EntropyMonitors.step(step)", low=0)
        if self._model is None:
            raise EntrotrainError(
                "EntropyMonitors.step() before watch(model): call monitors.watch(model, optimizer) first."
            )
        if self._done is not None and step <= self._done:
            raise EntrotrainError(
                f"EntropyMonitors.step(step) must increase from block to block (the optimizer step, counted across "
                f"epochs); got {step} after {self._done}. Pass a global step counter, not the batch index of an epoch, "
                "and put every micro-batch of one optimizer step inside one block."
            )
        restored = max((g.last_seen_step for g in self.session.guards if g.last_seen_step is not None), default=None)
        if self._done is None and restored is not None and step < restored:  # a guard would skip every step up to it
            raise EntrotrainError(
                f"EntropyMonitors.step({step}): the state loaded with load_state_dict was saved at step {restored} or "
                f"later, and steps must go on from there (the guards judge each step once, so they would ignore every "
                f"step up to {restored}: a model gone NaN meanwhile would not be seen). Resume your loop's step counter "
                "from the checkpoint's step, or do not load the monitors' state of a later checkpoint."
            )
        self.logs, self.computed, self.media, self._observed, self._step = {}, {}, {}, {}, step
        due = [i for i, d in enumerate(self.session.drivers) if step % (self.every_n_steps or d.period) == 0]
        if due:
            self.session.arm(step, due, training_only=self.training_forwards_only)
        try:
            yield self
        except BaseException:
            self.session.release()
            self._step = None
            raise
        self._step = None
        self._done = step
        self._finish(step)

    def observe(self, **values: float | Tensor) -> None:
        """Hand this step's scalars (``loss=loss``, ``grad_norm=...``) to the guards watching those keys; judged at
        the end of the ``step()`` block. Not logged (log them yourself).

        Under ``torch.distributed`` each rank hands over its own value (its loss), and the guards judge one value
        agreed on by all ranks at the block's end (one ``all_gather`` per step while a guard watches a key no monitor
        publishes; :meth:`MonitorSession.agree`): the first NaN / Inf of any rank, else the worst rank's value for the
        guard's mode, so every rank fires, stops or rolls back alike, and a value you all-reduced yourself is judged
        as it is. A rank may leave a key out (only the ranks that handed it over count)."""
        if self._step is None:
            raise EntrotrainError(
                "EntropyMonitors.observe() must be called inside a `with monitors.step(step):` block."
            )
        watched = {guard.monitor for guard in self.guards}  # other keys are never read
        for key, value in ((k, v) for k, v in values.items() if k in watched):
            if not readable_scalar(value):
                got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise EntrotrainError(
                    f"EntropyMonitors.observe({key}=...) needs a number or a one-element tensor, got {got}; reduce it "
                    f"first (e.g. {key}=loss.mean())."
                )
        self._observed.update(values)

    def record_policy(
        self,
        entropy: Tensor,
        logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        rewards: Tensor | None = None,
        temperature: float | None = None,
    ) -> None:
        """Hand one micro-batch of your RL update to the :class:`~entrotrain.callbacks.PolicyEntropyMonitor` s
        (inside the ``step()`` block; a no-op on steps where they do not log): ``(B, T)`` token entropy, log-probs of
        the sampled tokens (the rollout's, for the covariance) and response mask; advantages ``(B,)`` or ``(B, T)``;
        rewards ``(B,)`` for the entropy–reward fit. Detached; under DDP every rank hands its tensors over at the
        same steps, all with rewards or none, at one temperature (they are gathered; a rank that does not is an error
        on every rank at the logging step, not a hang); a rank with no sample in a step hands over empty ``(0, T)``
        tensors. Tensors refused on one rank alone (a wrong shape, a mask holding a 2) are refused at the block's end,
        with the same error on every rank naming that rank (raised here, on one rank, it would leave the others
        waiting in their next collective); with one process, here."""
        if self._step is None:
            raise EntrotrainError(
                "EntropyMonitors.record_policy() must be called inside a `with monitors.step(step):` block."
            )
        tensors = dict(entropy=entropy, logprobs=logprobs, advantages=advantages, mask=mask, rewards=rewards)
        if not self.session.record_policy(**tensors, temperature=temperature):
            raise EntrotrainError(
                "EntropyMonitors.record_policy(): no PolicyEntropyMonitor among the monitors; add "
                "PolicyEntropyMonitor(...) to EntropyMonitors([...])."
            )

    def checkpoint_saved(self, path: str | os.PathLike[str], step: int | None = None) -> None:
        """Your loop just saved a checkpoint at ``path`` (a file or folder; ``step``: default the step in its name):
        the guards with ``keep_last_good`` keep it from your rotation until their judgements let it go. Call it on
        the rank that saved (others are ignored)."""
        if distributed()[1] == 0:
            self._pinned.add(Path(path))
            self.session.checkpoint_saved(path, step)

    def _pin_new_checkpoints(self) -> None:
        """Pin the checkpoints ``checkpoint_dir`` gained since the last look (rank zero, logging steps only)."""
        folder = self.checkpoint_dir
        if folder is None or distributed()[1] != 0 or not any(g.keep_last_good for g in self.session.guards):
            return
        try:
            entries = list(folder.iterdir())
        except OSError:
            return
        for path in entries:
            if path in self._pinned or saved_at(path) is None:
                continue
            if of_this_run(path, self._run_start):
                self.checkpoint_saved(path)
            else:  # an earlier run's checkpoint: not this run's to keep
                self._pinned.add(path)

    def _finish(self, step: int) -> None:
        self._pin_new_checkpoints()
        send = wandb_run() is not None
        metrics, self.media = self.session.collect(step, media=send)
        self.computed = {k: float(v) for k, v in metrics.items()}
        self.logs = {k: v for k, v in self.computed.items() if math.isfinite(v)}
        fired = self.session.observe(metrics, step, local=self._observed) + self.session.check_stale(step)
        self._observed = {}
        self.rolled_back = False
        folder = self.checkpoint_dir
        saved = list(folder.iterdir()) if fired and folder is not None and folder.is_dir() else []
        if self._resumed_from is not None:  # before this run's first save, the checkpoint it resumed from
            saved.append(self._resumed_from)
        for guard, reason in fired:
            self.should_stop |= self.session.act(
                guard, reason, step, self._optimizers, self._schedulers, saved, since=self._run_start
            )
            self.logs[f"{guard.monitor}/alert"] = 1.0
            self.rolled_back |= guard.last_level == "rollback"  # (not a stop, nor a silent key only warned about)
        self.session.record_scalars(self.logs, step)
        if self.log is not None and (self.logs or self.media) and distributed()[1] == 0:
            from entrotrain.dashboards.wandb_media import log_to

            log_to(self.log, {**self.logs, **self.media}, step, wandb_run())

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """Every monitor's and guard's ``state_dict()`` by ``state_key`` (JSON-able), and the run record's folder and
        last completed step: put it in your checkpoint."""
        return self.session.state_dict(self._done if self._done is not None else 0)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output: now when watching, else at the next :meth:`watch`."""
        if not isinstance(state_dict, Mapping):
            raise EntrotrainError(
                "EntropyMonitors.load_state_dict needs the dict state_dict() returned, got "
                f"{type(state_dict).__name__}."
            )
        state = dict(state_dict)
        entry = state.pop(CHECKPOINT_KEY, None)
        if self._model is None:
            self._saved, self._saved_record = state, entry
        else:
            self.session.load_state_dict(state)
            self._run_start = run_start(resumed=True)  # a resumed run: its earlier checkpoints are its own
            if self.record is not None:
                self.record.resume_from_entry(entry)


def _as_list(value: Any | Sequence[Any] | None) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
