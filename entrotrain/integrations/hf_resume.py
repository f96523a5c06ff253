"""Roll back and cure under ``transformers.Trainer``: ``trainer.train(resume_from_checkpoint=...)`` with a changed
run uses the changed run, as the Lightning fork does (:mod:`entrotrain._forked_resume`). Opt in with
``EntropyTrainerCallback(..., resume_changes=True).attach(trainer)``::

    model = sigma_reparam(GPT2LMHeadModel(config))                   # the cure, applied at the resume
    args = TrainingArguments("out", learning_rate=1e-3, ...)         # was 1e-2
    trainer = Trainer(model=model, args=args, train_dataset=data)
    EntropyTrainerCallback([AttentionEntropyMonitor()], record="runs", resume_changes=True).attach(trainer)
    trainer.train(resume_from_checkpoint="out/entrotrain-last-good/checkpoint-50")

What plain ``Trainer`` does with such a resume: the checkpoint's ``optimizer.pt`` and ``scheduler.pt`` are restored
as saved, so the checkpoint's learning rate, betas, epsilon and weight decay win over ``TrainingArguments`` (the
scheduler's ``base_lrs`` are the saved ones); σReparam applied at the resume loads its weights (a plain layer's
``weight`` loads into :class:`~entrotrain.regularizers.sigma_reparam.SigmaReparamLinear`), but
``optimizer.load_state_dict`` raises torch's ``ValueError`` (the parameter groups grew by a γ per layer); and the
run record continues the checkpoint's, superseding its history after the checkpoint's step.

What is compared (no pickle is read: ``training_args.bin`` is a pickled object, loading it could run code):

- the ``TrainingArguments`` fields that define training (:data:`DEFINING_ARGS`: ``learning_rate``,
  ``lr_scheduler_type`` / ``_kwargs``, ``warmup_steps``, ``weight_decay``, ``adam_beta1`` / ``2``,
  ``adam_epsilon``, ``max_grad_norm``, ``optim`` / ``optim_args``, ``seed``, ``data_seed``) with the checkpoint's
  run's: from ``trainer_state.json`` (``EntropyTrainerCallback`` writes them into its ``stateful_callbacks`` entry
  with every checkpoint), else from the checkpoint's run record (``hparams.json``), else not compared;
- the saved optimizer state with the configured optimizer (``optimizer.pt``, ``weights_only``): every group's rate
  (its schedule's initial rate), betas, eps, weight decay, ..., the optimizer's kind and its groups' sizes; an
  implementation flag (``fused``, ``foreach``, ``capturable``, ``differentiable``) is no change, nor is ``optim``
  ``adamw_torch`` ↔ ``adamw_torch_fused`` (a transformers 4 checkpoint resumed under transformers 5's default:
  ``Trainer``'s own resume, whose restored param groups keep the saved flag; a fork runs the configured one);
- the model's parameters with the checkpoint's weights' names (``model.safetensors`` or its index, else
  ``pytorch_model.bin``): σReparam applied at the resume, and parameters the checkpoint does not have. σReparam
  removed at the resume is an :class:`~entrotrain.errors.EntrotrainError` (Trainer's non-strict load would have
  put the raw ``weight`` in place of the weight the layer computed with), as in the Lightning fork.

The schedule's *value* at the saved step is not compared on its own: a longer ``max_steps`` (a run extended) changes
it too and is an ordinary resume. A changed warmup or schedule type is seen through the arguments.

Unchanged: exactly ``Trainer``'s resume (its own ``_load_optimizer_and_scheduler`` runs, the record continues).
Changed: a *fork*: the configured values win. The configured hyperparameters replace the saved ones in the restored
optimizer state, whose moments are kept when the parameter groups still fit and the optimizer is of the same kind,
else the optimizer starts afresh (no torch error); the scheduler is the configured one (``base_lrs`` the configured
rates, the configured warmup and decay) at the saved step, so the first resumed step runs at the configured
schedule's rate for that step (``Trainer``'s schedule is a function of the run's global step, which continues: unlike
Lightning's fork, a fresh optimizer does not restart the schedule); a changed ``seed`` also leaves the checkpoint's
random state (``rng_state.pth``) unrestored, so the configured seed's draws are used; every change is printed once
(main process); the run record (``record=``) is a new run whose ``meta.json`` names its parent (``forked_from``:
record, step, checkpoint, changes) and the parent's record is left byte for byte.

When. ``Trainer.train`` loads the weights (``_load_from_checkpoint``, strict=False) and ``trainer_state.json``
before it builds the optimizer and scheduler from the arguments, then restores their states in
``_load_optimizer_and_scheduler(checkpoint)``, all before any callback's ``on_train_begin``. ``attach`` therefore
wraps ``trainer.train``, and a resume puts a one-shot wrapper around this trainer's
``_load_optimizer_and_scheduler`` (an instance attribute, removed at its first call or when ``train`` returns): it
compares, and either calls ``Trainer``'s own method or loads the adapted states itself. The wrapper needs
``Trainer._load_optimizer_and_scheduler(checkpoint)`` and ``Trainer._load_rng_state(checkpoint)``
(transformers 4.48 to 5.x; checked when the option is given). Under DeepSpeed, FSDP, SageMaker MP or XLA, whose
checkpoints load elsewhere, the resume is ``Trainer``'s own, with a warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from entrotrain.errors import EntrotrainError

__all__ = ["DEFINING_ARGS", "HFForkedResume", "check_trainer_supports_forks", "defining_args"]

#: ``TrainingArguments`` fields that define what is trained: a resume where one of them differs forks.
DEFINING_ARGS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "seed", "data_seed",
)

#: The key of the defining arguments in ``EntropyTrainerCallback``'s ``trainer_state.json`` entry.
ARGS_KEY = "training_args"

_OPTIMIZER, _SCHEDULER = "optimizer.pt", "scheduler.pt"


def defining_args(args: Any) -> dict[str, Any]:
    """The :data:`DEFINING_ARGS` of ``TrainingArguments`` ``args`` as ``to_sanitized_dict`` writes them (a bool,
    number or string as it is, anything else as its ``str``: the form a run record's ``hparams.json`` holds)."""
    out: dict[str, Any] = {}
    for name in DEFINING_ARGS:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        value = getattr(value, "value", value)  # an enum (SchedulerType, OptimizerNames) as its value
        out[name] = value if type(value) in (bool, int, float, str) else str(value)
    return out


def check_trainer_supports_forks(owner: str) -> None:
    """Raise :class:`EntrotrainError` when this transformers' ``Trainer`` lacks the methods the fork wraps."""
    import inspect

    from transformers import Trainer

    missing = [name for name in ("_load_optimizer_and_scheduler", "_load_rng_state")
               if "checkpoint" not in inspect.signature(getattr(Trainer, name, lambda: None)).parameters]
    if missing:
        import transformers

        raise EntrotrainError(
            f"{owner}(resume_changes=True) wraps transformers.Trainer.{missing[0]}(checkpoint), which transformers "
            f"{transformers.__version__} does not have. Use transformers>=4.48,<6, or resume_changes=False (Trainer's "
            "own resume: the checkpoint's optimizer and scheduler states as saved)."
        )


def _saved_args(trainer: Any, parent: str | None) -> dict[str, Any] | None:
    """The checkpoint's run's defining arguments: ``trainer_state.json``'s entrotrain entry (``trainer.state`` is
    already loaded from it), else the parent record's ``hparams.json``, else ``None``."""
    from entrotrain.integrations.transformers import STATE_KEY

    entry = trainer.state.stateful_callbacks.get(STATE_KEY) if isinstance(trainer.state.stateful_callbacks, dict) else None
    if isinstance(entry, Mapping) and isinstance(entry.get(ARGS_KEY), Mapping):
        return dict(entry[ARGS_KEY])
    if parent is not None:
        try:
            hparams = json.loads((Path(parent) / "hparams.json").read_text())
        except (OSError, ValueError):
            return None
        saved = hparams.get("training_args") if isinstance(hparams, Mapping) else None
        if isinstance(saved, Mapping):
            return {k: saved[k] for k in DEFINING_ARGS if k in saved}
    return None


#: ``optim`` names that build the same optimizer as another, with an implementation flag only
#: (:data:`~entrotrain._forked_resume.IMPLEMENTATION_FLAGS`): ``adamw_torch_fused`` is ``torch.optim.AdamW(...,
#: fused=True)``, ``adamw_torch`` the same without the flag (transformers 4's default and 5's).
SAME_OPTIMIZER = {"adamw_torch_fused": "adamw_torch"}


def _same_arg(name: str, old: Any, new: Any) -> bool:
    if name == "optim":
        return SAME_OPTIMIZER.get(str(old), str(old)) == SAME_OPTIMIZER.get(str(new), str(new))
    return old == new


def _warmup_as_now(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with a transformers 4 warmup in transformers 5's form when this transformers has no
    ``warmup_ratio`` (5.x: ``warmup_steps`` below 1 is the ratio): ``warmup_steps`` 0 with ``warmup_ratio`` r is
    ``warmup_steps`` r (4.x used the ratio only when ``warmup_steps`` was 0)."""
    if "warmup_ratio" not in saved or "warmup_ratio" in now or "warmup_steps" not in saved:
        return dict(saved)
    out = dict(saved)
    ratio = out.pop("warmup_ratio")
    steps = out["warmup_steps"]
    if isinstance(steps, (int, float)) and steps <= 0 and isinstance(ratio, (int, float)) and 0 < ratio < 1:
        out["warmup_steps"] = ratio
    return out


def _args_changes(saved: Mapping[str, Any] | None, args: Any) -> list[tuple[str, Any, Any]]:
    """``(args.NAME, saved, configured)`` for every :data:`DEFINING_ARGS` entry both have that differs
    (``optim`` compared through :data:`SAME_OPTIMIZER`: ``adamw_torch`` → ``adamw_torch_fused`` is no change; a
    transformers 4 ``warmup_ratio`` as transformers 5's ``warmup_steps`` below 1: :func:`_warmup_as_now`)."""
    if saved is None:
        return []
    now = defining_args(args)
    saved = _warmup_as_now(saved, now)
    return [(f"args.{k}", saved[k], now[k]) for k in DEFINING_ARGS
            if k in saved and k in now and not _same_arg(k, saved[k], now[k])]


def _weight_names(checkpoint: Path) -> set[str] | None:
    """The names of the weights saved in a ``Trainer`` checkpoint folder (``None``: none found, e.g. adapters)."""
    if (checkpoint / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (checkpoint / index).is_file():
            return set(json.loads((checkpoint / index).read_text()).get("weight_map", {}))
    if (checkpoint / "pytorch_model.bin").is_file():
        return set(torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))
    return None


def _model_changes(model: torch.nn.Module, names: set[str] | None) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """``(changes, new)``: σReparam applied at the resume (``model.sigma_reparam_layers``: 0 → how many layers), and
    the model's parameters the checkpoint has no weight for (``model.new_parameters``: they keep their initial
    values; σReparam's filled-in γ are not among them)."""
    from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear

    if names is None:
        return [], []
    removed = [name for name, m in model.named_modules() if name and not isinstance(m, SigmaReparamLinear)
               and f"{name}.gamma" in names and f"{name}.weight" in names]
    if removed:
        raise EntrotrainError(
            f"EntropyTrainerCallback(resume_changes=True): the checkpoint's layers {removed[:5]} are σReparam layers "
            "(their γ, u and σ have no place in a plain layer: Trainer loaded only their raw weight, which is not the "
            "weight they computed with), but the model's are plain. σReparam cannot be removed on a resume: apply "
            "sigma_reparam(model) as in the checkpoint's run before trainer.train(resume_from_checkpoint=...)."
        )
    layers = [name for name, m in model.named_modules() if isinstance(m, SigmaReparamLinear)
              and f"{name}.weight" in names and f"{name}.gamma" not in names]
    filled = {f"{name}.gamma" for name in layers}
    # weights saved under other names than the model's (transformers converts them on load: a MoE's fused experts
    # are saved as the checkpoint format's per-expert weights): which parameter is new cannot be told by name
    renamed = bool(names - set(model.state_dict()))
    new = [] if renamed else [name for name, _ in model.named_parameters() if name not in names and name not in filled]
    changes: list[tuple[str, Any, Any]] = []
    if layers:
        changes.append(("model.sigma_reparam_layers", 0, len(layers)))
    if new:
        changes.append(("model.new_parameters", [], new))
    return changes, new


class HFForkedResume:
    """The one-shot wrapper around one ``Trainer``'s ``_load_optimizer_and_scheduler`` (module docstring).
    :meth:`install` before ``train``, :meth:`remove` after; ``plan`` is the fork made (``None``: no fork)."""

    def __init__(self, trainer: Any, checkpoint: str) -> None:
        self.trainer = trainer
        self.checkpoint = str(checkpoint)
        self.plan: Any = None
        self._installed: list[tuple[str, Any]] = []  # (attribute, previous instance attribute or None)

    # ------------------------------------------------------------------ wrapping
    def install(self) -> HFForkedResume:
        trainer = self.trainer
        load = trainer._load_optimizer_and_scheduler

        def load_optimizer_and_scheduler(checkpoint: Any) -> None:
            self._restore("_load_optimizer_and_scheduler")
            self._load(checkpoint, load)

        self._set("_load_optimizer_and_scheduler", load_optimizer_and_scheduler)
        return self

    def _set(self, name: str, fn: Any) -> None:
        self._installed.append((name, vars(self.trainer).get(name)))
        setattr(self.trainer, name, fn)

    def _restore(self, name: str) -> None:
        for i, (attr, previous) in enumerate(self._installed):
            if attr == name:
                del self._installed[i]
                if previous is not None:
                    setattr(self.trainer, name, previous)
                else:
                    vars(self.trainer).pop(name, None)
                return

    def remove(self) -> None:
        """Take every wrapper off (idempotent)."""
        for name, _ in list(self._installed):
            self._restore(name)

    # ------------------------------------------------------------------ the resume
    def _load(self, checkpoint: Any, original: Any) -> None:
        from entrotrain._forked_resume import ForkPlan, parent_record, training_state_changes

        trainer = self.trainer
        if checkpoint is None:
            original(checkpoint)
            return
        elsewhere = [name for name, on in (
            ("DeepSpeed", trainer.is_deepspeed_enabled), ("FSDP", trainer.is_fsdp_enabled),
            ("SageMaker MP", _sagemaker_mp()), ("XLA", _xla())) if on]
        if elsewhere:
            warnings.warn(
                f"EntropyTrainerCallback(resume_changes=True) does not compare or adapt a resume under "
                f"{elsewhere[0]} (its checkpoints load elsewhere): Trainer's own resume.", stacklevel=3)
            original(checkpoint)
            return
        folder = Path(checkpoint)
        from entrotrain.integrations.transformers import STATE_KEY

        stash = trainer.state.stateful_callbacks.get(STATE_KEY) if isinstance(trainer.state.stateful_callbacks, dict) else None
        from entrotrain.dashboards.run_record import CHECKPOINT_KEY

        entry = {CHECKPOINT_KEY: stash.get(CHECKPOINT_KEY)} if isinstance(stash, Mapping) else {}
        parent = parent_record(entry)
        args_changes = _args_changes(_saved_args(trainer, parent), trainer.args)
        model_changes, new = _model_changes(trainer.model, _weight_names(folder))
        changes = args_changes + model_changes
        saved = self._saved_states(folder)
        schedulers = [SimpleNamespace(scheduler=trainer.lr_scheduler)] if trainer.lr_scheduler is not None else []
        if saved is not None:
            found = training_state_changes(saved, [trainer.optimizer], schedulers)
            # what the arguments or the model already say is not said twice
            found = [c for c in found if not (
                (args_changes and c[0].startswith(("optimizer", "lr_scheduler")) and not c[0].endswith(".param_groups"))
                or (model_changes and c[0].endswith(".param_groups")))]
            changes += found
        if not changes:
            original(checkpoint)  # exactly Trainer's resume
            return
        step = int(trainer.state.global_step)
        self.plan = ForkPlan(str(checkpoint), step, changes, parent)
        if new:
            self.plan.notes.append(f"new in the model, from their initial values: {', '.join(new)}")
        if saved is not None:
            self._adapt(saved, schedulers)
        else:
            self._without_saved_states()
        if any(key in ("args.seed", "args.data_seed") for key, _, _ in changes):
            self._skip_rng_restore()
        if trainer.is_world_process_zero():
            print("\n".join(self.plan.lines()))

    def _saved_states(self, folder: Path) -> dict[str, Any] | None:
        """The checkpoint's optimizer and scheduler states as ``{"optimizer_states": [...], "lr_schedulers":
        [...]}`` (``weights_only``), or ``None`` when ``Trainer`` would restore none (either file absent)."""
        if not (folder / _OPTIMIZER).is_file() or not (folder / _SCHEDULER).is_file():
            return None
        args = self.trainer.args
        where = args.device if args.world_size > 1 and args.device.type != "cpu" else "cpu"  # as Trainer loads it
        optimizer = torch.load(folder / _OPTIMIZER, map_location=where, weights_only=True)
        scheduler = torch.load(folder / _SCHEDULER, weights_only=True)
        return {"optimizer_states": [optimizer], "lr_schedulers": [scheduler]}

    def _adapt(self, saved: dict[str, Any], schedulers: list[Any]) -> None:
        """The configured hyperparameters and schedule into the saved states (moments kept when they fit), then
        load them into the trainer's optimizer and scheduler."""
        from entrotrain._forked_resume import _scheduled_lrs, adapt_training_state

        trainer = self.trainer
        position = dict(saved["lr_schedulers"][0]) if saved["lr_schedulers"] else {}
        notes = len(self.plan.notes)
        adapt_training_state(self.plan, None, saved, configured=([trainer.optimizer], schedulers))
        scheduler = trainer.lr_scheduler
        if len(self.plan.notes) > notes and "start afresh" in self.plan.notes[-1]:
            # adapt_training_state restarted the optimizer and its scheduler; Trainer's schedule is a function of
            # the global step, which continues: the configured schedule at the saved step
            inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
            what = (f"optimizer changed (now {type(inner).__name__})" if "optimizer changed" in self.plan.notes[-1]
                    else "optimizer's parameters changed")
            self.plan.notes[-1] = (f"the {what}: its state (moments) starts afresh; the weights and the step count "
                                   "are the checkpoint's")
            last = position.get("last_epoch")
            if scheduler is not None and isinstance(last, int):
                state = saved["lr_schedulers"][0]
                lrs = _scheduled_lrs(scheduler, {"last_epoch": last, "base_lrs": list(state.get("base_lrs", []))})
                if lrs is not None:
                    state.update({k: position[k] for k in ("last_epoch", "_step_count") if k in position})
                    state["_last_lr"] = list(lrs)
                    for group, lr in zip(saved["optimizer_states"][0]["param_groups"], lrs):
                        group["lr"] = lr
        trainer.optimizer.load_state_dict(saved["optimizer_states"][0])
        if scheduler is not None and saved["lr_schedulers"]:
            scheduler.load_state_dict(saved["lr_schedulers"][0])
            lr = trainer.optimizer.param_groups[0]["lr"]
            kind = _schedule_name(trainer)
            self.plan.notes.append(f"schedule: {kind} as configured, at step "
                                   f"{self.plan.step} (lr {float(lr):.4g} at the first resumed step)")

    def _without_saved_states(self) -> None:
        """A fork from a checkpoint without ``optimizer.pt`` / ``scheduler.pt`` (``save_only_model=True``): the
        optimizer starts afresh, and the scheduler, which ``Trainer`` would leave at its step 0 (a warmup run again
        from a rate of 0), is the configured schedule at the saved step, as in a fork with saved states."""
        from entrotrain._forked_resume import _scheduled_lrs

        trainer, step = self.trainer, self.plan.step
        note = "the checkpoint has no optimizer state (save_only_model): the optimizer starts afresh"
        scheduler = trainer.lr_scheduler
        base = list(getattr(scheduler, "base_lrs", None) or [])
        lrs = _scheduled_lrs(scheduler, {"last_epoch": step, "base_lrs": base}) if scheduler is not None and base else None
        if lrs is not None:
            scheduler.last_epoch, scheduler._step_count, scheduler._last_lr = step, step + 1, list(lrs)
            for group, lr in zip(trainer.optimizer.param_groups, lrs):
                group["lr"] = lr
            kind = _schedule_name(trainer)
            note += f"; schedule: {kind} as configured, at step {step} (lr {lrs[0]:.4g} at the first resumed step)"
        self.plan.notes.append(note)

    def _skip_rng_restore(self) -> None:
        """A changed seed: the checkpoint's random state is not restored (once), so the configured seed's is used."""
        def load_rng_state(checkpoint: Any) -> None:
            self._restore("_load_rng_state")

        self._set("_load_rng_state", load_rng_state)
        self.plan.notes.append("random state: the configured seed's (the checkpoint's rng_state is not restored)")


def _schedule_name(trainer: Any) -> str:
    """``lr_scheduler_type`` when ``Trainer`` built the scheduler, else (``Trainer(optimizers=(opt, scheduler))``)
    the class of the one passed."""
    if getattr(trainer, "_created_lr_scheduler", True):
        return str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type))
    return type(trainer.lr_scheduler).__name__


def _sagemaker_mp() -> bool:
    try:
        from transformers.utils import is_sagemaker_mp_enabled
    except ImportError:
        return False
    return bool(is_sagemaker_mp_enabled())


def _xla() -> bool:
    try:
        from transformers.utils import is_torch_xla_available
    except ImportError:
        return False
    return bool(is_torch_xla_available())
