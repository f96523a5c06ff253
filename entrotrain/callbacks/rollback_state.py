"""The training state a collapse guard rolls back to: the model's and the optimizers' state at the last good
observation, held in host memory (``EntropyCollapseGuard(action="rollback")``).

Rolling back past an instability and going on at a lower learning rate is how large runs survive a loss spike or a
collapse: PaLM (Chowdhery et al., 2022, §5.1) "restarted training from a checkpoint roughly 100 steps before the spike
started, and skipped roughly 200–500 data batches"; OPT-175B (Zhang et al., 2022, §2.5) rolled back to an earlier
checkpoint and lowered the learning rate. Attention-entropy collapse does not heal by itself (Zhai et al., 2023):
once the heads are one-hot, a lower learning rate keeps them so; the weights from before the fall are the cure's
starting point.

What rolls back, and what does not:

- **Rolls back**: every tensor of ``model.state_dict()`` (parameters and persistent buffers: σReparam's ``u``,
  BatchNorm statistics) and every optimizer's per-parameter state (Adam's moments and step counts), and the value of
  a parameter an optimizer steps outside the model (a loop that watches the generator with the discriminator's
  optimizer too, a learnable temperature kept outside any module), which its moments must match. A parameter that
  had no optimizer state then has none now (it reinitialises at its next step, as it did then). Gradients are
  cleared: they belong to the trajectory that was abandoned. The optimizer state some optimizers keep in their param
  groups (Prodigy's step-size estimate ``d``, the schedule-free optimizers' ``k`` and ``weight_sum``) rolls back too:
  every number or tensor entry of a group except ``params`` and the rates the guard and the schedulers own (``lr``,
  ``initial_*``, OneCycleLR's / CyclicLR's bounds and ``momentum``, ``swa_lr``); a schedule-free state taken in one
  mode (``train`` / ``eval``) is switched to the current one after the restore
  (:mod:`~entrotrain.callbacks.rollback_groups`).
- **Never held**: a state with a non-finite tensor. A guard judges a step good on a value its forward measured,
  before the step's update, and that update can still turn the weights NaN (an overflowing gradient): such a state
  is skipped and the one held before stays, so a model gone NaN rolls back to finite weights.
- **Does not**: the clock (the global step, the schedulers' position, the data order, the RNG): the batches seen
  between the snapshot and the firing are skipped, not replayed, as PaLM skipped them, and loggers keep a monotonic
  step. The rates in the param groups (``lr`` and the schedulers' entries) and their flags (``train_mode``,
  ``foreach``) stay as they are now; the guard then multiplies the learning rates by its ``lr_factor``.

Copies are made in place: the snapshot's host buffers are re-used from one good observation to the next (one
device-to-host copy of model + optimizer state per good observation, into pinned memory on CUDA, queued on the
current stream), and a rollback copies back into the live tensors, so parameters keep their identity (optimizers,
DDP buckets and compiled graphs see the same tensors). Host memory: one copy of the model and its optimizer state
(per held state: :mod:`~entrotrain.callbacks.rollback_history` holds the last ``rollback_states``).

Supported: one device, DDP (each rank holds its own replica's copy; the guard's decision is the same on every rank,
and so is the "non-finite state is not held" decision, all-reduced over the ranks: a buffer DDP does not keep equal,
such as BatchNorm's running statistics without ``SyncBatchNorm``, gone non-finite on one rank keeps every rank at the
state held before, so a rollback sends every replica to the same step; a refusal of ``take`` or ``restore`` that
only one rank meets, such as a frozen parameter changed on that rank alone with ``hold="trainable"``, is an error on
every rank, the others saying that another process refused; a take agrees on all of it, the host memory check
included, in one all-reduce of a few int32 flags),
DDP with ``ZeroRedundancyOptimizer`` (each rank holds and restores its shard of the optimizer state, which lives in
its ``.optim``; the "non-finite state is not held" decision is all-reduced over its process group; ``overlap_with_ddp=
True``, which steps inside DDP's communication hook, is refused),
``torch.compile``, and FSDP2 (``fully_shard`` on a 1-D mesh, in a plain loop or Lightning's
``ModelParallelStrategy``): each rank holds and restores **its local shards** only. A ``DTensor`` in
``model.state_dict()`` or in the optimizer state (Adam's ``exp_avg`` / ``exp_avg_sq``; ``step`` is a plain tensor) is
held as ``.to_local()`` in host memory (one ``1/W`` share of the model and its moments per rank) and copied back into
the live tensor's ``.to_local()``, which must share storage with the parameter's local shard (checked at every
restore; a state-dict hook that hands out copies is refused). The "non-finite state is not held" decision is
all-reduced over the mesh (a NaN in one rank's shard skips the take on every rank), so the ranks always hold the
same step; ``take`` and ``restore`` must therefore be called on every rank (the guard's decision is the same on
every rank). Bit-for-bit: after a rollback each rank's shards and moments equal the held ones, and the full
parameters equal a one-process run that rolls back to the same step (tests/integrations/test_rollback_fsdp2.py).

Refused with :class:`~entrotrain.errors.EntrotrainError` naming the alternative: FSDP1 (``FullyShardedDataParallel``,
flat parameters) and DeepSpeed, whose state lives outside ``state_dict()`` / ``optimizer.state``; ``DTensor``
parameters outside ``fully_shard`` (tensor parallelism alone) or on a mesh of more than one dimension (HSDP, FSDP2 +
TP): untested.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from entrotrain.callbacks import rollback_groups
from entrotrain.callbacks.rollback_frozen import FrozenParameters
from entrotrain.errors import EntrotrainError
from entrotrain.functional._dist import collective_device, world

__all__ = ["RollbackState", "Verdict", "agreement_groups", "check_supported", "outside_params", "unwrap_optimizer"]

_MISSING = object()
_T = TypeVar("_T")
#: One optimizer's held state: per parameter (by identity), state key -> (host copy, the device it came from, the
#: DTensor spec of a sharded moment or ``None``); ``None`` for a parameter that had no state.
_HeldOptimizer = dict[int, "dict[str, tuple[Any, Any, Any]] | None"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the per-parameter state: :func:`stepped_optimizer` (through Lightning's and
    Accelerate's wrappers), then the local optimizer ``.optim`` of a ``ZeroRedundancyOptimizer`` (its own ``state``
    stays empty: ``.optim`` holds this rank's shard); anything else as it is."""
    optimizer = stepped_optimizer(optimizer)
    return optimizer.optim if _is_zero(optimizer) else optimizer


