"""Resuming from a checkpoint with a changed configuration: roll back to before a collapse and continue with a cure.

``entrotrain fit --recipe attention_collapse_sigma_reparam --ckpt_path ckpts/epoch=0-step=50.ckpt`` resumes the
collapsing run from step 50 with σReparam on. Plain Lightning would not do what that says:

- ``LightningCLI`` replaces the configured model's arguments with the checkpoint's hyperparameters, so the run would
  go on *without* σReparam, at the checkpoint's learning rate, and say nothing;
- the optimizer's state, restored as saved, overrides the configured learning rate, betas and weight decay, and does
  not fit a model whose parameters changed (σReparam adds a γ per layer).

entrotrain compares the configured ``model``, ``data``, ``optimizer`` (not its implementation flags: ``fused``,
``foreach``, ``capturable``, ``differentiable``), ``lr_scheduler``, the trainer's gradient clipping and (when both
are numbers) ``seed_everything`` with the checkpoint's run's (the run record's ``config.yaml`` when there is one,
else the checkpoint's hyperparameters) and, when they differ, *forks*:

1. the configured model is built (its arguments win), and the checkpoint's weights are loaded into it (a plain
   layer's weights load into its σReparam replacement function-preservingly: γ = σ(W); a regulariser added with a
   learnable parameter keeps its initial value; a swapped policy loss's call counter (Clip-Cov / KL-Cov's
   ``_extra_state``) starts afresh or is dropped; any other missing or unexpected key is an error);
2. :class:`ForkedResume` adapts the optimizer state before Lightning restores it: the configured hyperparameters
   replace the saved ones, and the moments are kept when the parameter groups still fit and the optimizer is of the
   same kind, else the optimizer and its schedulers start afresh. A scheduler with a closed form (``LambdaLR``
   warmups, cosine, step) is the configured one at the saved position, from the first resumed step, and so is one
   that is a function of the step count only (``SequentialLR``, ``ChainedScheduler``,
   ``CosineAnnealingWarmRestarts``: replayed to the position); others (``ReduceLROnPlateau``): the saved position
   with the configured settings, a learning rate mid-schedule rescaled by new / old; a scheduler the checkpoint's
   run did not have starts at the fork (its step 0);
3. the run is recorded as a new run whose ``meta.json`` names its parent (``forked_from``: record, step, checkpoint,
   changes); the parent's record is left as it was (an unchanged resume continues it, as before).

Everything that changed is printed when the run starts.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning_utilities.core.rank_zero import rank_zero_only

from entrotrain.dashboards.run_reader import short_value
from entrotrain.dashboards.run_record import json_safe

__all__ = [
    "ForkPlan",
    "ForkedResume",
    "IMPLEMENTATION_FLAGS",
    "adapt_training_state",
    "config_changes",
    "fork_plan",
    "fork_run_records",
    "print_plan",
    "state_key_problems",
    "training_state_changes",
]

#: The sections of a LightningCLI configuration that define what is trained (the trainer's may change on a resume).
_COMPARED = ("model", "data", "optimizer", "lr_scheduler")


def _clipping(before: Any, after: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The trainer sections' gradient clipping, the one trainer setting compared (it is part of the update, as
    ``TrainingArguments.max_grad_norm`` is of transformers'; ``max_steps``, devices, precision, logging and
    ``accumulate_grad_batches``, which a resume on fewer devices changes with them, are not), saved and configured:
    ``{"gradient_clip_val": v, "gradient_clip_algorithm": a}`` (a value of 0 or null: off; an algorithm of null:
    ``"norm"``; the algorithm compared only while clipping is on). ``None``: a side without a trainer section or
    without the setting (nothing to compare)."""
    sides = []
    for trainer in (before, after):
        if not isinstance(trainer, Mapping) or "gradient_clip_val" not in trainer:
            return None
        sides.append({"gradient_clip_val": trainer.get("gradient_clip_val") or None,
                      "gradient_clip_algorithm": trainer.get("gradient_clip_algorithm") or "norm"})
    if sides[0]["gradient_clip_val"] is None and sides[1]["gradient_clip_val"] is None:
        for side in sides:
            side.pop("gradient_clip_algorithm")
    return sides[0], sides[1]


