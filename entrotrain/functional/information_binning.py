r"""Binning (plug-in) information-plane estimators: Shwartz-Ziv & Tishby's fixed grid and Chelombiev et al.'s EBAB.

Each activation is replaced by its bin index; each row of bin indices (the whole layer vector) is one symbol ``t``.
With counts ``c_t`` over ``n`` rows and ``c_{t,y}`` joint with the class ``y`` (``n_y`` rows):

.. math::

    H(T) = \log n - \tfrac1n \textstyle\sum_t c_t \log c_t, \qquad
    I(T;Y) = H(T) - \sum_y \tfrac{n_y}{n} H(T \mid Y{=}y)
           = \tfrac1n\big[(\textstyle\sum_{t,y} c_{t,y}\log c_{t,y} - \sum_t c_t \log c_t)
                         + (n\log n - \sum_y n_y \log n_y)\big].

For a deterministic network over distinct inputs with uniform ``p(x)`` (the Tishby setting), ``I(X;T) = H(T)``;
with ``x`` given, ``I(X;T) = H(T) - H(T|X)`` with ``X`` the distinct rows of ``x`` (equal to ``H(T)`` for a
deterministic network, smaller for a noisy one). Plug-in values, ≥ 0 (clamped: rounding never shows −1e-17), and
``I(T;Y) ≤ H(Y)``; ``I(T;Y) = 0`` exactly for a single class.

Symbols: ``torch.unique(bins, dim=0, return_inverse=True)`` — a lexicographic sort of the integer rows, so two rows
share a symbol iff all their bin indices are equal (no hash, no collisions); joint symbols ``t·c + y`` are exact in
int64 (``t < n``, ``c ≤ n``). Memory O(n·d); no Python loop over samples (``scope="neuron"`` loops over features).

Choices (reference note "Choices an implementation must state", items 1–4, 6):

- **Base**: nats by default (``base=2`` for the papers' bits).
- **Fixed grid** (``adaptive=False``), ``range=(lo, hi)`` default ``(-1, 1)``, one global grid for every feature:
  ``scheme="intervals"`` (default): ``n_bins`` equal intervals ``[e_k, e_{k+1})``, ``e = linspace(lo, hi,
  n_bins+1)``; values outside are **clipped** into the first/last bin and ``hi`` falls in the last one.
  ``scheme="idnns"`` reproduces Shwartz-Ziv & Tishby's code exactly: ``n_bins`` *edges* ``linspace(lo, hi, n_bins)``
  (``n_bins − 1`` intervals plus a bin for values ``≥ hi``), ``np.digitize − 1``, and values ``< lo`` **wrap** into
  the ``≥ hi`` bin (their bug, kept for reproduction; never hit by tanh).
- **Adaptive grid** (``adaptive=True``, EBAB, Chelombiev et al. 2019): recomputed at every call from the
  activations: with ``u`` the sorted **distinct** values (``quantiles="distinct"``, EBAB; ``"samples"`` = ordinary
  equal-mass quantiles of all values), interior edges ``u[⌊k·m/B⌋]``, ``k = 1..B−1`` (``m = |u|``), bins
  ``[e_k, e_{k+1})``: each bin holds the same number (±1) of distinct values. ``scope="layer"`` (default, the
  reference code's ``per_layer_bins``) pools all features; ``scope="neuron"`` gives each feature its own edges.
  Not reproduced from the reference code (``set_up_bins``): its extra singleton bin at the maximum, and its
  ``low`` edge (−1.000001 for tanh/ELU, 0 otherwise) below the quantiles of the distinct values other than ``low``.
  For tanh that edge only adds an empty bin (same values); for ReLU (``low = 0``) it gives the exact zeros a bin of
  their own, where here 0 is one distinct value among the rest: on 4,096 × 4 rectified Gaussians
  ``max(N(0,1) − c, 0)``, c = 0 / 0.3 / 0.6, H(T) is 10.40 / 9.09 / 7.37 bits here, 10.58 / 9.29 / 7.56 with the
  reference's edges.
- **Degenerate input**: no rows, no features, constant activations, one row or ``n_bins = 1`` give one symbol
  (``H = 0``, ``I = 0``); a single class gives ``I(T;Y) = 0``. NaN/Inf rows are refused (see
  :mod:`entrotrain.functional._information_common`).

Papers: Shwartz-Ziv & Tishby 2017, "Opening the Black Box of Deep Neural Networks via Information" (arXiv
1703.00810); Chelombiev, Houghton & O'Donnell 2019, "Adaptive Estimators Show Information Compression in Deep
Neural Networks" (ICLR); Saxe et al. 2018 (ICLR) for the same plug-in formulas.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_shape, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional._information_common import (
    as_rows64,
    check_base,
    check_labels,
    class_ids,
    count_entropy_sum,
    zero,
)

__all__ = [
    "BINNING_SCHEMES",
    "QUANTILE_MODES",
    "SCOPES",
    "binned_entropy",
    "binned_mutual_information",
    "binned_symbols",
    "discrete_entropy",
    "discrete_mutual_information",
]

BINNING_SCHEMES = ("intervals", "idnns")
#: The most bins per feature: the grid's edges are materialised (``8·n_bins`` bytes), and more bins than samples
#: only split singletons further.
MAX_BINS = 2**24
SCOPES = ("layer", "neuron")
QUANTILE_MODES = ("distinct", "samples")


def check_range(value: Any) -> tuple[float, float]:
    """``range``: two finite reals ``lo < hi``."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise EntrotrainError(f"range must be a pair (lo, hi) with lo < hi, got {value!r}; e.g. range=(-1.0, 1.0).")
    lo = check_real(value[0], "range[0]")
    hi = check_real(value[1], "range[1]")
    if not lo < hi:  # type: ignore[operator]
        raise EntrotrainError(f"range must satisfy lo < hi, got {value!r}; e.g. range=(-1.0, 1.0) for tanh.")
    return lo, hi  # type: ignore[return-value]