def stepped_optimizer(optimizer: Any) -> Any:
    """The optimizer a wrapper steps, whose ``param_groups`` (``lr``) and ``state`` are the ones that count.

    Follows ``.optimizer`` through any object that is not a ``torch.optim.Optimizer`` and through optimizers whose
    ``state`` *is* the inner one's: Accelerate's ``AcceleratedOptimizer`` (a ``torch.optim.Optimizer`` subclass whose
    ``state`` / ``param_groups`` are properties reading ``.optimizer``'s) and Lightning's ``LightningOptimizer`` (a
    dynamic subclass of the optimizer's class sharing its ``__dict__``). Stops at an optimizer with a state of its
    own (a Lookahead-style wrapper: its state is what it holds). Used by rollback and by the guard's rate check
    (:mod:`entrotrain.callbacks._rate_ignored`) alike."""
    seen = {id(optimizer)}
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or id(inner) in seen:
            return optimizer
        if isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "state", None) is not getattr(
            inner, "state", _MISSING
        ):
            return optimizer
        seen.add(id(inner))
        optimizer = inner


def _is_zero(optimizer: Any) -> bool:
    """Whether ``optimizer`` is ``torch.distributed.optim.ZeroRedundancyOptimizer`` (without importing it)."""
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


def check_supported(model: nn.Module, optimizers: Sequence[Any] = ()) -> None:
    """Refuse a model whose state cannot be held and copied back in place (FSDP1, DeepSpeed, DTensor parameters
    outside FSDP2 or on a mesh of more than one dimension), or an optimizer whose state is not in ``.state``
    (``ZeroRedundancyOptimizer(overlap_with_ddp=True)``, which steps inside DDP's communication hook).

    Raises:
        EntrotrainError: naming why and the alternative.
    """
    why = _unsupported(model) or next(filter(None, map(_unsupported_optimizer, optimizers)), None)
    if why is not None:
        raise EntrotrainError(
            f"EntropyCollapseGuard(action='rollback') cannot hold the state of this model: {why}. Use "
            "action='reduce_lr' or 'stop', and roll back from the checkpoint the guard names (it keeps it from "
            "rotation) with `entrotrain fit --ckpt_path ...` or ResumeWithChanges."
        )