def _implementation_flag(change: tuple[str, Any, Any]) -> bool:
    """Whether a configuration change is an optimizer's implementation flag (``optimizer.fused``,
    ``model.optimizer.foreach``: :data:`IMPLEMENTATION_FLAGS`): the same optimizer, not a change."""
    parts = change[0].split(".")
    return len(parts) > 1 and parts[-1] in IMPLEMENTATION_FLAGS and any("optimizer" in p for p in parts[:-1])


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value
    return out


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, before, after)`` for every leaf that differs (``init_args.`` dropped from the names); a list
    (e.g. of regularisers) is one leaf."""
    old = _flatten(json_safe(before), "", {})
    new = _flatten(json_safe(after), "", {})
    # a nested object whose class changed (policy_loss: PPOClipLoss → ClipCovLoss) is one change, both whole: the
    # arguments of two classes do not pair up (one's argument is absent from the other, not null)
    swapped = sorted(key[: -len(".class_path")] for key in old.keys() | new.keys()
                     if key.endswith(".class_path") and "." in key[: -len(".class_path")] and old.get(key) != new.get(key))
    changes = []
    for key in sorted(old.keys() | new.keys()):
        whole = next((p for p in swapped if key == p + ".class_path"), None)
        if whole is not None:
            changes.append((whole.replace("init_args.", ""), _subtree(old, whole), _subtree(new, whole)))
        elif old.get(key) != new.get(key) and not any(key.startswith(p + ".") for p in swapped):
            changes.append((key.replace("init_args.", ""), old.get(key), new.get(key)))
    return changes


def _subtree(flat: Mapping[str, Any], prefix: str) -> Any:
    """``{"class_path", "init_args"}`` of the object at dotted ``prefix`` in a flattened configuration (``None``:
    absent)."""
    inner = {key[len(prefix) + 1:]: value for key, value in flat.items() if key.startswith(prefix + ".")}
    if not inner:
        return flat.get(prefix)
    args = {key[len("init_args."):]: value for key, value in inner.items() if key.startswith("init_args.")}
    return {"class_path": inner.get("class_path"), "init_args": args}


@dataclass
class ForkPlan:
    """A resume whose configuration differs from the checkpoint's: what changed (``(key, before, after)``), the
    record it forks from, and ``step``: the optimizer steps the checkpoint had done (``global_step``)."""

    ckpt_path: str
    step: int | None
    changes: list[tuple[str, Any, Any]]
    parent_record: str | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        where = f" (after {self.step} optimizer steps)" if self.step is not None else ""
        out = [f"entrotrain: resuming from {self.ckpt_path}{where} with a changed configuration; the configured "
               "values are used:"]
        out += [f"    {key}: {short_value(old)} → {short_value(new)}" for key, old, new in self.changes]
        out += [f"  {note}" for note in self.notes]
        if self.parent_record:
            out.append(f"  recorded as a new run forked from {self.parent_record} (left as it was)")
        return out

    def meta(self) -> dict[str, Any]:
        return {"run_dir": self.parent_record, "step": self.step, "ckpt_path": self.ckpt_path,
                "changes": [[key, json_safe(old), json_safe(new)] for key, old, new in self.changes]}


def _new_argument_at_default(change: tuple[str, Any, Any], saved: set[str], config: Mapping[str, Any]) -> bool:
    """Whether ``change`` is an init argument the saved configuration does not have at all (a record written before
    the argument existed) and whose configured value is the class's default: not a change."""
    key, _, new = change
    section, _, name = key.partition(".")
    if key in saved or not name or "." in name:
        return False
    class_path = (config.get(section) or {}).get("class_path") if isinstance(config.get(section), Mapping) else None
    if not isinstance(class_path, str):
        return False
    import importlib
    import inspect

    module, _, cls = class_path.rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), cls)).parameters.get(name)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is not inspect.Parameter.empty and (
        json_safe(parameter.default) == json_safe(new))


def fork_plan(ckpt_path: str, config: Mapping[str, Any]) -> ForkPlan | None:
    """The fork a ``fit`` resuming from ``ckpt_path`` with the configuration dump ``config`` (its ``model``,
    ``data``, ``optimizer``, ``lr_scheduler`` sections, the trainer's gradient clipping and the seed) makes, or
    ``None`` when nothing changed or nothing can be compared (a checkpoint without hyperparameters: a plain resume).
    An optimizer's implementation flag (``fused``, ``foreach``, ...) is no change. A checkpoint written outside
    ``LightningCLI`` (no ``_class_path``) is compared on the model arguments its hyperparameters and the
    configuration both have."""
    from entrotrain.dashboards.run_record import CHECKPOINT_KEY
    from entrotrain.integrations.checkpoint_sources import load_checkpoint_light  # lazily: DESIGN §1 (callbacks
    # import this module through ResumeWithChanges and must not import entrotrain.integrations)

    checkpoint = load_checkpoint_light(ckpt_path)
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint.get(CHECKPOINT_KEY), Mapping) else {}
    parent = Path(str(entry.get("run_dir"))) if entry.get("run_dir") else None
    saved = None
    if parent is not None and (parent / "config.yaml").is_file():
        saved = yaml.safe_load((parent / "config.yaml").read_text())
    if isinstance(saved, Mapping) and "model" in saved:
        before = {key: saved.get(key) for key in _COMPARED}
        after = {key: config.get(key) for key in _COMPARED}
        clipping = _clipping(saved.get("trainer"), config.get("trainer"))
        if clipping is not None:
            before["trainer"], after["trainer"] = clipping
        seeds = saved.get("seed_everything"), config.get("seed_everything")
        if all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):  # True: a drawn seed
            before["seed_everything"], after["seed_everything"] = seeds  # a new seed: new data order, new dropout
    else:  # no record: the module's and datamodule's saved hyperparameters
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)  # LightningCLI's own entries, not the module's arguments
        class_path = hparams.pop("_class_path", None)
        if not hparams:
            return None
        model = config.get("model") or {}
        init_args = {k: v for k, v in (model.get("init_args") or {}).items() if k in hparams}
        if class_path is not None:
            before = {"model": {"class_path": class_path, "init_args": hparams}}
            after = {"model": {"class_path": model.get("class_path"), "init_args": init_args}}
        else:  # saved by a Trainer outside LightningCLI: no class named, the arguments both sides have compared
            before = {"model": {"init_args": {k: hparams[k] for k in init_args}}}
            after = {"model": {"init_args": init_args}}
    absent = {key.replace("init_args.", "") for key in _flatten(json_safe(before), "", {})}
    changes = [c for c in config_changes(before, after)
               if not _new_argument_at_default(c, absent, after) and not _implementation_flag(c)]
    if not changes:
        return None
    return new_plan(str(ckpt_path), checkpoint, changes)


def parent_record(checkpoint: Mapping[str, Any]) -> str | None:
    """The run record a checkpoint names (``checkpoint["entrotrain_run_record"]["run_dir"]``) when it still exists
    (holds a ``meta.json``), else ``None``."""
    from entrotrain.dashboards.run_record import CHECKPOINT_KEY

    entry = checkpoint.get(CHECKPOINT_KEY)
    run_dir = entry.get("run_dir") if isinstance(entry, Mapping) else None
    return str(Path(str(run_dir))) if run_dir and (Path(str(run_dir)) / "meta.json").is_file() else None


