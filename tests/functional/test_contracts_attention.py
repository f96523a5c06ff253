"""Trust under failure for attention entropy: ``attention_entropy(_stats)``, ``attention_entropy_from_scores`` /
``_from_probs``, ``AttentionMask``, ``normalized_entropy`` and the taps' mask handling.

Mask conventions under test: ``key_padding_mask`` bool, True = padding (``nn.MultiheadAttention``); an integer
``key_padding_mask`` is refused with the fix (HF's 1 = keep would mark every key as padding). ``attn_mask`` bool
True = attend, float additive; integer refused with the fix.

Scenario tests first (each failed before its fix), then hypothesis property tests: every call either raises
:class:`EntrotrainError` or matches a float64 brute force on every query whose scores are finite (a query reading a
NaN/+Inf score through a valid key may be NaN; it never contaminates another query).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from entrotrain.errors import EntrotrainError
from entrotrain.functional import (
    AttentionMask,
    attention_entropy,
    attention_entropy_from_probs,
    attention_entropy_from_scores,
    attention_entropy_stats,
    normalized_entropy,
)
from entrotrain.taps import AttentionTap, record_attention
from entrotrain.taps.nn_attention import mha_query_key
from tests.helpers.reference import attention_entropy64, row_entropy64, valid_keys
from tests.helpers.reference import no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)
from tests.helpers.contracts import DTYPES, INF, NAN, call

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _qk(batch=2, heads=2, n_q=5, n_k=5, dim=4, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=g)
    k = torch.randn(batch, heads if kv_heads is None else kv_heads, n_k, dim, generator=g)
    return q, k


# ------------------------------------------------------------------ scenarios (each failed before its fix)

ENTRY_POINTS = {
    "attention_entropy": lambda q, k, **kw: attention_entropy(q, k, **kw),
    "attention_entropy_stats": lambda q, k, **kw: attention_entropy_stats(q, k, **kw),
    "from_scores": lambda q, k, **kw: attention_entropy_from_scores(q @ k.transpose(-1, -2), **kw),
    "from_probs": lambda q, k, **kw: attention_entropy_from_probs(
        torch.softmax(q @ k.transpose(-1, -2), -1), normalize=True, **kw
    ),
    "AttentionMask": lambda q, k, **kw: AttentionMask((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), **kw),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8])
def test_integer_key_padding_mask_of_ones_is_refused_not_silently_all_padding(entry, dtype):
    q, k = _qk()
    hf_mask = torch.ones(2, 5, dtype=dtype)  # HF's attention_mask: 1 = keep; it made every key padding before
    with pytest.raises(EntrotrainError, match=r"attention_mask == 0"):
        ENTRY_POINTS[entry](q, k, key_padding_mask=hf_mask)


def test_the_fix_in_the_message_gives_the_unmasked_entropy():
    q, k = _qk()
    hf_mask = torch.ones(2, 5, dtype=torch.long)
    got = attention_entropy(q, k, key_padding_mask=hf_mask == 0)
    torch.testing.assert_close(got, attention_entropy(q, k))
    assert (got > 0).all()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_integer_attn_mask_is_refused_with_the_fix(entry):
    q, k = _qk()
    with pytest.raises(EntrotrainError, match=r"attn_mask\.bool\(\)"):
        ENTRY_POINTS[entry](q, k, attn_mask=torch.ones(5, 5, dtype=torch.long))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_key_padding_mask_of_wrong_shape_is_an_entrotrain_error(entry):
    q, k = _qk()
    with pytest.raises(EntrotrainError, match="key_padding_mask"):
        ENTRY_POINTS[entry](q, k, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_record_attention_with_an_integer_padding_mask_raises_in_the_tap():
    class Custom(nn.Module):
        def forward(self, q, k, pad):
            record_attention(q, k, key_padding_mask=pad)
            return q

    model = Custom()
    q, k = _qk()
    with AttentionTap(model) as tap:
        with pytest.raises(EntrotrainError, match="key_padding_mask"):
            model(q, k, torch.ones(2, 5, dtype=torch.long))  # recorded all-zero entropies before
    assert not tap.stats


def test_mha_adapter_refuses_an_integer_key_padding_mask():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(EntrotrainError, match="key_padding_mask"):  # a TypeError from torch.finfo before
        mha_query_key(mha, (x, x, x), {"key_padding_mask": torch.ones(2, 5, dtype=torch.long)})
    out = mha_query_key(mha, (x, x, x), {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)})
    assert out["key_padding_mask"].dtype == torch.bool


@pytest.mark.parametrize("path", ["auto", "chunked", "materialized", "fused"])
def test_zero_heads_give_empty_results_not_zero_division(path):
    q, k = _qk(heads=0, kv_heads=0)
    out = attention_entropy_stats(q, k, path=path)  # ZeroDivisionError before
    assert out.entropy.shape == (2, 0, 5) and out.n_keys.shape == (2, 0, 5)


def test_query_heads_without_key_heads_is_an_entrotrain_error():
    q, k = _qk(heads=2, kv_heads=0)
    with pytest.raises(EntrotrainError, match="heads"):
        attention_entropy(q, k)


@pytest.mark.parametrize("path", ["auto", "chunked", "materialized", "fused"])
def test_head_dim_zero_is_uniform_attention(path):
    q, k = _qk(dim=0)
    out = attention_entropy_stats(q, k, is_causal=True, path=path)  # ZeroDivisionError (1/sqrt(0)) before
    want = torch.log(torch.arange(1, 6, dtype=torch.float32))
    torch.testing.assert_close(out.entropy, want.expand(2, 2, 5))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"window": 0}, "window"),
        ({"window": 1.5}, "window"),  # silently int(1.5) = 1 before
        ({"scale": NAN}, "scale"),  # all-NaN entropies before
        ({"scale": INF}, "scale"),
        ({"chunk_elements": 0}, "chunk_elements"),
        ({"path": "bogus", "impl": "auto"}, "path"),
        ({"is_causal": 1}, "is_causal"),
    ],
)
def test_bad_parameters_are_refused(kwargs, name):
    q, k = _qk()
    with pytest.raises(EntrotrainError, match=name):
        attention_entropy(q, k, **kwargs)


@pytest.mark.parametrize("masking", ["causal", "padding"])
def test_a_nan_in_a_masked_key_does_not_poison_other_queries_on_the_auto_path(masking):
    q, k = _qk(batch=1, heads=1, n_q=6, n_k=6, dim=8)
    k[0, 0, 4] = NAN
    pad = torch.zeros(1, 6, dtype=torch.bool)
    pad[0, 4] = True
    kwargs = {"is_causal": True} if masking == "causal" else {"key_padding_mask": pad}
    got = attention_entropy(q, k, path="auto", **kwargs)  # the flash kernel made every query NaN before
    clean = k.clone()
    clean[0, 0, 4] = 0.0
    want = attention_entropy(q, clean, path="chunked", **kwargs)
    seen = torch.arange(6) >= 4 if masking == "causal" else torch.zeros(6, dtype=torch.bool)
    torch.testing.assert_close(got[0, 0, ~seen], want[0, 0, ~seen])
    assert torch.isnan(got[0, 0, seen]).all()


def test_normalized_entropy_validates():
    with pytest.raises(EntrotrainError, match="n_keys"):
        normalized_entropy(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(EntrotrainError, match="entropy"):
        normalized_entropy([1.0], torch.ones(1))


# ------------------------------------------------------------------ property tests


@st.composite
def attention_case(draw):
    batch, kv_heads, group = draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    n_q, n_k, dim = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 3))
    bad_heads = draw(st.integers(0, 9)) == 0 and kv_heads != 1  # kv_heads * group + 1: not a multiple of kv_heads
    heads = kv_heads * group + (1 if bad_heads else 0)
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, heads, n_q, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n_k, dim, generator=g, dtype=torch.float64)
    if draw(st.booleans()) and k.numel():  # one-hot-ish: a key far above the others
        k[..., 0, :] *= 8
    for value in draw(st.lists(st.sampled_from([NAN, INF, -INF]), max_size=2)):
        x = draw(st.sampled_from([q, k]))
        if x.numel():
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = value
    q, k = q.to(dtype), k.to(dtype)
    attn_kind = draw(st.sampled_from(["none", "bool", "all-false", "float", "int", "wrong-shape"]))
    attn_mask = {
        "none": None,
        "bool": torch.rand(n_q, n_k, generator=g) < 0.7,
        "all-false": torch.zeros(n_q, n_k, dtype=torch.bool),
        "float": torch.where(torch.rand(n_q, n_k, generator=g) < 0.7, torch.randn(n_q, n_k, generator=g), -INF),
        "int": torch.ones(n_q, n_k, dtype=torch.long),
        "wrong-shape": torch.ones(n_q + 1, n_k + 2, dtype=torch.bool),
    }[attn_kind]
    pad_kind = draw(st.sampled_from(["none", "bool", "all-padding", "int", "wrong-shape"]))
    key_padding_mask = {
        "none": None,
        "bool": torch.rand(batch, n_k, generator=g) < 0.3,
        "all-padding": torch.ones(batch, n_k, dtype=torch.bool),
        "int": torch.zeros(batch, n_k, dtype=torch.long),
        "wrong-shape": torch.zeros(batch, n_k + 1, dtype=torch.bool),
    }[pad_kind]
    options = {
        "is_causal": draw(st.booleans()),
        "window": draw(st.sampled_from([None, None, 1, 2, 0, 1.5])),
        "scale": draw(st.sampled_from([None, None, 0.7, NAN])),
        "path": draw(st.sampled_from(["auto", "chunked", "materialized", "fused"])),
    }
    invalid = {  # why the call is invalid (empty: valid)
        "heads": bad_heads,
        "attn_mask": attn_kind in ("int", "wrong-shape"),
        "key_padding_mask": pad_kind in ("int", "wrong-shape"),
        "window": options["window"] in (0, 1.5),
        "scale": options["scale"] is not None and math.isnan(options["scale"]),
    }
    return q, k, attn_mask, key_padding_mask, options, {name for name, bad in invalid.items() if bad}


def _reference(q, k, attn_mask, key_padding_mask, options):
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    if heads == 0:  # the reference's GQA expansion divides by the key heads
        empty = torch.zeros(batch, 0, n_q, dtype=torch.float64)
        return empty, empty, empty.long(), empty.bool()
    valid = valid_keys(
        batch, heads, n_q, n_k, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        is_causal=options["is_causal"], window=options["window"],
    )  # fmt: skip
    bias = None
    if attn_mask is not None and attn_mask.is_floating_point():
        bias = torch.where(torch.isfinite(attn_mask), attn_mask, 0.0)
    scale = options["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(dim) if dim else 1.0
    k_all = k.repeat_interleave(heads // k.shape[1], dim=1)
    keys_ok = torch.isfinite(k_all).all(-1)[:, :, None, :]  # (B, H, 1, Nk)
    inputs_finite = torch.isfinite(q).all(-1) & (keys_ok | ~valid).all(-1)
    return (*attention_entropy64(q, k, valid=valid, bias=bias, scale=scale), inputs_finite)


@given(attention_case())
@settings(max_examples=60)
def test_attention_entropy_stats_contract(case):
    q, k, attn_mask, key_padding_mask, options, invalid = case
    status, out = call(
        attention_entropy_stats, q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, impl="torch",
        **options,
    )  # fmt: skip
    if invalid:
        assert status == "error", f"accepted an invalid call {options}"
        return
    has_bias = (
        attn_mask is not None and attn_mask.is_floating_point() and bool((attn_mask.isfinite() & (attn_mask != 0)).any())
    )
    if status == "error":
        assert options["path"] == "fused" and has_bias, out  # the only legitimate refusal of a valid input
        return
    event(f"compared path={options['path']} finite={bool(q.isfinite().all() and k.isfinite().all())}")
    ent, norm, count, finite = _reference(q, k, attn_mask, key_padding_mask, options)
    assert out.entropy.shape == ent.shape
    assert torch.equal(out.n_keys.expand_as(count).long()[finite], count[finite])
    tol = TOL[q.dtype]
    assert torch.isfinite(out.entropy[finite]).all(), "a query reading only finite q/k gave a non-finite entropy"
    torch.testing.assert_close(out.entropy[finite].double(), ent[finite], atol=tol, rtol=tol)
    torch.testing.assert_close(out.normalized[finite].double(), norm[finite], atol=tol, rtol=tol)
    shows = torch.isfinite(ent)  # a NaN/+Inf score through a valid key must show, never be hidden
    assert not torch.isfinite(out.entropy[~shows]).any()


@given(attention_case())
@settings(max_examples=30)
def test_attention_entropy_from_scores_contract(case):
    q, k, attn_mask, key_padding_mask, options, invalid = case
    if q.shape[1] != k.shape[1]:  # scores need matching heads; GQA is covered above
        return
    options.pop("scale")
    options.pop("path")
    scores = q @ k.transpose(-1, -2)
    status, out = call(
        attention_entropy_from_scores, scores, attn_mask=attn_mask, key_padding_mask=key_padding_mask, **options
    )
    if invalid - {"scale"}:  # these take no scale
        assert status == "error"
        return
    assert status == "ok", out
    batch, heads, n_q, n_k = scores.shape
    valid = valid_keys(batch, heads, n_q, n_k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, **options)
    s = scores.double()
    if attn_mask is not None and attn_mask.is_floating_point():
        s = s + torch.where(torch.isfinite(attn_mask), attn_mask, 0.0).double()
    ref = torch.zeros(batch, heads, n_q, dtype=torch.float64)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (batch, heads, n_q))).reshape(-1, 3).tolist():
        if batch and heads and n_q:
            ref[tuple(idx)] = row_entropy64(s[tuple(idx)], valid[tuple(idx)])[0]
    finite = torch.isfinite(ref)
    tol = TOL[scores.dtype] * 10  # the scores themselves were rounded to the low-precision dtype
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=tol, rtol=tol)
    assert not torch.isfinite(out[~finite]).any()


@given(attention_case())
@settings(max_examples=20)
def test_attention_entropy_from_probs_contract(case):
    q, k, attn_mask, key_padding_mask, options, invalid = case
    if q.shape[1] != k.shape[1]:
        return
    options.pop("scale")
    options.pop("path")
    probs = torch.softmax((q @ k.transpose(-1, -2)).float(), -1).to(q.dtype)
    status, out = call(
        attention_entropy_from_probs, probs, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        normalize=True, **options,
    )  # fmt: skip
    if invalid - {"scale"}:  # these take no scale
        assert status == "error"
        return
    assert status == "ok", out
    rows_finite = torch.isfinite(probs.double()).all(-1)
    assert torch.isfinite(out[rows_finite]).all()
    assert (out[rows_finite] >= -1e-6).all()


@given(attention_case())
@settings(max_examples=60)
def test_attention_entropy_gradient_is_finite_for_finite_inputs(case):
    """Regulariser use: masked keys, fully masked queries, -inf biases and 0-sized dims never give a NaN gradient."""
    q, k, attn_mask, key_padding_mask, options, invalid = case
    if invalid or q.dtype not in (torch.float32, torch.float64) or not (q.isfinite().all() and k.isfinite().all()):
        return
    options["path"] = "chunked" if options["path"] != "materialized" else "materialized"
    event("gradient checked")
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    bias = attn_mask.clone().requires_grad_() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out = attention_entropy(q, k, attn_mask=bias, key_padding_mask=key_padding_mask, chunk_elements=7, **options)
    assert torch.isfinite(out).all()
    (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape).to(out.dtype)).sum().backward()
    for name, x in (("q", q), ("k", k), ("attn_mask", bias)):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            assert x.grad is None or torch.isfinite(x.grad).all(), f"NaN gradient for {name}"
