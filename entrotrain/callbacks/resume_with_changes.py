"""Roll back and cure with a plain Lightning ``Trainer``: ``trainer.fit(model, ckpt_path=...)`` with a changed module
uses the changed module, as ``entrotrain fit --ckpt_path`` does (:mod:`entrotrain._forked_resume`).

Without it, Lightning restores the checkpoint's optimizer state as saved, so its learning rate, betas and weight
decay override the ones the module now configures, and a :class:`~entrotrain.dashboards.RunRecordLogger` continues
the checkpoint's record, superseding its history after the checkpoint's step (the record of the failure is lost)::

    model = MyModule(lr=1e-3)                       # was 1e-2; or sigma_reparam(...) applied, or a regulariser added
    trainer = Trainer(callbacks=[ResumeWithChanges(), AttentionEntropyMonitor()], logger=RunRecordLogger("runs"))
    trainer.fit(model, datamodule, ckpt_path="ckpts/epoch=0-step=50.ckpt")

With no configuration file to compare, the comparison is made on what the checkpoint holds:

- the module's ``hparams`` (``save_hyperparameters``) with the checkpoint's ``hyper_parameters``, and the
  datamodule's with ``datamodule_hyper_parameters`` (``model.lr: 0.01 → 0.001``, ``data.batch_size: 4 → 8``);
  an argument the checkpoint does not have and whose value is the class's default is not a change; a value whose
  text is an object's address (``<... at 0x...>``) cannot be compared and is left out;
- the freshly configured optimizers (``configure_optimizers`` called once more, on throwaway objects) with the saved
  ``optimizer_states``: each group's ``lr`` (a scheduled group's initial rate), ``betas``, ``weight_decay``, ...,
  the optimizer's kind and its groups' sizes; the schedulers with the saved ``lr_schedulers`` (how many, and every
  setting in their ``state_dict`` that is not a position: ``T_max``, ``eta_min``, ``step_size``, ``gamma``, ...,
  a ``SequentialLR``'s ``milestones`` and its / a ``ChainedScheduler``'s children's settings; a ``LambdaLR``'s
  function is not saved, so a changed warmup shows only through the hyperparameters). Not changes: an
  implementation flag (``fused``, ``foreach``, ``capturable``, ``differentiable``); Adam ↔ AdamW at weight decay
  0; a manual warmup in ``optimizer_step`` (Lightning's documented pattern: the saved rate of an unscheduled group
  is a position): the configured rates this callback recorded in the checkpoint's run (``configured_rates``, saved
  with every checkpoint) are compared with the configured ones; without a record, when no hyperparameter changed,
  a configured rate that is a hyperparameter's value is taken as unchanged (a rate written in code is still
  compared with the saved one); saved param groups beyond the configured ones whose parameters no configured
  group holds (a callback added them at fit start: Lightning restores them into the groups it adds again). The
  trainer's settings (gradient clipping, ``accumulate_grad_batches``) are not in a checkpoint and are not compared (``entrotrain fit`` compares the clipping from its saved configuration);
- the model's parameters: σReparam applied at the resume (the checkpoint has a plain layer's ``weight`` where the
  module has a :class:`~entrotrain.regularizers.sigma_reparam.SigmaReparamLinear`) and a regulariser's parameters
  the checkpoint does not have.

Unchanged: exactly Lightning's resume (the weights load as Lightning loads them, the optimizer state is restored as
saved, the run record continues). Changed: a *fork*, as the CLI's (one implementation,
:mod:`entrotrain._forked_resume`): the configured values are used; the weights load into the module as it is now
(a plain layer's into its σReparam replacement function-preservingly, γ = σ(W); a new regulariser's parameters
keep their initial values; any other missing or unexpected key is an :class:`~entrotrain.errors.EntrotrainError`);
the configured optimizer hyperparameters replace the saved ones (moments kept when the groups still fit and the
optimizer is of the same kind, else the optimizer and schedulers start afresh); a changed schedule runs as
configured from the saved step; every change is printed once (rank zero); every ``RunRecordLogger`` writes a new
record whose ``meta.json`` names its parent (``forked_from``), and the parent's record is left byte for byte. A
parameter whose shape differs from the checkpoint's (layers, widths) is an ``EntrotrainError`` naming it, changed
or not; a refused resume (that error, σReparam removed, a key that cannot load) leaves no new record folder (it is
raised at the call, before any step: a "failed" record holding nothing would only be noise beside the parent's).

When: Lightning loads a checkpoint's weights before any callback's ``on_load_checkpoint`` runs (``restore_model``,
then ``restore_callbacks``, then ``restore_training_state``), and sets ``trainer.ckpt_path`` only when it loads the
checkpoint, after ``setup``. So ``setup`` (``fit`` only) puts a one-shot wrapper around this trainer's
``strategy.load_model_state_dict``: the first call, with the checkpoint Lightning loaded and before the weights
load, makes the comparison, loads the weights, rewrites the checkpoint's optimizer and scheduler states that
``restore_training_state`` restores next, and makes the record fork before the record's own resume (its
``on_load_checkpoint``) can continue the parent's; the wrapper is removed then, or at ``teardown`` when nothing was
loaded. This holds whether the strategy restores before its setup (``restore_checkpoint_after_setup`` False, DDP)
or after it (True). ``validate`` / ``test`` / ``predict`` from a checkpoint are Lightning's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from entrotrain.errors import EntrotrainError

__all__ = ["ResumeWithChanges", "hyperparameter_changes"]

#: An object's default repr (``<Foo object at 0x7f...>``): differs between processes, not a comparable setting.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _comparable(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters whose values can be compared across processes (LightningCLI's own entries and values
    printed with an address dropped)."""
    from entrotrain.dashboards.run_record import json_safe

    out = {}
    for key, value in json_safe(dict(hparams)).items():
        if key in ("_class_path", "_instantiator") or _ADDRESS.search(repr(value)):
            continue
        out[key] = value
    return out


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _section_changes(section: str, saved: Any, current: Any, obj: Any) -> list[tuple[str, Any, Any]]:
    """``config_changes`` of one section (``model`` / ``data``): the checkpoint's hyperparameters ``saved`` against
    the object's ``current`` ones, an argument only ``current`` has at the class's default left out."""
    from entrotrain._forked_resume import _flatten, _new_argument_at_default, config_changes

    if not isinstance(saved, Mapping) or current is None:
        return []
    old, new = _comparable(saved), _comparable(current)
    if not old and not new:
        return []
    before = {section: {"class_path": _class_path(obj), "init_args": old}}
    after = {section: {"class_path": _class_path(obj), "init_args": new}}
    absent = {key.replace("init_args.", "") for key in _flatten(before, "", {})}
    return [c for c in config_changes(before, after) if not _new_argument_at_default(c, absent, after)]