def new_plan(ckpt_path: str, checkpoint: Mapping[str, Any], changes: list[tuple[str, Any, Any]]) -> ForkPlan:
    """The :class:`ForkPlan` of resuming from ``checkpoint`` (loaded from ``ckpt_path``) with ``changes``: its step
    (``global_step``: optimizer steps done, as ModelCheckpoint's ``step=N`` names count them) and parent record."""
    step = checkpoint.get("global_step")
    return ForkPlan(str(ckpt_path), int(step) if step is not None else None, changes, parent_record(checkpoint))


def _other_kind(saved: Mapping[str, Any], optimizer: Any) -> bool:
    """Whether a saved optimizer state is another kind of optimizer's (SGD's ``momentum`` where AdamW has ``betas``):
    each side's param groups have hyperparameters the other lacks. (One side only: a newer torch's added flag.)"""
    groups = saved.get("param_groups") or []
    if not groups or not optimizer.param_groups:
        return False
    old = set(groups[0]) - {"params", "initial_lr"}
    new = set(optimizer.param_groups[0]) - {"params", "initial_lr"}
    return bool(old - new) and bool(new - old)


def _scheduled_lrs(scheduler: Any, state: Mapping[str, Any]) -> list[float] | None:
    """The learning rates the *configured* ``scheduler`` gives at the saved position ``state["last_epoch"]`` (a
    changed warmup length is in effect from the first resumed step, not one step late), or ``None`` when it has no
    closed form (a chained or metric-driven scheduler: the saved rate, rescaled, is kept)."""
    last, base = state.get("last_epoch"), state.get("base_lrs")
    if not isinstance(last, int) or not isinstance(base, list):
        return None
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # the lambdas are the configured ones (not saved)
        return [float(b) * float(f(last)) for b, f in zip(base, scheduler.lr_lambdas)]
    if isinstance(scheduler, (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)):
        # a function of the step and the configured settings (total_steps, phases, max_lr, cycle sizes)
        from torch.optim.lr_scheduler import _enable_get_lr_call

        scheduler.last_epoch = last
        with _enable_get_lr_call(scheduler):
            return [float(lr) for lr in scheduler.get_lr()]
    closed = getattr(scheduler, "_get_closed_form_lr", None)
    if closed is None:
        return None
    scheduler.base_lrs, scheduler.last_epoch = list(base), last  # a throwaway instance (ForkedResume built it)
    return [float(lr) for lr in closed()]


class ForkedResume(Callback):
    """Adapts a checkpoint's optimizer and scheduler states to the configured ones before Lightning restores them
    (module docstring, step 2); prints the plan once the checkpoint is loaded (rank zero). ``entrotrain fit`` adds it
    when :func:`fork_plan` found changes; :class:`~entrotrain.callbacks.resume_with_changes.ResumeWithChanges` does
    the same for a plain ``Trainer`` (both through :func:`adapt_training_state`)."""

    def __init__(self, plan: ForkPlan) -> None:
        self.plan = plan
        self._strict: Any = None  # the module's own strict_loading while this fork relaxes it

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Lightning loads the weights non-strictly for this fork (a regulariser added with a learnable parameter has
        none in the checkpoint); :meth:`_check_state_keys` then refuses any other missing or unexpected key."""
        if stage == "fit" and pl_module.strict_loading and not trainer.strategy.restore_checkpoint_after_setup:
            self._strict = (pl_module._strict_loading,)
            pl_module.strict_loading = False

    def _check_state_keys(self, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """The keys a strict load would have refused, but a new regulariser's parameters and σReparam's filled-in
        γ, u, σ (:func:`state_key_problems`): a ``load_state_dict``-style error."""
        if self._strict is None:
            return
        pl_module._strict_loading, self._strict = self._strict[0], None
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            return
        missing, unexpected, new = state_key_problems(pl_module, state)
        if missing or unexpected:
            parts = [f"{what} key(s) in state_dict: " + ", ".join(f'"{k}"' for k in keys)
                     for what, keys in (("Missing", missing), ("Unexpected", unexpected)) if keys]
            raise RuntimeError(f"Error(s) in loading state_dict for {type(pl_module).__name__}:\n\t" + "\n\t".join(parts))
        if new:
            self.plan.notes.append(f"new in the model, from their initial values: {', '.join(new)}")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check_state_keys(pl_module, checkpoint)
        configured = configured_optimizers(pl_module)
        finetuning_groups(trainer, pl_module, checkpoint, configured[0])
        adapt_training_state(self.plan, pl_module, checkpoint, configured)
        print_plan(self.plan)


def configured_optimizers(pl_module: LightningModule) -> tuple[list[Any], list[Any]]:
    """The module's freshly configured optimizers and scheduler configs (``configure_optimizers`` called once more,
    on throwaway objects: the module's parameters are not touched)."""
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    return _init_optimizers_and_lr_schedulers(pl_module)


def finetuning_groups(trainer: Trainer, pl_module: LightningModule, checkpoint: Mapping[str, Any],
                      optimizers: list[Any]) -> None:
    """Lightning's ``BaseFinetuning`` callbacks (``BackboneFinetuning``) add a param group as they unfreeze a module,
    and put those groups back at the resume's ``on_fit_start`` (from their state in the checkpoint), before the
    optimizer state is restored: the configured ``optimizers`` (:func:`configured_optimizers`) get the same added
    groups, so that they are compared with (and adapted into) the groups Lightning will restore."""
    from lightning.pytorch.callbacks import BaseFinetuning

    states = checkpoint.get("callbacks") if isinstance(checkpoint.get("callbacks"), Mapping) else {}
    named = dict(pl_module.named_parameters())
    for callback in trainer.callbacks:
        state = states.get(callback.state_key) if isinstance(callback, BaseFinetuning) else None
        metadata = state.get("internal_optimizer_metadata", state) if isinstance(state, Mapping) else None
        if not isinstance(metadata, Mapping):
            continue
        for index, optimizer in enumerate(optimizers):
            groups = metadata.get(index) or []
            try:
                for group in BaseFinetuning._apply_mapping_to_param_groups(groups[len(optimizer.param_groups):], named):
                    optimizer.add_param_group(group)
            except (KeyError, ValueError):  # a parameter renamed or already in a group: compared as configured
                continue