def _unsupported(model: nn.Module) -> str | None:
    """Why this model's state cannot be rolled back in place (``None``: it can)."""
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel":
            return "it is wrapped in FSDP (flat sharded parameters)"
        if name == "DeepSpeedEngine":
            return "it is a DeepSpeed engine"
    sharded = [p if _is_dtensor(p) else p.data for p in model.parameters() if _is_dtensor(p) or _is_dtensor(p.data)]
    if not sharded:
        return None
    if not _has_fully_shard(model):
        return "its parameters are DTensor shards outside FSDP2's fully_shard (tensor parallel: untested)"
    dims = sorted({param.device_mesh.ndim for param in sharded})
    if dims != [1]:
        return (f"its parameters are DTensor shards on a {dims[-1]}-D device mesh (HSDP / FSDP2 + tensor parallel: "
                "untested; FSDP2 on a 1-D mesh is supported)")
    return None


def _unsupported_optimizer(optimizer: Any) -> str | None:
    """Why this optimizer's state cannot be rolled back in place (``None``: it can)."""
    outer = stepped_optimizer(optimizer)
    if _is_zero(outer) and getattr(outer, "_overlap_with_ddp", False):
        return ("its optimizer is a ZeroRedundancyOptimizer with overlap_with_ddp=True (it steps inside DDP's "
                "communication hook, outside optimizer.state); overlap_with_ddp=False rolls back")
    return None


def _is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed)."""
    return any(cls.__name__ == "DTensor" for cls in type(value).__mro__)


def _has_fully_shard(model: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``model`` or one of its submodules."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without FSDP2
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _local(value: Any) -> Any:
    """A DTensor's local shard (``to_local()``, which shares its storage); anything else as it is."""
    return value.to_local() if _is_dtensor(value) else value


def _spec(value: Any) -> Any:
    """What a DTensor's local shard must match at restore (its mesh, placements, global shape and stride);
    ``None`` for a plain tensor."""
    if not _is_dtensor(value):
        return None
    return (value.device_mesh, tuple(value.placements), tuple(value.shape), tuple(value.stride()))


