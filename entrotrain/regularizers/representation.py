r"""Representation regularisers that cure rank collapse: matrix entropy, Vendi entropy and MMCR.

The formulas live in :mod:`entrotrain.functional.spectral_objectives` (differentiable, eigenvalue-only, clamped at
``ε = 1e-10``; values equal the detached measures of :mod:`entrotrain.functional.representation`). These classes are
:class:`~entrotrain.regularizers.composition.Regularizer` s: a weight, a schedule, ``+`` and ``c *`` composition.

Sign convention: the entropy regularisers return the penalty ``−H`` (adding ``w · penalty`` to the loss *maximises*
the entropy), by default normalised by ``ln min(n, d)`` (``normalize=True``) so a weight transfers across batch and
feature sizes — ``H`` still depends on ``n``: keep the batch size fixed. :class:`MMCRLoss` returns the MMCR loss itself
(minimise it). Under DDP the entropy regularisers score each rank's local batch (no gather: DDP averages the
per-rank gradients); :class:`MMCRLoss` gathers the centroids (its docstring).

Inputs — what ``reg(...)`` accepts:

- a tensor: ``(n, d)`` rows (``(B, ..., d)`` is flattened to rows) for the entropy regularisers, ``(N, k, d)`` or
  stacked ``(N·k, d)`` views (with ``n_views`` / ``layout``) for :class:`MMCRLoss`;
- a differentiable :class:`~entrotrain.taps.activation_tap.ActivationTap` or its ``captures`` dict: the penalty is
  the mean over the captured modules (each module's calls concatenated);
- nothing, after ``with reg.capture(model): out = model(x)`` (a differentiable ActivationTap on the modules named by
  ``include`` globs, released by the call)::

      reg = MatrixEntropyRegularizer(0.1, order=2, include=["model.projector"])
      with reg.capture(self):
          loss = self.model.loss(x1, x2)
      loss = loss + reg(step=self.global_step).total

  A *sum* (``a + b``, also mixed with attention regularisers) captures under one ``with (a + b).capture(model):``:
  each of these terms arms its own tap on its own ``include`` (see :mod:`entrotrain.regularizers.composition`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Union

import torch
import torch.distributed as dist
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real
from entrotrain.errors import EntrotrainError
from entrotrain.functional.spectral_objectives import (
    EIG_EPS,
    MMCR_MAX_LAM,
    MMCR_NORM_EPS,
    matrix_entropy_objective,
    mmcr_terms,
    mmcr_views,
    nuclear_norm,
    vendi_entropy_objective,
)
from entrotrain.functional.spectrum import _check_order
from entrotrain.regularizers.composition import Regularizer, Schedule

__all__ = ["MatrixEntropyRegularizer", "MMCRLoss", "RepresentationInput", "VendiRegularizer"]

#: What the representation regularisers accept (module docstring).
RepresentationInput = Union[Tensor, Mapping[str, Sequence[Any]], Any]


def _as_row_sets(inputs: RepresentationInput) -> list[tuple[str, Tensor]]:
    """``[(name, rows)]``: one entry for a tensor, one per captured module for a tap or its ``captures``."""
    if isinstance(inputs, Tensor):
        return [("input", inputs)]
    if hasattr(inputs, "captures") and hasattr(inputs, "differentiable"):  # an ActivationTap
        if not inputs.differentiable:
            raise EntrotrainError(
                "the ActivationTap is not differentiable: its rows are detached and a regulariser on them has no "
                "gradient. Build it with ActivationTap(model, ..., differentiable=True), or use `with "
                "reg.capture(model): ...`."
            )
        inputs = inputs.captures
    if not isinstance(inputs, Mapping):
        raise EntrotrainError(
            f"expected a tensor of activations, an ActivationTap or its captures dict, got {type(inputs).__name__}."
        )
    out = []
    for name, captures in inputs.items():
        rows = [c.rows if hasattr(c, "rows") else c for c in captures]
        if rows:
            out.append((str(name), torch.cat(rows) if len(rows) > 1 else rows[0]))
    if not out:
        raise EntrotrainError(
            "no activation was captured: run the forward inside `with reg.capture(model):` (include= must name the "
            "modules whose outputs to regularise), or pass the tensor: reg(z)."
        )
    return out


def _flat_rows(x: Tensor) -> Tensor:
    if x.dim() < 2:
        raise EntrotrainError(f"activations must be (n, d) rows (or (B, ..., d)), got shape {tuple(x.shape)}.")
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


class _RepresentationRegularizer(Regularizer):
    """Shared input handling and ``capture`` (a differentiable ActivationTap on ``include``)."""

    capture_group = "activation"

    def __init__(
        self,
        weight: float,
        *,
        include: str | Sequence[str] | None,
        schedule: Schedule,
        final_weight: float,
        total_steps: int | None,
        name: str | None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include

    @contextmanager
    def capture(self, model: torch.nn.Module, *, step: int | None = None, **tap_kwargs: Any) -> Iterator[Any]:
        """Arm a differentiable :class:`~entrotrain.taps.activation_tap.ActivationTap` on ``model`` for the
        ``with`` body (modules from ``include=`` here or this regulariser's ``include``); the next call without
        inputs uses and releases its captures. ``tap_kwargs`` go to the tap (``max_rows=``, ``layout=``, ...).
        ``step`` and weight 0 as :meth:`Regularizer.capture <entrotrain.regularizers.composition.Regularizer.capture>`
        (no tap, yields ``None``)."""
        from entrotrain.taps.activation_tap import ActivationTap  # regularisers sit above taps; import on use

        if tap_kwargs.pop("differentiable", True) is not True:
            raise EntrotrainError("Regularizer.capture needs a differentiable tap; drop differentiable=False.")
        include = tap_kwargs.pop("include", self.include)
        if include is None:
            raise EntrotrainError(
                f"{type(self).__name__}.capture needs the modules to regularise: pass include=[globs] here or to the "
                "constructor (e.g. include=['model.projector'])."
            )
        if self._skip_capture(model, step):
            yield None
            return
        tap = ActivationTap(model, include=include, differentiable=True, **tap_kwargs)
        self._capture.records = None
        with tap:
            yield tap
        self._capture.records = tap.captures

    def penalty(self, inputs: RepresentationInput) -> Tensor:
        terms = [self._penalty_of(rows) for _, rows in _as_row_sets(inputs)]
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

    def _penalty_of(self, rows: Tensor) -> Tensor:
        raise NotImplementedError


def _maximised(h: Tensor, rows: Tensor, normalize: bool) -> Tensor:
    """The penalty ``-H`` of a regulariser that maximises the entropy ``h`` of ``(n, d)`` ``rows``; with ``normalize``
    ``-H / ln min(n, d)`` (``ln`` taken as 1 below 2: the entropy is 0 there)."""
    if not normalize:
        return -h
    m = min(rows.shape[0], rows.shape[1])
    return -(h / (math.log(m) if m >= 2 else 1.0))


class MatrixEntropyRegularizer(_RepresentationRegularizer):
    r"""Maximise the matrix entropy of a batch of representations (spectral / von Neumann entropy).

    .. math::

        R = -\frac{H_\alpha(\rho)}{\ln \min(n, d)},\qquad \rho = \frac{Z^\top Z}{\operatorname{tr} Z^\top Z},\
        Z = \operatorname{rownorm}(X - \bar X)

    ``order=1``: von Neumann ``H₁ = −Σ λ ln λ`` (``eigvalsh`` of the smaller Gram, eigenvalues clamped at
    ``eps``); ``order=2``: Rényi-2 ``H₂ = −ln ‖ρ‖_F²`` (no eigensolver, smooth gradient). The preset of Wei et al.
    2024 (Diff-eRank): centred, unit rows; the value equals
    :func:`~entrotrain.functional.representation.matrix_entropy`. The anti-collapse use follows the reference note
    (``representation_routing.md`` §2). A fully collapsed batch (identical rows) gives 0 with zero gradient; NaN data
    gives NaN (:mod:`~entrotrain.functional.spectral_objectives`).

    Args:
        weight: coefficient of the penalty.
        order: 1 or 2.
        normalize: divide by ``ln min(n, d)`` (default ``True``; ``H <= ln min(n − 1, d)`` after centring).
        center, normalize_rows: the preset's steps (both on by default).
        eps: eigenvalue clamp (order 1), default ``1e-10``.
        include: module-name globs for :meth:`capture`.
        schedule, final_weight, total_steps, name: as :class:`~entrotrain.regularizers.composition.Regularizer`.
    """

    name = "matrix_entropy"

    def __init__(
        self,
        weight: float = 0.1,
        order: int = 1,
        *,
        normalize: bool = True,
        center: bool = True,
        normalize_rows: bool = True,
        eps: float = EIG_EPS,
        include: str | Sequence[str] | None = None,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            weight, include=include, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name
        )
        self.order = check_int(order, "order", low=1, high=2)
        self.normalize = check_bool(normalize, "normalize")
        self.center = check_bool(center, "center")
        self.normalize_rows = check_bool(normalize_rows, "normalize_rows")
        self.eps = check_real(eps, "eps", low=0.0, high=1e-3, low_open=True)

    def entropy(self, rows: Tensor) -> Tensor:
        """``H`` of one ``(n, d)`` batch (nats, keeps the graph)."""
        return matrix_entropy_objective(
            _flat_rows(rows), self.order, center=self.center, normalize_rows=self.normalize_rows, eps=self.eps
        )

    def _penalty_of(self, rows: Tensor) -> Tensor:
        rows = _flat_rows(rows)
        h = self.entropy(rows)
        return _maximised(h, rows, self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}, normalize={self.normalize}"


class VendiRegularizer(_RepresentationRegularizer):
    r"""Maximise the log-Vendi score of order ``q`` (Friedman & Dieng 2023) with the cosine kernel.

    .. math::

        R = -\frac{\ln \mathrm{VS}_q}{\ln \min(n, d)},\qquad \ln\mathrm{VS}_q = H_q(\operatorname{spec}(\hat X
        \hat X^\top / n))

    (unit rows, no centring: vendi-score's ``score_dual``; the value equals
    :func:`~entrotrain.functional.representation.vendi_score` ``(x, q)``). ``q = 2`` needs no eigensolver.

    Args:
        weight: coefficient. q: order ``> 0`` (``float('inf')`` allowed). normalize: divide by ``ln min(n, d)``
            (default ``True``). eps: eigenvalue clamp. include: globs for :meth:`capture`. Others as
            :class:`~entrotrain.regularizers.composition.Regularizer`.
    """

    name = "vendi"

    def __init__(
        self,
        weight: float = 0.1,
        q: float = 1.0,
        *,
        normalize: bool = True,
        eps: float = EIG_EPS,
        include: str | Sequence[str] | None = None,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            weight, include=include, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name
        )
        self.q = _check_order(q)
        if self.q == 0.0:
            raise EntrotrainError("q=0 counts the non-zero eigenvalues: it has no gradient. Use q > 0.")
        self.normalize = check_bool(normalize, "normalize")
        self.eps = check_real(eps, "eps", low=0.0, high=1e-3, low_open=True)

    def _penalty_of(self, rows: Tensor) -> Tensor:
        rows = _flat_rows(rows)
        h = vendi_entropy_objective(rows, self.q, eps=self.eps)
        return _maximised(h, rows, self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q={self.q}, normalize={self.normalize}"


def _gather_with_local_grad(c: Tensor) -> Tensor:
    """All ranks' ``c`` stacked in rank order; only this rank's slot carries gradient (the MMCR reference's DDP)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shapes = [torch.zeros(1, dtype=torch.long, device=c.device) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor([c.shape[0]], dtype=torch.long, device=c.device))
    sizes = [int(s) for s in shapes]
    if len(set(sizes)) != 1:
        raise EntrotrainError(
            f"MMCRLoss(distributed=True) needs the same number of samples on every rank, got {sizes}; use "
            "drop_last=True (or distributed=False for a per-rank loss)."
        )
    parts = [torch.empty_like(c) for _ in range(world)]
    dist.all_gather(parts, c.detach().contiguous())
    parts[rank] = c
    return torch.cat(parts)


class MMCRLoss(_RepresentationRegularizer):
    r"""Maximum Manifold Capacity Representations loss (Yerxa, Kuang, Simoncelli & Chung, NeurIPS 2023).

    .. math::

        \mathcal L = -\|C\|_* + \frac{\lambda}{N}\sum_i \|Z_i\|_*,\qquad c_i = \tfrac1k\textstyle\sum_j
        \hat z_{ij},\ \hat z_{ij} = z_{ij}/\|z_{ij}\|_2

    (:func:`~entrotrain.functional.spectral_objectives.mmcr_objective`; minimise it). The choices (reference note
    §1): the layout is explicit — ``(N, k, d)``, or stacked ``(N·k, d)`` read as ``layout="sample_major"`` (the
    reference's) or ``"view_major"`` (``torch.cat([view1, view2])``); ``F.normalize`` eps 1e-12; ``λ = 0`` by default
    (the reference's) with the local term divided by the local ``N``; no loss scaling (retune the weight when ``N``
    changes: ``‖C‖_* <= √(N·min(N, d))``); SVDs in float32/float64; no momentum centroid; NaN data → NaN.

    DDP (``distributed="auto"``: on when a process group of more than one rank is initialised): the centroids are
    all-gathered and this rank's slot replaced by the local tensor, so ``‖C‖_*`` is over the global ``N = W·N_r``
    and gradients flow through the local shard only (the reference's semantics). Every rank logs the same global term;
    after DDP averages gradients over ``W`` ranks, the update is that of one process on the union with the global term
    divided by ``W``. Each rank must hold the same number of samples.

    Args:
        weight: coefficient (1.0: MMCR is the whole SSL objective).
        lam: ``0 <= λ <= 1e6`` (``MMCR_MAX_LAM``: far larger weights overflow the float32 gradient).
        n_views: ``k``, to read stacked ``(N·k, d)`` input (ignored for ``(N, k, d)``).
        layout: ``"sample_major"`` | ``"view_major"`` for stacked input.
        distributed: ``"auto"``, ``True`` (requires an initialised process group) or ``False``.
        include: globs for :meth:`capture`. Others as :class:`~entrotrain.regularizers.composition.Regularizer`.
    """

    name = "mmcr"

    def __init__(
        self,
        weight: float = 1.0,
        lam: float = 0.0,
        *,
        n_views: int = 2,
        layout: Literal["sample_major", "view_major"] = "sample_major",
        distributed: bool | Literal["auto"] = "auto",
        eps: float = MMCR_NORM_EPS,
        include: str | Sequence[str] | None = None,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            weight, include=include, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name
        )
        self.lam = check_real(lam, "lam", low=0.0, high=MMCR_MAX_LAM)
        self.n_views = check_int(n_views, "n_views", low=1)
        self.layout = check_choice(layout, "layout", ("sample_major", "view_major"))
        if distributed != "auto":
            check_bool(distributed, "distributed")
        self.distributed = distributed
        self.eps = check_real(eps, "eps", low=0.0, low_open=True)

    def _use_distributed(self) -> bool:
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed is True and not ready:
            raise EntrotrainError(
                "MMCRLoss(distributed=True) needs an initialised torch.distributed process group; use "
                "distributed='auto' (on only under DDP) or False."
            )
        return bool(self.distributed) and ready and dist.get_world_size() > 1

    def views(self, z: Tensor) -> Tensor:
        """``(N, k, d)`` from ``(N, k, d)`` or stacked ``(N·k, d)`` (``n_views``, ``layout``)."""
        if z.dim() == 3:
            return z
        if z.dim() != 2:
            raise EntrotrainError(
                f"MMCRLoss takes (N, k, d) views or stacked (N*k, d) rows, got shape {tuple(z.shape)}."
            )
        return mmcr_views(z, self.n_views, self.layout)

    def _penalty_of(self, rows: Tensor) -> Tensor:
        c, zhat, bad = mmcr_terms(self.views(rows), eps=self.eps)
        n = c.shape[0]
        if n == 0 or c.shape[1] == 0:
            return rows.sum() * 0.0
        if self._use_distributed():
            c = _gather_with_local_grad(c)
        loss = -nuclear_norm(c)
        if self.lam:
            loss = loss + self.lam * nuclear_norm(zhat.transpose(1, 2)).sum() / n
        return torch.where(bad, torch.full_like(loss, math.nan), loss)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, n_views={self.n_views}, layout={self.layout!r}"