def sigma_reparam_removed(unexpected: list[str] | tuple[str, ...]) -> str:
    """The sentence that says why a resume cannot drop σReparam, when the checkpoint's keys the model has no place
    for include a σReparam layer's own (``gamma``, ``u``, ``sigma``); ``""`` otherwise. The caller ends it (how to
    keep it on)."""
    if not any(re.search(r"\.(gamma|u|sigma)$", key) for key in unexpected):
        return ""
    return (" σReparam cannot be removed on a resume: the checkpoint's layers are σReparam layers (their γ, u and σ "
            "have no place in a plain layer); keep it on")


def state_key_problems(pl_module: LightningModule, state: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, new)``: the keys of ``pl_module.state_dict()`` a load of the checkpoint's ``state``
    leaves unfilled, the checkpoint's keys the module has no place for, and the missing keys that belong to a
    :class:`~entrotrain.regularizers.composition.Regularizer` (a regulariser added at the resume: they keep their
    initial values). σReparam's ``gamma``, ``u``, ``sigma`` are not missing when the layer's plain ``weight`` is in
    ``state`` (:class:`~entrotrain.regularizers.sigma_reparam.SigmaReparamLinear` loads it function-preservingly).
    The ``_extra_state`` (call counter) of a policy loss is new when the checkpoint's policy loss had none (a fork
    from ``PPOClipLoss`` to ``ClipCovLoss``: the counter starts at 0) and not unexpected when the configured one has
    none (the other way)."""
    from entrotrain.regularizers.composition import Regularizer
    from entrotrain.regularizers.policy_loss import PolicyLoss
    from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear

    modules = dict(pl_module.named_modules())
    regularizers = tuple(f"{name}." for name, m in modules.items() if name and isinstance(m, Regularizer))
    counters = {f"{name}._extra_state" for name, m in modules.items() if name and isinstance(m, PolicyLoss)}
    regularizers += tuple(counters)
    expected = set(pl_module.state_dict().keys())

    def filled(key: str) -> bool:
        owner, _, leaf = key.rpartition(".")
        return (leaf in ("gamma", "u", "sigma") and isinstance(modules.get(owner), SigmaReparamLinear)
                and f"{owner}.weight" in state)

    missing = sorted(k for k in expected - set(state) if not filled(k))
    new = [k for k in missing if k.startswith(regularizers)]
    missing = [k for k in missing if not k.startswith(regularizers)]
    unexpected = sorted(k for k in set(state) - expected if k not in counters)
    return missing, unexpected, new


def sigma_reparam_filled(pl_module: LightningModule, state: Mapping[str, Any]) -> list[str]:
    """The module's σReparam layers whose checkpoint entry is a plain layer's (``weight`` without ``gamma``): σReparam
    applied at the resume."""
    from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear

    return [name for name, m in pl_module.named_modules() if isinstance(m, SigmaReparamLinear)
            and f"{name}.weight" in state and f"{name}.gamma" not in state]


def _cycled(group: Mapping[str, Any]) -> frozenset[str]:
    """The hyperparameters of a param group a scheduler moves at every step besides ``lr``: ``betas`` /
    ``momentum`` under ``OneCycleLR`` / ``CyclicLR`` with ``cycle_momentum`` (they put ``max_momentum`` and
    ``base_momentum`` into the group). A saved value of these is a position in the cycle, not a setting."""
    return frozenset({"betas", "momentum"}) if "max_momentum" in group or "base_momentum" in group else frozenset()


def _is_swalr(state: Any) -> bool:
    """Whether a saved scheduler state is ``torch.optim.swa_utils.SWALR``'s (Lightning's
    ``StochasticWeightAveraging`` puts one in place of the configured schedulers once averaging starts)."""
    return isinstance(state, Mapping) and "anneal_epochs" in state and "_anneal_strategy" in state


def _pair(value: Any) -> bool:
    """Whether ``value`` is Adam's ``betas`` (two numbers)."""
    return isinstance(value, (tuple, list)) and len(value) == 2


def _scheduler_settings(scheduler: Any) -> frozenset[str]:
    """The entries of ``scheduler.state_dict()`` that are its settings: those named as its class's constructor
    arguments (``T_max``, ``eta_min``, ``step_size``, ``gamma``, ``milestones``, ``factor``, ``patience``, ...).
    The rest is position and what it has seen (``last_epoch``, ``_last_lr``, ReduceLROnPlateau's ``best``, a
    SequentialLR's children's states)."""
    import inspect

    try:
        return frozenset(inspect.signature(type(scheduler).__init__).parameters) - {"self", "optimizer", "verbose", "last_epoch"}
    except (TypeError, ValueError):
        return frozenset()


#: An object's default repr (``<Warmup object at 0x7f...>``): differs between two objects of equal settings.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _setting(value: Any) -> Any:
    """A scheduler setting as compared: a function by its qualified name, an object printed with its address (a
    callable instance: the checkpoint's is unpickled as another object) by its class and attributes, anything else
    as :func:`json_safe` writes it."""
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    if _ADDRESS.search(repr(value)) and hasattr(value, "__dict__"):
        attributes = ", ".join(f"{key}={json_safe(item)!r}" for key, item in sorted(vars(value).items()))
        return f"{type(value).__qualname__}({attributes})"
    return json_safe(value)


def _group_lr(group: Mapping[str, Any]) -> Any:
    """A param group's configured learning rate: its scheduler's initial rate when it has one."""
    return group.get("initial_lr", group.get("lr"))


