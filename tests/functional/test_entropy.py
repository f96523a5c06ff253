"""Exactness of ``entropy_from_logits`` / ``entropy_from_probs`` / ``row_entropy`` against a float64 brute force.

Tolerances (absolute, nats):
- float32 / float64 inputs vs. the float64 brute force: 1e-5 (fp32 accumulation; entropies here are <= ln 16);
  float64 inputs: 1e-10.
- bf16 / fp16 inputs vs. the float64 entropy *of the rounded inputs*: 1e-4 (the library upcasts to float32 before
  any arithmetic, so only float32 round-off remains; much tighter than the 1e-2 an fp16 softmax would need).
- chunk-size invariance: 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional import entropy_from_logits, entropy_from_probs, row_entropy
from tests.helpers.reference import entropy_rows64, probs_entropy_rows64
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)

INF = float("inf")


def _adversarial_logits(rows: int = 12, width: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, width, generator=g, dtype=torch.float64) * 3
    z[0] = 0.0  # uniform
    z[1] = torch.tensor([50.0, 0, 0, 0, 0, 0, 0])  # one-hot (to fp64 precision)
    z[2] = -INF
    z[2, 3] = 1.5  # single finite entry among -inf: entropy 0
    z[3, ::2] = -INF  # half -inf
    z[4] = torch.tensor([1e4, -1e4, 1e4 - 1.0, 0, -1e4, 1e4, -INF])  # huge
    z[5] = torch.tensor([-1e4, -1e4 + 0.5, -1e4 + 2, -1e4, -1e4, -1e4, -1e4])  # huge negative, shifted
    z[6] = -INF  # fully -inf: entropy 0
    return z


# ------------------------------------------------------------------ golden vectors (reference §9, T1)
T1 = [
    ([0.0, 0.0, 0.0, 0.0], 1.3862943611),
    ([1.0, 2.0, 3.0, 4.0], 0.9475369640),
    ([0.0, -INF, 2.0, -INF], 0.3653338551),
    ([10.0, 0.0, 0.0, 0.0], 0.0014980029),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk_elements", [1, 4, 1 << 22])
def test_golden_t1(dtype, tol, chunk_elements):
    logits = torch.tensor([row for row, _ in T1], dtype=dtype)
    expected = torch.tensor([h for _, h in T1], dtype=torch.float64)
    got = entropy_from_logits(logits, chunk_elements=chunk_elements)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden_t1_near_one_hot(dtype):
    # [100, 0, -100, 5] -> 5.3e-40 nats: 0 in float32, tiny and non-negative in float64.
    got = entropy_from_logits(torch.tensor([100.0, 0.0, -100.0, 5.0], dtype=dtype))
    assert got.shape == ()
    assert 0.0 <= got.item() < 1e-38
    if dtype == torch.float64:
        ref = entropy_rows64(torch.tensor([100.0, 0.0, -100.0, 5.0], dtype=torch.float64))
        assert math.isclose(got.item(), ref.item(), rel_tol=1e-6)
        assert 5.0e-40 < got.item() < 5.6e-40


def test_docstring_example():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4), abs=1e-7)


# ------------------------------------------------------------------ random and adversarial vs brute force
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_elements", [1, 7, 20, 1 << 22])
def test_matches_brute_force_adversarial(dtype, tol, chunk_elements):
    z = _adversarial_logits().to(dtype)
    got = entropy_from_logits(z, chunk_elements=chunk_elements)
    ref = entropy_rows64(z)
    assert torch.isfinite(got).all()
    assert (got >= 0).all()
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)
    assert got[0].item() == pytest.approx(math.log(7), abs=tol)
    assert got[2].item() == 0.0 and got[6].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_fp64_of_rounded_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(40, 33, generator=g) * 4).to(dtype)
    z[0] = 0
    z[1, 5:] = -INF
    z[2] = -INF
    z[3, 0] = 300.0  # one-hot after rounding
    got = entropy_from_logits(z, chunk_elements=64)
    assert got.dtype == torch.float32
    ref = entropy_rows64(z)  # entropy of the rounded inputs, float64
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)
    # normalised entropy (H / ln V) as a monitor reports it
    torch.testing.assert_close(got.double() / math.log(33), ref / math.log(33), atol=1e-4, rtol=0)


def test_bf16_huge_logits():
    z = torch.tensor([[1e4, -1e4, 9984.0, 0.0], [-1e4, -1e4, -1e4, -1e4]], dtype=torch.bfloat16)
    got = entropy_from_logits(z)
    ref = entropy_rows64(z)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert got[1].item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_result_dtype(dtype, expected):
    assert entropy_from_logits(torch.randn(3, 5).to(dtype)).dtype == expected
    assert entropy_from_probs(torch.softmax(torch.randn(3, 5), -1).to(dtype)).dtype == expected


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_dim_argument(dim):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    got = entropy_from_logits(z, dim=dim)
    expected_shape = list(z.shape)
    del expected_shape[dim]
    assert list(got.shape) == expected_shape
    torch.testing.assert_close(got, entropy_rows64(z, dim=dim), atol=1e-12, rtol=0)


# ------------------------------------------------------------------ masks
def test_mask_same_shape_equals_minus_inf():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[0] = False  # fully masked row -> 0
    mask[1] = False
    mask[1, 2] = True  # single entry -> 0
    got = entropy_from_logits(z, mask=mask)
    ref = entropy_rows64(z, mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert got[0].item() == 0.0 and got[1].item() == 0.0
    torch.testing.assert_close(got, entropy_from_logits(z.masked_fill(~mask, -INF)), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "mask_shape",
    [(9,), (1, 9), (3, 1), (2, 1, 9), (1, 3, 1)],
    ids=["categories", "1xV", "rows", "2x1xV", "1x3x1"],
)
def test_mask_broadcast_last_dim(mask_shape):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(mask_shape, generator=g) > 0.3
    mask.view(-1)[0] = False
    got = entropy_from_logits(z, mask=mask)
    torch.testing.assert_close(got, entropy_rows64(z, mask=mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "logits_shape,dim,mask_shape",
    [
        ((5, 4), 0, (5, 1)),  # same ndim as the logits: works
        ((5, 4), 0, (4,)),  # per-row mask broadcast over the categories (dim 0)
        ((2, 5, 3), 1, (5, 3)),  # (V, T) mask broadcast over the batch, category dim in the middle
        ((3, 3), 0, (3,)),  # square: a wrong broadcast is silent here
    ],
    ids=["same-ndim", "row-mask-dim0", "VxT-dim1", "square-dim0"],
)
def test_mask_broadcasts_against_original_layout_when_dim_is_not_last(logits_shape, dim, mask_shape):
    """``mask`` is "broadcastable to logits": numpy broadcasting on the caller's layout, whatever ``dim`` is."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(logits_shape, generator=g, dtype=torch.float64)
    mask = torch.rand(mask_shape, generator=g) > 0.3
    mask.view(-1)[0] = False
    mask.view(-1)[-1] = True
    ref = entropy_rows64(z, dim=dim, mask=mask)
    got = entropy_from_logits(z, dim=dim, mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_non_bool_mask_raises(dtype):
    with pytest.raises(EntrotrainError, match="bool"):
        entropy_from_logits(torch.randn(2, 3), mask=torch.ones(2, 3, dtype=dtype))


def test_mask_not_broadcastable_raises_naming_shapes():
    with pytest.raises(EntrotrainError, match=r"\(4,\)"):
        entropy_from_logits(torch.randn(2, 3), mask=torch.ones(4, dtype=torch.bool))


def test_bad_inputs_raise():
    with pytest.raises(EntrotrainError, match="floating"):
        entropy_from_logits(torch.ones(3, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="scalar"):
        entropy_from_logits(torch.tensor(1.0))
    with pytest.raises(EntrotrainError, match="Tensor"):
        entropy_from_logits([0.0, 1.0])  # type: ignore[arg-type]


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape,out_shape", [((0, 5), (0,)), ((2, 0, 5), (2, 0))])
def test_empty_batch(dtype, shape, out_shape):
    got = entropy_from_logits(torch.zeros(shape, dtype=dtype))
    assert tuple(got.shape) == out_shape
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_empty_batch_stays_in_the_graph():
    """An empty micro-batch must not break ``loss.backward()`` (entropy is differentiable everywhere else)."""
    z = torch.zeros(0, 5, requires_grad=True)
    h = entropy_from_logits(z)
    assert h.requires_grad
    h.sum().backward()
    assert z.grad is not None and z.grad.shape == z.shape


def test_zero_categories_is_entropy_zero():
    """A row with no category has no valid entry: entropy 0 (as a fully masked row), not a reshape error."""
    got = entropy_from_logits(torch.zeros(3, 0))
    torch.testing.assert_close(got, torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), INF])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 22])
