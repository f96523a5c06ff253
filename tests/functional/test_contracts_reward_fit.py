"""fit_entropy_reward under failure: every field finite or an EntrotrainError naming the problem and the fix, and
the fit equal to a float64 least-squares reference (numpy polyfit in x = e^{H - H_max}) wherever it is defined."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import fit_entropy_reward

NAN, INF = float("nan"), float("inf")


def test_constant_rewards_give_r2_one_not_nan():
    # before: r2 = NaN (0/0) although the flat line reproduces the rewards exactly
    fit = fit_entropy_reward([0.5, 1.0, 1.5], [0.7, 0.7, 0.7])
    assert fit.a == 0.0 and fit.b == pytest.approx(0.7) and fit.r2 == 1.0


def test_large_entropies_do_not_overflow():
    # before: exp(800) = inf and a, b, ceiling, r2 were all NaN
    h = np.array([800.0, 800.5, 801.0, 801.5])
    r = 2.0 - 3.0 * np.exp(h - 801.5)  # R = -a e^H + b with a = 3 e^{-801.5} (a subnormal-free product), b = 2
    fit = fit_entropy_reward(h.tolist(), r.tolist())
    assert fit.b == pytest.approx(2.0, rel=1e-12) and fit.r2 == pytest.approx(1.0)
    assert fit.ceiling == pytest.approx(2.0, rel=1e-12)  # a = 3e-349 underflows to 0: the ceiling is b
    assert all(math.isfinite(v) for v in fit[:4])


def test_huge_rewards_do_not_overflow():
    # before: Σ R overflowed (mean = inf) and every field was NaN
    h = [0.1, 0.5, 1.0, 1.5]
    r = [1.6e308 - 1e307 * math.exp(v) for v in h]
    fit = fit_entropy_reward(h, r)
    assert fit.a == pytest.approx(1e307, rel=1e-9) and fit.b == pytest.approx(1.6e308, rel=1e-9)
    assert fit.ceiling == pytest.approx(1.5e308, rel=1e-9) and fit.r2 == pytest.approx(1.0)


def test_nearly_equal_entropies_keep_their_digits():
    # before: e^H - mean(e^H) cancelled ~10 digits (relative error 1e-7 in a and b); expm1 keeps them
    h, r = [1e-10, 0.0, 5e-11], [1.0, 0.0, 0.4]
    fit = fit_entropy_reward(h, r)
    ref_a, ref_b = _ols_decimal(h, r)
    assert fit.a == pytest.approx(ref_a, rel=1e-9) and fit.b == pytest.approx(ref_b, rel=1e-9)


@pytest.mark.parametrize(
    "entropy, reward, match",
    [
        ("ab", [1.0, 2.0], "entropy must be a sequence"),  # before: TypeError
        (None, None, "entropy must be a sequence"),  # before: TypeError
        ([1.0, "a"], [1.0, 2.0], "entropy must be a sequence"),
        ([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]], "1-D"),  # before: silently flattened
        ([1.0, 2.0], [1.0, NAN], "1 step"),
        ([1.0, INF, 3.0], [1.0, 2.0, NAN], "2 step"),
        ([1.0], [1.0], "at least 2"),
        ([1.0, 1.0], [1.0, 2.0], "all entropies are equal"),
    ],
)
def test_bad_input_is_refused_with_the_fix(entropy, reward, match):
    with pytest.raises(EntrotrainError, match=match):
        fit_entropy_reward(entropy, reward)


@settings(max_examples=40)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.floats(-5.0, 900.0), st.sampled_from([NAN, INF])),
            st.one_of(st.floats(-1e300, 1e300), st.sampled_from([NAN, -INF])),
        ),
        min_size=0,
        max_size=8,
    )
)
def test_fit_is_finite_or_refused_and_matches_polyfit(points):
    h = [p[0] for p in points]
    r = [p[1] for p in points]
    try:
        fit = fit_entropy_reward(h, r)
    except EntrotrainError:
        return
    assert all(math.isfinite(v) for v in fit[:4]) and fit.n == len(points)
    ref_a, ref_b = _ols_decimal(h, r)
    tol = 1e-8 * (abs(ref_b) + abs(ref_a) + max(abs(v) for v in r))
    assert fit.b == pytest.approx(ref_b, abs=tol) and fit.ceiling == pytest.approx(ref_b - ref_a, abs=tol)
    assert -1e-9 <= fit.r2 <= 1.0 + 1e-9  # least squares with an intercept: R² in [0, 1]


def _ols_decimal(h: list[float], r: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``R = -a e^H + b`` by least squares in 60-digit decimal arithmetic (x = e^{H - H_max})."""
    with localcontext() as ctx:
        ctx.prec = 60
        top = max(Decimal(v) for v in h)
        x = [(Decimal(v) - top).exp() for v in h]
        y = [Decimal(v) for v in r]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sum((u - mx) ** 2 for u in x)
        b = my - slope * mx
        return float(-slope * (-top).exp()), float(b)