#: Param-group entries that choose how torch computes the step, not what it computes: AdamW saved as the for-loop
#: implementation and resumed as ``fused=True`` (transformers 5's default ``adamw_torch_fused``) or ``foreach`` is the
#: same optimizer. ``capturable`` (CUDA-graph capture) and ``differentiable`` (autograd through the step) alike.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _same_setting(key: str, group: Mapping[str, Any], fresh: Mapping[str, Any]) -> bool:
    """Whether a param-group entry ``key`` compares equal for :func:`training_state_changes`: an implementation flag
    (:data:`IMPLEMENTATION_FLAGS`) always; ``decoupled_weight_decay`` (Adam ↔ AdamW) when both weight decays are 0
    (the two are then the same algorithm)."""
    if key in IMPLEMENTATION_FLAGS:
        return True
    if key == "decoupled_weight_decay":
        return group.get("weight_decay") == 0 and fresh.get("weight_decay") == 0
    return False


def _numbers(values: Any) -> set[Any]:
    """The numbers among ``values`` (a mapping of hyperparameters, nested), as :func:`json_safe` writes them."""
    out: set[Any] = set()
    for value in _flatten(json_safe(values), "", {}).values():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.add(value)
    return out


def unclaimed_shapes(pl_module: Any, optimizers: list[Any]) -> list[tuple[int, ...]]:
    """The shapes of ``pl_module``'s parameters that no param group of ``optimizers`` holds (a frozen backbone a
    callback adds to the optimizer later, as ``BaseFinetuning`` does); ``[]`` without a module."""
    if pl_module is None:
        return []
    claimed = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    return [tuple(p.shape) for p in pl_module.parameters() if id(p) not in claimed]


def _added_groups(saved: Mapping[str, Any], optimizer: Any, unclaimed: list[tuple[int, ...]] | None) -> bool:
    """Whether the saved optimizer's param groups are the configured ones plus groups a callback added during the
    checkpoint's run, before the optimizer state is restored (in ``on_fit_start``; Lightning restores the state
    into the groups as they are then): the configured groups' sizes are the saved first ones', and the saved extra
    groups' parameters fit the module's parameters no configured group holds (``unclaimed``, :func:`unclaimed_shapes`:
    as many or more, and each saved moment's shape one of theirs). Parameters the configuration moved out of a group
    (a real change) are in a configured group: not unclaimed."""
    groups = list(saved.get("param_groups") or [])
    n = len(optimizer.param_groups)
    if not unclaimed or len(groups) <= n:
        return False
    if [len(g["params"]) for g in groups[:n]] != [len(g["params"]) for g in optimizer.param_groups]:
        return False
    extra = [index for g in groups[n:] for index in g["params"]]
    if len(extra) > len(unclaimed):
        return False
    pool = list(unclaimed)
    states = saved.get("state") or {}
    for index in extra:
        shapes = {tuple(v.shape) for v in (states.get(index) or {}).values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not shapes:
            continue  # no moments saved (SGD without momentum): counted only
        if len(shapes) != 1 or next(iter(shapes)) not in pool:
            return False
        pool.remove(next(iter(shapes)))
    return True


def training_state_changes(checkpoint: Mapping[str, Any], optimizers: list[Any], schedulers: list[Any],
                           hyperparameters: Mapping[str, Any] | None = None,
                           unclaimed: list[tuple[int, ...]] | None = None,
                           recorded_rates: list[list[Any]] | None = None) -> list[tuple[str, Any, Any]]:
    """``(key, saved, configured)`` for every hyperparameter where the freshly configured ``optimizers`` /
    ``schedulers`` (:func:`configured_optimizers`) differ from the checkpoint's ``optimizer_states`` /
    ``lr_schedulers``, without changing anything: ``optimizer.lr`` (a scheduled group's initial rate),
    ``optimizer.betas``, ``optimizer.weight_decay``, ... (first differing group), ``optimizer`` (another kind),
    ``optimizer.param_groups`` (their sizes), ``lr_scheduler`` (how many), ``lr_scheduler.T_max``, ... (the
    entries of a scheduler's ``state_dict`` named as its constructor's arguments: not its position, nor what it has
    seen). What a scheduler moves (``lr``, a cycled ``betas`` / ``momentum``) is compared at its configured value.
    A ``LambdaLR``'s function is not in a checkpoint: its change shows only through the module's hyperparameters.
    Several optimizers or schedulers are named ``optimizer1``, ``lr_scheduler1``, ... after the first. A
    weights-only checkpoint (no ``optimizer_states``) has nothing to compare: ``[]``.

    Not changes: an implementation flag (``fused``, ``foreach``, ``capturable``, ``differentiable``:
    :data:`IMPLEMENTATION_FLAGS`); Adam ↔ AdamW when both weight decays are 0; the rate of an unscheduled group
    whose configured rate is the value of one of ``hyperparameters`` (the run's, known unchanged): the saved rate
    is then a position that code moved, e.g. a manual warmup in ``LightningModule.optimizer_step`` (Lightning's
    documented ``pg["lr"] = scale * self.hparams.lr``), as under ``ReduceLROnPlateau``. A rate set in code that
    no hyperparameter holds is still compared. Saved param groups beyond the configured ones whose parameters are
    the module's that no configured group holds (``unclaimed``: :func:`unclaimed_shapes`) are a callback's, added
    before the restore: not compared. ``recorded_rates``: the checkpoint's run's configured rates
    (``[optimizer][group]``, as :class:`~entrotrain.callbacks.resume_with_changes.ResumeWithChanges` records them
    when the optimizers are built): an unscheduled group's configured rate is compared with the recorded one, not
    with the saved (running) rate, whatever moved it. A ``SequentialLR`` / ``ChainedScheduler`` is compared on its
    ``milestones`` and its children's settings (``lr_scheduler.schedulers[0].total_iters``), and how many
    children it has."""
    changes: list[tuple[str, Any, Any]] = []
    if "optimizer_states" not in checkpoint:  # a weights-only checkpoint: nothing to compare
        return changes
    saved = list(checkpoint.get("optimizer_states") or [])
    # a ReduceLROnPlateau's rate is a position too (it cuts the rate on a plateau) but it keeps no initial rate to
    # compare: its groups' rates are not compared (a changed rate shows through the hyperparameters)
    plateau = [c.scheduler.optimizer for c in schedulers
               if isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)]
    # so is the rate of an unscheduled group that a collapse guard lowered (action="reduce_lr")
    callbacks = checkpoint.get("callbacks") or {}
    lowered = any(str(key).startswith("EntropyCollapseGuard") and isinstance(state, Mapping)
                  and (state.get("lr_reductions") or 0) > 0 for key, state in callbacks.items())
    rates = _numbers(hyperparameters) if hyperparameters else set()
    for i, (state, optimizer) in enumerate(zip(saved, optimizers)):
        name = "optimizer" if i == 0 else f"optimizer{i}"
        groups = state.get("param_groups") or []
        if _other_kind(state, optimizer):
            changes.append((name, "another optimizer", type(optimizer).__name__))
            continue
        sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
        if sizes[0] != sizes[1] and not _added_groups(state, optimizer, unclaimed):
            changes.append((f"{name}.param_groups", sizes[0], sizes[1]))
        seen: set[str] = set()
        for j, (group, fresh) in enumerate(zip(groups, optimizer.param_groups)):
            recorded = _recorded(recorded_rates, i, j)
            # a guard lowers a OneCycleLR's group bounds with its rate (or the cycle would bring the rate back)
            cycle_lowered = lowered and "max_lr" in group
            moved = (cycle_lowered
                     # a ReduceLROnPlateau's (on accelerate's wrapped optimizer too)
                     or any(o in (optimizer, getattr(optimizer, "optimizer", None)) for o in plateau)
                     or "swa_lr" in group  # Lightning's StochasticWeightAveraging's SWALR drives it
                     or (lowered and "initial_lr" not in group)  # a guard's reductions (a schedule's base: kept)
                     # code moves it (a manual warmup) from a configured rate an unchanged hyperparameter gives
                     or ("initial_lr" not in group and "initial_lr" not in fresh and json_safe(fresh["lr"]) in rates))
            pairs = {} if moved else {"lr": (_group_lr(group), _group_lr(fresh))}
            if recorded is not None and "initial_lr" not in group and "initial_lr" not in fresh:
                pairs = {"lr": (recorded, fresh["lr"])}  # configured against configured: exact
            cycled = _cycled(fresh) | _cycled(group)
            # a key the saved group lacks is a flag the saving torch did not have (torch fills in its default)
            bounds = ("max_lr", "min_lr") if cycle_lowered else ()
            pairs.update({key: (group.get(key), value) for key, value in fresh.items()
                          if key not in ("params", "lr", "initial_lr", *bounds) and key not in cycled and key in group
                          and not _same_setting(key, group, fresh)})
            if "betas" in cycled and _pair(group.get("betas")) and _pair(fresh.get("betas")):  # beta1 only cycles
                pairs["beta2"] = (group["betas"][1], fresh["betas"][1])
            for key, (old, new) in pairs.items():
                if key not in seen and json_safe(old) != json_safe(new):
                    seen.add(key)
                    changes.append((f"{name}.{key}", json_safe(old), json_safe(new)))
    if len(saved) != len(optimizers):
        changes.append(("optimizers", len(saved), len(optimizers)))
    states = list(checkpoint.get("lr_schedulers") or [])
    if any(_is_swalr(state) for state in states):
        # StochasticWeightAveraging put its SWALR in place of the configured schedulers (and restores it itself):
        # the configured ones cannot be compared with the saved state
        states, schedulers = [], []
    if len(states) != len(schedulers):
        changes.append(("lr_scheduler", len(states) or None,
                        [type(c.scheduler).__name__ for c in schedulers] or None))
    for i, (state, config) in enumerate(zip(states, schedulers)):
        name = "lr_scheduler" if i == 0 else f"lr_scheduler{i}"
        found = _scheduler_changes(name, config.scheduler, state, config.scheduler.state_dict())
        # a collapse guard lowers a cosine schedule's floor with its rate (or the rate would climb back to it)
        changes += [change for change in found if not (lowered and change[0].endswith(".eta_min"))]
    return changes