class RollbackState:
    """The model's and optimizers' state at one step, in reusable host buffers (see the module docstring).

    Example::

        state = RollbackState()
        state.take(model, [optimizer], step=50)     # a good observation
        ...
        state.restore(model, [optimizer])            # the collapse: back to step 50's weights and moments
    """

    def __init__(self, trainable_only: bool = False) -> None:
        #: The step the held state was taken at (``None``: nothing held).
        self.step: int | None = None
        #: ``trainable_only``: the frozen parameters not copied, fingerprinted (:mod:`.rollback_frozen`).
        self._frozen = FrozenParameters() if trainable_only else None
        self._model: dict[str, Any] = {}
        self._specs: dict[str, Any] = {}  # key -> DTensor spec (mesh, placements, shape, stride) of a sharded entry
        self._optimizers: list[_HeldOptimizer] = []
        self._outside: dict[int, torch.Tensor] = {}  # id -> value of a parameter an optimizer steps outside the model
        self._groups: list[rollback_groups.HeldGroups] = []  # per optimizer: the state in its param groups

    # ------------------------------------------------------------------ take
    def take(
        self, model: nn.Module, optimizers: Sequence[Any], step: int, last: RollbackState | None = None,
        checks: Sequence[Verdict] = (),
    ) -> bool:
        """Hold ``model``'s and ``optimizers``' state as it is now, as the state of ``step``; whether it was held.

        A state with a non-finite floating-point tensor (a parameter, a buffer or an optimizer moment) is not held:
        the state held before stays (returns ``False``). A guard judges a step good on a value measured in that
        step's forward, before its update, and that update can still turn the weights non-finite (an overflowing
        gradient): rolling back to such a state would cure nothing. The check is one device sync per device.

        With ``trainable_only``, parameters with ``requires_grad=False`` are not copied, only fingerprinted
        (:mod:`~entrotrain.callbacks.rollback_frozen`), and a rollback leaves them as they are; ``last``: the state
        taken at the last observation, whose fingerprints they are compared with (default: this one's). ``checks``:
        the caller's verdicts on this process that every process must pass too before anything is held (the host
        memory check of :meth:`RollbackHistory.take <entrotrain.callbacks.rollback_history.RollbackHistory.take>`).

        Every process decides alike, in **one** all-reduce with 2+ processes (:func:`agree`, over
        :func:`agreement_groups`): whether each of ``checks`` and the frozen parameters' check passed on every
        process, and whether the state is finite on every process (each rank judges its replica or its shards).

        Raises:
            EntrotrainError: the model is sharded (FSDP, DeepSpeed): its state cannot be copied in place; one of
                ``checks`` failed, or, with ``trainable_only``, a frozen parameter changed since the last take (on any
                process of the run: there its own error, elsewhere the verdict's ``elsewhere``, refusing together).
        """
        check_supported(model, optimizers)
        live = model.state_dict()
        checks = list(checks)
        frozen: dict[str, tuple[float, ...]] = {}
        if self._frozen is not None:
            last_frozen = last._frozen if last is not None else None
            try:
                frozen, refusal = self._frozen.fingerprint(model, live, step, last_frozen), None
            except EntrotrainError as error:
                refusal = error
            checks.append(Verdict(refusal, _elsewhere(f"hold the state of step {step}")))
        live = {key: value for key, value in live.items() if key not in frozen}
        inner = [unwrap_optimizer(opt) for opt in optimizers]
        state = [t for opt in inner for s in opt.state.values() for t in _tensors(s)]
        state += rollback_groups.group_tensors([stepped_optimizer(opt) for opt in optimizers])
        outside = outside_params(model, inner)
        refused = any(check.refusal is not None for check in checks)  # (then the state's verdict does not matter)
        finite, meshes = (True, []) if refused else _finite_here([*_tensors(live), *state, *outside])
        *passed, finite = agree([*(check.refusal is None for check in checks), finite],
                                agreement_groups([*mesh_groups(meshes), *shard_groups(optimizers)]))
        failed = [check for check, ok in zip(checks, passed) if not ok]
        if failed:  # this process's own reason first, else the first one another process met
            raise next((check.refusal for check in failed if check.refusal is not None), failed[0].elsewhere)
        if not finite:
            return False
        with torch.no_grad():
            self._outside = {id(p): _copy_into(p, self._outside.get(id(p))) for p in outside}
            self._model = {key: _copy_into(value, self._model.get(key)) for key, value in live.items()}
            self._specs = {key: spec for key, spec in ((k, _spec(v)) for k, v in live.items()) if spec is not None}
            held = self._optimizers if len(self._optimizers) == len(optimizers) else [{} for _ in optimizers]
            self._optimizers = [_optimizer_state(opt, previous) for opt, previous in zip(inner, held)]
            self._groups = [rollback_groups.hold_groups(stepped_optimizer(opt)) for opt in optimizers]
        self.step = int(step)
        if self._frozen is not None:
            self._frozen.keep(frozen, step)
        return True

    # ------------------------------------------------------------------ restore
    def restore(self, model: nn.Module, optimizers: Sequence[Any]) -> int:
        """Copy the held state back into ``model`` and ``optimizers`` (in place) and clear the gradients; returns the
        step it was taken at.

        Raises:
            EntrotrainError: nothing is held, or the model or the optimizers changed shape since it was taken (on any
                process of the run, checked before anything is copied: see :func:`_agreed_or_raise`).
        """
        if self.step is None:
            raise EntrotrainError("RollbackState.restore: no state is held; call take() at a good step first.")
        if len(optimizers) != len(self._optimizers):
            raise EntrotrainError(
                f"RollbackState.restore: the state was taken with {len(self._optimizers)} optimizer(s), got "
                f"{len(optimizers)}; restore with the optimizers given to take()."
            )
        current = model.state_dict()
        outer = [stepped_optimizer(opt) for opt in optimizers]  # (whose groups ZeroRedundancyOptimizer steps from)
        frozen = self._frozen.keys if self._frozen else set()

        def check() -> list[tuple[torch.Tensor, torch.Tensor]]:  # every refusal, before anything is copied
            if self._frozen is not None:
                self._frozen.verify(current)
            for opt, groups in zip(outer, self._groups):
                rollback_groups.check_groups(opt, groups)
            return _model_shards(model, self._model, self._specs, current, frozen)

        with torch.no_grad():  # (the local shards are views of the parameters, copied into below)
            shards = _agreed_or_raise(check, f"restore the state of step {self.step}")
        modes = [rollback_groups.modes(opt) for opt in outer]  # schedule-free's, before the restore
        with torch.no_grad():
            _restore_model(model, self._model, self._specs, current, shards)
            for opt, held in zip(optimizers, self._optimizers):
                _restore_optimizer(unwrap_optimizer(opt), held)
            _restore_outside([unwrap_optimizer(opt) for opt in optimizers], self._outside)
            for opt, groups in zip(outer, self._groups):
                rollback_groups.restore_groups(opt, groups)
            for opt, wanted in zip(outer, modes):  # parameters and state restored: switch to the current mode
                rollback_groups.switch_modes(opt, wanted)
        model.zero_grad(set_to_none=True)
        return self.step

    def clear(self) -> None:
        """Drop the held state (its host memory)."""
        self.step, self._model, self._specs, self._optimizers, self._outside = None, {}, {}, [], {}
        self._groups = []
        if self._frozen is not None:
            self._frozen.clear()

    @property
    def nbytes(self) -> int:
        """Host memory held, in bytes."""
        tensors = [*_tensors(self._model), *self._outside.values()]
        for held in self._optimizers:
            for state in held.values():
                tensors.extend(value for value, _, _ in (state or {}).values() if isinstance(value, torch.Tensor))
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------- helpers
def _tensors(state: dict[str, Any]) -> Iterable[torch.Tensor]:
    return (value for value in state.values() if isinstance(value, torch.Tensor))


