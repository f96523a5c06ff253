"""Independent float64 numpy references for the information-plane estimators (tests only).

Each is a transcription of the papers' reference code or formulas with Python loops and numpy, sharing no code with
``entrotrain.functional.information*``:

- :func:`idnns_binned` — Shwartz-Ziv & Tishby's ``np.digitize`` binning + ``np.unique`` of row views (IDNNs).
- :func:`plugin_entropy` / :func:`plugin_mi` — −Σ p log p from dict counts.
- :func:`kde_saxe` — Saxe et al.'s ``kde.py`` (``entropy_estimator_kl`` and ``kde_condentropy``) in numpy float64.
- :func:`ksg_loop` — KSG algorithm 1 (max-norm, strict counts) with an O(n²) Python loop.
- :func:`ross_loop` — Ross (2014) continuous–discrete estimator, as scikit-learn's ``_compute_mi_cd``, looped.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from scipy.special import digamma, logsumexp


def idnns_binned(a: np.ndarray, n_edges: int, lo: float = -1.0, hi: float = 1.0) -> list[tuple]:
    """IDNNs: ``bins = linspace(lo, hi, n_edges)``; ``bins[digitize(a, bins) - 1]`` (index −1 wraps); row tuples."""
    bins = np.linspace(lo, hi, n_edges)
    binned = bins[np.digitize(a, bins) - 1]
    return [tuple(row) for row in binned]


def plugin_entropy(symbols: list, base: float = math.e) -> float:
    n = len(symbols)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n, base) for c in Counter(symbols).values())


def plugin_mi(symbols: list, labels: list, base: float = math.e) -> float:
    """``H(T) − Σ_y p(y) H(T|Y=y)`` by dict counts."""
    n = len(symbols)
    if n == 0:
        return 0.0
    h_cond = 0.0
    for y, n_y in Counter(labels).items():
        sub = [s for s, lab in zip(symbols, labels) if lab == y]
        h_cond += n_y / n * plugin_entropy(sub, base)
    return plugin_entropy(symbols, base) - h_cond


def _kl_entropy(h: np.ndarray, var: float) -> float:
    """kde.py ``entropy_estimator_kl``: d/2 + mean of −(lse(−D/2var) − log N − (d/2) log(2π var))."""
    n, d = h.shape
    sq = (h * h).sum(1)
    dists = sq[:, None] + sq[None, :] - 2.0 * h @ h.T  # kde.py's Kget_dists (float64 here)
    lprobs = logsumexp(-dists / (2 * var), axis=1) - math.log(n) - (d / 2.0) * math.log(2 * math.pi * var)
    return d / 2.0 + float(-lprobs.mean())


def kde_saxe(h: np.ndarray, labels: np.ndarray, var: float) -> tuple[float, float]:
    """Saxe et al.'s notebook: ``(H_KL(T) − H(T|X), H_KL(T) − Σ_y p(y) H_KL(T|y))`` in nats."""
    d = h.shape[1]
    h_t = _kl_entropy(h, var)
    h_t_given_x = (d / 2.0) * (math.log(2 * math.pi * var) + 1)
    h_t_given_y = 0.0
    for y in np.unique(labels):
        mask = labels == y
        h_t_given_y += mask.mean() * _kl_entropy(h[mask], var)
    return h_t - h_t_given_x, h_t - h_t_given_y


def kde_saxe_lower(h: np.ndarray, labels: np.ndarray, var: float) -> tuple[float, float]:
    """Saxe et al.'s lower (Bhattacharyya) bound: ``H_BD = H_KL(·; 4 var) + (d/2) ln(1/4)``; the same differences."""
    d = h.shape[1]

    def h_bd(a: np.ndarray) -> float:
        return _kl_entropy(a, 4 * var) + (d / 2.0) * math.log(0.25)

    h_t = h_bd(h)
    h_t_given_x = (d / 2.0) * (math.log(2 * math.pi * var) + 1)
    h_t_given_y = sum((labels == y).mean() * h_bd(h[labels == y]) for y in np.unique(labels))
    return h_t - h_t_given_x, h_t - h_t_given_y


def ksg_loop(x: np.ndarray, y: np.ndarray, k: int = 3) -> float:
    """KSG algorithm 1: ψ(k) + ψ(N) − ⟨ψ(n_x+1) + ψ(n_y+1)⟩, max-norm, strict counts (Kraskov et al. 2004)."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        dx = np.abs(x - x[i]).max(1)
        dy = np.abs(y - y[i]).max(1)
        dz = np.maximum(dx, dy)
        dz[i] = np.inf
        eps = np.sort(dz)[k - 1]
        nx = int((dx < eps).sum()) - 1
        ny = int((dy < eps).sum()) - 1
        total += digamma(nx + 1) + digamma(ny + 1)
    return float(digamma(k) + digamma(n) - total / n)


def ross_loop(c: np.ndarray, d: np.ndarray, k: int = 3) -> float:
    """Ross 2014 (scikit-learn ``_compute_mi_cd`` without the clip): ψ(N) + ⟨ψ(k_i)⟩ − ⟨ψ(N_y)⟩ − ⟨ψ(m_i)⟩,
    ``m_i`` = #points (itself included) strictly closer than the k-th same-class neighbour; singleton classes
    dropped; max-norm."""
    keep = np.array([(d == lab).sum() > 1 for lab in d])
    c, d = c[keep], d[keep]
    n = c.shape[0]
    acc_k = acc_ny = acc_m = 0.0
    for i in range(n):
        same = d == d[i]
        dist = np.abs(c - c[i]).max(1)
        ds = dist[same].copy()
        ds.sort()
        kk = min(k, int(same.sum()) - 1)
        r = ds[kk]  # ds[0] is the point itself
        acc_k += digamma(kk)
        acc_ny += digamma(int(same.sum()))
        acc_m += digamma(int((dist < r).sum()))
    return float(digamma(n) + (acc_k - acc_ny - acc_m) / n)