def _recorded(rates: Any, i: int, j: int) -> Any:
    """``rates[i][j]`` when it is a number, else ``None``."""
    try:
        value = rates[i][j]
    except (TypeError, IndexError, KeyError):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def configured_rates(optimizers: list[Any]) -> list[list[Any]]:
    """Each param group's configured rate (its schedule's initial rate when it has one), optimizer by optimizer,
    as :func:`json_safe` writes it: what ``training_state_changes(recorded_rates=...)`` compares."""
    return [[json_safe(_group_lr(group)) for group in getattr(o, "param_groups", [])] for o in optimizers]


def _children(scheduler: Any) -> list[Any] | None:
    """The schedulers a ``SequentialLR`` / ``ChainedScheduler`` runs (``None``: not a composite)."""
    children = getattr(scheduler, "_schedulers", None)
    return list(children) if isinstance(children, (list, tuple)) else None


def _scheduler_changes(name: str, scheduler: Any, state: Mapping[str, Any], fresh: Mapping[str, Any]
                       ) -> list[tuple[str, Any, Any]]:
    """``(key, saved, configured)`` for every setting of ``scheduler`` (:func:`_scheduler_settings`) that differs
    between the saved ``state`` and the configured ``fresh`` one; a composite's ``milestones`` (saved as
    ``_milestones``) and its children (saved as ``_schedulers``), each compared the same way."""
    changes: list[tuple[str, Any, Any]] = []
    children = _children(scheduler)
    settings = _scheduler_settings(scheduler)
    if children is not None:
        settings -= {"schedulers", "milestones"}
        old, new = _setting(state.get("_milestones")), _setting(fresh.get("_milestones"))
        if old != new:
            changes.append((f"{name}.milestones", old, new))
        saved = state.get("_schedulers")
        configured = fresh.get("_schedulers")
        if not isinstance(saved, list) or not isinstance(configured, list) or len(saved) != len(children):
            changes.append((f"{name}.schedulers", len(saved) if isinstance(saved, list) else None,
                            [type(child).__name__ for child in children]))
        else:
            for j, (child, old_child, new_child) in enumerate(zip(children, saved, configured)):
                if isinstance(old_child, Mapping) and isinstance(new_child, Mapping):
                    changes += _scheduler_changes(f"{name}.schedulers[{j}]", child, old_child, new_child)
    for key in sorted(settings & (set(fresh) | set(state))):
        old, new = _setting(state.get(key)), _setting(fresh.get(key))
        if old != new:
            changes.append((f"{name}.{key}", old, new))
    return changes