def shard_groups(optimizers: Sequence[Any]) -> list[tuple[Any, torch.device]]:
    """The process groups (and the device their collectives take) over which ``optimizers`` shard their state
    (``ZeroRedundancyOptimizer``): each rank judges only its shard, so the verdict must be agreed on."""
    outer = [stepped_optimizer(opt) for opt in optimizers]
    return [(opt.process_group, collective_device(opt.process_group)) for opt in outer if _is_zero(opt)]


def _all_finite(tensors: Iterable[torch.Tensor], groups: Sequence[tuple[Any, torch.device]] = ()) -> bool:
    """Whether every floating-point (or complex) tensor among ``tensors`` is finite (:func:`_finite_here`), agreed
    on (min) over :func:`agreement_groups` of the DTensors' meshes and ``groups`` (process group, device), so that
    every rank decides the same (a collective: every rank of the mesh or group calls it, in the same order)."""
    finite, meshes = _finite_here(tensors)
    return agreed(finite, agreement_groups([*mesh_groups(meshes), *groups]), every=True)


def _finite_here(tensors: Iterable[torch.Tensor]) -> tuple[bool, list[Any]]:
    """Whether every floating-point (or complex) tensor among ``tensors`` is finite on this process (a DTensor judged
    on its local shard: not agreed on, no collective), and the DTensors' device meshes. One sync per device.

    Each tensor is first judged on its 2-norm, which is finite exactly when every element is, unless the sum of the
    squares of finite values overflows; a tensor whose norm is not finite is then judged element by element, so the
    verdict is exact. The norms of the tensors of one device and dtype are one ``torch._foreach_norm`` (one fused
    kernel on CUDA): 1.4-3 × faster on CPU than a sum per tensor, 10-40 × than ``isfinite(t).all()``, which writes a
    boolean tensor first (``benchmarks/rollback.py``'s hold row)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    meshes: list[Any] = []
    for t in tensors:
        if _is_dtensor(t):
            if all(t.device_mesh is not m for m in meshes):
                meshes.append(t.device_mesh)
            t = t.to_local()
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            by_kind.setdefault((t.device, t.dtype), []).append(t.detach())
    by_device: dict[torch.device, list[tuple[list[torch.Tensor], torch.Tensor]]] = {}
    for (device, dtype), kind in by_kind.items():
        by_device.setdefault(device, []).append((kind, _screen(kind, dtype)))
    finite = True
    for screened in by_device.values():
        flags = torch.cat([flags for _, flags in screened]).tolist()  # one sync per device
        kinds = [t for kind, _ in screened for t in kind]
        suspects = [t for t, ok in zip(kinds, flags) if not ok]  # a NaN / Inf, or an overflowing norm
        # (float8 has no isfinite: judged widened, only when suspect)
        finite = finite and all(bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()) for t in suspects)
    return finite, meshes


def _agreed_or_raise(check: Callable[[], _T], what: str) -> _T:
    """``check()``'s result once every process of the run (:func:`agreement_groups`, none in one process) found no
    refusal: ``check``'s own :class:`EntrotrainError` on a process where it raised, and on every other one an error
    saying that another process could not ``what``. So a refusal that only one rank meets (a frozen parameter changed
    on that rank alone, a local shard copied by a state-dict hook) is taken on every rank alike, never one rank
    holding or rolling back while another goes on (one all-reduce with 2+ processes)."""
    try:
        result, refusal = check(), None
    except EntrotrainError as error:
        result, refusal = None, error
    if agreed(refusal is None, agreement_groups([]), every=True):
        return result  # type: ignore[return-value]
    raise refusal or _elsewhere(what)


def _elsewhere(what: str) -> EntrotrainError:
    """The error of a process whose own check passed when another process's check refused to ``what``."""
    return EntrotrainError(
        f"EntropyCollapseGuard(action='rollback'): another process of this run could not {what} (its error says "
        "why); every process refuses together, so the replicas stay alike. Use action='reduce_lr' or 'stop' if it "
        "persists."
    )


