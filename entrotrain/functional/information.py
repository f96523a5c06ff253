r"""Information-plane mutual-information estimators: ``(I(X;T), I(T;Y))`` for a layer's activations ``T``.

The one public module (the maths lives in ``information_binning`` / ``information_kde`` / ``information_knn``).
:func:`information_plane_point` dispatches on the estimator name; :data:`ESTIMATORS` lists the names and
:func:`estimator_parameters` gives the parameters actually used (defaults filled in), to log beside the value —
these numbers depend on them (Saxe et al. 2018; Chelombiev et al. 2019).

====================  ===================================================  =========================================
name                  I(X;T)                                               I(T;Y)
====================  ===================================================  =========================================
``binning``           ``H(T)`` of the fixed-grid binned rows               ``H(T) − H(T|Y)`` (Shwartz-Ziv & Tishby)
``adaptive_binning``  ``H(T)`` of EBAB equal-mass bins                     ``H(T) − H(T|Y)`` (Chelombiev et al.)
``kde``               Kolchinsky–Tracey bound, ``T = h(X) + N(0, σ²I)``     the same, refit per class (Saxe et al.)
``ksg``               KSG(x, t) — needs ``x``                              Ross k-NN, continuous–discrete
``pca_ksg``           KSG(PCA(x), PCA(t)) — needs ``x``                    Ross(PCA(t), y) (Butakov et al.'s route)
====================  ===================================================  =========================================

Parameters and defaults: ``binning`` n_bins=30, range=(-1, 1), scheme="intervals"; ``adaptive_binning``
n_bins=30, scope="layer", quantiles="distinct"; ``kde`` noise_variance=1e-3 (Saxe et al.'s Tishby net),
bound="upper"; ``ksg`` k=3, noise_std=0, jitter=1e-10, seed=0; ``pca_ksg`` the same plus dim=4 (Butakov et al.),
whiten=True, compress=None, compress_x=None (callables ``(N, d) -> (N, m)`` that replace PCA for ``t`` / ``x``).

The k-NN routes measure the activations as given: for a deterministic network ``I(X;T)`` of a continuous ``T`` is
infinite in theory, and the finite KSG value reflects the estimator (it grows with N, up to about ψ(N) − ψ(k)).
Make the network stochastic (Butakov et al.) or pass ``noise_std`` > 0 to add seeded ``N(0, noise_std²)`` noise to
``t`` (the same ``T = h(X) + Z`` model as ``kde``) before both estimates; ``estimator_parameters`` logs which.
KSG assumes a continuous ``x``: on discrete inputs its max-norm distances tie (the 12-bit task's distinct inputs are
all at distance 1), and the estimate says little. Measured on that task at initialisation (``IBMLP``, seed 0, all
4,096 inputs, bits): for the first tanh layer, an injective function of ``x``, ``ksg`` gives I(X;T) = 0.70,
``pca_ksg`` 2.25, ``binning`` 12.0 (= H(X)). Use the binning or ``kde`` routes for discrete inputs, or pass continuous
``x`` coordinates (``compress_x``).

With ``x`` given, the binning routes use ``I(X;T) = H(T) − H(T|X)`` over the distinct rows of ``x`` (the same value
as ``H(T)`` for a deterministic network); without it, ``H(T)`` (distinct, uniformly drawn inputs assumed).

Units: nats by default; ``base=2`` for bits (the papers plot bits). Results are 0-d float64 tensors, never NaN.
Bad input (issue 16 item 5), every estimator:

- no rows, one row, constant activations, no features → ``(0, 0)``; a single class → ``I(T;Y) = 0``;
  ``n_bins = 1`` → ``(0, 0)``;
- k-NN routes with ``2 ≤ n ≤ k`` rows → :class:`~entrotrain.errors.EntrotrainError` (no k-th neighbour; lower k);
  ``ksg`` / ``pca_ksg`` without ``x`` → error naming the fix;
- NaN/Inf activations → error naming the fix: drop the rows with
  :func:`entrotrain.functional.representation.finite_row_mask` (cut ``labels`` and ``x`` alike) and count them;
- mismatched lengths, float labels, unknown estimator or parameter, out-of-range parameters → error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_seed, check_str
from entrotrain.errors import EntrotrainError
from entrotrain.functional._information_common import as_rows64, check_base, check_labels, zero
from entrotrain.functional.information_binning import (
    binned_entropy,
    binned_mutual_information,
    binned_symbols,
    binning_options,
    discrete_entropy,
    discrete_mutual_information,
    input_symbols,
)
from entrotrain.functional.information_kde import KDE_BOUNDS, kde_mutual_information
from entrotrain.functional.information_knn import (
    ksg_mutual_information,
    pca_compress,
    ross_mutual_information,
)

__all__ = [
    "ESTIMATORS",
    "binned_entropy",
    "binned_mutual_information",
    "binned_symbols",
    "discrete_entropy",
    "discrete_mutual_information",
    "estimator_parameters",
    "information_plane_point",
    "loggable_parameters",
    "kde_mutual_information",
    "ksg_mutual_information",
    "pca_compress",
    "ross_mutual_information",
]

#: Each estimator's parameters and their defaults (what :func:`estimator_parameters` fills in).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "binning": {"n_bins": 30, "range": (-1.0, 1.0), "scheme": "intervals"},
    "adaptive_binning": {"n_bins": 30, "scope": "layer", "quantiles": "distinct"},
    "kde": {"noise_variance": 1e-3, "bound": "upper"},
    "ksg": {"k": 3, "noise_std": 0.0, "jitter": 1e-10, "seed": 0},
    "pca_ksg": {
        "k": 3, "noise_std": 0.0, "jitter": 1e-10, "seed": 0, "dim": 4, "whiten": True, "compress": None,
        "compress_x": None,
    },
}

#: The estimator names :func:`information_plane_point` accepts.
ESTIMATORS: tuple[str, ...] = tuple(_DEFAULTS)


def _check_estimator(estimator: Any) -> str:
    check_str(estimator, "estimator")
    if estimator not in _DEFAULTS:
        raise EntrotrainError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    return estimator


def estimator_parameters(estimator: str, **params: Any) -> dict[str, Any]:
    """The parameters ``estimator`` uses with ``params`` (defaults filled in, validated), plus ``estimator`` and
    ``base``: log this dict beside the value. Unknown parameter names raise with the accepted ones."""
    estimator = _check_estimator(estimator)
    base = check_base(params.pop("base", math.e))
    defaults = _DEFAULTS[estimator]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise EntrotrainError(
            f"estimator {estimator!r} has no parameter(s) {unknown}; its parameters are {sorted(defaults)} "
            "(and base)."
        )
    used = {**defaults, **params}
    if estimator == "binning":
        opts = binning_options(used["n_bins"], False, used["range"], used["scheme"], "layer", "distinct")
        used = {"n_bins": opts["n_bins"], "range": opts["range"], "scheme": opts["scheme"]}
    elif estimator == "adaptive_binning":
        opts = binning_options(used["n_bins"], True, None, None, used["scope"], used["quantiles"])
        used = {"n_bins": opts["n_bins"], "scope": opts["scope"], "quantiles": opts["quantiles"]}
    elif estimator == "kde":
        used["noise_variance"] = check_real(used["noise_variance"], "noise_variance", low=0.0, low_open=True)
        check_choice(used["bound"], "bound", KDE_BOUNDS)
    else:
        check_int(used["k"], "k", low=1)
        check_seed(used["seed"], low=0, offset=2)  # the noise generator is seeded seed + 2
        used["noise_std"] = check_real(used["noise_std"], "noise_std", low=0.0)
        used["jitter"] = check_real(used["jitter"], "jitter", low=0.0)
        if estimator == "pca_ksg":
            check_int(used["dim"], "dim", low=1)
            check_bool(used["whiten"], "whiten")
            for key in ("compress", "compress_x"):
                if used[key] is not None and not callable(used[key]):
                    raise EntrotrainError(
                        f"{key} must be None (PCA) or a callable mapping (N, d) rows to (N, m), got {used[key]!r}."
                    )
    return {"estimator": estimator, "base": base, **used}


def loggable_parameters(used: dict[str, Any]) -> dict[str, Any]:
    """:func:`estimator_parameters`' dict with callables replaced by their names (for a logger or a table)."""
    if not isinstance(used, dict):
        raise EntrotrainError(
            f"used must be the dict estimator_parameters returns, got {type(used).__name__}; pass "
            "loggable_parameters(estimator_parameters(estimator, **params))."
        )
    return {
        key: (getattr(value, "__qualname__", None) or type(value).__name__) if callable(value) else value
        for key, value in used.items()
    }