def _adopt_settings(scheduler: Any, state: dict[str, Any], fresh: Mapping[str, Any]) -> None:
    """The configured settings of ``scheduler`` into its saved ``state``, its position kept: its constructor's
    settings; a composite's ``milestones`` and, child by child, their settings and ``base_lrs``."""
    children = _children(scheduler)
    if children is not None:
        if "_milestones" in fresh and "_milestones" in state:
            state["_milestones"] = list(fresh["_milestones"])
        saved, configured = state.get("_schedulers"), fresh.get("_schedulers")
        if isinstance(saved, list) and isinstance(configured, list) and len(saved) == len(configured) == len(children):
            for child, old_child, new_child in zip(children, saved, configured):
                if isinstance(old_child, dict) and isinstance(new_child, Mapping):
                    if "base_lrs" in old_child and "base_lrs" in new_child:
                        old_child["base_lrs"] = new_child["base_lrs"]
                    _adopt_settings(child, old_child, new_child)
    for key in (_scheduler_settings(scheduler) - {"schedulers", "milestones"}) & set(fresh) & set(state):
        state[key] = fresh[key]


def adapt_training_state(plan: ForkPlan, pl_module: LightningModule, checkpoint: dict[str, Any],
                         configured: tuple[list[Any], list[Any]] | None = None) -> None:
    """Rewrite the checkpoint's ``optimizer_states`` / ``lr_schedulers`` in place to the configured ones before
    Lightning restores them (module docstring, step 2), adding what was done to ``plan.notes``. ``configured``: the
    :func:`configured_optimizers` of ``pl_module`` when already built."""
    optimizers, schedulers = configured if configured is not None else configured_optimizers(pl_module)
    saved = checkpoint.get("optimizer_states") or []
    sizes = [[len(g["params"]) for g in o.param_groups] for o in optimizers]
    other = [type(o).__name__ for o, s in zip(optimizers, saved) if _other_kind(s, o)]
    unclaimed = unclaimed_shapes(pl_module, optimizers)
    # groups a callback added (kept as saved: Lightning restores them into the groups it adds again) are no misfit
    afresh = [i for i, (o, s) in enumerate(zip(optimizers, saved)) if _other_kind(s, o)
              or ([len(g["params"]) for g in s.get("param_groups", [])] != sizes[i]
                  and not _added_groups(s, o, unclaimed))]
    if len(saved) != len(optimizers) or len(afresh) == len(optimizers) > 0:
        checkpoint["optimizer_states"] = [o.state_dict() for o in optimizers]
        checkpoint["lr_schedulers"] = [c.scheduler.state_dict() for c in schedulers]
        what = f"optimizer changed (now {', '.join(other)})" if other else "optimizer's parameters changed"
        plan.notes.append(f"the {what}: its state (moments) and schedulers start afresh; the weights and "
                          "the step count are the checkpoint's")
        return
    states = checkpoint.get("lr_schedulers") or []
    indices = [_optimizer_index(config.scheduler, optimizers) for config in schedulers]
    for i in afresh:  # another optimizer's moments (a GAN's generator, when σReparam went into its critic) are kept
        name = "optimizer" if i == 0 else f"optimizer{i}"
        what = (f"{name} changed (now {type(optimizers[i]).__name__})" if _other_kind(saved[i], optimizers[i])
                else f"{name}'s parameters changed")
        saved[i] = optimizers[i].state_dict()
        for j, config in enumerate(schedulers):
            if indices[j] == i and j < len(states):
                states[j] = config.scheduler.state_dict()
        plan.notes.append(f"the {what}: its state (moments) and schedulers start afresh; the other optimizers keep "
                          "the checkpoint's")
    kept = [i for i in range(len(optimizers)) if i not in afresh]
    _configured_hyperparameters(plan, [saved[i] for i in kept], [optimizers[i] for i in kept])
    for state, config, index in zip(states, schedulers, indices):
        if index in afresh:
            continue
        fresh = config.scheduler.state_dict()
        if "base_lrs" in state and "base_lrs" in fresh:
            state["base_lrs"] = fresh["base_lrs"]
        lrs = _scheduled_lrs(config.scheduler, state)
        replayed = (None if lrs is not None or pl_module is None or _is_swalr(state)
                    else _replayed(config.scheduler, state))
        if replayed is not None:  # no closed form, a function of the step: the configured one stepped to the position
            state.clear()
            state.update(replayed[0])
            if index is not None and index < len(saved):
                for group, lr in zip(saved[index].get("param_groups", []), replayed[1]):
                    group["lr"] = lr
            continue
        if lrs is None:  # no closed form: the saved position, with the configured settings (factor, patience, ...)
            _adopt_settings(config.scheduler, state, fresh)
            continue
        # the configured scheduler (its T_max, step_size, lambdas' settings: Lightning would restore the
        # saved ones) at the saved position
        position = {key: state[key] for key in ("last_epoch", "_step_count") if key in state}
        state.clear()
        state.update({**fresh, **position})
        if "_last_lr" in fresh:
            state["_last_lr"] = list(lrs)
        if index is not None and index < len(saved):
            for group, lr in zip(saved[index].get("param_groups", []), lrs):
                group["lr"] = lr