@dataclass(frozen=True)
class Verdict:
    """A check that every process must pass before a state is held (:meth:`RollbackState.take`'s ``checks``), judged
    on this process and not yet agreed on: ``refusal``, this process's own error (``None``: it passed);
    ``elsewhere``, the error it raises when only other processes failed."""

    refusal: EntrotrainError | None
    elsewhere: EntrotrainError


def agreement_groups(groups: Sequence[tuple[Any, torch.device]]) -> list[tuple[Any, torch.device]]:
    """Where a verdict on the state to hold is agreed on (:func:`agreed`): with 2+ processes in the default group,
    that group alone (on :func:`~entrotrain.functional._dist.collective_device`), else ``groups`` (the DTensor
    meshes' and ZeRO's, e.g. over a 1-process group). Under plain DDP each rank judges its own replica, and what DDP
    does not keep equal can differ: buffers (BatchNorm's running statistics without ``SyncBatchNorm``; DDP broadcasts
    rank 0's at the next forward, after the state was judged), frozen parameters, an optimizer's state. Judged
    alone, a non-finite buffer on one rank held an older state there than on the others, and a rollback then sent
    the replicas to different steps. The default group holds every rank of the meshes and ZeRO groups, so one
    reduction over it agrees on theirs too (every rank calls it: the guards' decisions are the same on every
    rank)."""
    if world()[1] > 1:
        return [(None, collective_device())]
    return list(groups)


def mesh_groups(meshes: Iterable[Any]) -> list[tuple[Any, torch.device]]:
    """``(process group, device)`` of each of the DTensors' device ``meshes``, for :func:`agreed`."""
    return [(mesh.get_group(), _mesh_device(mesh)) for mesh in meshes]


def agreed(verdict: bool, groups: Sequence[tuple[Any, torch.device]], every: bool) -> bool:
    """``verdict`` agreed on over each ``(process group, device)`` of ``groups``: true when it is true on every rank
    (``every``) or on any rank (otherwise). A collective: every rank of each group calls it, in the same order, with
    the same groups (ranks that hold different shards of one state, FSDP2 or ZeRO, must decide one thing)."""
    if every:
        return agree([verdict], groups)[0]
    return not agree([not verdict], groups)[0]  # true on any rank: not false on every rank


