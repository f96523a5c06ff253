"""attention_with_entropy: the attention output and its entropy in one pass, against a float64 brute force and SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from tests.helpers.contracts import DTYPES, INF, NAN, call
from tests.helpers.torch_release import needs_torch
from entrotrain.functional.attention import attention_entropy_stats
from entrotrain.functional.attention_joint import (
    JOINT_MAX_ELEMENTS,
    attention_with_entropy,
    joint_attention_applies,
)


def brute(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Float64 materialised attention and entropy; a query with no valid key: output 0, entropy 0."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    valid = torch.ones(s.shape, dtype=torch.bool)
    attended = valid  # the keys given weight: valid ones whose additive bias is not a float's minimum (p = 0 there)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        valid = valid & attn_mask
    elif attn_mask is not None:  # additive: added to the scores, −∞ blocks
        s = s + attn_mask.double()
        valid = valid & ~torch.isneginf(attn_mask)
        attended = attn_mask.double() > -1e300  # (autograd through −1.8e308 · 0 would give the reference NaN)
    if is_causal:
        valid = valid & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    attended = valid & attended
    s = s.masked_fill(~attended, float("-inf"))
    has_key = attended.any(-1, keepdim=True)
    p = torch.where(has_key, torch.softmax(torch.where(has_key, s, 0.0), -1), 0.0)
    logp = torch.where(attended, torch.log_softmax(torch.where(has_key, s, 0.0), -1), 0.0)
    entropy = -(p * logp).sum(-1)
    return p @ v, entropy, valid.sum(-1)


def make(batch, heads, kv_heads, n_q, n_k, dim, dim_v, dtype=torch.float64, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B, N, H, D) memory, as q/k/v split from one projection and transposed (nanoGPT)
        q = torch.randn(batch, n_q, heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, n_q, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, n_k, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, n_k, dim_v, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def grads(out, entropy, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gh = torch.randn(entropy.shape, generator=g, dtype=entropy.dtype)
    return torch.autograd.grad((out, entropy), inputs, (go, gh))


def random_mask(shape, p, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


CASES = {
    "causal": dict(is_causal=True),
    "none": dict(),
    "causal, Nq < Nk": dict(is_causal=True, n_q=5),
    "causal, Nq > Nk": dict(is_causal=True, n_k=5),
    "2-D mask and causal": dict(is_causal=True, mask_shape=(8, 8)),
    "padding mask (B, 1, 1, Nk)": dict(mask_shape=(2, 1, 1, 8)),
    "per-batch mask with empty rows": dict(mask_shape=(2, 1, 8, 8), density=0.3),
    "per-head mask": dict(mask_shape=(2, 4, 8, 8)),
    "GQA causal": dict(is_causal=True, kv_heads=2),
    "MQA per-head mask": dict(kv_heads=1, mask_shape=(1, 4, 8, 8)),
    "Dv != D": dict(is_causal=True, dim_v=12),
    "scale": dict(is_causal=True, scale=0.7),
    "sliding window of 3 (HF Mistral's boolean mask)": dict(window=3),
    "ALiBi bias and causal": dict(is_causal=True, additive="alibi"),
    "additive padding mask: −∞ and a large finite bias": dict(additive="padding"),
    "per-head additive bias, GQA": dict(additive="heads", kv_heads=2),
}


def additive_mask(kind: str, n_q: int, n_k: int) -> torch.Tensor:
    """Float64 additive masks: ALiBi (slope per head × distance), a padding mask with −∞ and a large finite bias, a
    random per-head bias with a blocked key."""
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    if kind == "alibi":
        slopes = 2.0 ** -torch.arange(1, 5, dtype=torch.float64)
        return -(slopes[:, None, None] * (i - j).abs())[None]  # (1, H, Nq, Nk)
    if kind == "padding":
        mask = torch.zeros(2, 1, 1, n_k, dtype=torch.float64)
        mask[0, ..., -2:] = float("-inf")
        mask[1, ..., :1] = -1e30
        return mask
    bias = torch.randn(1, 4, n_q, n_k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bias[..., 2] = float("-inf")
    return bias


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_float64_brute_force_in_value_and_gradient(case, transposed):
    spec = dict(CASES[case])
    n_q, n_k = spec.pop("n_q", 8), spec.pop("n_k", 8)
    kv_heads, dim_v = spec.pop("kv_heads", 4), spec.pop("dim_v", 16)
    mask_shape, density = spec.pop("mask_shape", None), spec.pop("density", 0.6)
    window, additive = spec.pop("window", None), spec.pop("additive", None)
    q, k, v = make(2, 4, kv_heads, n_q, n_k, 16, dim_v, transposed=transposed)
    mask = None if mask_shape is None else random_mask(mask_shape, density, seed=3)
    if additive is not None:
        mask = additive_mask(additive, n_q, n_k)
    if window is not None:  # query i sees keys i - window < j <= i
        i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
        mask = (j <= i) & (j > i - window)
    if mask_shape == (2, 1, 8, 8):
        mask[0, 0, 3] = False  # a query with no valid key
    kw = dict(attn_mask=mask, enable_gqa=kv_heads != 4, **spec)
    out, result = attention_with_entropy(q, k, v, **kw)
    ref_out, ref_entropy, ref_counts = brute(q, k, v, attn_mask=mask, is_causal=spec.get("is_causal", False),
                                              scale=spec.get("scale"))
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(result.entropy, ref_entropy, atol=1e-12, rtol=0)
    assert torch.equal(result.n_keys, ref_counts)
    n = ref_counts.double()
    ref_normalized = torch.where(n >= 2, ref_entropy / torch.log(n.clamp_min(2)), 0.0)
    torch.testing.assert_close(result.normalized, ref_normalized, atol=1e-12, rtol=0)
    got = grads(out, result.entropy, (q, k, v))
    want = grads(ref_out, ref_entropy, (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
    if mask_shape == (2, 1, 8, 8):
        empty = (ref_counts == 0).expand(2, 4, 8)
        assert bool(empty.any()) and torch.all(out[empty] == 0) and torch.all(result.entropy[empty] == 0)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(attn_mask="mask"), dict(is_causal=True, kv_heads=2)])
@needs_torch(2, 5, "the reference calls F.scaled_dot_product_attention(enable_gqa=), new in torch 2.5")
@pytest.mark.parametrize("transposed", [False, True])
def test_output_matches_sdpa_in_value_and_layout(kw, transposed):
    kw = dict(kw)
    kv_heads = kw.pop("kv_heads", 4)
    q, k, v = make(2, 4, kv_heads, 8, 8, 16, 16, dtype=torch.float32, transposed=transposed)
    if kw.get("attn_mask") == "mask":
        kw["attn_mask"] = random_mask((2, 1, 8, 8), 0.7, seed=5) | torch.eye(8, dtype=torch.bool)
    kw["enable_gqa"] = kv_heads != 4
    out, _ = attention_with_entropy(q, k, v, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)
    out.transpose(1, 2).reshape(2, 8, -1)  # what the next layer does


def test_float32_entropy_matches_the_chunked_path_at_the_recipe_shape():
    q, k, v = make(8, 4, 4, 64, 64, 32, 32, dtype=torch.float32, transposed=True)
    _, result = attention_with_entropy(q, k, v, is_causal=True)
    ref = attention_entropy_stats(q.double(), k.double(), is_causal=True, path="chunked")
    torch.testing.assert_close(result.entropy.double(), ref.entropy, atol=2e-6, rtol=0)
    torch.testing.assert_close(result.normalized.double(), ref.normalized, atol=1e-6, rtol=0)


def test_collapsed_and_uniform_rows():
    """One-hot rows (scores far apart) give entropy 0 and its gradient; equal scores give ln |V_i| exactly."""
    q, k, v = make(1, 2, 2, 6, 6, 4, 4)
    with torch.no_grad():
        q[:, 0] *= 200.0  # head 0: near one-hot
        q[:, 1] = 0.0  # head 1: uniform over the valid keys
    out, result = attention_with_entropy(q, k, v, is_causal=True)
    ref_out, ref_entropy, _ = brute(q, k, v, is_causal=True)
    torch.testing.assert_close(result.entropy, ref_entropy, atol=1e-12, rtol=0)
    expected = torch.log(torch.arange(1, 7, dtype=torch.float64))
    torch.testing.assert_close(result.entropy[0, 1], expected, atol=1e-14, rtol=0)
    got = grads(out, result.entropy, (q, k, v))
    want = grads(ref_out, ref_entropy, (q, k, v))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_one_output_in_the_loss():
    q, k, v = make(2, 4, 4, 8, 8, 16, 16)
    out, result = attention_with_entropy(q, k, v, is_causal=True)
    dq, dk, dv = torch.autograd.grad(result.entropy.sum(), (q, k, v))
    ref = attention_entropy_stats(q, k, is_causal=True, path="chunked").entropy.sum()
    rq, rk = torch.autograd.grad(ref, (q, k))
    torch.testing.assert_close(dq, rq, atol=1e-12, rtol=0)
    torch.testing.assert_close(dk, rk, atol=1e-12, rtol=0)
    assert torch.equal(dv, torch.zeros_like(dv))
    out, result = attention_with_entropy(q, k, v, is_causal=True)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_non_finite_key_reaches_only_the_queries_that_read_it():
    q, k, v = make(1, 2, 2, 6, 6, 4, 4)
    with torch.no_grad():
        k[0, 0, 3, 1] = float("nan")
    _, result = attention_with_entropy(q, k, v, is_causal=True)
    assert torch.isfinite(result.entropy[0, 0, :3]).all()  # causal: queries 0..2 never read key 3
    assert torch.isnan(result.entropy[0, 0, 3:]).all()
    assert torch.isfinite(result.entropy[0, 1]).all()


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    n_q=st.integers(1, 7),
    n_k=st.integers(1, 7),
    dim=st.integers(1, 5),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "2d", "batch", "head"]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_brute_force(batch, kv_heads, groups, n_q, n_k, dim, causal, mask_kind, seed):
    heads = kv_heads * groups
    q, k, v = make(batch, heads, kv_heads, n_q, n_k, dim, dim + 1, seed=seed)
    shapes = {"none": None, "2d": (n_q, n_k), "batch": (batch, 1, n_q, n_k), "head": (1, heads, n_q, n_k)}
    mask = None if shapes[mask_kind] is None else random_mask(shapes[mask_kind], 0.6, seed)
    out, result = attention_with_entropy(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=groups > 1)
    ref_out, ref_entropy, ref_counts = brute(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(result.entropy, ref_entropy, atol=1e-12, rtol=0)
    assert torch.equal(result.n_keys, ref_counts.expand_as(result.n_keys))
    assert (result.entropy >= 0).all() and torch.isfinite(result.normalized).all()
    got = grads(out, result.entropy, (q, k, v), seed=seed)
    want = grads(ref_out, ref_entropy, (q, k, v), seed=seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "change, fix",
    [
        (lambda q, k, v: (q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)), "float32/float64"),
        (lambda q, k, v: (q[:, :, :0], k, v), "sizes > 0"),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), "enable_gqa=True"),
        (lambda q, k, v: (q[0], k[0], v[0]), "(B, H, Nq, D)"),
    ],
)
def test_refuses_what_it_cannot_compute_with_the_fix(change, fix):
    q, k, v = change(*make(2, 4, 4, 8, 8, 16, 16, dtype=torch.float32))
    with pytest.raises(EntrotrainError, match="F.scaled_dot_product_attention") as err:
        attention_with_entropy(q, k, v)
    assert fix in str(err.value)


def test_refuses_a_foreign_or_learned_mask_and_a_non_finite_scale():
    q, k, v = make(1, 1, 1, 4, 4, 8, 8, dtype=torch.float32)
    with pytest.raises(EntrotrainError, match="additive one in q's dtype"):
        attention_with_entropy(q, k, v, attn_mask=torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(EntrotrainError, match="additive"):
        attention_with_entropy(q, k, v, attn_mask=torch.zeros(4, 4, requires_grad=True))
    hf_style = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    with pytest.raises(EntrotrainError, match="not the float's minimum"):
        attention_with_entropy(q, k, v, attn_mask=hf_style)
    with pytest.raises(EntrotrainError, match="scale"):
        attention_with_entropy(q, k, v, scale=float("nan"))


def test_applies_only_where_it_pays_and_matches_sdpa_semantics():
    q, k, v = make(2, 4, 4, 8, 8, 16, 16, dtype=torch.float32)
    assert joint_attention_applies(q, k, v, None, 0.0, False)
    assert not joint_attention_applies(q, k, v, None, 0.1, False)  # dropout: SDPA's RNG
    assert joint_attention_applies(q, k, v, torch.zeros(8, 8), 0.0, False)  # an additive mask: exact here
    assert not joint_attention_applies(q, k, v, torch.zeros(8, 8, requires_grad=True), 0.0, False)  # a learned bias
    assert not joint_attention_applies(q, k, v, torch.zeros(8, 8, dtype=torch.float64), 0.0, False)  # SDPA refuses
    assert not joint_attention_applies(q, k[:, :2], v[:, :2], None, 0.0, False)  # GQA without enable_gqa
    assert not joint_attention_applies(q, k, v, torch.ones(3, 8, dtype=torch.bool), 0.0, False)  # mask shape
    assert not joint_attention_applies(q, k, v, None, 0.0, False, max_elements=2 * 4 * 8 * 8 - 1)
    assert joint_attention_applies(q, k, v, None, 0.0, False, max_elements=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not joint_attention_applies(q, k, v, None, 0.0, False)
    one = torch.zeros(1, 1, 1, 1)
    big = one.expand(1, 4, 1025, 1024), one.expand(1, 4, 1024, 1024), one.expand(1, 4, 1024, 1024)
    assert 4 * 1025 * 1024 > JOINT_MAX_ELEMENTS and not joint_attention_applies(*big, None, 0.0, False)
    assert joint_attention_applies(*(x[:, :, :1024] for x in big), None, 0.0, False)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 4), st.integers(0, 4), st.integers(0, 3)),
    dtype=st.sampled_from(DTYPES),
    poison=st.sampled_from([None, NAN, INF]),
    causal=st.booleans(),
)
def test_contract_a_documented_value_or_an_entrotrain_error(shape, dtype, poison, causal):
    """Any shape (0-sized dims too) and dtype: a result or an EntrotrainError, never a raw torch error; a NaN/Inf in a
    query reaches only that query's entropy."""
    batch, heads, n_q, n_k, dim = shape
    q = torch.randn(batch, heads, n_q, dim).to(dtype)
    k = torch.randn(batch, heads, n_k, dim).to(dtype)
    if poison is not None and q.numel():
        q.view(-1)[0] = poison
    status, value = call(attention_with_entropy, q, k, k.clone(), is_causal=causal)
    if status == "error":
        assert dtype not in (torch.float32, torch.float64) or 0 in shape
        return
    out, result = value
    assert out.shape == (batch, heads, n_q, dim) and result.entropy.shape == (batch, heads, n_q)
    bad = ~torch.isfinite(q).all(-1)
    assert torch.isfinite(result.entropy[~bad]).all() and torch.isfinite(result.normalized[~bad]).all()
    assert (result.entropy[~bad] >= 0).all()


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    groups=st.integers(2, 3),
    n_q=st.integers(2, 6),
    n_k=st.integers(1, 6),
    shape_kind=st.sampled_from(["padding", "2d-row", "head-row"]),
    additive=st.booleans(),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gqa_with_a_mask_of_one_query_row_matches_brute_force(
    batch, kv_heads, groups, n_q, n_k, shape_kind, additive, causal, seed
):
    """GQA (G > 1) with a mask broadcast over the queries ((B, 1, 1, Nk) padding, (1, Nk), (1, H, 1, Nk)), boolean
    or additive with −∞: values, counts and gradients equal the float64 brute force. The grouped layout stacks the G
    query heads of a key head, so one mask row no longer broadcasts over them: RuntimeError before (without causal)."""
    heads = kv_heads * groups
    q, k, v = make(batch, heads, kv_heads, n_q, n_k, 3, 4, seed=seed)
    shape = {"padding": (batch, 1, 1, n_k), "2d-row": (1, n_k), "head-row": (1, heads, 1, n_k)}[shape_kind]
    keep = random_mask(shape, 0.7, seed)
    if additive:
        g = torch.Generator().manual_seed(seed + 1)
        mask = torch.randn(shape, generator=g, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    else:
        mask = keep
    out, result = attention_with_entropy(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    ref_out, ref_entropy, ref_counts = brute(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(result.entropy, ref_entropy, atol=1e-12, rtol=0)
    assert torch.equal(result.n_keys, ref_counts.expand_as(result.n_keys))
    want = grads(ref_out, ref_entropy, (q, k, v), seed=seed)
    for a, b in zip(grads(out, result.entropy, (q, k, v), seed=seed), want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (1, 3, 4, 4), (1, 1, 2, 3, 4), (4,), ()])
def test_a_mask_larger_than_the_scores_is_refused_with_the_fix(shape):
    """A mask that broadcasts *with* the (1, 2, 3, 4) scores but not *to* them (more batches, heads or dims than q),
    or a 1-D / 0-d one: SDPA refuses them; attention_with_entropy raised a raw RuntimeError / IndexError from its
    grouped reshape."""
    q, k, v = make(1, 2, 2, 3, 4, 5, 5)
    assert not joint_attention_applies(q, k, v, torch.ones(shape, dtype=torch.bool), 0.0, False)
    with pytest.raises(EntrotrainError, match="F.scaled_dot_product_attention"):
        attention_with_entropy(q, k, v, attn_mask=torch.ones(shape, dtype=torch.bool))
