"""Brute-force float64 references for the representation measures, written from the papers' code, in numpy/scipy.

Independent of ``entrotrain.functional``: every function takes a numpy array, builds the *full* matrix the paper
builds (the d×d covariance with an SVD for matrix entropy as Diff-eRank does, the n×n kernel for Vendi, scipy's
cdist for DSE, full SVD for effective rank / RankMe) and follows the anchor's steps literally. Slow by design.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.spatial.distance


def renyi_entropy(p: np.ndarray, q: float) -> float:
    """vendi-score's ``entropy_q``: over ``p > 0``; q=1 Shannon, q=inf min-entropy, else log(Σp^q)/(1-q)."""
    p_ = p[p > 0]
    if q == 1:
        return float(-(p_ * np.log(p_)).sum())
    if q == math.inf:
        return float(-np.log(np.max(p)))
    return float(np.log((p_**q).sum()) / (1 - q))


def vendi_score_k(k: np.ndarray, q: float = 1.0) -> float:
    """vendi-score 0.0.3 ``score_K(K, q)``: eigenvalues of K/n by scipy eigvalsh, no renormalisation."""
    n = k.shape[0]
    w = scipy.linalg.eigvalsh(k / n)
    return float(np.exp(renyi_entropy(w, q)))


def cosine_kernel(x: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return xn @ xn.T


def matrix_entropy(x: np.ndarray) -> float:
    """Diff-eRank: centre over tokens, row-normalise, Σ = ZᵀZ/T, svdvals(Σ/trΣ), -Σ s ln s (nansum)."""
    z = x - x.mean(axis=0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    cov = z.T @ z / z.shape[0]
    s = np.linalg.svd(cov / np.trace(cov), compute_uv=False)
    return float(np.nansum(-s * np.log(s)))


def effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def diffusion_spectral_entropy(x: np.ndarray, sigma: float = 10.0, t: int = 1) -> float:
    """dse-dsmi 1.1 literally: cdist, Gaussian with its prefactor, Deg^-½ G Deg^-½, eigvalsh, |λ|^t, +eps, log2."""
    d = scipy.spatial.distance.cdist(x, x)
    g = (1 / (sigma * np.sqrt(2 * np.pi))) * np.exp((-(d**2)) / (2 * sigma**2))
    deg = np.diag(1 / np.sum(g, axis=1) ** 0.5)
    k = deg @ g @ deg
    eig = np.abs(np.linalg.eigvalsh(k)) ** t
    prob = eig / eig.sum() + np.finfo(float).eps
    return float(-np.sum(prob * np.log2(prob)))


def dsmi_with_subsets(x: np.ndarray, y: np.ndarray, subsets: dict, sigma: float, t: int) -> float:
    """DSMI with given random subsets per class: Σ_c p(c)[mean_r DSE(X[subset_r]) − DSE(X_c)]."""
    n = x.shape[0]
    mi = 0.0
    for c in np.unique(y):
        xc = x[y == c]
        if xc.shape[0] < 2:
            continue
        rand = np.mean([diffusion_spectral_entropy(x[idx], sigma, t) for idx in subsets[c]])
        mi += xc.shape[0] / n * (rand - diffusion_spectral_entropy(xc, sigma, t))
    return float(mi)


def matrix_nuclear_norm(r: np.ndarray) -> float:
    """MatrixNuclearNorm MNN.py: rownorm(R − mean), column L2 norms, top min(T, d) summed, divided by T."""
    z = r - r.mean(axis=0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    cols = np.sort(np.linalg.norm(z, axis=0))[::-1]
    return float(cols[: min(z.shape)].sum() / z.shape[0])