def binning_options(
    n_bins: Any, adaptive: Any, range: Any, scheme: Any, scope: Any, quantiles: Any
) -> dict[str, Any]:
    """The validated binning parameters (what :func:`binned_symbols` uses), as a dict for logging."""
    check_int(n_bins, "n_bins", low=1, high=MAX_BINS)
    check_bool(adaptive, "adaptive")
    if adaptive:
        check_choice(scope, "scope", SCOPES)
        check_choice(quantiles, "quantiles", QUANTILE_MODES)
        return {"n_bins": n_bins, "adaptive": True, "scope": scope, "quantiles": quantiles}
    check_choice(scheme, "scheme", BINNING_SCHEMES)
    lo, hi = check_range(range)
    return {"n_bins": n_bins, "adaptive": False, "range": (lo, hi), "scheme": scheme}


def _numpy_linspace(lo: float, hi: float, num: int) -> Tensor:
    """``np.linspace(lo, hi, num)`` in float64, computed the way numpy does (``arange·step + lo``, last = ``hi``)."""
    if num == 1:
        return torch.tensor([lo], dtype=torch.float64)
    step = (hi - lo) / (num - 1)
    edges = torch.arange(num, dtype=torch.float64) * step + lo
    edges[-1] = hi
    return edges


def _fixed_bins(rows: Tensor, n_bins: int, lo: float, hi: float, scheme: str) -> Tensor:
    if scheme == "idnns":
        edges = _numpy_linspace(lo, hi, n_bins).to(rows.device)
        idx = torch.searchsorted(edges, rows.contiguous(), right=True) - 1  # np.digitize(a, edges) - 1
        return torch.where(idx < 0, n_bins - 1, idx)  # a < lo wraps to edges[-1] (IDNNs' negative index)
    interior = _numpy_linspace(lo, hi, n_bins + 1)[1:-1].to(rows.device)
    return torch.searchsorted(interior, rows.contiguous(), right=True)  # clipped: < lo → 0, ≥ hi → n_bins - 1


def _quantile_edges(values: Tensor, n_bins: int, quantiles: str) -> Tensor:
    """Interior edges ``u[⌊k·m/B⌋]``, ``k = 1..B−1``, of the sorted distinct values (or all values)."""
    u = torch.unique(values) if quantiles == "distinct" else torch.sort(values).values
    m = u.numel()
    k = torch.arange(1, n_bins, device=values.device)
    return u[torch.div(k * m, n_bins, rounding_mode="floor")]


