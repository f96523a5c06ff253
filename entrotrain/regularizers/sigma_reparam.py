r"""σReparam: spectrally reparametrised linear layers and a function-preserving converter.

Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse" (ICML, arXiv
2303.06296): attention entropy has a lower bound that falls exponentially with the spectral norm of the attention
logits, so every linear map is reparametrised as

.. math::

    \hat W = \frac{\gamma}{\sigma(W)}\, W,

with :math:`\sigma(W)` the spectral norm of ``W`` estimated by power iteration and :math:`\gamma` a learned scalar.
The effective spectral norm :math:`\sigma(\hat W) = \gamma` then grows only as fast as one scalar is trained.

Public API:

* :class:`SigmaReparamLinear` — drop-in ``nn.Linear`` replacement (``weight``, ``bias``, ``gamma``; buffers ``u``,
  ``sigma``).
* :class:`SigmaReparamConv1D` — the same for transformers' ``Conv1D`` (GPT-2 family: ``y = x W + b`` with ``W``
  stored ``(C_in, C_out)``, the transpose of ``nn.Linear``'s); it keeps that storage layout, so ``weight`` and
  ``bias`` keep their names and shapes in the state dict.
* :func:`sigma_reparam` — converts ``nn.Linear`` and ``Conv1D`` submodules chosen by name glob, in place,
  function-preserving at step 0 (γ₀ = σ(W₀), u₀ = top right singular vector). Granularity is per ``nn.Linear``: a separate q/k/v projection
  is "per_projection", a fused ``qkv`` linear (TinyGPT's ``attn.qkv``) is "fused_qkv". Apple's speech model's
  "qk_joint" split (one σReparam over ``[W_q; W_k]``, one over ``W_v``) is :class:`SigmaReparamQKJoint`, chosen
  per fused linear with ``sigma_reparam(..., qk_joint="**.qkv")``.
* :func:`sigma_reparam_names` — qualified names of the σReparam layers in a model.

Sharded parameters (FSDP2 ``fully_shard``, DTensor). The rule: **σ is always the σ of the full weight**, identical
on every rank. Inside ``forward`` FSDP2 has all-gathered the weight (a plain tensor), so the power iteration runs on
the full matrix and the buffers ``u`` / ``sigma`` (never sharded) are updated from it identically on every rank,
with no extra communication. Outside ``forward`` (``effective_weight``, ``spectral_norm_estimate``, the monitor) a
DTensor weight or γ is gathered with ``DTensor.full_tensor()``, a collective that every rank of the mesh must call
in the same order. γ has shape ``(1,)`` (as in Apple's reference) because ``fully_shard`` refuses 0-d parameters;
state dicts holding a 0-d γ (saved before) still load. Convert *before* sharding: a weight that is already a
DTensor is refused at conversion. A model converted on the meta device and sharded before its weights exist gets its
spectral state when it is materialised (``reset_parameters``, as Lightning's ``ModelParallelStrategy`` does). A plain
layer's state (``weight``, ``bias``: a checkpoint saved before conversion; a fused ``qkv`` converted with
``qk_joint`` too, split into its qk and v rows) loads through ``load_state_dict`` as the converter converts it
(``u`` and γ = σ(W) from the loaded W, nothing missing); :func:`reset_sigma_reparam_state` does
the same for weights set any other way. Tensor parallelism (DTensor weights inside
``forward``) is not supported: the weight would be gathered whole.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_int, check_real
from entrotrain.errors import EntrotrainError
from entrotrain.taps.exclusive import in_backward
from entrotrain.taps.module_names import clean_module_name, named_modules
from entrotrain.taps.name_filter import GLOB_SYNTAX, NameFilter

try:  # DTensor parameters (FSDP2 / tensor parallel); absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "SigmaReparamConv1D",
    "SigmaReparamLinear",
    "SigmaReparamQKJoint",
    "is_hf_conv1d",
    "reset_sigma_reparam_state",
    "sigma_reparam",
    "sigma_reparam_names",
]

CONVERTIBLE = "nn.Linear or transformers' Conv1D (GPT-2 family)"


def full_tensor(t: Tensor) -> Tensor:
    """``t`` as a plain tensor holding all its values: ``t.full_tensor()`` for a DTensor (an FSDP2-sharded parameter
    outside ``forward``; a collective every rank must call in the same order, differentiable), ``t`` itself otherwise."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.full_tensor()
    return t


