"""Trust under failure for token-level entropy shaping (token_shaping.py): any input gives the documented value (0
with count 0 for empty windows / phases / rows; NaN only in the values that average a valid NaN/Inf entropy) or an
EntrotrainError naming the argument — never a raw torch / Python error; padding never changes a value.

Scenario tests first (each failed before its fix), then hypothesis properties over shapes (B = 0, T = 0 included),
dtypes (half, integer, bool), masks (bool, 0/1 integer, 0/1 float, other floats, all-False, wrong shape), NaN/Inf
placements and parameter values at and beyond their bounds, against the float64 loop references.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.token_shaping import (
    WINDOW_ALIGNS,
    canon_advantage,
    canon_split,
    high_window_entropy_mask,
    pear_reward,
    phase_entropy,
    phase_ids_from_delimiter,
    sequence_entropy,
    window_entropy,
)
from tests.helpers.contracts import DTYPES, INF, NAN, call
from tests.helpers.token_shaping_reference import (
    canon_reference,
    phase_ids_reference,
    phase_reference,
    window_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------ scenarios (each failed before its fix)


@pytest.mark.parametrize("delimiter", [2**63, [1, 2**70], -(2**63) - 1, [2**62, 2**64]])
def test_delimiter_ids_outside_int64_are_refused(delimiter):
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(EntrotrainError, match="delimiter_ids"):  # OverflowError "int too big to convert" before
        phase_ids_from_delimiter(ids, mask, delimiter)
    with pytest.raises(EntrotrainError, match="delimiter_ids"):
        phase_entropy(torch.rand(2, 5), mask, token_ids=ids, delimiter_ids=delimiter)


# ------------------------------------------------------------------ property tests

_ALL_DTYPES = DTYPES + (torch.int64, torch.bool)


@st.composite
def tokens_case(draw):
    """``(entropy (B, T), mask, mask_kind)``: any dtype, NaN/Inf placements (on valid or padded tokens)."""
    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    h = torch.rand(b, t, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 5.0]))
    for value in draw(st.lists(st.sampled_from([NAN, INF, -INF]), max_size=2)):
        if h.numel():
            h.view(-1)[draw(st.integers(0, h.numel() - 1))] = value
    dtype = draw(st.sampled_from(_ALL_DTYPES))
    h = h.to(dtype) if dtype.is_floating_point else (h > 0.5).to(dtype)
    if draw(st.booleans()):
        h = h.t().contiguous().t()
    keep = torch.rand(b, t, generator=g) < 0.7
    mask_kind = draw(st.sampled_from(["bool", "bool", "all_false", "int", "float", "float_other", "wrong_shape"]))
    mask = {
        "bool": keep,
        "all_false": torch.zeros(b, t, dtype=torch.bool),
        "int": keep.long(),
        "float": keep.float(),
        "float_other": keep.float() * 0.5 + 0.25,  # not 0/1: refused
        "wrong_shape": torch.ones(b, t + 1, dtype=torch.bool),
    }[mask_kind]
    return h, mask, mask_kind


def _expect_error(h, mask_kind) -> bool:
    other = mask_kind == "float_other" and h.numel() > 0  # an empty mask holds no value other than 0/1
    return not h.dtype.is_floating_point or other or mask_kind == "wrong_shape"


def _keep(mask) -> torch.Tensor:
    return mask != 0


def _same(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal to the float64 reference where it is finite, NaN exactly where it is NaN."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.equal(torch.isnan(out), torch.isnan(want)), f"NaN pattern: {out} vs {want}"
    ok = ~torch.isnan(want)
    torch.testing.assert_close(out[ok].double(), want[ok], atol=tol, rtol=tol)


@settings(max_examples=60, deadline=None)
@given(tokens_case(), st.sampled_from([1, 2, 4, 0, 2**62, True, 2.0]), st.sampled_from(WINDOW_ALIGNS + ("back",)))
def test_window_entropy_contract(case, window, align):
    h, mask, mask_kind = case
    status, out = call(window_entropy, h, mask, window, align=align, return_counts=True)
    bad_window = isinstance(window, bool) or not isinstance(window, int) or window < 1
    if _expect_error(h, mask_kind) or bad_window or align == "back":
        assert status == "error", f"accepted: dtype={h.dtype} mask={mask_kind} window={window!r} align={align}"
        return
    assert status == "ok", out
    assert out.mean.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    # a window of ≥ 2T + 1 covers the whole row under every alignment: the loop reference needs no more
    want, count = window_reference(h.double(), _keep(mask), min(window, 2 * h.shape[1] + 2), align)
    assert torch.equal(out.count, count)
    _same(out.mean, want, h.dtype)
    assert (out.mean[count == 0] == 0).all(), "an empty window's documented value is 0"


@settings(max_examples=40, deadline=None)
@given(tokens_case(), st.sampled_from([None, 0.0, 0.5, 1.0, 1.5, NAN, "a"]), st.sampled_from([None, 0.3, INF, NAN]))
def test_high_window_entropy_mask_contract(case, quantile, threshold):
    h, mask, mask_kind = case
    status, out = call(high_window_entropy_mask, h, mask, quantile=quantile, threshold=threshold)
    one = (quantile is None) != (threshold is None)
    ok_q = quantile is None or (isinstance(quantile, float) and 0.0 <= quantile <= 1.0)
    ok_t = threshold is None or math.isfinite(threshold)
    if _expect_error(h, mask_kind) or not (one and ok_q and ok_t):
        assert status == "error"
        return
    assert status == "ok", out
    assert out.dtype == torch.bool and out.shape == h.shape
    assert not (out & ~_keep(mask)).any(), "a padded position was selected"
    assert not (out & ~torch.isfinite(h)).any(), "a NaN/Inf value was selected"


@st.composite
def phases_for(draw, h):
    b, t = h.shape
    kind = draw(st.sampled_from(["ids", "ids", "too_big", "delimiter", "none"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind in ("ids", "too_big"):
        top = 3 if kind == "ids" else 5
        return kind, {"phase_ids": torch.randint(-1, top, (b, t), generator=g)}
    if kind == "delimiter":
        return kind, {"token_ids": torch.randint(0, 4, (b, t), generator=g), "delimiter_ids": [1, 2]}
    return kind, {}


@settings(max_examples=60, deadline=None)
@given(tokens_case(), st.data())
def test_phase_entropy_and_pear_reward_contract(case, data):
    h, mask, mask_kind = case
    kind, phases = data.draw(phases_for(h))
    status, out = call(phase_entropy, h, mask, n_phases=3, **phases)
    keep = _keep(mask)
    if _expect_error(h, mask_kind) or kind == "none":
        assert status == "error"
        return
    if kind == "too_big" and h.numel() and bool(((phases["phase_ids"] >= 3) & keep).any()):
        assert status == "error"
        return
    assert status == "ok", out
    ids = phases.get("phase_ids")
    if ids is None:
        ids = phase_ids_reference(phases["token_ids"], keep, phases["delimiter_ids"], 3)
    want, count = phase_reference(h.double(), keep, ids, 3)
    assert torch.equal(out.count, count)
    _same(out.mean, want, h.dtype)
    # PEAR: two phases, ≤ 0 wherever finite, 0 for an all-padding row, NaN only in rows whose phases hold NaN
    two = {k: (v.clamp_max(1) if k == "phase_ids" else v) for k, v in phases.items()}
    think = data.draw(st.sampled_from([0.0, 0.1, 2.0, 1e39, 1e300]))  # extreme weights overflow the output dtype
    answer = data.draw(st.sampled_from([0.5, -1e300]))
    status, reward = call(pear_reward, h, mask, think_coef=think, answer_coef=answer, **two)
    if status == "error":  # only when the weighted phase means overflow the reward (before: -inf or NaN)
        assert max(think, abs(answer)) >= 1e39 and "think_coef" in str(reward), reward
        return
    assert reward.shape == (h.shape[0],)
    finite = torch.isfinite(reward)
    assert (reward[finite] <= 0).all()
    assert (reward[~keep.any(1)] == 0).all()
    assert torch.isfinite(reward[torch.isfinite(h.double()).all(1)]).all()


@settings(max_examples=40, deadline=None)
@given(tokens_case())
def test_sequence_entropy_is_verls_masked_mean(case):
    h, mask, mask_kind = case
    status, out = call(sequence_entropy, h, mask)
    if _expect_error(h, mask_kind):
        assert status == "error"
        return
    keep = _keep(mask)
    rows = [
        math.fsum(float(v) for v, k in zip(h[i].double(), keep[i]) if k) / (int(keep[i].sum()) + 1e-8)
        if all(math.isfinite(float(v)) for v, k in zip(h[i].double(), keep[i]) if k) else math.nan
        for i in range(h.shape[0])
    ]
    _same(out, torch.tensor(rows, dtype=torch.float64).reshape(-1), h.dtype)


_COEFFICIENTS = st.sampled_from([0.0, 0.5, 1.0, -2.0, NAN, INF, True, "a", None])
_EXTREME = (1e300, -1e300, 1e-300)  # finite, but the advantage overflows (before: inf / NaN advantages)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 3),
    st.sampled_from([1, 2, 3, 4, 0, -1, True]),
    st.sampled_from(DTYPES + (torch.int64,)),
    st.data(),
)
def test_canon_advantage_contract(n_groups, group_size, dtype, data):
    g = max(group_size, 1) if isinstance(group_size, int) and not isinstance(group_size, bool) else 1
    n = n_groups * g + data.draw(st.sampled_from([0, 0, 0, 1]))  # sometimes not a multiple
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    r = (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2).round(decimals=1)
    metric = torch.randint(0, 3, (n,), generator=gen).double()  # ties: the stable order decides
    if n and data.draw(st.booleans()):
        metric[data.draw(st.integers(0, n - 1))] = NAN  # a NaN metric sorts high (documented)
    r = r.to(dtype) if dtype.is_floating_point else r.round().to(dtype)
    name = data.draw(st.sampled_from(["lam", "alpha", "beta", "length_norm"]))
    value = data.draw(st.one_of(_COEFFICIENTS, st.sampled_from(_EXTREME)))
    kwargs = {name: value, "variant": data.draw(st.sampled_from(["entropy", "length"]))}
    status, out = call(canon_advantage, r, metric, group_size, **kwargs)
    bad_group = isinstance(group_size, bool) or group_size < 1 or n % group_size
    meaningless = value is None or isinstance(value, (bool, str)) or not math.isfinite(value)
    if bad_group or meaningless or (name == "length_norm" and value <= 0):
        assert status == "error", f"accepted group_size={group_size!r} n={n} {name}={value!r}"
        assert name in str(out) or "group_size" in str(out) or "lam" in str(out)
        return
    if status == "error":  # a finite coefficient far beyond order 1: only when the advantage would overflow
        assert value in _EXTREME and "overflows" in str(out) and f"{name}=" in str(out), out
        return
    assert status == "ok", out
    assert out.shape == (n,) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all(), "finite rewards gave a non-finite advantage"
    if value in _EXTREME:
        return  # finite (an exact cancellation, or all-zero rewards): the reference's rounding differs at 1e300
    assert torch.equal(canon_split(metric, group_size), canon_split(metric.float(), group_size))
    if torch.isnan(metric).any():  # documented: a NaN metric sorts above every number (Python's sorted would not)
        assert canon_split(metric, group_size)[torch.isnan(metric)].all()
        return
    defaults = {"lam": 1.0, "alpha": 1.0, "beta": 0.0, "length_norm": 1.0, **{name: value}}
    want = canon_reference(
        r.double(), metric, [i // group_size for i in range(n)], defaults["alpha"], defaults["beta"],
        defaults["lam"], defaults["length_norm"], kwargs["variant"],
    )
    torch.testing.assert_close(out.double(), torch.as_tensor(want, dtype=torch.float64).reshape(-1),
                               atol=1e-5, rtol=1e-5)


def test_sequence_entropy_of_a_row_holding_a_valid_inf_is_nan():
    h = torch.tensor([[1.0, INF], [1.0, -INF], [1.0, NAN], [2.0, INF]])
    mask = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    out = sequence_entropy(h, mask)  # before: inf and -inf (the docstring promises NaN)
    assert torch.isnan(out[:3]).all()
    assert float(out[3]) == pytest.approx(2.0)  # a padded Inf never reaches the value