def _noisy(rows: Tensor, noise_std: float, seed: int) -> Tensor:
    """``rows + N(0, noise_std²)``, seeded on the CPU (the ``T = h(X) + Z`` model); unchanged when 0."""
    if noise_std == 0.0 or rows.numel() == 0:
        return rows
    gen = torch.Generator().manual_seed(seed + 2)
    return rows + noise_std * torch.randn(rows.shape, generator=gen, dtype=torch.float64).to(rows.device)


def _compressed(rows: Tensor, fn: Any, dim: int, whiten: bool, name: str) -> Tensor:
    if fn is None:
        return pca_compress(rows, dim, whiten=whiten, name=name)
    out = fn(rows)
    if not isinstance(out, Tensor) or out.dim() not in (1, 2) or out.shape[0] != rows.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise EntrotrainError(
            f"compress{'_x' if name == 'x' else ''} must map ({rows.shape[0]}, d) rows to ({rows.shape[0]}, m), got "
            f"{got}; return one compressed row per sample."
        )
    return as_rows64(out, f"compressed {name}")


def information_plane_point(
    t: Tensor,
    labels: Tensor,
    estimator: str,
    *,
    x: Tensor | None = None,
    base: float = math.e,
    **params: Any,
) -> tuple[Tensor, Tensor]:
    """``(I(X;T), I(T;Y))`` of the activations ``t`` ``(n, d)`` and class ``labels`` ``(n,)`` by ``estimator``.

    Args:
        t: a layer's activations on the probe set, ``(n, d)`` (or ``(n,)``), any real dtype (computed in float64).
        labels: ``(n,)`` integer/bool class ids.
        estimator: one of :data:`ESTIMATORS` (table in the module docstring).
        x: the probe inputs ``(n, d_x)``: required by ``ksg`` / ``pca_ksg``; the binning routes use them for
            ``H(T|X)`` (optional); ``kde`` ignores them (its ``H(T|X)`` is the noise entropy).
        base: log base (nats by default, 2 for bits).
        **params: the estimator's parameters (see :func:`estimator_parameters` for names and defaults).

    Returns:
        Two 0-d float64 tensors, finite.
    """
    used = estimator_parameters(estimator, base=base, **params)
    estimator, base = used.pop("estimator"), used.pop("base")
    rows = as_rows64(t)
    labels = check_labels(labels, rows.shape[0]).to(rows.device)
    if x is not None:
        x_rows = as_rows64(x, "x")
        if x_rows.shape[0] != rows.shape[0]:
            raise EntrotrainError(
                f"x must have one row per row of t ({rows.shape[0]}), got {x_rows.shape[0]}; pass the probe inputs "
                "that produced t, in the same order."
            )
    if estimator in ("binning", "adaptive_binning"):
        adaptive = estimator == "adaptive_binning"
        symbols = binned_symbols(rows, adaptive=adaptive, **used)
        if x is None:
            i_xt = discrete_entropy(symbols, base=base)
        else:
            i_xt = discrete_mutual_information(symbols, input_symbols(x_rows).to(rows.device), base=base)
        return i_xt, discrete_mutual_information(symbols, labels, base=base)
    if estimator == "kde":
        return kde_mutual_information(rows, labels, used["noise_variance"], base=base, bound=used["bound"])
    if x is None:
        raise EntrotrainError(
            f"estimator {estimator!r} needs x (the probe inputs, one row per row of t) for I(X;T); pass "
            "information_plane_point(t, labels, estimator, x=inputs)."
        )
    k, jitter, seed = used["k"], used["jitter"], used["seed"]
    rows = _noisy(rows, used["noise_std"], seed)
    if estimator == "pca_ksg":
        rows = _compressed(rows, used["compress"], used["dim"], used["whiten"], "t")
        x_rows = _compressed(x_rows, used["compress_x"], used["dim"], used["whiten"], "x")
    n = rows.shape[0]
    if n < k + 1:
        return _too_few(n, k, rows.device)
    i_xt = ksg_mutual_information(x_rows, rows, k, base=base, jitter=jitter, seed=seed)
    i_ty = ross_mutual_information(rows, labels, k, base=base, jitter=jitter, seed=seed)
    return i_xt, i_ty


def _too_few(n: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if n <= 1:  # no rows or one row: nothing is shared, the documented value is 0 (as for every estimator)
        return zero(device), zero(device)
    raise EntrotrainError(f"the k-NN estimators need at least k + 1 = {k + 1} rows, got {n}; lower k or pass more rows.")