def _copy_full_into(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` where ``value`` holds all of ``param``'s values; for a DTensor ``param`` only its local
    shard is written (every rank holds the same ``value``, so no communication)."""
    if _DTensor is not None and isinstance(param, _DTensor):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(value)


def is_hf_conv1d(module: Any) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (GPT-2 family): ``y = x W + b``, ``W`` stored
    ``(C_in, C_out)``. Never imports transformers: if it is not already imported, no Conv1D can exist."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return isinstance(cls, type) and isinstance(module, cls)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 weights, float64 for float64 weights."""
    return torch.promote_types(dtype, torch.float32)


def _top_right_singular_vector(weight: Tensor, init_iterations: int | None) -> Tensor:
    """Unit vector ``(in_features,)`` along the top right singular vector of ``weight``, in float64.

    ``init_iterations=None``: exact, from ``torch.linalg.svd`` in float64. An integer: that many power iterations
    from a fixed-seed random start (identical on every rank; no global RNG consumed).
    A zero matrix (σ = 0, every vector is singular) gives the start vector, never a zero vector.
    """
    w = weight.detach().to(torch.float64)
    if init_iterations is None:
        _, _, vh = torch.linalg.svd(w, full_matrices=False)
        return vh[0]
    check_int(init_iterations, "init_iterations (None = exact SVD)", low=1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = F.normalize(torch.randn(w.shape[1], generator=gen, dtype=torch.float64).to(w.device), dim=0)
    u = start
    for _ in range(init_iterations):
        v = _unit(w @ u)
        u = _keep_if_degenerate(_unit(w.T @ v), u)
    return u


#: Training forwards per layer whose start is kept for activation checkpointing's recomputation.
_MAX_STARTS = 16


def _may_be_recomputed() -> bool:
    """Whether the running forward may be recomputed in backward: inside non-reentrant activation checkpointing
    (saved-tensor hooks are active) or reentrant one (the forward runs without gradients)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return not torch.is_grad_enabled() or top is None or top(False) is not None


def _fingerprint(x: Tensor) -> Tensor:
    """A few numbers that tell one input of a layer from another (its sum and 16 evenly spaced values, in float32;
    the shape is compared apart): the same bit for bit when checkpointing recomputes it. No copy of ``x`` is kept."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // 16)
    return torch.cat([flat.sum(dtype=torch.float32).reshape(1), flat[::step][:16].to(torch.float32)])


def _unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ‖x‖`` for a vector, scale-free: ``x`` is first divided by its largest ``|entry|``, so ``‖x‖`` neither
    overflows (weights of 1e20 in float32: ``‖x‖² = inf`` gave ``v = 0``, σ = 0) nor falls under ``eps`` (weights of
    1e-20: ``F.normalize`` divided by ``eps`` instead of ``‖x‖``, so ``v`` was not a unit vector and σ ≠ ``‖W u‖``).
    The zero vector stays 0; NaN/Inf entries give NaN. No host sync."""
    peak = x.abs().amax()
    return F.normalize(x / torch.where(peak > 0, peak, torch.ones_like(peak)), dim=0, eps=eps)


def _keep_if_degenerate(new: Tensor, old: Tensor) -> Tensor:
    """``new`` unless it is the zero vector (``W u = 0``: σ = 0) or non-finite (NaN/Inf in ``W``), then ``old``.

    A power-iteration vector that became 0 or NaN would stay so for good (``normalize(0) = 0``), so the layer
    could never recover its σ; no host sync (``torch.where`` on a scalar condition).
    """
    ok = torch.isfinite(new).all() & (new != 0).any()
    return torch.where(ok, new, old)


class SigmaReparamLinear(nn.Module):
    r"""Linear layer with σReparam: :math:`y = x \hat W^\top + b`, :math:`\hat W = \gamma\, W / \sigma(W)`.

    Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse".

    :math:`\sigma(W) = v^\top W u` with ``u`` (right singular vector estimate, a persisted buffer) and
    ``v = normalize(W u)`` from power iteration, both constants for autograd: the gradient of σ reaches ``W`` only,
    :math:`\partial\sigma/\partial W = v u^\top`, as in Apple's reference (``apple/ml-sigma-reparam``).

    Power iteration runs in float32 (float64 for float64 weights) with autocast disabled, whatever the autocast
    state. In **training** mode each forward does ``n_power_iterations`` steps
    ``v ← normalize(W u); u ← normalize(Wᵀ v)`` then ``σ = normalize(W u_{old})ᵀ W u`` (the last ``v``), and writes
    ``u`` and ``sigma`` into the buffers. In **eval** mode nothing is iterated or written: ``v = normalize(W u)``
    from the stored ``u`` and ``σ = vᵀ W u = ‖W u‖``, so evaluation is deterministic and side-effect free. This
    differs from Apple, whose eval forward does one (non-persisted) iteration; after a training forward the two
    differ by one power step, i.e. negligibly once ``u`` has converged.

    Args:
        in_features: ``C_in``.
        out_features: ``C_out``.
        bias: learn an additive bias.
        n_power_iterations: power-iteration steps per training forward (Apple: 1). Under gradient accumulation
            each micro-batch forward does its own steps.
        eps: ``eps`` of the normalisations.
        device, dtype: factory arguments of the parameters.

    Parameters / buffers:
        ``weight`` ``(C_out, C_in)``, ``bias`` ``(C_out,)``, ``gamma`` ``(1,)`` (learned, initialised to σ(W₀) so
        that ``Ŵ₀ = W₀``; ``(1,)`` as in Apple's code, and because FSDP2 cannot shard a 0-d parameter); buffers ``u`` ``(C_in,)`` and ``sigma`` ``()`` (last training estimate of σ(W), for
        logging), both in the state dict.

    Shapes:
        ``x``: ``(*, C_in)`` → ``(*, C_out)``.

    Example::

        layer = SigmaReparamLinear.from_linear(nn.Linear(64, 32))   # same outputs as the nn.Linear
    """

    u: Tensor
    sigma: Tensor
    #: ``weight`` stored ``(C_in, C_out)`` (transformers' Conv1D) instead of ``(C_out, C_in)`` (nn.Linear)
    _transposed: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(in_features, "in_features", low=1)
        check_int(out_features, "out_features", low=1)
        check_bool(bias, "bias")
        check_int(n_power_iterations, "n_power_iterations", low=1)
        eps = check_real(eps, "eps", low=0.0, low_open=True)  # type: ignore[assignment]
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        shape = (in_features, out_features) if self._transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(*shape, **factory))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.gamma = nn.Parameter(torch.empty(1, **factory))  # (1,), not 0-d: fully_shard refuses scalars
        cdtype = _compute_dtype(self.weight.dtype)
        self.register_buffer("u", torch.empty(in_features, device=device, dtype=cdtype))
        self.register_buffer("sigma", torch.empty((), device=device, dtype=cdtype))
        self._step_start: Tensor | None = None  # the u the last recomputable forward started from
        #: (input shape, input fingerprint, u it started from) of the latest training forwards that checkpointing
        #: may recompute (eager code; compiled code recomputes in its own backward, without Python)
        self._starts: deque[tuple[tuple[int, ...], Tensor, Tensor]] = deque(maxlen=_MAX_STARTS)
        self.reset_parameters()

    def _as_matrix(self, weight: Tensor) -> Tensor:
        """The ``(C_out, C_in)`` matrix of a weight in this layer's storage layout (a view, no copy)."""
        return weight.T if self._transposed else weight

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """Loads this layer's state; also the state of the plain layer it replaced (``weight`` and ``bias`` only: a
        checkpoint saved before :func:`sigma_reparam` was applied), as the converter does: ``u`` the top right
        singular vector of the loaded ``W`` and ``γ = σ(W)``, so the loaded model computes what the plain one did
        (function-preserving), and no key is reported missing."""
        gamma = state_dict.get(prefix + "gamma")
        if isinstance(gamma, Tensor) and gamma.ndim == 0:  # saved before γ became (1,) for FSDP2
            state_dict[prefix + "gamma"] = gamma.reshape(1)
        spectral = [prefix + name for name in ("gamma", "u", "sigma")]
        plain = prefix + "weight" in state_dict and not any(key in state_dict for key in spectral)
        known = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if plain and not error_msgs:
            missing_keys[known:] = [key for key in missing_keys[known:] if key not in spectral]
            self.reset_spectral_state()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init of ``weight`` and ``bias``, then :meth:`reset_spectral_state`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_spectral_state()

    @torch.no_grad()
    def reset_spectral_state(self, init_iterations: int | None = None, reset_gamma: bool = True) -> None:
        """Set ``u`` to the top right singular vector of ``weight``, ``sigma`` to σ(W) and (optionally) γ = σ(W).

        A no-op on the meta device. A DTensor (sharded, e.g. by ``fully_shard`` after meta-device init) weight is
        gathered first (a collective: call it on every rank, as Lightning's materialisation does through
        :meth:`reset_parameters`); every rank then holds the same ``u`` / ``sigma`` and its shard of γ.

        Args:
            init_iterations: ``None`` = exact float64 SVD; an int = that many power iterations (large matrices).
            reset_gamma: also set γ = σ(W), making ``Ŵ = W`` (function-preserving).
        """
        if self.weight.is_meta:
            return
        weight = full_tensor(self.weight.detach())
        if not bool(torch.isfinite(weight).all()):
            raise EntrotrainError(
                f"{type(self).__name__}.weight holds NaN/Inf, so its spectral norm σ(W) is undefined; load or "
                "initialise finite weights first (or leave this layer out of sigma_reparam with exclude=)."
            )
        matrix = self._as_matrix(weight)
        u = _top_right_singular_vector(matrix, init_iterations)
        sigma = torch.linalg.vector_norm(matrix.to(torch.float64) @ u)
        self.u.copy_(u)
        self.sigma.copy_(sigma)
        if reset_gamma:
            _copy_full_into(self.gamma, sigma.reshape(1))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n_power_iterations: int = 1,
        init_iterations: int | None = None,
        eps: float = 1e-12,
    ) -> SigmaReparamLinear:
        """A σReparam copy of ``linear`` (same device and dtype) whose output equals ``linear``'s at conversion.

        ``weight`` and ``bias`` are copied (new Parameters, not shared), ``u`` is the top right singular vector of
        ``W`` (float64 SVD, or ``init_iterations`` power iterations) and ``γ = σ(W)``.
        """
        if not isinstance(linear, nn.Linear) or cls._transposed:
            raise EntrotrainError(
                f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}; pass the Linear module "
                "itself (for transformers' Conv1D use SigmaReparamConv1D.from_conv1d, or sigma_reparam(model))."
            )
        return cls._from_weights(linear.weight, linear.bias, n_power_iterations, init_iterations, eps)

    @classmethod
    def _from_weights(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        n_power_iterations: int,
        init_iterations: int | None,
        eps: float,
    ) -> SigmaReparamLinear:
        """A layer holding copies of ``weight`` (in this class's storage layout) and ``bias``, with γ = σ(W)."""
        if _DTensor is not None and isinstance(weight, _DTensor):
            raise EntrotrainError(
                f"the layer to convert holds a DTensor weight {tuple(weight.shape)} (already sharded, e.g. by "
                "fully_shard); convert with sigma_reparam(...) before fully_shard / parallelize_module."
            )
        in_f, out_f = (weight.shape[0], weight.shape[1]) if cls._transposed else (weight.shape[1], weight.shape[0])
        layer = cls(
            in_f,
            out_f,
            bias=bias is not None,
            n_power_iterations=n_power_iterations,
            eps=eps,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias)
        layer.weight.requires_grad_(weight.requires_grad)
        layer.reset_spectral_state(init_iterations)
        if not layer.sigma.is_meta and float(layer.sigma) == 0.0:
            warnings.warn(
                f"σReparam of an all-zero weight ({out_f}×{in_f}): σ(W) = 0, so γ₀ = 0 and "
                "the layer outputs 0 + bias, like the original, but its weight and γ get zero gradients (Ŵ = γW/σ(W) "
                "has no direction at W = 0) and only the bias learns. Initialise the weight (e.g. "
                "nn.init.kaiming_uniform_) before converting, or leave the layer out with exclude=.",
                UserWarning,
                stacklevel=3,
            )
        return layer

    # ------------------------------------------------------------------ maths
    def _spectral_norm(self, weight: Tensor, update: bool, x: Tensor | None = None) -> Tensor:
        """σ(W) = vᵀ W u with u, v constants (gradient to W only); updates the buffers iff ``update``.

        ``weight`` is this layer's (full, plain) weight in its storage layout; ``x`` the layer's input. Activation
        checkpointing runs a training forward a second time inside ``backward()`` to recompute it: that run repeats
        the power iteration from the ``u`` its forward started from and writes nothing, so σ (and so the gradient)
        is the forward's and ``u`` advances once per forward, as without checkpointing. The forward is found by its
        input (a fingerprint of ``x``, recomputed bit for bit), so several forwards before one backward (two
        micro-batches or two views with their losses summed, a layer called twice in one checkpointed region) each
        get their own σ; without a match (a non-deterministic recomputation) the latest forward's start is used.
        """
        cdtype = _compute_dtype(weight.dtype)
        # compiled code recomputes inside its own backward graph and runs no Python forward again: eager only
        eager = not torch.compiler.is_compiling()
        recompute = update and eager and self._step_start is not None and in_backward()
        # the start of a forward that checkpointing may recompute (asked here, outside the no_grad below: plain
        # training keeps nothing)
        keep_start = update and eager and not recompute and _may_be_recomputed()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            w = self._as_matrix(weight).to(cdtype)
            with torch.no_grad():
                if keep_start:
                    self._step_start = self.u.detach().clone()
                    if x is not None:
                        self._start_log().append((tuple(x.shape), _fingerprint(x), self._step_start))
                start = self._start_of(x) if recompute else self.u
                u = start.to(cdtype).clone()  # never hand the buffer itself to autograd
                if update:
                    for _ in range(self.n_power_iterations):
                        v = _unit(torch.mv(w, u), self.eps)
                        u = _keep_if_degenerate(_unit(torch.mv(w.T, v), self.eps), u)
                else:
                    v = _unit(torch.mv(w, u), self.eps)
            sigma = torch.dot(v, torch.mv(w, u))
        if update and not recompute:
            with torch.no_grad():
                self.u.copy_(u)  # never 0 or NaN: a transient NaN weight does not poison later forwards
                self.sigma.copy_(torch.where(torch.isfinite(sigma), sigma, self.sigma.to(sigma.dtype)).detach())
        return sigma

    def _start_log(self) -> deque[tuple[tuple[int, ...], Tensor, Tensor]]:
        return self.__dict__.setdefault("_starts", deque(maxlen=_MAX_STARTS))  # (a layer pickled before it had one)

    def _start_of(self, x: Tensor | None) -> Tensor:
        """The ``u`` the forward being recomputed started from: the latest forward with ``x``'s fingerprint, else
        the latest forward's."""
        assert self._step_start is not None
        if x is not None and not torch.compiler.is_compiling():
            fingerprint = _fingerprint(x)
            for shape, seen, start in reversed(self._start_log()):
                if shape == tuple(x.shape) and torch.equal(seen, fingerprint):
                    return start
        return self._step_start

    def spectral_norm_estimate(self) -> Tensor:
        """σ(W) from the stored ``u`` without iterating or writing anything (the eval-mode σ), differentiable.

        A DTensor (sharded) weight is gathered first: under FSDP2, call it on every rank."""
        return self._spectral_norm(full_tensor(self.weight), update=False)

    def effective_weight(self) -> Tensor:
        """``Ŵ = γ / σ(W) · W`` with the eval-mode σ (stored ``u``, no update), in the storage layout of ``weight``
        (``(C_out, C_in)``; ``(C_in, C_out)`` for :class:`SigmaReparamConv1D`). A DTensor (sharded) weight and γ
        are gathered first: under FSDP2, call it on every rank."""
        weight = full_tensor(self.weight)
        return self._reparam(weight, self._spectral_norm(weight, update=False))

    def _reparam(self, weight: Tensor, sigma: Tensor) -> Tensor:
        """``W · γ/σ``, with ``γ/σ := 0`` where ``σ = 0``.

        σ = ‖W u‖ is 0 only when ``W u = 0`` — in practice a zero weight, whose σReparam is ``0 · γ/0``: the
        output is then ``W · 0 = 0`` (= the zero weight's own output, plus the bias) with finite (zero)
        gradients, instead of 0/0 = NaN. The division runs on a safe denominator so its backward is finite too.
        """
        positive = sigma > 0
        safe = torch.where(positive, sigma, torch.ones_like(sigma))
        gamma = full_tensor(self.gamma).reshape(())
        scale = torch.where(positive, gamma.to(sigma.dtype) / safe, torch.zeros_like(sigma))
        return weight * scale.to(weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # under FSDP2 the weight is already gathered here (full_tensor is then a no-op)
        weight = full_tensor(self.weight)
        sigma = self._spectral_norm(weight, update=self.training, x=x)
        return F.linear(x, self._as_matrix(self._reparam(weight, sigma)), full_tensor(self.bias) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"n_power_iterations={self.n_power_iterations}"
        )


class SigmaReparamConv1D(SigmaReparamLinear):
    r"""σReparam for transformers' ``Conv1D`` (GPT-2 family): :math:`y = x \hat W + b`, :math:`\hat W = \gamma W/\sigma(W)`.

    ``transformers.pytorch_utils.Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` stored ``(C_in, C_out) = (nx,
    nf)``, the transpose of ``nn.Linear``'s. This layer keeps that storage (``weight`` ``(C_in, C_out)``, ``bias``
    ``(C_out,)``, plus ``gamma`` ``(1,)`` and buffers ``u`` ``(C_in,)``, ``sigma`` ``()``), so the original
    ``weight`` / ``bias`` state-dict entries load unchanged, and it exposes ``nf`` / ``nx`` like Conv1D. The maths is
    :class:`SigmaReparamLinear`'s on the ``(C_out, C_in)`` matrix :math:`W^\top` (σ(Wᵀ) = σ(W); ``u`` is a right
    singular vector of :math:`W^\top`, i.e. lives in the input space ``C_in`` as for a Linear); converting keeps
    the output (γ₀ = σ(W₀)). :func:`sigma_reparam` converts Conv1D layers automatically; transformers is never
    imported by entrotrain (see :func:`is_hf_conv1d`).

    Example::

        layer = SigmaReparamConv1D.from_conv1d(model.transformer.h[0].attn.c_attn)
    """

    _transposed: ClassVar[bool] = True

    @property
    def nf(self) -> int:
        """Output features (Conv1D's name)."""
        return self.out_features

    @property
    def nx(self) -> int:
        """Input features (Conv1D's name)."""
        return self.in_features

    def reset_parameters(self) -> None:
        """transformers' Conv1D init (``weight ~ N(0, 0.02²)``, ``bias = 0``), then :meth:`reset_spectral_state`."""
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_spectral_state()

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        n_power_iterations: int = 1,
        init_iterations: int | None = None,
        eps: float = 1e-12,
    ) -> SigmaReparamConv1D:
        """A σReparam copy of a transformers ``Conv1D`` whose output equals the original's at conversion.

        ``weight`` (kept ``(C_in, C_out)``) and ``bias`` are copied (new Parameters), ``u`` is the top right singular
        vector of ``Wᵀ`` (float64 SVD, or ``init_iterations`` power iterations) and ``γ = σ(W)``.
        """
        if not is_hf_conv1d(conv1d):
            raise EntrotrainError(
                f"from_conv1d expects a transformers.pytorch_utils.Conv1D, got {type(conv1d).__name__}; for an "
                "nn.Linear use SigmaReparamLinear.from_linear (sigma_reparam(model) picks the right one)."
            )
        layer = cls._from_weights(conv1d.weight, conv1d.bias, n_power_iterations, init_iterations, eps)
        assert isinstance(layer, SigmaReparamConv1D)
        return layer

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}, n_power_iterations={self.n_power_iterations}"


