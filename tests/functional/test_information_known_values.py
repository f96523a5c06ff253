"""Known values of the information-plane estimators on the 12-bit task (Shwartz-Ziv & Tishby's 4,096 patterns).

A layer that copies its input (``T = X``, distinct binary rows) is injective, so ``I(X;T) = H(X) = 12`` bits, and
the labels are a function of ``X``, so ``I(T;Y) = H(Y)`` (2,118 positives of 4,096: 0.99916 bits). A constant layer
carries nothing: ``(0, 0)``. The binning routes and KDE (on a 1,024-row subset, to stay fast) reach these values to
rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from entrotrain.functional.information import information_plane_point
from entrotrain.tasks.information_plane import icosahedron_dataset

X, Y, _ = icosahedron_dataset()
H_Y = -(2118 / 4096 * math.log2(2118 / 4096) + 1978 / 4096 * math.log2(1978 / 4096))


@pytest.mark.parametrize("estimator", ["binning", "adaptive_binning"])
@pytest.mark.parametrize("with_x", [False, True])
def test_a_copy_layer_carries_all_of_x_and_y(estimator, with_x):
    i_xt, i_ty = information_plane_point(X.float(), Y, estimator, x=X if with_x else None, base=2)
    assert i_xt.item() == pytest.approx(12.0, abs=1e-9)
    assert i_ty.item() == pytest.approx(H_Y, abs=1e-9) and H_Y == pytest.approx(0.99916, abs=1e-5)


def test_kde_of_a_copy_layer_reaches_log_n_and_h_y():
    # every 4th pattern (1,024 distinct rows at distance >= 1, σ² = 1e-3: the kernel matrix is the identity to
    # e^-500): I(X;T) = log2(1024) = 10 bits, I(T;Y) = the subset's H(Y)
    x, y = X[::4], Y[::4]
    p = y.float().mean().item()
    h_y = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    i_xt, i_ty = information_plane_point(x.float(), y, "kde", base=2)
    assert i_xt.item() == pytest.approx(10.0, abs=1e-9) and i_ty.item() == pytest.approx(h_y, abs=1e-9)


@pytest.mark.parametrize("estimator", ["binning", "adaptive_binning", "kde"])
def test_a_constant_layer_carries_nothing(estimator):
    i_xt, i_ty = information_plane_point(torch.full((4096, 3), 0.25), Y, estimator, x=X, base=2)
    assert i_xt.item() == 0.0 and i_ty.item() == 0.0


@pytest.mark.parametrize("estimator", ["binning", "adaptive_binning"])
def test_merging_rows_never_raises_either_value(estimator):
    # T2 = the first 6 bits of X, a function of T1 = X whose grid cells map onto T2's: binned values can only fall
    i_full = information_plane_point(X.float(), Y, estimator, base=2)
    i_half = information_plane_point(X[:, :6].float(), Y, estimator, base=2)
    assert i_half[0].item() == pytest.approx(6.0, abs=1e-9)
    assert i_half[0] <= i_full[0] and i_half[1] <= i_full[1] + 1e-12