def test_nonfinite_row_is_nan_not_hidden(bad, chunk_elements):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 6, generator=g)
    z[2, 3] = bad
    z[4] = -INF
    z.requires_grad_(True)
    got = entropy_from_logits(z, chunk_elements=chunk_elements)
    assert torch.isnan(got[2])
    others = [0, 1, 3, 4]
    torch.testing.assert_close(got[others].double(), entropy_rows64(z.detach())[others], atol=1e-5, rtol=0)
    got[others].sum().backward()
    assert torch.isfinite(z.grad[others]).all()


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("chunk_elements", [1, 5, 13, 1 << 22])
def test_gradcheck_float64(chunk_elements):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 6, generator=g) > 0.3
    mask[1] = False  # fully masked row
    mask[2] = False
    mask[2, 0] = True
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_elements=chunk_elements), (z,))
    assert torch.autograd.gradcheck(
        lambda x: entropy_from_logits(x, mask=mask, chunk_elements=chunk_elements), (z,)
    )
    assert torch.autograd.gradcheck(
        lambda x: entropy_from_logits(x, dim=0, chunk_elements=chunk_elements), (z,)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 22])
def test_gradient_formula_with_minus_inf_and_masks(dtype, tol, chunk_elements):
    """dH/dz_j = -p_j (z_j - E_p[z]), 0 on -inf / masked entries, finite everywhere (also fully masked rows)."""
    z = _adversarial_logits().to(dtype)
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(z.shape, generator=g) > 0.2
    mask[7] = False  # fully masked row
    weights = torch.rand(z.shape[0], generator=g, dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    (entropy_from_logits(zz, mask=mask, chunk_elements=chunk_elements) * weights.to(dtype)).sum().backward()
    assert torch.isfinite(zz.grad).all()
    expected = torch.zeros(z.shape, dtype=torch.float64)
    z64 = z.double()
    for r in range(z.shape[0]):
        keep = mask[r] & (z64[r] != -INF)
        if not keep.any():
            continue
        p = torch.softmax(z64[r][keep], 0)
        expected[r, keep] = -weights[r] * p * (z64[r][keep] - (p * z64[r][keep]).sum())
    scale = 1.0 if dtype == torch.float64 else 1e4  # the 1e4-logit row: fp32 z - E_p z carries 1e4 * eps
    torch.testing.assert_close(zz.grad.double(), expected, atol=tol * scale, rtol=1e-5)
    assert (zz.grad[~mask] == 0).all()
    assert (zz.grad[z == -INF] == 0).all()


def test_gradient_of_fully_minus_inf_row_is_zero():
    z = torch.full((2, 4), -INF, requires_grad=True)
    h = entropy_from_logits(z)
    assert (h == 0).all()
    h.sum().backward()
    assert torch.equal(z.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chunk_size_invariance(dtype):
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(37, 11, generator=g) * 5).to(dtype)
    z[3, 2:] = -INF
    z[10] = -INF
    mask = torch.rand(37, 11, generator=g) > 0.1
    outs, grads = [], []
    for chunk in [1, 10, 11, 12, 100, 37 * 11, 1 << 22]:
        zz = z.clone().requires_grad_(True)
        h = entropy_from_logits(zz, mask=mask, chunk_elements=chunk)
        h.sum().backward()
        outs.append(h)
        grads.append(zz.grad)
    for h, gz in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(h, outs[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(gz.float(), grads[0].float(), atol=1e-6 if dtype != torch.bfloat16 else 1e-2, rtol=0)


# ------------------------------------------------------------------ row_entropy (the primitive under attention)
def test_row_entropy_terms():
    z = _adversarial_logits()
    out = row_entropy(z)
    torch.testing.assert_close(out.entropy, entropy_rows64(z), atol=1e-10, rtol=0)
    finite = z != -INF
    torch.testing.assert_close(out.count, finite.sum(-1))
    for r in range(z.shape[0]):
        keep = finite[r]
        if not keep.any():
            assert out.lse[r].item() == -INF
            continue
        zr = z[r][keep]
        assert out.lse[r].item() == pytest.approx(torch.logsumexp(zr, 0).item(), abs=1e-9)
        assert out.mean[r].item() == pytest.approx((torch.softmax(zr, 0) * zr).sum().item(), abs=1e-8)


# ------------------------------------------------------------------ entropy_from_probs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_probs_zero_log_zero(dtype):
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]], dtype=dtype)
    got = entropy_from_probs(p)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), probs_entropy_rows64(p), atol=1e-6, rtol=0)
    assert got[0].item() == 0.0