def _convert_one(
    module: nn.Module, n_power_iterations: int, init_iterations: int | None, eps: float = 1e-12
) -> SigmaReparamLinear:
    """The σReparam layer for an ``nn.Linear`` or a transformers ``Conv1D``."""
    if is_hf_conv1d(module):
        return SigmaReparamConv1D.from_conv1d(module, n_power_iterations, init_iterations, eps)
    if isinstance(module, nn.Linear):
        return SigmaReparamLinear.from_linear(module, n_power_iterations, init_iterations, eps)
    raise EntrotrainError(f"σReparam converts {CONVERTIBLE} layers, got {type(module).__name__}.")


class SigmaReparamQKJoint(nn.Module):
    r"""A fused ``qkv`` projection with one σReparam over the q and k rows jointly and one over the v rows.

    Apple's speech model (``disjoint_type=1``): :math:`\hat W_{qk} = \gamma_{qk} W_{qk} / \sigma(W_{qk})` with
    :math:`W_{qk} = [W_q; W_k]`, and :math:`\hat W_v` alike, so the scale of the attention logits is controlled by
    one spectral norm, independently of the values. Holds two :class:`SigmaReparamLinear` (``qk`` with ``2C`` rows,
    ``v`` with ``C``) and concatenates their outputs: ``y = [x Ŵ_qkᵀ + b_qk, x Ŵ_vᵀ + b_v]``, the layout of the
    fused linear it replaces.
    """

    def __init__(self, qk: SigmaReparamLinear, v: SigmaReparamLinear) -> None:
        super().__init__()
        if qk.in_features != v.in_features or qk.out_features != 2 * v.out_features:
            raise EntrotrainError(
                f"SigmaReparamQKJoint needs qk with 2·C rows and v with C rows over the same input, got "
                f"{qk.out_features}×{qk.in_features} and {v.out_features}×{v.in_features}."
            )
        self.qk = qk
        self.v = v
        self.in_features = qk.in_features
        self.out_features = qk.out_features + v.out_features

    @classmethod
    def from_linear(
        cls, linear: nn.Module, n_power_iterations: int = 1, init_iterations: int | None = None, eps: float = 1e-12
    ) -> SigmaReparamQKJoint:
        """Split a fused ``qkv`` ``nn.Linear`` (rows ``[q; k; v]``) or transformers ``Conv1D`` (columns ``[q, k, v]``,
        GPT-2's ``c_attn``) into joint-qk and v σReparam layers of the same kind, exactly."""
        conv = is_hf_conv1d(linear)
        if not (conv or isinstance(linear, nn.Linear)):
            raise EntrotrainError(
                f"from_linear expects a fused qkv {CONVERTIBLE}, got {type(linear).__name__}; pass that module itself."
            )
        weight, bias = linear.weight, linear.bias
        out_features = weight.shape[1] if conv else weight.shape[0]
        if out_features % 3:
            raise EntrotrainError(
                f"qk_joint needs a fused qkv linear with 3·C output rows, got {out_features}."
            )
        kind = SigmaReparamConv1D if conv else SigmaReparamLinear
        rows = 2 * out_features // 3
        parts = []
        for sl in (slice(0, rows), slice(rows, out_features)):
            piece = weight.detach()[:, sl] if conv else weight.detach()[sl]
            part = kind._from_weights(piece, None if bias is None else bias.detach()[sl], n_power_iterations,
                                      init_iterations, eps)
            part.weight.requires_grad_(weight.requires_grad)
            parts.append(part)
        return cls(*parts)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """Also loads the state of the fused layer it replaced (``weight`` and ``bias``: a checkpoint saved before
        :func:`sigma_reparam`): they are split into the ``qk`` and ``v`` rows (Conv1D: columns), which then load as
        plain layers (``u`` and γ = σ(W) from the loaded weights: function-preserving, nothing missing)."""
        fused = state_dict.get(prefix + "weight")
        own = any(key.startswith((prefix + "qk.", prefix + "v.")) for key in state_dict)
        dim = 1 if self.qk._transposed else 0
        if isinstance(fused, Tensor) and not own and fused.dim() == 2 and fused.shape[dim] == self.out_features:
            rows = self.qk.out_features
            state_dict.pop(prefix + "weight")
            state_dict[prefix + "qk.weight"], state_dict[prefix + "v.weight"] = fused.split(
                [rows, self.out_features - rows], dim=dim
            )
            bias = state_dict.pop(prefix + "bias", None)
            if isinstance(bias, Tensor):
                state_dict[prefix + "qk.bias"], state_dict[prefix + "v.bias"] = bias.split(
                    [rows, self.out_features - rows]
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def effective_weight(self) -> Tensor:
        """``[Ŵ_qk; Ŵ_v]`` with the eval-mode σ: the fused weight this module computes with, in the layout of the
        layer it replaced (``(3C, C)`` for nn.Linear; ``(C, 3C)``, i.e. ``[Ŵ_qk, Ŵ_v]``, for Conv1D)."""
        dim = 1 if self.qk._transposed else 0
        return torch.cat([self.qk.effective_weight(), self.v.effective_weight()], dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.qk(x), self.v(x)], dim=-1)