def agree(verdicts: Sequence[bool], groups: Sequence[tuple[Any, torch.device]]) -> list[bool]:
    """Each of ``verdicts`` agreed on over each ``(process group, device)`` of ``groups``: true when it is true on
    every rank, all of them in one all-reduce per group (an int32 tensor of the flags, MIN). A collective, as
    :func:`agreed`."""
    if not groups:
        return [bool(v) for v in verdicts]
    flags = torch.tensor([int(bool(v)) for v in verdicts], dtype=torch.int32)
    for group, device in groups:
        flags = flags.to(device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=group)
    return [bool(v) for v in flags.tolist()]


#: The dtypes ``torch._foreach_norm`` takes (float8 does not: judged on a widened sum).
_NORMED = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def _screen(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One boolean per tensor of one device and ``dtype``: its 2-norm (or, for float8, its float32 sum) is finite."""
    if dtype in _NORMED:
        return torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2)))
    return torch.stack([torch.isfinite(t.float().sum()) for t in tensors])


def _mesh_device(mesh: Any) -> torch.device:
    """The device a collective on ``mesh`` takes its tensors on (the current accelerator for a CUDA mesh)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def _copy_into(value: Any, buffer: Any) -> Any:
    """``value`` copied to host memory, into ``buffer`` when it has the same shape and dtype (re-used), else into a
    new buffer (pinned when ``value`` is on CUDA, so the copy is queued, not waited for); a non-tensor is
    deep-copied."""
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    value = _local(value).detach()  # a DTensor: its local shard (this rank's share)
    if not (isinstance(buffer, torch.Tensor) and buffer.shape == value.shape and buffer.dtype == value.dtype):
        buffer = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=value.is_cuda)
    buffer.copy_(value, non_blocking=value.is_cuda)
    return buffer


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def outside_params(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The parameters ``optimizers`` step that are not ``model``'s (a discriminator when the loop watches the
    generator, a learnable temperature kept outside any module): held and restored with their optimizer state, which
    would not match their values otherwise."""
    inside = {id(p) for p in model.parameters()}
    outside: dict[int, torch.Tensor] = {}
    for param in (p for opt in optimizers for p in _params(opt)):
        if id(param) not in inside:
            outside.setdefault(id(param), param)
    return list(outside.values())


def _restore_outside(optimizers: Sequence[torch.optim.Optimizer], held: dict[int, torch.Tensor]) -> None:
    """Copy the held values back into the parameters ``optimizers`` step outside the model, and clear their gradients
    (one that joined an optimizer since, or changed shape, is left as it is)."""
    for param in (p for opt in optimizers for p in _params(opt)):
        value = held.get(id(param))
        if value is not None and _local(param).shape == value.shape:
            _local(param).copy_(value, non_blocking=True)
            param.grad = None


def _optimizer_state(
    optimizer: torch.optim.Optimizer, previous: _HeldOptimizer
) -> _HeldOptimizer:
    """Each parameter's optimizer state (``None``: it has none yet), by parameter identity."""
    held: _HeldOptimizer = {}
    for param in _params(optimizer):
        state = optimizer.state.get(param)
        if not state:
            held[id(param)] = None
            continue
        before = previous.get(id(param)) or {}
        held[id(param)] = {
            key: (_copy_into(value, before.get(key, (None,))[0]), getattr(value, "device", None), _spec(value))
            for key, value in state.items()
        }
    return held