def test_probs_match_logits_entropy_and_dim_and_mask():
    g = torch.Generator().manual_seed(10)
    z = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    z[0, 2:, 1] = -INF
    p = torch.softmax(z, dim=1)
    torch.testing.assert_close(entropy_from_probs(p, dim=1), entropy_rows64(z, dim=1), atol=1e-12, rtol=0)
    mask = torch.ones(4, 7, 3, dtype=torch.bool)
    mask[:, 0] = False  # drop category 0 from the sum (not renormalised)
    expected = -(p[:, 1:] * torch.log(p[:, 1:]).nan_to_num(0.0)).sum(1)
    torch.testing.assert_close(entropy_from_probs(p, dim=1, mask=mask), expected, atol=1e-12, rtol=0)


def test_probs_gradient_finite_at_zero():
    p = torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    entropy_from_probs(p).sum().backward()
    assert torch.isfinite(p.grad).all()
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[0, 1:] = -(torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64)) + 1)
    expected[1, 0] = -1.0
    torch.testing.assert_close(p.grad, expected, atol=1e-12, rtol=0)
    q = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_probs, (q,))


def test_probs_nan_is_not_hidden():
    """A NaN probability (e.g. a NaN attention row from a backend) must give NaN, never a plausible entropy."""
    p = torch.tensor([[0.5, float("nan"), 0.5], [0.2, 0.3, 0.5]])
    got = entropy_from_probs(p)
    assert torch.isnan(got[0])
    assert got[1].item() == pytest.approx(probs_entropy_rows64(p[1:])[0].item(), abs=1e-6)