def _as_patterns(patterns: str | Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    if not all(isinstance(p, str) for p in out):
        raise EntrotrainError(f"{what} must be glob strings, got {patterns!r}.")
    return out


def sigma_reparam(
    model: nn.Module,
    include: str | Sequence[str] = ("**",),
    exclude: str | Sequence[str] = (),
    n_power_iterations: int = 1,
    init_iterations: int | None = None,
    qk_joint: str | Sequence[str] = (),
) -> nn.Module:
    """Replace ``nn.Linear`` submodules by :class:`SigmaReparamLinear` and transformers ``Conv1D`` ones (GPT-2
    family) by :class:`SigmaReparamConv1D`, in place, function-preserving at step 0.

    Granularity: each converted ``nn.Linear`` / ``Conv1D`` gets its own σReparam ("per projection" for separate q/k/v linears,
    "fused qkv" for a fused one); fused ``qkv`` linears whose names match ``qk_joint`` (e.g. ``"**.attn.qkv"``, GPT-2's
    ``"**.attn.c_attn"``) instead get one σReparam over the q and k rows jointly and one over the v rows (:class:`SigmaReparamQKJoint`).

    A Linear / Conv1D is converted when its qualified name (``model.named_modules()``, without the segments of
    torch.compile / FSDP1 / activation-checkpointing wrappers: :mod:`entrotrain.taps.module_names`) matches one of
    ``include`` and none of
    ``exclude`` (globs over whole dotted names as every tap takes them: ``*`` = one name segment, ``**`` = any number
    of segments; see :class:`~entrotrain.taps.name_filter.NameFilter`). Each converted layer keeps its weight and
    bias and gets γ₀ = σ(W₀), so the model computes the same function (up to float rounding) right after
    conversion; build the optimizer *after* converting (the parameters are new objects). Linears inside
    ``nn.MultiheadAttention`` are skipped (it reads ``out_proj.weight`` directly, never calling its forward), and a
    layer whose weight is shared with another module (weight tying, e.g. GPT-2's ``lm_head`` ↔ ``wte``) is an
    error: exclude it. List the converted layers with :func:`sigma_reparam_names`. Conv1D is recognised without
    importing transformers (:func:`is_hf_conv1d`). Convert before FSDP2's ``fully_shard`` (see the module doc).

    Args:
        model: any module; modified in place and returned.
        include: glob(s) of Linear / Conv1D names to convert, e.g. ``"blocks.**"``; default ``"**"`` (all).
        exclude: glob(s) of names to leave alone, e.g. ``("lm_head", "**.mlp.*")``.
        n_power_iterations: per training forward, see :class:`SigmaReparamLinear`.
        init_iterations: ``None`` = exact SVD at conversion, else that many power iterations.
        qk_joint: glob(s) of fused ``qkv`` linears (rows ``[q; k; v]``; Conv1D columns ``[q, k, v]``) to convert
            with joint-qk granularity.

    Returns:
        ``model``.

    Raises:
        EntrotrainError: when no Linear / Conv1D matched (names the patterns and some convertible layer names), a
            matched layer's weight is tied to another module, or holds NaN/Inf (σ is undefined), or a bad argument.

    A layer with an all-zero weight converts with a warning: σ = 0 gives γ₀ = 0 and the output stays 0 + bias
    (never 0/0 = NaN), but only the bias learns. In training, a forward with a non-finite weight gives a non-finite
    output (that is data) but leaves ``u`` and ``sigma`` at their last finite values.
    """
    if not isinstance(model, nn.Module):
        raise EntrotrainError(f"sigma_reparam expects an nn.Module, got {type(model).__name__}; pass the model.")
    check_int(n_power_iterations, "n_power_iterations", low=1)
    check_int(init_iterations, "init_iterations (None = exact SVD)", low=1, none_ok=True)
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")
    joint = _as_patterns(qk_joint, "qk_joint")
    wanted = NameFilter(list(include), list(exclude)) if include else None  # include=() converts nothing (an error)
    joint_names = NameFilter(list(joint)) if joint else None
    linears = [  # globs see clean names: no torch.compile / FSDP1 / activation-checkpointing wrapper segments
        (clean_module_name(n), m)
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, nn.Linear) or is_hf_conv1d(m)
    ]
    mha_children = {
        id(child) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for child in m.modules()
    }
    chosen = [(n, m) for n, m in linears if n and wanted is not None and wanted(n)]
    skipped = [n for n, m in chosen if id(m) in mha_children]
    if skipped:
        warnings.warn(
            f"sigma_reparam skips {skipped[:8]}: nn.MultiheadAttention uses its projection weights directly, so "
            "they cannot be swapped. Use a hand-written attention module with nn.Linear projections instead.",
            stacklevel=2,
        )
    chosen = [(n, m) for n, m in chosen if id(m) not in mha_children]
    if not chosen:
        names = [n for n, _ in linears if n]
        raise EntrotrainError(
            f"sigma_reparam: no nn.Linear or transformers Conv1D layer of {type(model).__name__} matched "
            f"include={list(include)} and not exclude={list(exclude)}. The convertible layers ({CONVERTIBLE}) are "
            f"e.g. {names[:10]}" + (" (none at all)" if not names else "")
            + f". Fix the glob patterns ({GLOB_SYNTAX})."
        )
    chosen_ids = {id(m) for _, m in chosen}
    owners: dict[int, set[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        name = clean_module_name(name)  # as in `linears`
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(f"{name}.{pname}" if name else pname)
    for name, m in chosen:
        own = {f"{n}.weight" for n, mm in linears if mm is m}
        others = owners.get(id(m.weight), set()) - own
        if others:
            raise EntrotrainError(
                f"sigma_reparam: {name}.weight is shared with {sorted(others)} (weight tying); converting it would "
                f"untie them. Add {name!r} to exclude."
            )
    converted: dict[int, nn.Module] = {}
    for name, m in chosen:
        if id(m) not in converted:
            if joint_names is not None and joint_names(name):
                converted[id(m)] = SigmaReparamQKJoint.from_linear(m, n_power_iterations, init_iterations)
            else:
                converted[id(m)] = _convert_one(m, n_power_iterations, init_iterations)
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # named_children() would drop repeats
            if child is not None and id(child) in chosen_ids:
                setattr(parent, child_name, converted[id(child)])
    return model


@torch.no_grad()
def reset_sigma_reparam_state(model: nn.Module, init_iterations: int | None = None, reset_gamma: bool = True) -> nn.Module:
    """Recompute ``u``, ``sigma`` (and γ = σ(W), function-preserving) of every σReparam layer from its current weight.

    For weights loaded *after* conversion: a converted model built on the meta device (or sharded with FSDP2's
    ``fully_shard`` and materialised with ``to_empty``), then given the original, unconverted checkpoint
    (``load_state_dict(..., strict=False)`` or ``torch.distributed.checkpoint.state_dict.set_model_state_dict``),
    computes that checkpoint's function once this has run. Under FSDP2 it gathers each weight (call it on every
    rank). See :meth:`SigmaReparamLinear.reset_spectral_state`.

    Returns:
        ``model``.
    """
    check_int(init_iterations, "init_iterations (None = exact SVD)", low=1, none_ok=True)
    check_bool(reset_gamma, "reset_gamma")
    for module in model.modules():
        if isinstance(module, SigmaReparamLinear):
            module.reset_spectral_state(init_iterations, reset_gamma)
    return model


def sigma_reparam_names(model: nn.Module) -> list[str]:
    """Qualified names of the σReparam layers (:class:`SigmaReparamLinear`, incl. :class:`SigmaReparamConv1D`) of
    ``model``, in ``named_modules`` order."""
    return [name for name, m in named_modules(model) if isinstance(m, SigmaReparamLinear)]