#: The most steps :func:`_replayed` replays (beyond: the saved position with the configured settings).
_REPLAY_LIMIT = 1_000_000


def _position(state: Mapping[str, Any]) -> int | None:
    """A scheduler state's step count: its ``last_epoch``, or (a ``ChainedScheduler``, which keeps none) its first
    child's."""
    last = state.get("last_epoch")
    if last is None and isinstance(state.get("_schedulers"), list) and state["_schedulers"]:
        first = state["_schedulers"][0]
        last = first.get("last_epoch") if isinstance(first, Mapping) else None
    return last if isinstance(last, int) and not isinstance(last, bool) else None


def _replayed(scheduler: Any, state: Mapping[str, Any]) -> tuple[dict[str, Any], list[float]] | None:
    """The configured ``scheduler`` (a throwaway, on its throwaway optimizer) stepped from its start to the saved
    position: its ``state_dict`` and its optimizer's rates there. For the schedulers without a closed form that are
    a function of the step count only: ``SequentialLR``, ``ChainedScheduler``, ``CosineAnnealingWarmRestarts``, a
    chainable scheduler. ``None``: a metric-driven one (``ReduceLROnPlateau``), no position, more than
    :data:`_REPLAY_LIMIT` steps, or a ``step()`` that fails."""
    import warnings

    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or not hasattr(scheduler, "optimizer"):
        return None
    last, start = _position(state), _position(scheduler.state_dict())
    if last is None or start is None or not 0 <= last - start <= _REPLAY_LIMIT:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no step is trained
            for _ in range(last - start):
                scheduler.step()
    except Exception:  # noqa: BLE001 - a scheduler whose step needs more: the saved position, configured settings
        return None
    return scheduler.state_dict(), [float(group["lr"]) for group in scheduler.optimizer.param_groups]


def _optimizer_index(scheduler: Any, optimizers: list[Any]) -> int | None:
    """The position in ``optimizers`` of the optimizer ``scheduler`` drives (``None``: not among them)."""
    return next((i for i, o in enumerate(optimizers) if scheduler.optimizer is o
                 or scheduler.optimizer is getattr(o, "optimizer", None)), None)  # accelerate's wrap


def _configured_hyperparameters(plan: ForkPlan, saved: list[dict[str, Any]], optimizers: list[Any]) -> None:
    """The configured hyperparameters into the saved param groups (moments kept); the learning rate of a group
    under a scheduler is rescaled by new / old initial rate, so the schedule keeps its position."""
    changed: dict[str, tuple[Any, Any]] = {}
    added: float | None = None  # the first resumed step's rate under a scheduler the checkpoint's run had not
    for state, optimizer in zip(saved, optimizers):
        for group, fresh in zip(state.get("param_groups", []), optimizer.param_groups):
            scheduled = "initial_lr" in fresh and "initial_lr" in group
            if "initial_lr" in fresh and "initial_lr" not in group:  # a new schedule starts at the fork
                added = fresh["lr"] if added is None else added
                if group.get("lr") != fresh["initial_lr"]:
                    changed.setdefault("lr", (group.get("lr"), fresh["initial_lr"]))
                group["lr"] = fresh["lr"]
                scheduled = True
            cycled = _cycled(fresh) | _cycled(group)
            for key, value in fresh.items():
                if key == "betas" and key in cycled and _pair(value) and _pair(group.get(key)):
                    if group[key][1] != value[1]:  # OneCycleLR / CyclicLR move beta1 only: beta2 is the configured
                        changed.setdefault("beta2", (group[key][1], value[1]))
                        group[key] = (group[key][0], value[1])
                    continue
                if key in ("params", "lr") or key in cycled or group.get(key) == value:
                    continue
                if key == "initial_lr" and group.get("initial_lr"):  # same place in the schedule, new peak
                    changed.setdefault("lr", (group["initial_lr"], value))
                    group["lr"] = group["lr"] * value / group["initial_lr"]
                elif key != "initial_lr" and key in group and not _same_setting(key, group, fresh):
                    # not a scheduler's bookkeeping, nor a newer torch's flag, nor an implementation flag (the
                    # configured one is used, unlisted)
                    changed.setdefault(key, (group.get(key), value))
                group[key] = value
            if not scheduled and group.get("lr") != fresh["lr"]:
                changed.setdefault("lr", (group.get("lr"), fresh["lr"]))
                group["lr"] = fresh["lr"]
    if changed:
        listed = ", ".join(f"{key} {short_value(json_safe(old))} → {short_value(json_safe(new))}"
                           for key, (old, new) in changed.items())
        plan.notes.append(f"optimizer: {listed}; its moments are the checkpoint's")
    if added is not None:
        plan.notes.append(f"a learning-rate schedule the checkpoint's run did not have starts at the fork "
                          f"(its step 0: lr {float(added):.4g} at the first resumed step)")


def fork_run_records(loggers: list[Any], plan: ForkPlan) -> None:
    """Make every :class:`~entrotrain.dashboards.run_record.RunRecordLogger` among ``loggers`` a new run forked from
    ``plan``'s checkpoint: it does not continue the record the checkpoint names (left as it was), and its
    ``meta.json`` names its parent (``forked_from``: record, step, checkpoint, changes). Call it before the record
    resumes (before Lightning calls the callbacks' ``on_load_checkpoint``); writes on rank zero only."""
    from entrotrain.dashboards.run_record import RunRecordLogger

    for logger in loggers:
        if isinstance(logger, RunRecordLogger):
            logger.resume = False
            logger.set_meta(forked_from=plan.meta())


@rank_zero_only
def print_plan(plan: ForkPlan) -> None:
    """Print ``plan.lines()`` (rank zero)."""
    print("\n".join(plan.lines()))
