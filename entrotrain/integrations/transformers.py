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
(``bind`` / ``compute_metrics`` / ``media`` / ``observe``) and their keys, through the session it shares with
:class:`~entrotrain.integrations.loop.EntropyMonitors` (:mod:`entrotrain.integrations._monitor_session`). No statistic
is computed here (DESIGN.md §8): a key has the same value from Lightning, from ``Trainer`` and from a plain loop on the
same model and batches.

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
``{monitor}/alert = 1`` to the logs. On several ranks every rank must judge the same value: Trainer's own (``loss``
gathered, a global ``grad_norm``, evaluation metrics) and the monitors' keys are; a ``stop`` / ``rollback`` /
``reduce_lr`` guard on a key of a log of your own (``self.log`` in a ``Trainer`` subclass) is warned about once: log
it reduced over ranks (``self.accelerator.reduce``).

Resume. The monitors' and guards' ``state_dict()`` go into ``TrainerState.stateful_callbacks["entrotrain"]`` before
each checkpoint (``trainer_state.json``); ``trainer.train(resume_from_checkpoint=...)`` restores them in
``on_train_begin`` (guard streaks, first summaries and histories continue). Without a checkpoint every ``train()``
starts fresh. The callback is not an ``ExportableState`` (Trainer would rebuild it from JSON arguments, and monitor
objects are not JSON); with ``restore_callback_states_from_checkpoint=True`` Trainer only warns that it ignores the
``entrotrain`` entry, which this callback restores itself.

