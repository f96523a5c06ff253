"""Trust under failure: ``entropy_from_logits`` / ``entropy_from_probs`` / ``row_entropy`` either raise
:class:`EntrotrainError` or return finite values wherever the input row is finite (checked against a float64 brute
force); a row holding NaN/+Inf may be NaN and never contaminates another row; no other exception type escapes.

Scenario tests first (each failed before its fix), then hypothesis property tests over shapes (0-sized dims
included), dtypes, dims (out of range included), masks (bool, integer, float, all-False, all-True, wrong shape),
NaN/Inf placements, one-hot / uniform rows and temperatures (invalid included).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import entropy_from_logits, entropy_from_probs, row_entropy
from tests.helpers.reference import entropy_rows64, probs_entropy64, row_entropy64
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.contracts import DTYPES, INF, NAN, call

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4}


# ------------------------------------------------------------------ scenarios (each failed before its fix)


def test_dim_out_of_range_raises_instead_of_wrapping():
    z = torch.randn(3, 4)
    with pytest.raises(EntrotrainError, match=r"dim=2 is out of range"):
        entropy_from_logits(z, dim=2)  # wrapped to dim=0 before
    with pytest.raises(EntrotrainError, match=r"dim=-3"):
        entropy_from_logits(z, dim=-3)
    with pytest.raises(EntrotrainError, match=r"dim=2"):
        entropy_from_probs(torch.softmax(z, -1), dim=2)


@pytest.mark.parametrize("temperature", [INF, NAN, -1.0, 0.0])
def test_non_finite_or_non_positive_temperature_is_refused(temperature):
    with pytest.raises(EntrotrainError, match="temperature"):
        entropy_from_logits(torch.randn(2, 5), temperature=temperature)  # Inf gave entropy ln V silently before


@pytest.mark.parametrize("chunk_elements", [0, -4, 2.5])
def test_bad_chunk_elements_is_refused(chunk_elements):
    with pytest.raises(EntrotrainError, match="chunk_elements"):
        entropy_from_logits(torch.randn(2, 5), chunk_elements=chunk_elements)


def test_probs_mask_of_wrong_shape_is_an_entrotrain_error():
    p = torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(EntrotrainError, match=r"mask of shape \(3, 3\)"):
        entropy_from_probs(p, mask=torch.ones(3, 3, dtype=torch.bool))  # a raw RuntimeError before


def test_row_entropy_validates_its_inputs():
    with pytest.raises(EntrotrainError, match="scores"):
        row_entropy(torch.ones(3, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="valid"):
        row_entropy(torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool))  # a raw RuntimeError before
    with pytest.raises(EntrotrainError, match="valid"):
        row_entropy(torch.randn(2, 3), torch.ones(2, 3))  # float "mask" silently AND-ed before


def test_row_entropy_of_rows_without_categories_is_zero():
    out = row_entropy(torch.empty(3, 0, requires_grad=True))  # IndexError from amax before
    assert out.entropy.tolist() == [0.0, 0.0, 0.0] and out.count.tolist() == [0, 0, 0]
    assert torch.isneginf(out.lse).all()
    out.entropy.sum().backward()


# ------------------------------------------------------------------ property tests


@st.composite
def logits_case(draw):
    """Logits (shape, dtype, dim, special rows, non-finite placements), a mask and a temperature."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    dim = draw(st.integers(-ndim - 1, ndim))  # ndim and -ndim-1 are out of range
    kind = draw(st.sampled_from(["random", "uniform", "one-hot", "neg-inf-row"]))
    if z.numel() and 0 <= dim + ndim < 2 * ndim:
        d = dim % ndim
        if kind == "uniform":
            z.zero_()
        elif kind == "one-hot":
            z.fill_(-INF)
            z.select(d, 0).fill_(3.0)
        elif kind == "neg-inf-row":
            z.select(d, 0).fill_(-INF)
    flat = z.view(-1)
    for value in draw(st.lists(st.sampled_from([NAN, INF, -INF]), max_size=2)):
        if flat.numel():
            flat[draw(st.integers(0, flat.numel() - 1))] = value
    z = z.to(dtype)
    mask_kind = draw(st.sampled_from(["none", "bool", "all-false", "all-true", "int", "float", "wrong-shape"]))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(shape, generator=g) < 0.7
    elif mask_kind == "all-false":
        mask = torch.zeros(shape, dtype=torch.bool)
    elif mask_kind == "all-true":
        mask = torch.ones(shape, dtype=torch.bool)
    elif mask_kind in ("int", "float"):
        mask = torch.ones(shape, dtype=torch.long if mask_kind == "int" else torch.float32)
    elif mask_kind == "wrong-shape":
        mask = torch.ones(tuple(s + 2 for s in shape), dtype=torch.bool)  # never 1: does not broadcast
    temperature = draw(st.sampled_from([1.0, 0.5, 2.0, 0.0, -1.0, INF, NAN]))
    return z, dim, mask, mask_kind, temperature