def _adaptive_bins(rows: Tensor, n_bins: int, scope: str, quantiles: str) -> Tensor:
    if rows.numel() == 0:
        return torch.zeros(rows.shape, dtype=torch.long, device=rows.device)
    if scope == "layer":
        edges = _quantile_edges(rows.reshape(-1), n_bins, quantiles)
        return torch.searchsorted(edges, rows.contiguous(), right=True)
    columns = [
        torch.searchsorted(_quantile_edges(col, n_bins, quantiles), col.contiguous(), right=True)
        for col in rows.unbind(1)  # a loop over features, not samples
    ]
    return torch.stack(columns, dim=1)


def binned_symbols(
    t: Tensor,
    n_bins: int = 30,
    *,
    adaptive: bool = False,
    range: tuple[float, float] = (-1.0, 1.0),
    scheme: str = "intervals",
    scope: str = "layer",
    quantiles: str = "distinct",
) -> Tensor:
    """The symbol of each binned row of ``t`` ``(n, d)``: ``(n,)`` int64 ids ``0..s−1`` (``s`` distinct binned rows).

    Rows share an id iff every feature falls in the same bin (``torch.unique(dim=0)``: exact, collision-free).
    Parameters as in :func:`binned_entropy` (the module docstring states the grid choices)."""
    rows = as_rows64(t)
    opts = binning_options(n_bins, adaptive, range, scheme, scope, quantiles)
    n = rows.shape[0]
    if n == 0 or rows.shape[1] == 0:
        return torch.zeros(n, dtype=torch.long, device=rows.device)
    if opts["adaptive"]:
        bins = _adaptive_bins(rows, n_bins, scope, quantiles)
    else:
        bins = _fixed_bins(rows, n_bins, *opts["range"], scheme)
    return torch.unique(bins, dim=0, return_inverse=True)[1].to(torch.long)


def _check_symbols(symbols: Any, name: str, n: int | None = None) -> Tensor:
    """``symbols`` is a 1-D integer or bool tensor (of length ``n`` when given); ids are only compared."""
    check_tensor(symbols, name, ndim=1, layout="(n,)")
    if symbols.is_floating_point() or symbols.is_complex():
        raise EntrotrainError(
            f"{name} must be integer (or bool) symbol ids, got dtype {symbols.dtype}; bin real values first "
            f"(binned_symbols) or pass {name}.long() if they are ids."
        )
    if n is not None:
        check_shape(symbols, (n,), name, like="one id per symbol")
    return symbols


def discrete_entropy(symbols: Tensor, *, base: float = math.e) -> Tensor:
    r"""Plug-in entropy ``H = log n − (1/n) Σ_s c_s log c_s`` of a ``(n,)`` integer symbol tensor (0 when ``n ≤ 1``).

    ``symbols`` must be a 1-D integer or bool tensor (float ids are refused: equality of floats is not a symbol)."""
    _check_symbols(symbols, "symbols")
    base = check_base(base)
    n = symbols.numel()
    if n <= 1:
        return zero(symbols.device)
    counts = torch.unique(symbols, return_counts=True)[1]
    total = torch.tensor([n], dtype=torch.float64, device=symbols.device)
    h = (count_entropy_sum(total, base) - count_entropy_sum(counts, base)) / n
    return h.clamp_min(0.0)


def discrete_mutual_information(symbols: Tensor, groups: Tensor, *, base: float = math.e) -> Tensor:
    r"""Plug-in ``I(S;G) = H(S) − Σ_g p(g) H(S|G=g)`` of two ``(n,)`` integer symbol tensors (module formula).

    Computed as ``[(Σ c_sg log c_sg − Σ c_s log c_s) + (n log n − Σ n_g log n_g)] / n``, clamped at 0: a single
    group gives exactly 0, and so does ``n ≤ 1``. Both must be 1-D integer or bool tensors of one length."""
    _check_symbols(symbols, "symbols")
    _check_symbols(groups, "groups", symbols.numel())
    base = check_base(base)
    n = symbols.numel()
    if n <= 1:
        return zero(symbols.device)
    s = torch.unique(symbols, return_inverse=True)[1].to(torch.long)
    g, n_groups = class_ids(groups)
    if n_groups <= 1:
        return zero(symbols.device)
    c_s = torch.unique(s, return_counts=True)[1]
    c_g = torch.unique(g, return_counts=True)[1]
    c_sg = torch.unique(s * n_groups + g, return_counts=True)[1]
    total = torch.tensor([n], dtype=torch.float64, device=symbols.device)
    joint_minus_s = count_entropy_sum(c_sg, base) - count_entropy_sum(c_s, base)
    n_minus_g = count_entropy_sum(total, base) - count_entropy_sum(c_g, base)
    return ((joint_minus_s + n_minus_g) / n).clamp_min(0.0)


