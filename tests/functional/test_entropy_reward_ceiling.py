"""When the fitted ceiling b − a of R = -a·exp(H) + b is a prediction (ceiling_verdict): at least 8 points, R² ≥ 0.5,
H = 0 within one span of exp(H) of the data, b − a within one span of the observed rewards. A 6-step TRL GRPO run
with a flat entropy published a ceiling of 10.6 at R² 0.16 for rewards in [0, 1]."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.functional.entropy_reward_fit import (
    CEILING_MIN_POINTS,
    ceiling_verdict,
    fit_entropy_reward,
    fit_extrapolation,
)

FLAT_H = [2.6332, 2.6337, 2.6327, 2.6330, 2.6335, 2.6331]  # a 6-step TRL run: entropy flat at 2.633 nats
FLAT_R = [0.0, 0.0, 0.125, 0.0625, 0.0, 0.125]


def test_six_flat_entropy_points_give_no_ceiling_and_say_why():
    fit = fit_entropy_reward(FLAT_H, FLAT_R)
    assert fit.ceiling > 10  # the number itself is kept, never clamped
    verdict = ceiling_verdict(fit, FLAT_H, FLAT_R)
    assert not verdict.shown
    text = "; ".join(verdict.reasons)
    assert "only 6 fitted steps" in text
    assert "extrapolated: H = 0 lies" in text and verdict.extrapolation > 100
    assert "far outside the observed rewards [0, 0.125]" in text


def test_a_good_law_over_a_wide_entropy_range_is_recovered_and_shown():
    """R = -0.2 e^H + 1 plus N(0, 0.005) noise, H from 1.5 down to 0.2 over 14 steps: a within 5 %, b within 1 %."""
    rng = random.Random(0)
    h = [1.5 - 0.1 * i for i in range(14)]
    r = [-0.2 * math.exp(v) + 1.0 + rng.gauss(0.0, 0.005) for v in h]
    fit = fit_entropy_reward(h, r)
    assert fit.a == pytest.approx(0.2, rel=0.05) and fit.b == pytest.approx(1.0, rel=0.01)
    verdict = ceiling_verdict(fit, h, r)
    assert verdict.shown and verdict.reasons == () and verdict.extrapolation < 0.1


def test_low_r2_is_said():
    rng = random.Random(1)
    h = [1.5 - 0.1 * i for i in range(12)]
    r = [-0.05 * math.exp(v) + 0.5 + rng.gauss(0.0, 0.1) for v in h]
    fit = fit_entropy_reward(h, r)
    assert fit.r2 < 0.5
    assert any(reason.startswith(f"R² {fit.r2:.2f} < 0.5") for reason in ceiling_verdict(fit, h, r).reasons)


def test_extrapolation_is_distance_from_x_equals_one_in_spans_of_exp_h():
    assert fit_extrapolation([0.0, 1.0]) == 0.0
    assert fit_extrapolation([math.log(2.0), math.log(3.0)]) == pytest.approx(1.0)  # x in [2, 3]: 1 span from x = 1
    assert fit_extrapolation([math.log(5.0), math.log(7.0)]) == pytest.approx(2.0)
    assert fit_extrapolation([-1.0, -1.0]) == math.inf and fit_extrapolation([]) == math.inf


@settings(max_examples=60, deadline=None)
@given(
    a=st.floats(0.05, 2.0), b=st.floats(-1.0, 3.0), n=st.integers(CEILING_MIN_POINTS, 30),
    h_top=st.floats(0.8, 3.0)
)
def test_exact_law_reaching_low_entropy_is_always_shown(a, b, n, h_top):
    """Property: a noiseless law sampled from h_top down to 0.1 nats is shown and recovered (rel 1e-6)."""
    h = [h_top - (h_top - 0.1) * i / (n - 1) for i in range(n)]
    r = [-a * math.exp(v) + b for v in h]
    fit = fit_entropy_reward(h, r)
    assert fit.a == pytest.approx(a, rel=1e-6) and fit.ceiling == pytest.approx(b - a, rel=1e-6, abs=1e-9)
    assert ceiling_verdict(fit, h, r).shown