def _expected_invalid(z, dim, mask_kind, temperature) -> bool:
    return (
        not -z.dim() <= dim < z.dim()
        or mask_kind in ("int", "float", "wrong-shape")
        or not (math.isfinite(temperature) and temperature > 0)
    )


@given(logits_case())
def test_entropy_from_logits_contract(case):
    z, dim, mask, mask_kind, temperature = case
    status, out = call(entropy_from_logits, z, dim, mask, temperature=temperature, impl="torch")
    if _expected_invalid(z, dim, mask_kind, temperature):
        assert status == "error", f"accepted an invalid call: dim={dim} mask={mask_kind} T={temperature}"
        return
    assert status == "ok", out
    ref = entropy_rows64(z.double() / temperature, dim=dim, mask=mask)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(ref)
    assert torch.isfinite(out[finite]).all(), "a finite row gave a non-finite entropy"
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=TOL[z.dtype], rtol=TOL[z.dtype])
    assert torch.isnan(out[~finite]).all(), "a row holding NaN/+Inf must give NaN, never a hidden value"
    assert (out[finite] >= 0).all()


@given(logits_case())
@settings(max_examples=25)
def test_entropy_from_logits_gradient_is_finite_on_finite_rows(case):
    z, dim, mask, mask_kind, temperature = case
    if _expected_invalid(z, dim, mask_kind, temperature) or z.dtype not in (torch.float32, torch.float64):
        return
    x = z.clone().requires_grad_()
    out = entropy_from_logits(x, dim, mask, temperature=temperature, impl="torch")
    finite = torch.isfinite(out.detach())
    torch.where(finite, out, 0.0).sum().backward()
    rows_finite = finite.unsqueeze(dim % z.dim()).expand_as(z)
    assert torch.isfinite(x.grad[rows_finite]).all(), "NaN gradient on a finite row"


@st.composite
def probs_case(draw):
    rows = draw(st.integers(0, 4))
    width = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "uniform", "one-hot"]))
    if kind == "uniform" and width:
        p = torch.full((rows, width), 1.0 / width, dtype=torch.float64)
    elif kind == "one-hot" and width:
        p = torch.zeros(rows, width, dtype=torch.float64)
        p[:, 0] = 1.0
    else:
        p = torch.softmax(torch.randn(rows, width, generator=g, dtype=torch.float64), -1)
    if p.numel() and draw(st.booleans()):
        p.view(-1)[draw(st.integers(0, p.numel() - 1))] = draw(st.sampled_from([NAN, INF]))
    p = p.to(dtype)
    transpose = draw(st.booleans())
    dim = 0 if transpose else -1
    if transpose:
        p = p.t()
    dim = draw(st.sampled_from([dim, dim, 2, -3]))
    mask_kind = draw(st.sampled_from(["none", "bool", "all-false", "int", "wrong-shape"]))
    mask = {
        "none": None,
        "bool": torch.rand(p.shape, generator=g) < 0.7,
        "all-false": torch.zeros(p.shape, dtype=torch.bool),
        "int": torch.ones(p.shape, dtype=torch.long),
        "wrong-shape": torch.ones(p.shape[0] + 2, p.shape[1] + 2, dtype=torch.bool),  # never 1: does not broadcast
    }[mask_kind]
    return p, dim, mask, mask_kind


@given(probs_case())
def test_entropy_from_probs_contract(case):
    p, dim, mask, mask_kind = case
    status, out = call(entropy_from_probs, p, dim, mask)
    if dim in (2, -3) or mask_kind in ("int", "wrong-shape"):
        assert status == "error"
        return
    assert status == "ok", out
    q = p.double().movedim(dim, -1)
    m = None if mask is None else mask.movedim(dim, -1)
    ref = torch.tensor(
        [probs_entropy64(q[i][m[i]] if m is not None else q[i]) for i in range(q.shape[0])], dtype=torch.float64
    )
    finite = torch.isfinite(ref)
    assert torch.isfinite(out[finite]).all()
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=TOL[p.dtype], rtol=TOL[p.dtype])
    assert not torch.isfinite(out[~finite]).any()


@given(logits_case())
@settings(max_examples=25)
def test_row_entropy_contract(case):
    z, _, mask, mask_kind, _ = case
    status, out = call(row_entropy, z, mask)
    if z.dim() == 0 or mask_kind in ("int", "float", "wrong-shape"):
        assert status == "error"
        return
    assert status == "ok", out
    rows = z.reshape(math.prod(z.shape[:-1]), z.shape[-1])
    m = None if mask is None else mask.reshape(rows.shape)
    for i in range(rows.shape[0]):
        want, count = row_entropy64(rows[i], None if m is None else m[i])
        got = out.entropy.reshape(-1)[i].double()
        assert int(out.count.reshape(-1)[i]) == count
        if math.isfinite(want):
            assert abs(float(got) - want) <= TOL[z.dtype] * (1 + want)
        else:
            assert torch.isnan(got)
