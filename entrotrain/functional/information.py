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
====================  ===================================================  =========================================

With ``x`` given, the binning routes use ``I(X;T) = H(T) − H(T|X)`` over the distinct rows of ``x`` (the same value
as ``H(T)`` for a deterministic network); without it, ``H(T)`` (distinct, uniformly drawn inputs assumed).

Units: nats by default; ``base=2`` for bits (the papers plot bits). Results are 0-d float64 tensors, never NaN:
degenerate input gives the documented value of each estimator (0 for no/one row, constant activations, a single
class, one bin) or an :class:`~entrotrain.errors.EntrotrainError` naming the fix (NaN/Inf rows: drop them with
:func:`entrotrain.functional.representation.finite_row_mask` and count them; bad parameters; mismatched lengths).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from entrotrain._validation import check_str
from entrotrain.errors import EntrotrainError
from entrotrain.functional._information_common import as_rows64, check_base, check_labels
from entrotrain.functional.information_binning import (
    binned_entropy,
    binned_mutual_information,
    binned_symbols,
    binning_options,
    discrete_entropy,
    discrete_mutual_information,
    input_symbols,
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
]

#: Each estimator's parameters and their defaults (what :func:`estimator_parameters` fills in).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "binning": {"n_bins": 30, "range": (-1.0, 1.0), "scheme": "intervals"},
    "adaptive_binning": {"n_bins": 30, "scope": "layer", "quantiles": "distinct"},
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
    return {"estimator": estimator, "base": base, **used}


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
        x: the probe inputs ``(n, d_x)``; the binning routes use them for ``H(T|X)`` (optional).
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
    raise AssertionError(estimator)  # pragma: no cover - _check_estimator guards the names