def binned_entropy(
    t: Tensor,
    n_bins: int = 30,
    *,
    adaptive: bool = False,
    base: float = math.e,
    range: tuple[float, float] = (-1.0, 1.0),
    scheme: str = "intervals",
    scope: str = "layer",
    quantiles: str = "distinct",
) -> Tensor:
    r"""``H(T)`` of the binned rows of ``t`` ``(n, d)`` — ``I(X;T)`` for a deterministic network over distinct,
    uniformly drawn inputs (Shwartz-Ziv & Tishby 2017).

    ``H(T) = log n − (1/n) Σ_t c_t log c_t`` over the counts of distinct binned rows; a 0-d float64 tensor in units
    of ``base`` (nats by default), in ``[0, log n]``.

    Args:
        t: activations ``(n, d)`` (or ``(n,)``), any real dtype; NaN/Inf rows are refused (drop them first).
        n_bins: bins per feature (``scheme="idnns"``: grid *edges*), in ``[1, MAX_BINS]`` (2²⁴); 1 gives ``H = 0``.
        adaptive: ``False`` = fixed equal-width grid over ``range``; ``True`` = EBAB equal-mass bins
            (Chelombiev et al. 2019) recomputed from ``t``.
        base: log base (``math.e`` nats, 2 bits).
        range: ``(lo, hi)`` of the fixed grid (default ``(-1, 1)``, tanh); ignored when adaptive.
        scheme: ``"intervals"`` (clip) or ``"idnns"`` (IDNNs' edges and wrap-around); ignored when adaptive.
        scope: ``"layer"`` (one adaptive grid pooled over features) or ``"neuron"``; adaptive only.
        quantiles: ``"distinct"`` (EBAB) or ``"samples"``; adaptive only.

    Degenerate input: no rows / no features / constant rows / one row / ``n_bins=1`` → 0.
    """
    base = check_base(base)
    symbols = binned_symbols(
        t, n_bins, adaptive=adaptive, range=range, scheme=scheme, scope=scope, quantiles=quantiles
    )
    return discrete_entropy(symbols, base=base)


def binned_mutual_information(
    t: Tensor,
    labels: Tensor,
    n_bins: int = 30,
    *,
    adaptive: bool = False,
    base: float = math.e,
    range: tuple[float, float] = (-1.0, 1.0),
    scheme: str = "intervals",
    scope: str = "layer",
    quantiles: str = "distinct",
) -> Tensor:
    r"""``I(T;Y) = H(T) − Σ_y p(y) H(T|Y=y)`` of the binned rows of ``t`` ``(n, d)`` and the classes ``labels``
    ``(n,)`` (Shwartz-Ziv & Tishby 2017; Chelombiev et al. 2019 when ``adaptive``), ``p(y)`` the label frequencies.

    A 0-d float64 tensor in units of ``base``, in ``[0, min(H(T), H(Y))]``; exactly 0 for a single class, one row or
    no rows. One grid for all rows (computed on all of ``t`` when adaptive, not per class). Other arguments as in
    :func:`binned_entropy`; ``labels`` must be integer/bool with one entry per row.
    """
    base = check_base(base)
    rows = as_rows64(t)
    labels = check_labels(labels, rows.shape[0])
    symbols = binned_symbols(
        rows, n_bins, adaptive=adaptive, range=range, scheme=scheme, scope=scope, quantiles=quantiles
    )
    return discrete_mutual_information(symbols, labels.to(rows.device), base=base)


def input_symbols(x: Tensor) -> Tensor:
    """Symbols of the distinct rows of ``x`` (exact values, no binning): ``X`` for ``I(X;T) = H(T) − H(T|X)``."""
    rows = as_rows64(x, "x")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    return torch.unique(rows, dim=0, return_inverse=True)[1].to(torch.long)

