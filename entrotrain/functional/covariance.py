r"""Streaming float64 sufficient statistics of rows, and the covariance-family measures computed from them exactly.

:class:`CovarianceAccumulator` keeps ``count``, ``Σ x`` (``d``) and ``Σ x xᵀ`` (``d × d``) in float64 —
``O(d²)`` memory, no sample buffer — so a measure over many batches, steps or ranks is exact at any point:

- ``update(x)`` adds a batch; ``merge(other)`` adds another accumulator; under DDP, all-reduce
  :meth:`~CovarianceAccumulator.state` (a list of float64 tensors) with ``SUM`` and :meth:`load_state` the result.
- ``covariance(centered=True)`` = ``Σxxᵀ/N − μμᵀ`` (population covariance, as ``ZᵀZ/N`` in the papers);
  ``second_moment()`` = ``Σxxᵀ/N``.
- ``normalize_rows=True`` accumulates the unit-norm rows ``x / ‖x‖`` instead (zero rows raise).

What can be streamed exactly from these statistics (all rows seen so far, any batching, any rank order):

==============================  =================================================================================
measure                         from the stream
==============================  =================================================================================
Vendi, linear kernel            exact: ``spec(XXᵀ/N) = spec(second_moment())`` (``vendi_score(x, kernel="linear")``)
Vendi, cosine kernel            exact with ``normalize_rows=True`` (row normalisation needs no other row)
Rényi-q entropy of covariance   exact: ``spec(C / tr C)`` (the "erank of the covariance", p ∝ σ²), any ``q``
effective rank / RankMe         exact in exact arithmetic: ``σ_k(X) = √λ_k(Σxxᵀ)``, ``k ≤ min(N, d)``; in float64
                                the Gram squares the condition number (singular values below ~1e-8·σ_max lose
                                relative accuracy)
matrix entropy (Diff-eRank)     **not** streamable: rows are normalised *after* centring by the mean of all rows,
                                which is unknown until the last row (a per-batch mean gives another measure)
matrix nuclear norm             **not** streamable, for the same reason (centre-then-normalise)
DSE / DSMI, RBF-kernel Vendi    **not** streamable: they need every pairwise distance (keep a fixed-size buffer)
==============================  =================================================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotrain._validation import check_device, check_int, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.representation import _row_normalize
from entrotrain.functional.spectrum import (
    _check_finite,
    _check_order,
    _eigvalsh,
    _round_off_zeros,
    spectral_entropy,
)

__all__ = ["CovarianceAccumulator"]


def _check_representable(rows: Tensor, outer: Tensor) -> None:
    """``Σ x xᵀ`` of these rows neither overflows float64 (rows beyond ~1e154) nor underflows to 0 (rows below
    ~1e-154 that are not zero): either would turn a value into a wrong one or into 'a zero matrix'."""
    if not bool(torch.isfinite(outer).all()):
        raise EntrotrainError(
            f"x (max |x| = {float(rows.abs().max()):.3g}) overflows the float64 second moment Σ x xᵀ; rescale the "
            "rows before update() (divide by a constant: the entropies and ranks do not change)."
        )
    if rows.numel() and not bool((outer != 0).any()) and bool((rows != 0).any()):
        raise EntrotrainError(
            f"x (max |x| = {float(rows.abs().max()):.3g}) underflows the float64 second moment Σ x xᵀ to 0; rescale "
            "the rows before update() (multiply by a constant: the entropies and ranks do not change)."
        )


class CovarianceAccumulator:
    """Float64 running ``count``, ``Σ x`` and ``Σ x xᵀ`` of ``d``-dimensional rows (see the module doc).

    Args:
        dim: feature dimension ``d``.
        normalize_rows: accumulate ``x / ‖x‖`` (for the cosine-kernel Vendi score).
        device: where the statistics live (the device of the rows you feed).
    """

    def __init__(self, dim: int, *, normalize_rows: bool = False, device: torch.device | str | None = None) -> None:
        self.dim = check_int(dim, "dim", low=1)
        device = check_device(device)
        self.normalize_rows = bool(normalize_rows)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------------------------------------ updates

    def update(self, x: Tensor) -> CovarianceAccumulator:
        """Add rows: ``x`` of shape ``(..., d)`` (leading dims flattened), any float dtype. Returns ``self``."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[-1] != self.dim:
            got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
            raise EntrotrainError(f"update() takes a floating tensor of shape (..., {self.dim}), got {got}.")
        rows = x.detach().reshape(-1, self.dim).to(device=self.sum.device, dtype=torch.float64)
        _check_finite(rows, "x")
        if self.normalize_rows:
            if bool((rows == 0).all(dim=1).any()):
                raise EntrotrainError("normalize_rows=True but x has all-zero rows; drop them before update().")
            rows = _row_normalize(rows, allow_zero=True, name="x")  # overflow-safe for any scale of the rows
        outer = rows.T @ rows
        _check_representable(rows, outer)
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sum_outer += outer
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's statistics (same ``dim`` and ``normalize_rows``). Returns ``self``."""
        if not isinstance(other, CovarianceAccumulator):
            raise EntrotrainError(f"merge() takes a CovarianceAccumulator, got {type(other).__name__}.")
        if other.dim != self.dim or other.normalize_rows != self.normalize_rows:
            raise EntrotrainError(
                f"cannot merge accumulators with dim/normalize_rows {other.dim}/{other.normalize_rows} into "
                f"{self.dim}/{self.normalize_rows}."
            )
        self.count += other.count.to(self.count.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        return self

    def reset(self) -> None:
        """Forget every row."""
        self.count.zero_()
        self.sum.zero_()
        self.sum_outer.zero_()

    def state(self) -> list[Tensor]:
        """``[count, Σx, Σxxᵀ]``, the live float64 tensors: all-reduce each with ``SUM`` across ranks in place."""
        return [self.count, self.sum, self.sum_outer]

    def load_state(self, tensors: list[Tensor]) -> None:
        """Replace the statistics with ``[count, Σx, Σxxᵀ]`` (e.g. after a manual all-reduce of copies)."""
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 3:
            got = len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__
            raise EntrotrainError(f"load_state() takes [count, sum, sum_outer], got {got} tensors.")
        for name, t in zip(("count", "sum", "sum_outer"), tensors):
            check_tensor(t, f"load_state()'s {name}")
        count, s, so = (t.detach().to(device=self.sum.device, dtype=torch.float64) for t in tensors)
        if count.numel() != 1 or tuple(s.shape) != (self.dim,) or tuple(so.shape) != (self.dim, self.dim):
            raise EntrotrainError(
                f"load_state() shapes must be (), ({self.dim},), ({self.dim}, {self.dim}); got "
                f"{tuple(count.shape)}, {tuple(s.shape)}, {tuple(so.shape)}."
            )
        for name, t in (("count", count), ("sum", s), ("sum_outer", so)):
            _check_finite(t, f"load_state()'s {name}")
        if float(count) < 0:
            raise EntrotrainError(f"load_state()'s count must be >= 0 (a number of rows), got {float(count)}.")
        self.count = count.reshape(())
        self.sum, self.sum_outer = s, so

    # ---------------------------------------------------------------------------------------------- statistics

    def _n(self, minimum: int = 1) -> float:
        n = float(self.count)
        if n < minimum:
            raise EntrotrainError(
                f"the accumulator holds {n:.0f} row(s); at least {minimum} are needed. update() first."
            )
        return n

    def mean(self) -> Tensor:
        """``Σx / N``, ``(d,)`` float64."""
        return self.sum / self._n()

    def second_moment(self) -> Tensor:
        """``Σxxᵀ / N``, ``(d, d)`` float64 (uncentred)."""
        return self.sum_outer / self._n()

    def covariance(self, centered: bool = True) -> Tensor:
        """``Σxxᵀ/N − μμᵀ`` (population covariance) when ``centered``, else :meth:`second_moment`. ``(d, d)`` float64.

        One-pass float64 sums: exact to ~1e-16 relative to ``‖μ‖²``; data whose mean dwarfs its spread by more than
        ~1e6 lose precision (subtract a rough offset before ``update``).
        """
        if not centered:
            return self.second_moment()
        n = self._n(2)
        mu = self.sum / n
        c = self.sum_outer / n - torch.outer(mu, mu)
        return 0.5 * (c + c.T)

    def spectrum(self, centered: bool = True) -> Tensor:
        """Eigenvalues of :meth:`covariance`, float64, descending, ``(d,)``; negative round-off and the round-off floor
        ``max(N, d, 16) · ε₆₄ · max λ`` are set to 0.

        ``N`` rows give a covariance of rank at most ``N − 1`` (centred; ``N`` uncentred): the eigenvalues past that
        bound are set to exactly 0, so that round-off there (~1e-16 of the largest) is no direction (order ``q = 0``,
        the rank, counted each of them: 17 for 5 rows of width 30); the floor does the same for rows of lower rank
        (duplicated rows, rank-3 rows: order 0 gave 101 for 500 rank-3 rows of width 200). The floor is relative to
        ``max λ``: a mean that dwarfs the spread leaves larger round-off (:meth:`covariance`)."""
        n = self._n(2 if centered else 1)
        lam = self._floored(_eigvalsh(self.covariance(centered), "the covariance").flip(0), n)
        lam[max(round(n) - (1 if centered else 0), 0) :] = 0.0
        return lam

    def _floored(self, lam: Tensor, n: float) -> Tensor:
        """Eigenvalues of a ``d × d`` sum over ``n`` rows with negatives and the round-off floor
        (``max(n, d, 16) · ε₆₄ · max λ``, :func:`~entrotrain.functional.spectrum._round_off_zeros`) set to 0: the
        eigenvalues of rank-deficient rows' exact zeros (duplicated rows, rank ``r < min(N, d)``) are no direction."""
        return _round_off_zeros(lam, max(round(n), self.dim))

    # ------------------------------------------------------------------------------------------------ measures

    def entropy(self, q: float = 1.0, *, centered: bool = True, base: float = math.e) -> Tensor:
        """Rényi-``q`` entropy of ``spec(C / tr C)`` (covariance family, p ∝ σ²). 0-dim float64."""
        return spectral_entropy(self.spectrum(centered), _check_order(q), base=base)

    def erank(self, q: float = 1.0, *, centered: bool = True) -> Tensor:
        """``exp`` of :meth:`entropy`: the effective number of directions of the covariance."""
        return torch.exp(self.entropy(q, centered=centered))

    def vendi_score(self, q: float = 1.0) -> Tensor:
        """Vendi score of every row seen, exact: linear kernel, or cosine with ``normalize_rows=True``.

        ``spec(XXᵀ/N) = spec(Σxxᵀ/N)`` (plus zeros): the ``min(N, d)`` largest eigenvalues of the ``d × d`` second
        moment, used without renormalisation as vendi-score does; equals
        :func:`~entrotrain.functional.representation.vendi_score` on the concatenated rows. (With ``N < d`` the
        other ``d − N`` are round-off, not eigenvalues of ``XXᵀ/N``: order ``q = 0``, the rank, counted them; the
        round-off floor of :meth:`spectrum` sets those of rows of lower rank to 0 as well.)
        """
        n = self._n(2)
        lam = self._floored(_eigvalsh(self.second_moment(), "the second moment").flip(0), n)[: min(round(n), self.dim)]
        return torch.exp(spectral_entropy(lam, _check_order(q), normalize=False))

    def singular_values(self) -> Tensor:
        """Singular values of the stacked ``(N, d)`` (raw or row-normalised) rows: the ``min(N, d)`` largest of
        ``√λ(Σxxᵀ)``, float64, descending. ``Σxxᵀ`` is ``d × d``: with fewer rows than features its other ``d − N``
        eigenvalues are zeros (round-off) that the rows have no singular value for (RankMe's ``+ε`` would count
        each of them). Eigenvalues at the round-off floor of :meth:`spectrum` are 0 before the square root: the root
        of a round-off ``1e-16 · λ_max`` is a singular value of ``1e-8 · σ_max``, which ``svdvals`` of the rows puts
        at ``~1e-16 · σ_max`` (the effective rank of 500 rank-3 rows of width 200 was 2.988363, svdvals 2.988349)."""
        n = self._n(1)
        return self._floored(_eigvalsh(self.sum_outer, "Σxxᵀ").flip(0), n).sqrt()[: min(round(n), self.dim)]

    def effective_rank(self) -> Tensor:
        """Roy & Vetterli effective rank of the stacked rows (p ∝ σ), from ``Σxxᵀ`` (see the module doc).

        Needs 2 rows, as :func:`~entrotrain.functional.representation.effective_rank` does."""
        self._n(2)
        return torch.exp(spectral_entropy(self.singular_values(), 1.0))

    def rankme(self, *, eps: float = 1e-7) -> Tensor:
        """RankMe (Garrido et al.) of the stacked raw rows, ``p = σ/‖σ‖₁ + ε``, from ``Σxxᵀ``; needs 2 rows."""
        self._n(2)
        return torch.exp(spectral_entropy(self.singular_values(), 1.0, eps=eps))