Run record. ``record="runs"`` (or a configured :class:`~entrotrain.dashboards.RunRecordLogger`) writes the local run
record ``entrotrain report`` reads, as a Lightning run does: every number of every training and evaluation log at
``state.global_step`` (``loss``, ``grad_norm``, ``learning_rate``, ``eval_loss``, entrotrain's keys, and a TRL
trainer's ``entropy/policy/*`` and rewards when the callback is attached to it), the monitors' arrays (attention
heatmap, spectra, router load, probe profile), thresholds, guard firings as events, ``TrainingArguments`` and the model
class as hyperparameters, and the status at the end (``finished``; with :meth:`~EntropyTrainerCallback.attach`,
``failed`` / ``interrupted`` with the exception). The record's folder goes into the checkpoint state, so
``resume_from_checkpoint`` continues it. ``EntropyTrainerCallback(record="runs")`` with no monitor is allowed: a
record of what ``Trainer`` logs. Written by the main process.

Roll back and cure. ``resume_changes=True`` (with :meth:`~EntropyTrainerCallback.attach`) makes a
``resume_from_checkpoint`` whose run changed (``TrainingArguments``' learning rate, warmup, schedule, weight decay,
betas, epsilon, optimizer, seed; σReparam applied, new parameters) fork as ``entrotrain fit --ckpt_path`` does: the
configured values win (the optimizer's moments kept when they fit), the schedule is the configured one at the saved
step, the changes are printed and the record is a new run naming its parent (:mod:`entrotrain.integrations.hf_resume`).
Off (the default), the resume is ``Trainer``'s own: the checkpoint's optimizer and scheduler as saved (a warning says
when the saved learning rate overrides a changed one). The defining ``TrainingArguments`` go into the checkpoint state
either way, for a later resume to compare with.

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
  take unshifted labels: pass ``shift_labels=True``; a ``*ForCausalLM`` / ``*LMHeadModel`` called with ``labels``
  equal to its ``input_ids`` under ``shift_labels=False`` is warned about once), the keep mask
  ``attention_mask & labels != ignore_index``. The
  probe set is the ``probe=`` tensors (there is no datamodule: ``probe=None`` means no probe set), scored, and
  ``generation_prompts`` generated, after the optimizer step in eval mode without gradient, RNG untouched.
  A model called positionally (no keywords) gives no mask and no labels: every position counts, no NLL; with
  ``label_smoothing_factor`` ``Trainer`` takes ``labels`` out of the inputs before the forward, so there is no
  ``nll`` key either. TRL's trainers (1.16: ``SFTTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer``) compute
  their loss through a fused LM head (``model(..., fused_lm_head=True)``), which returns no logits and never calls
  the head: such a forward is refused with a :class:`~entrotrain.errors.TapError` (TRL logs its own ``entropy``).

Not supported here: ``RepresentationEntropyMonitor(stage="validation")`` and its ``dsmi`` measure (``Trainer``
hands callbacks no batch; use ``stage="train"`` and the other measures).

Requires ``transformers>=4.48`` and ``accelerate>=1.4`` (the ``entrotrain[hf]`` extra); importing this module
without them raises :class:`~entrotrain.errors.EntrotrainError`. ``import entrotrain`` never imports transformers.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_utilities.core.imports import RequirementCache
from torch import nn

from entrotrain.errors import EntrotrainError

_TRANSFORMERS = RequirementCache("transformers>=4.48")
_ACCELERATE = RequirementCache("accelerate>=1.4")
for _req, _what in ((_TRANSFORMERS, "transformers>=4.48"), (_ACCELERATE, "accelerate>=1.4")):
    if not _req:
        raise EntrotrainError(
            f"entrotrain.integrations.transformers needs {_what}: {_req.message}. Install the extra with "
            "`pip install 'entrotrain[hf]'` (or `pip install -U transformers accelerate`)."
        )

from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402
from lightning_utilities.core.rank_zero import rank_zero_only  # noqa: E402
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_callback import DefaultFlowCallback  # noqa: E402

from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard, run_start  # noqa: E402
from entrotrain.dashboards.run_record import CHECKPOINT_KEY, RunRecordLogger  # noqa: E402
from entrotrain.taps.module_names import is_compiled, unwrap_module  # noqa: E402
from entrotrain.integrations._monitor_session import (  # noqa: E402
    MonitorSession, RecordSpec, check_record, distributed, wandb_run,
)

__all__ = ["STATE_KEY", "EntropyTrainerCallback"]

#: Key of entrotrain's entry in ``TrainerState.stateful_callbacks`` (saved in ``trainer_state.json``).
STATE_KEY = "entrotrain"

# ------------------------------------------------------------------------------------------------ the callback
def _warn_kept_learning_rate(args: TrainingArguments, state: TrainerState, scheduler: Any) -> None:
    """On ``resume_from_checkpoint``, Trainer restores the checkpoint's scheduler, whose base rates override
    ``TrainingArguments.learning_rate``: a rate changed for the resume (after a collapse, say) is silently not used.
    Say so (the callback only watches: it does not change training)."""
    base = getattr(scheduler, "base_lrs", None)
    if not base or not isinstance(base[0], (int, float)) or math.isclose(base[0], args.learning_rate, rel_tol=1e-6):
        return
    warnings.warn(
        f"EntropyTrainerCallback: resumed at step {state.global_step} with TrainingArguments(learning_rate="
        f"{args.learning_rate:g}), but Trainer restored the checkpoint's scheduler, whose peak learning rate is "
        f"{base[0]:g}: training goes on at the checkpoint's rate. To go on at {args.learning_rate:g}, start a new "
        "run with EntropyTrainerCallback(..., resume_changes=True).attach(trainer): the resume then uses the "
        "configured arguments (Adam's moments kept, the schedule at the saved step) and is recorded as a fork.",
        stacklevel=2,
    )


class EntropyTrainerCallback(TrainerCallback):
    """Runs entrotrain monitors and collapse guards inside ``transformers.Trainer`` (see the module docstring).

    Args:
        monitors: configured :class:`AttentionEntropyMonitor`, :class:`RepresentationEntropyMonitor` (``stage="train"``,
            no ``dsmi``), :class:`SigmaReparamMonitor`, :class:`RouterEntropyMonitor` and
            :class:`PredictionEntropyMonitor` (``probe=`` tensors, not a datamodule) objects; their arguments mean what they mean in Lightning,
            except ``every_n_steps`` (``TrainingArguments.logging_steps`` decides).
        guards: configured :class:`EntropyCollapseGuard` objects; each watches one key of the logs.
        log_media: send the monitors' wandb media to the active wandb run (main process only).
        record: write a run record for ``entrotrain report``: a folder (the run goes to
            ``record/records/run-<time>``, named after ``TrainingArguments.run_name``) or a configured
            :class:`~entrotrain.dashboards.RunRecordLogger`; ``None`` (default): none.
        resume_changes: a ``resume_from_checkpoint`` whose configuration differs from the checkpoint's run forks:
            the configured values win and the record is a new run naming its parent
            (:mod:`entrotrain.integrations.hf_resume`; needs :meth:`attach`). ``False`` (default): ``Trainer``'s own
            resume.

    Raises:
        EntrotrainError: no monitor, guard or record; an unsupported monitor or guard, a monitor given twice, a bad
            ``record``, or ``logging_strategy="epoch"``; ``resume_changes=True`` on a transformers whose ``Trainer``
            lacks the methods it wraps, or (at a resume) without :meth:`attach`.

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
        record: RecordSpec = None,
        resume_changes: bool = False,
    ) -> None:
        from entrotrain._validation import check_bool

        record = check_record(record, "EntropyTrainerCallback")
        self.resume_changes = bool(check_bool(resume_changes, "EntropyTrainerCallback: resume_changes"))
        if self.resume_changes:
            from entrotrain.integrations.hf_resume import check_trainer_supports_forks

            check_trainer_supports_forks("EntropyTrainerCallback")
        if not monitors and not guards and record is None:
            raise EntrotrainError("EntropyTrainerCallback needs at least one monitor, guard or record=; got none.")
        self.session = MonitorSession(
            monitors, guards, "EntropyTrainerCallback", "under transformers.Trainer", empty_ok=True
        )
        self._record_spec = record
        self._resume_path: str | None = None  # the checkpoint train() resumes from (known through attach)
        self._trainer: Callable[[], Any] | None = None  # weakref to the Trainer (through attach)
        self._fork: Any = None  # the HFForkedResume of this train() (resume_changes=True, a resume)
        self.monitors = self.session.monitors
        self.guards = self.session.guards
        self.log_media = bool(log_media)
        self.last_metrics: dict[str, float] = {}
        self._pending: dict[str, float] | None = None
        self._alerts: dict[str, float] = {}
        self._attached = False
        self._summaries_defined = False
        self._run_start: float | None = None  # checkpoints modified before it belong to an earlier run

    @property
    def drivers(self) -> list[Any]:
        """One driver per monitor (:mod:`entrotrain.integrations._monitor_session`)."""
        return self.session.drivers

    # ------------------------------------------------------------------ attaching
    def attach(self, trainer: Any) -> EntropyTrainerCallback:
        """Add this callback to ``trainer`` right after ``DefaultFlowCallback`` (before the ``report_to``
        integrations, so that they log entrotrain's keys) and make ``trainer.train`` release the taps on any
        exception. Returns ``self``."""
        self._trainer = weakref.ref(trainer)
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        flow = [i for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)]
        handler.callbacks.insert(flow[0] + 1 if flow else 0, self)
        train = trainer.train
        if not getattr(train, "_entrotrain_release", False):

            @functools.wraps(train)
            def guarded_train(*args: Any, **kwargs: Any) -> Any:
                resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
                self._resume_path = _checkpoint_path(trainer, resume)
                self._fork = None
                if self.resume_changes and self._resume_path is not None:
                    from entrotrain.integrations.hf_resume import HFForkedResume

                    self._fork = HFForkedResume(trainer, self._resume_path).install()
                try:
                    return train(*args, **kwargs)
                except BaseException as exc:
                    self.session.close_record(exc)  # failed / interrupted, with the reason
                    raise
                finally:
                    if self._fork is not None:
                        self._fork.remove()
                    self.release()
                    self.session.untrack()

            guarded_train._entrotrain_release = True  # type: ignore[attr-defined]
            trainer.train = guarded_train
        self._attached = True
        return self

    def release(self) -> None:
        """Disarm every tap (idempotent): no hook, no attention interception is left on the model."""
        self.session.release()

    # ------------------------------------------------------------------ state (resume)
    @property
    def record(self) -> RunRecordLogger | None:
        """The run record being written (``record=``, during ``train``), else ``None``."""
        return self.session.record

    def state_dict(self, step: int = 0) -> dict[str, Any]:
        """Every monitor's and guard's ``state_dict()`` by ``state_key`` (JSON-able), and the run record's folder at
        optimizer step ``step``."""
        return self.session.state_dict(step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    def _stash(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Put the state where ``Trainer`` saves it (``trainer_state.json``) before a checkpoint is written: at the
        events after which ``Trainer`` may save (``save_strategy="best"`` decides only after evaluating)."""
        best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
        if control.should_save or best:
            if not isinstance(state.stateful_callbacks, dict):
                state.stateful_callbacks = {}
            from entrotrain.integrations.hf_resume import ARGS_KEY, defining_args

            state.stateful_callbacks[STATE_KEY] = {**self.state_dict(state.global_step), ARGS_KEY: defining_args(args)}

    # ------------------------------------------------------------------ events
    @staticmethod
    def _logging_step(args: TrainingArguments, state: TrainerState, step: int) -> bool:
        """Whether ``Trainer`` logs at optimizer step ``step`` (``DefaultFlowCallback.on_step_end``'s rule: the first
        step with ``logging_first_step`` whatever the strategy, then every ``logging_steps`` under ``"steps"``)."""
        if step == 1 and bool(args.logging_first_step):
            return True
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            return False
        every = state.logging_steps or args.logging_steps
        return bool(every) and step % int(every) == 0

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
        if self.resume_changes and not self._attached and state.global_step > 0:
            raise EntrotrainError(
                "EntropyTrainerCallback(resume_changes=True) was passed in callbacks=[...]: Trainer has already "
                "restored the checkpoint's optimizer and scheduler as saved before any callback runs. Use "
                "EntropyTrainerCallback(..., resume_changes=True).attach(trainer) before trainer.train(...)."
            )
        self.last_metrics, self._pending, self._alerts = {}, None, {}
        self._run_start = run_start(resumed=state.global_step > 0)  # resumed: the earlier checkpoints are this run's
        world, rank, _ = distributed()
        if world > 1:  # as Lightning's strategies do: rank-zero output once, also in forked or spawned ranks
            rank_zero_only.rank = rank
        self.session.bind(_running_model(self._trainer, model))
        if state.is_world_process_zero:  # the pins a killed run left in output_dir: taken over
            self.session.start_keepers([args.output_dir], resumed_from=self._resume_path)
        if any(guard.action == "rollback" for guard in self.guards):
            _check_rollback(args, self._trainer() if self._trainer is not None else None)
            if kwargs.get("optimizer") is None:  # (as EntropyMonitors.watch: the moments roll back with the weights)
                raise EntrotrainError(
                    "EntropyCollapseGuard(action='rollback') restores the optimizer state too, but Trainer handed no "
                    "optimizer to the callbacks at train begin; use action='reduce_lr' or 'stop'."
                )
        if kwargs.get("optimizer") is not None:  # (a rate action warns there about an optimizer that ignores lr)
            self.session.track(model, [kwargs["optimizer"]])
        saved = state.stateful_callbacks.get(STATE_KEY) if isinstance(state.stateful_callbacks, dict) else None
        if saved:  # resume_from_checkpoint: trainer_state.json held our state
            self.load_state_dict(saved)
        self._open_record(args, model, saved.get(CHECKPOINT_KEY) if saved else None)
        if state.global_step > 0 and state.is_world_process_zero and not self._forked():
            _warn_kept_learning_rate(args, state, kwargs.get("lr_scheduler"))
        self._summaries_defined = False
        self._define_summaries(state)
        report_to = [r for r in (args.report_to or []) if r != "none"]
        if report_to and not self._attached and self.drivers:
            warnings.warn(
                f"EntropyTrainerCallback was passed in callbacks=[...]: Trainer runs the report_to integrations "
                f"{report_to} before it, so they will not log entrotrain's keys (state.log_history gets them). Use "
                "EntropyTrainerCallback(...).attach(trainer) instead.",
                stacklevel=2,
            )

    def _define_summaries(self, state: TrainerState) -> None:
        """Declare the entropy summaries once the wandb run exists: ``WandbCallback`` starts it in its own
        ``on_train_begin``, which runs after this callback's when attached."""
        run = wandb_run()
        if self._summaries_defined or run is None or not state.is_world_process_zero or not self.drivers:
            return
        from entrotrain.dashboards.wandb_media import define_entropy_summaries

        define_entropy_summaries(run, prefix="train/", step_metric="train/global_step")  # keyed as WandbCallback logs
        self._summaries_defined = True

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._define_summaries(state)
        self.release()  # a window left open (an interrupted step) never leaks into this one
        if self.drivers and self._logging_step(args, state, state.global_step + 1):
            self.session.arm(state.global_step + 1, training_only=True)  # not TRL's generation inside the step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.session.armed:
            send = self.log_media and state.is_world_process_zero and wandb_run() is not None
            self._pending, media = self.session.collect(state.global_step, media=send)
            if media:
                wandb_run().log({**{f"train/{k}": v for k, v in media.items()}, "train/global_step": state.global_step})
        self.release()
        for guard, reason in self.session.check_stale(state.global_step):  # its monitor stopped: Lightning's rule
            self._act(args, guard, reason, state.global_step, control, kwargs, None)
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
            values, self._pending = self._pending, None
            finite = {k: float(v) for k, v in values.items() if math.isfinite(v)}
            self.last_metrics = finite
            added.update(finite)
        logs.update(added)
        _warn_if_rank_local(self.session, logs, values)
        for guard, reason in self.session.observe({**logs, **values}, state.global_step):
            added[f"{guard.monitor}/alert"] = 1.0
            self._act(args, guard, reason, state.global_step, control, kwargs, logs)
        if state.is_world_process_zero:
            self.session.record_scalars(logs, state.global_step)
        history = state.log_history[-1] if state.log_history else None
        if added and isinstance(history, dict) and history.get("step") == state.global_step:
            history.update(added)  # Trainer wrote this row before calling on_log
        self._stash(args, state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._stash(args, state, control)  # save_strategy="epoch" decides here

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._stash(args, state, control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """``output_dir/checkpoint-N`` was just written (and older ones rotated away): the guards keep it
        (``keep_last_good``) until their judgements let it go."""
        if state.is_world_process_zero and args.output_dir:
            self.session.checkpoint_saved(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.release()
        self.session.untrack()
        if state.is_world_process_zero:
            self.session.release_checkpoints()
            self.session.flush_notifications()
        closing = self.session.close_record()
        if state.is_world_process_zero:
            for table in self.session.summaries():
                print(table)
            for line in closing:
                print(line)

    def _open_record(self, args: TrainingArguments, model: nn.Module, resume: dict[str, Any] | None) -> None:
        """Start writing the run record (``record=``) for this ``train``: continue the one a resumed checkpoint
        names, with ``TrainingArguments`` and the model class as hyperparameters."""
        if self._record_spec is None:
            return
        run_name = str(args.run_name) if getattr(args, "run_name", None) else None
        hparams = {"trainer": "transformers.Trainer", "model": type(model).__name__,
                   "training_args": args.to_sanitized_dict()}
        plan = self._fork.plan if self._fork is not None else None
        self.session.open_record(
            self._record_spec, hparams=hparams, resume=None if plan is not None else resume,
            ckpt_path=self._resume_path, run_name=run_name
        )
        if plan is not None and self.session.record is not None:  # a fork: a new record naming its parent
            from entrotrain._forked_resume import fork_run_records

            fork_run_records([self.session.record], plan)

    def _forked(self) -> bool:
        """Whether this ``train()`` resumed as a fork (``resume_changes=True`` and a changed configuration)."""
        return self._fork is not None and self._fork.plan is not None

    # ------------------------------------------------------------------ actions
    def _act(
        self, args: TrainingArguments, guard: EntropyCollapseGuard, reason: str, step: int, control: TrainerControl,
        kwargs: dict[str, Any], logs: dict[str, Any] | None,
    ) -> None:
        """The guard's action, once per episode (the judgement is the guard's own ``observe`` / ``check_stale``); the
        message names the newest ``output_dir/checkpoint-N`` at or before the last good observation."""
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        optimizers = [optimizer] if optimizer is not None else []
        schedulers = [scheduler] if scheduler is not None else []
        checkpoints = list(Path(args.output_dir).glob("checkpoint-*")) if args.output_dir else []
        if self._resume_path is not None:  # a kept one (entrotrain-last-good/) after a roll back: the one to go back to
            checkpoints.append(Path(self._resume_path))
        if self.session.act(guard, reason, step, optimizers, schedulers, checkpoints, since=self._run_start):
            control.should_training_stop = True
        if logs is not None:
            logs[f"{guard.monitor}/alert"] = 1.0
        else:  # fired at a step end: goes out with the next log
            self._alerts[f"{guard.monitor}/alert"] = 1.0


def _warn_if_rank_local(session: MonitorSession, logs: dict[str, Any], values: dict[str, float]) -> None:
    """Once per guard and ``train``: a ``stop`` / ``rollback`` / ``reduce_lr`` guard on several ranks whose key comes
    in a log of your own (``Trainer.log`` called outside Trainer's training log, which holds ``learning_rate``, its
    evaluation, ``eval_*``, and its closing log, ``train_runtime``) may judge a different value on each rank: one
    rank acts alone, and the replicas drift apart, or the rank that stops leaves the others waiting in their next
    collective (a hang). Trainer's own values are reduced over ranks (``loss`` is gathered, ``grad_norm`` is
    global, evaluation gathers the predictions), and so are the monitors' keys (``values``). Warned, not reduced:
    a log of your own may be written on some ranks only, and a reducing rank would wait for the others alone."""
    world = distributed()[0]
    if world < 2 or "learning_rate" in logs or "train_runtime" in logs:
        return
    for guard in session.guards:
        key = guard.monitor
        if (guard._rank_local_warned or guard.action not in ("stop", "rollback", "reduce_lr") or key not in logs
                or key in values or key.startswith("eval_") or any(key in keys for keys in session._published)):
            continue
        guard._rank_local_warned = True
        rank_zero_warn(
            f"EntropyCollapseGuard(action={guard.action!r}) watches {key!r}, which comes in a log of your own "
            f"(Trainer.log outside Trainer's training and evaluation logs, whose values are reduced over ranks): if "
            f"each of the {world} ranks logs its own value, each judges its own, so one rank can act while another "
            "does not: the replicas drift apart, or the rank that stops leaves the others waiting for it (a hang). "
            f"Log it reduced over ranks, e.g. self.log({{{key!r}: self.accelerator.reduce(value, "
            "reduction='mean').item()}), or watch a monitor's key (the monitors reduce across ranks)."
        )


def _running_model(trainer: Callable[[], Any] | None, model: nn.Module) -> nn.Module:
    """What ``Trainer`` runs: its ``model_wrapped`` when that is ``torch.compile`` of ``model``
    (``TrainingArguments(torch_compile=True)``), so the taps take their compiled path (one extra compile, no graph
    break); else ``model`` (a DDP wrapper's hooks run on the module inside it)."""
    wrapped = getattr(trainer() if trainer is not None else None, "model_wrapped", None)
    if isinstance(wrapped, nn.Module) and wrapped is not model and is_compiled(wrapped):
        if unwrap_module(wrapped) is model:
            return wrapped
    return model


def _check_rollback(args: TrainingArguments, trainer: Any = None) -> None:
    """Refuse ``action="rollback"`` where the state lives outside ``state_dict()`` / ``optimizer.state``: FSDP or
    DeepSpeed from ``TrainingArguments``, or from accelerate (``accelerate launch`` with an FSDP / DeepSpeed config
    leaves the arguments empty; ``Trainer.is_fsdp_enabled`` / ``is_deepspeed_enabled`` and accelerate's
    ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` say so). The model callbacks get is the unwrapped one,
    whose modules show no FSDP wrapper. FSDP through accelerate is refused whatever its ``fsdp_version``: version 1
    (the default) keeps flat parameters outside ``state_dict()``, and version 2 is untested here (FSDP2 rolls back
    in a plain loop with ``EntropyMonitors`` and under Lightning's ``ModelParallelStrategy``)."""
    found = [f"TrainingArguments({name}=...)" for name in ("deepspeed", "fsdp") if getattr(args, name, None)]
    found += [f"Trainer.{flag}" for flag in ("is_deepspeed_enabled", "is_fsdp_enabled")
              if getattr(trainer, flag, False) is True]
    found += [env for env in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
              if os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")]
    if found:
        raise EntrotrainError(
            f"EntropyCollapseGuard(action='rollback') cannot hold the training state under {found[0]}: the model and "
            "optimizer state are sharded. Use action='reduce_lr' or 'stop', and resume from the checkpoint the guard "
            "names (it keeps it from rotation). (FSDP2's fully_shard in your own loop with EntropyMonitors, or under "
            "Lightning's ModelParallelStrategy, rolls back in memory.)"
        )


def _checkpoint_path(trainer: Any, resume: Any) -> str | None:
    """The checkpoint folder ``trainer.train(resume_from_checkpoint=resume)`` resumes from (``True``: the last one in
    ``output_dir``, as ``Trainer`` finds it), else ``None``."""
    if isinstance(resume, bool):
        if not resume:
            return None
        from transformers.trainer_utils import get_last_checkpoint

        try:
            return get_last_checkpoint(trainer.args.output_dir)
        except (OSError, ValueError):  # Trainer raises its own error for a missing output_dir
            return None
    return str(resume) if isinstance(resume, (str, os.PathLike)) else None