def _model_shards(
    model: nn.Module, held: dict[str, Any], specs: dict[str, Any], current: dict[str, Any], frozen: set[str]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The refusals of :func:`_restore_model`, before anything is copied, and the DTensor entries' ``(local shard,
    held value)`` pairs it copies. A DTensor entry (FSDP2) is copied into its local shard, which must share storage
    with the parameter's local shard and have the spec it was taken with: anything else is refused (a local shard
    cannot go through ``load_state_dict``). ``current``: ``model.state_dict()`` now; ``frozen``: its keys not held
    (``hold="trainable"``, left as they are).

    Raises:
        EntrotrainError: the state keys changed, or a shard cannot be copied back in place.
    """
    if current.keys() != held.keys() | frozen:
        missing, extra = sorted((held.keys() | frozen) - current.keys()), sorted(current.keys() - held.keys() - frozen)
        raise EntrotrainError(
            "EntropyCollapseGuard(action='rollback'): the model's state keys changed since the good state was taken "
            f"(gone: {missing[:5]}, new: {extra[:5]}); a model whose structure changes during training cannot be "
            "rolled back in memory. Use action='reduce_lr' or 'stop'."
        )
    live = {_local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    # every shard checked before any is copied: a refusal leaves the model as it was, not half rolled back
    return [_shard_target(key, current[key], value, specs.get(key), live)
            for key, value in held.items() if key in specs or _is_dtensor(current[key])]


def _restore_model(
    model: nn.Module, held: dict[str, Any], specs: dict[str, Any], current: dict[str, Any],
    shards: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Copy ``held`` into the tensors ``model.state_dict()`` shares with the live parameters and buffers; what does
    not share storage with them (a state-dict hook's product) or is not a tensor goes through ``load_state_dict``;
    the DTensor entries into their local shards (``shards``, checked by :func:`_model_shards`)."""
    live = {_local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    through_load: dict[str, Any] = {}
    for local, value in shards:
        local.copy_(value, non_blocking=True)
    for key, value in held.items():
        target = current[key]
        if key in specs or _is_dtensor(target):
            continue
        shared = isinstance(target, torch.Tensor) and target.untyped_storage().data_ptr() in live
        if shared and target.shape == value.shape:
            target.copy_(value, non_blocking=True)
        else:
            through_load[key] = value
    if through_load:
        model.load_state_dict(through_load, strict=False)


def _shard_target(
    key: str, target: Any, value: torch.Tensor, spec: Any, live: set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target.to_local(), value)``: where the held local shard ``value`` of the state-dict entry ``key`` is copied
    back, once checked (same sharding, shape and dtype; storage shared with a parameter's local shard)."""
    def refuse(why: str) -> None:
        raise EntrotrainError(
            f"EntropyCollapseGuard(action='rollback'): cannot copy the held shard of {key!r} back in place: {why}. "
            "Use action='reduce_lr' or 'stop', and roll back from the checkpoint the guard names."
        )

    if spec is None or not _is_dtensor(target):
        refuse(f"it was {'a plain tensor' if spec is None else 'a DTensor'} when held and is a "
               f"{type(target).__name__} now")
    now = _spec(target)
    if now != spec:
        refuse(f"its sharding changed (placements {spec[1]} -> {now[1]}, shape {spec[2]} -> {now[2]})")
    local = target.to_local()
    if local.shape != value.shape or local.dtype != value.dtype:
        refuse(f"its local shard is {tuple(local.shape)} {local.dtype} now, {tuple(value.shape)} {value.dtype} held")
    if local.numel() and local.untyped_storage().data_ptr() not in live:  # (an empty shard: nothing to copy)
        refuse("model.state_dict() handed out a copy of its local shard, not a view of the parameter's (a "
               "state-dict hook?)")
    return local, value


def _restore_optimizer(optimizer: torch.optim.Optimizer, held: _HeldOptimizer) -> None:
    """Each parameter's state back to the held one, in place where the tensor is there with the same shape (a
    DTensor moment: its local shard, with the same sharding); a parameter that had none (or that joined the optimizer
    later) gets none."""
    for param in _params(optimizer):
        saved = held.get(id(param))
        if saved is None:
            optimizer.state.pop(param, None)
            continue
        state = optimizer.state[param]
        for key in [k for k in state if k not in saved]:
            del state[key]
        for key, (value, device, spec) in saved.items():
            now = state.get(key, _MISSING)
            if not isinstance(value, torch.Tensor):
                state[key] = copy.deepcopy(value)
                continue
            same = _spec(now) == spec if spec is not None else not _is_dtensor(now)
            local = _local(now)
            if same and isinstance(local, torch.Tensor) and local.shape == value.shape and local.dtype == value.dtype:
                local.copy_(value, non_blocking=True)
            elif spec is not None:  # a sharded moment gone or resharded: rebuilt from the held local shard
                from torch.distributed.tensor import DTensor

                mesh, placements, shape, stride = spec
                state[key] = DTensor.from_local(value.to(device, copy=True), mesh, placements, run_check=False,
                                                shape=torch.Size(shape), stride=stride)
            else:  # on the device it was taken from (Adam keeps its step on the CPU unless fused/capturable)
                state[key] = value.to(device, copy=True)