def hyperparameter_changes(pl_module: LightningModule, datamodule: Any, checkpoint: Mapping[str, Any]
                           ) -> list[tuple[str, Any, Any]]:
    """``(key, saved, current)`` for every hyperparameter of ``pl_module`` (``model.*``) and ``datamodule``
    (``data.*``, when not ``None``) that differs from the checkpoint's ``hyper_parameters`` /
    ``datamodule_hyper_parameters`` (module docstring: a new argument at its default and values printed with an
    address are not changes)."""
    changes = _section_changes("model", checkpoint.get("hyper_parameters"), pl_module.hparams, pl_module)
    if datamodule is not None:
        changes += _section_changes("data", checkpoint.get("datamodule_hyper_parameters"), datamodule.hparams,
                                    datamodule)
    return changes


def _explained(change: tuple[str, Any, Any], by: list[tuple[str, Any, Any]]) -> bool:
    """Whether a change found in the optimizer or scheduler (``optimizer.lr: 0.01 → 0.001``) is already listed as a
    hyperparameter's (``model.lr: 0.01 → 0.001``)."""
    return any(old == change[1] and new == change[2] for _, old, new in by)


class ResumeWithChanges(Callback):
    """``trainer.fit(model, ckpt_path=...)`` with a changed module uses the changed module: its hyperparameters,
    optimizer settings, schedule and cure (σReparam, a regulariser), keeping the checkpoint's weights, moments and
    step, and records the run as a new run forked from the checkpoint's (module docstring). An unchanged resume is
    Lightning's own.

    Args:
        verbose: print what changed when a resume forks (rank zero; default ``True``).

    Raises:
        EntrotrainError: when ``verbose`` is not a bool; on a resume, when a parameter's shape differs from the
            checkpoint's, or (on a fork) when a key the module or the checkpoint has cannot be loaded.

    Example::

        trainer = Trainer(callbacks=[ResumeWithChanges()], logger=RunRecordLogger("runs"))
        trainer.fit(MyModule(lr=1e-3), ckpt_path="ckpts/epoch=0-step=50.ckpt")
    """

    def __init__(self, verbose: bool = True) -> None:
        from entrotrain._validation import check_bool

        self.verbose = bool(check_bool(verbose, "ResumeWithChanges: verbose"))
        self.plan: Any = None  # the last fit's ForkPlan (None: no checkpoint, or an unchanged resume)
        self._wrapped: Any = None  # (strategy, previous instance attribute or None) while the wrapper is on
        self._refusal: BaseException | None = None  # the EntrotrainError this fit's resume was refused with
        #: The configured rates of this fit's optimizers (``[optimizer][group]``), recorded when they are built
        #: (``on_fit_start``, before a resume restores the saved ones) and saved with every checkpoint: a later
        #: resume compares its configured rates with these, not with the saved running rates (a manual warmup).
        self.configured_rates: list[list[Any]] | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._wrapped is not None:
            return  # validate / test / predict: Lightning's own, and the last fit's plan stays readable
        self.plan = None
        self._refusal = None
        strategy = trainer.strategy
        previous = vars(strategy).get("load_model_state_dict")
        original = strategy.load_model_state_dict

        def load_model_state_dict(checkpoint: Mapping[str, Any], strict: bool = True) -> None:
            self._unwrap()
            self._load(trainer, checkpoint, strict, original)

        strategy.load_model_state_dict = load_model_state_dict  # type: ignore[method-assign]
        self._wrapped = (strategy, previous)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unwrap()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from entrotrain._forked_resume import configured_rates

        self.configured_rates = configured_rates(trainer.optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {"configured_rates": self.configured_rates} if self.configured_rates is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: this fit records its own configured rates; the checkpoint's are read where the
        resume compares (``checkpoint["callbacks"]``)."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A refused resume leaves no new run record: Lightning's ``finalize("failed")``, which runs after this hook,
        would start a record folder that says "failed" and holds nothing, beside the checkpoint's (the error is
        raised at the call, before any step). Each ``RunRecordLogger`` not yet started drops it right after."""
        self._unwrap()
        refusal, self._refusal = self._refusal, None
        if exception is not refusal or refusal is None:
            return
        from entrotrain.dashboards.run_record import RunRecordLogger

        for logger in trainer.loggers:
            if isinstance(logger, RunRecordLogger) and not logger.started:
                _drop_after_finalize(logger)

    def _unwrap(self) -> None:
        if self._wrapped is None:
            return
        strategy, previous = self._wrapped
        self._wrapped = None
        if previous is not None:
            strategy.load_model_state_dict = previous
        else:
            vars(strategy).pop("load_model_state_dict", None)

    # ------------------------------------------------------------------ the resume
    def _load(self, trainer: Trainer, checkpoint: Any, strict: bool, original: Any) -> None:
        """Compare, then load the weights (Lightning's own load when nothing changed) and adapt the checkpoint's
        training state in place before Lightning restores it."""
        from entrotrain._forked_resume import ForkedResume

        pl_module = trainer.lightning_module
        state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
        if any(isinstance(cb, ForkedResume) for cb in trainer.callbacks) or not isinstance(state, Mapping):
            # `entrotrain fit` already forks this resume (compared with its configuration); or not a Lightning
            # checkpoint, or one without weights: Lightning's own
            original(checkpoint, strict=strict)
            return
        try:
            self._compare_and_load(trainer, pl_module, checkpoint, state, strict, original)
        except EntrotrainError as error:
            self._refusal = error  # on_exception: no record of a refused resume
            raise

    def _compare_and_load(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Any,
                          state: Mapping[str, Any], strict: bool, original: Any) -> None:
        from entrotrain._forked_resume import (
            adapt_training_state,
            configured_optimizers,
            finetuning_groups,
            fork_run_records,
            new_plan,
            print_plan,
            state_key_problems,
        )

        self._check_shapes(pl_module, state)
        configured = configured_optimizers(pl_module)
        finetuning_groups(trainer, pl_module, checkpoint, configured[0])
        saved = (checkpoint.get("callbacks") or {}).get(self.state_key)
        recorded = saved.get("configured_rates") if isinstance(saved, Mapping) else None
        changes = self._changes(trainer, pl_module, checkpoint, state, configured, recorded)
        if not changes:
            original(checkpoint, strict=strict)
            return
        missing, unexpected, new = state_key_problems(pl_module, state)
        if missing or unexpected:
            self._refuse_keys(pl_module, missing, unexpected, changes)
        plan = new_plan(str(trainer.ckpt_path), checkpoint, changes)
        original(checkpoint, strict=False)
        if new:
            plan.notes.append(f"new in the model, from their initial values: {', '.join(new)}")
        adapt_training_state(plan, pl_module, checkpoint, configured)
        fork_run_records(trainer.loggers, plan)
        self.plan = plan
        if self.verbose:
            print_plan(plan)

    @staticmethod
    def _changes(trainer: Trainer, pl_module: LightningModule, checkpoint: Mapping[str, Any],
                 state: Mapping[str, Any], configured: tuple[list[Any], list[Any]], recorded: Any = None
                 ) -> list[tuple[str, Any, Any]]:
        """What differs between the checkpoint's run and this one (module docstring): hyperparameters first, then
        the optimizer's and schedulers' settings and the model's new parameters not already explained by them."""
        from entrotrain._forked_resume import (
            sigma_reparam_filled,
            state_key_problems,
            training_state_changes,
            unclaimed_shapes,
        )

        changes = hyperparameter_changes(pl_module, trainer.datamodule, checkpoint)
        found: list[tuple[str, Any, Any]] = []
        layers = sigma_reparam_filled(pl_module, state)
        if layers:
            found.append(("model.sigma_reparam_layers", 0, len(layers)))
        new = state_key_problems(pl_module, state)[2]
        if new:
            found.append(("model.new_parameters", [], new))
        # the rates the checkpoint's run configured (recorded by this callback there) against the configured ones;
        # without them, when no hyperparameter changed, a group's rate equal to one of them is configured as before
        # (a manual warmup in optimizer_step moved the saved one)
        found += training_state_changes(checkpoint, *configured, hyperparameters=None if changes else pl_module.hparams,
                                        unclaimed=unclaimed_shapes(pl_module, configured[0]), recorded_rates=recorded)
        if changes:  # the optimizer's and new parameters' consequences of a hyperparameter are said in notes
            found = [c for c in found if not _explained(c, changes) and not c[0].startswith("optimizer")
                     and c[0] != "model.new_parameters"]
        return changes + found

    @staticmethod
    def _check_shapes(pl_module: LightningModule, state: Mapping[str, Any]) -> None:
        """A parameter or buffer whose shape differs from the checkpoint's: an error naming it (a resume keeps the
        model's shape)."""
        current = pl_module.state_dict()
        wrong = [(key, tuple(value.shape), tuple(current[key].shape)) for key, value in state.items()
                 if key in current and hasattr(value, "shape") and hasattr(current[key], "shape")
                 and tuple(value.shape) != tuple(current[key].shape)]
        if not wrong:
            return
        listed = "; ".join(f"{key}: {list(old)} in the checkpoint, {list(new)} in the model" for key, old, new in wrong[:5])
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise EntrotrainError(
            f"ResumeWithChanges: the checkpoint's weights do not fit {type(pl_module).__name__}: {listed}{more}. A "
            "resume keeps the model's shape (layers, widths, heads, vocabulary); σReparam and regularisers can be "
            "added. Build the module with the checkpoint's sizes, or start a new run without ckpt_path."
        )

    @staticmethod
    def _refuse_keys(pl_module: LightningModule, missing: list[str], unexpected: list[str],
                     changes: list[tuple[str, Any, Any]]) -> None:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = ([f"missing from the checkpoint: {few(missing)}"] if missing else []) + (
            [f"not in the model: {few(unexpected)}"] if unexpected else [])
        from entrotrain._forked_resume import sigma_reparam_removed

        removed = sigma_reparam_removed(unexpected)
        removed += "." if removed else ""
        changed = ", ".join(key for key, _, _ in changes)
        raise EntrotrainError(
            f"ResumeWithChanges: the checkpoint's weights do not fit {type(pl_module).__name__}, whose configuration "
            f"changed ({changed}): {'; '.join(parts)}.{removed} A resume can add σReparam (a plain layer's weights "
            "load into it) and regularisers; other parameters cannot be added or removed."
        )


def _drop_after_finalize(record: Any) -> None:
    """Make ``record``'s next ``finalize`` (Lightning's, after a refused resume) remove the folder it starts when
    nothing was logged (:meth:`~entrotrain.dashboards.run_record.RunRecordLogger.discard_if_empty`): a one-shot
    instance attribute, taken off at that call."""
    previous = vars(record).get("finalize")
    finalize = record.finalize

    def finalize_and_drop(status: str, exc: BaseException | None = None) -> None:
        if previous is not None:
            record.finalize = previous
        else:
            vars(record).pop("finalize", None)
        finalize(status, exc)
        if record.run_dir.is_dir():  # rank zero: finalize wrote it
            record.discard_if_empty()

    record.finalize = finalize_and_drop
