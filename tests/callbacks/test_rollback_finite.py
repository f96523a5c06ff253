"""The rollback's "is this state finite" verdict (``rollback_state._all_finite``), judged on each tensor's sum with an
element-wise look at the suspects, equals the element-wise brute force on any tensors: NaN / Inf anywhere, sums that
overflow (float32 near its max, float16 past 65504), complex values, empty and non-float tensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks.rollback_state import _all_finite

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.int64]
_SPECIAL = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 6e4, 0.0]


@st.composite
def _tensor(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(_DTYPES))
    n = draw(st.integers(0, 40))
    values = draw(st.lists(st.sampled_from(_SPECIAL) | st.floats(-1e3, 1e3), min_size=n, max_size=n))
    if dtype.is_complex:
        return torch.tensor([complex(v, draw(st.sampled_from(_SPECIAL))) for v in values], dtype=dtype)
    if not dtype.is_floating_point:
        return torch.tensor([int(v) if abs(v) < 1e6 else 7 for v in values], dtype=dtype)
    return torch.tensor(values, dtype=torch.float64).to(dtype)  # (3e38 and 6e4 overflow to inf in float16)


@settings(max_examples=150, deadline=None)
@given(tensors=st.lists(_tensor(), max_size=5))
def test_the_verdict_is_the_element_wise_one(tensors: list[torch.Tensor]) -> None:
    brute = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() or t.is_complex())
    assert _all_finite(tensors) == brute


def test_finite_tensors_whose_sums_overflow_are_finite() -> None:
    assert _all_finite([torch.full((10,), 3e38), torch.full((10**5,), 6e4, dtype=torch.float16)])
    assert not _all_finite([torch.full((10,), 3e38), torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)])
