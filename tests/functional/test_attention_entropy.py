"""Exactness of ``attention_entropy`` / ``attention_entropy_stats`` (all three paths), ``attention_entropy_from_scores``
and ``attention_entropy_from_probs`` against a float64 brute force written from the definitions
(``tests/helpers/reference.py``), and against SDPA's own probabilities.

Tolerances (absolute, nats, per query):
- float64 inputs: 1e-10 on ``materialized`` / ``chunked``; 1e-9 on ``fused`` (value := key identity, T2 gives 4.4e-16).
- float32 inputs: 2e-5 (fp32 round-off; the fused identity subtracts two O(|s|) numbers, so it is looser).
- scores of size ~1e3 (near one-hot): 2e-3 on ``fused`` (cancellation: 1e3 * fp32 eps * a few), 1e-4 otherwise.
- bf16 / fp16 inputs vs. the float64 entropy of the rounded inputs: 1e-4 (the library upcasts to fp32 first);
  normalised entropy likewise 1e-4 (the project rule asks for ~1e-2).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import entrotrain.functional.attention as attention_module
from entrotrain.errors import EntrotrainError
from entrotrain.functional import (
    attention_entropy,
    attention_entropy_from_probs,
    attention_entropy_from_scores,
    attention_entropy_stats,
    normalized_entropy,
)
from tests.helpers.reference import (
    attention_entropy64,
    probs_entropy_rows64,
    probs_from_sdpa,
    row_entropy64,
    valid_keys,
)
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.torch_release import needs_torch

INF = float("inf")
PATHS = ["materialized", "chunked", "fused"]
# chunk_elements small enough that the chunked path runs several query blocks (block = chunk // (B*H*Nk))
SMALL_CHUNK = 40


def _tol(path: str, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-9 if path == "fused" else 1e-10
    return 2e-5


def _qk(b=2, h=4, hk=None, lq=6, lk=None, d=8, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hk = h if hk is None else hk
    lk = lq if lk is None else lk
    q = (torch.randn(b, h, lq, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(b, hk, lk, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    return q, k


def _check(q, k, path, *, valid=None, bias=None, scale=None, tol=None, **kwargs):
    """Run ``attention_entropy_stats`` on ``path`` and compare all three outputs to the brute force."""
    out = attention_entropy_stats(q, k, path=path, scale=scale, chunk_elements=SMALL_CHUNK, **kwargs)
    ref_h, ref_norm, ref_n = attention_entropy64(q, k, valid=valid, bias=bias, scale=scale)
    tol = _tol(path, q.dtype) if tol is None else tol
    assert out.entropy.shape == ref_h.shape == out.normalized.shape == out.n_keys.shape
    assert out.entropy.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.normalized).all()
    torch.testing.assert_close(out.n_keys.long(), ref_n, atol=0, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=tol, rtol=0)
    torch.testing.assert_close(out.normalized.double(), ref_norm, atol=tol, rtol=0)
    # attention_entropy returns the same numbers
    h = attention_entropy(q, k, path=path, scale=scale, chunk_elements=SMALL_CHUNK, **kwargs)
    torch.testing.assert_close(h, out.entropy, atol=0, rtol=0)
    hn = attention_entropy(q, k, path=path, scale=scale, chunk_elements=SMALL_CHUNK, normalize=True, **kwargs)
    torch.testing.assert_close(hn, out.normalized, atol=0, rtol=0)
    return out


# ------------------------------------------------------------------ golden vector T2 and the docstring example
@pytest.mark.parametrize("path", PATHS)
def test_golden_t2_value_key_identity(path):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(1, 1, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 7, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 7).tril(diagonal=2).bool()
    out = _check(q, k, path, valid=mask, attn_mask=mask, scale=8**-0.5, tol=1e-13)
    # the identity itself, by hand: H = lse - scale * q . o_bar with o_bar = softmax(s) K
    s = (q[0, 0] @ k[0, 0].T) * 8**-0.5
    s = s.masked_fill(~mask, -INF)
    p = torch.softmax(s, -1)
    by_identity = torch.logsumexp(s, -1) - 8**-0.5 * (q[0, 0] * (p @ k[0, 0])).sum(-1)
    assert (out.entropy[0, 0] - by_identity).abs().max().item() < 1e-13


def test_docstring_example_causal_uniform():
    q = k = torch.zeros(1, 1, 4, 8)
    for path in PATHS:
        got = attention_entropy(q, k, is_causal=True, path=path)[0, 0]
        torch.testing.assert_close(got, torch.tensor([0.0, math.log(2), math.log(3), math.log(4)]), atol=1e-6, rtol=0)
        norm = attention_entropy(q, k, is_causal=True, path=path, normalize=True)[0, 0]
        torch.testing.assert_close(norm, torch.tensor([0.0, 1.0, 1.0, 1.0]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ masks, every path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", PATHS)
def test_no_mask(path, dtype):
    q, k = _qk(dtype=dtype, lk=7)
    _check(q, k, path)


@pytest.mark.parametrize("path", PATHS)
def test_causal(path):
    q, k = _qk()
    out = _check(q, k, path, valid=torch.ones(6, 6).tril().bool(), is_causal=True)
    assert out.entropy[..., 0].abs().max() < 1e-6 and (out.n_keys[..., 0] == 1).all()  # one key: H = 0
    assert (out.normalized[..., 0] == 0).all()


@pytest.mark.parametrize("lq,lk", [(4, 7), (7, 4)])
@pytest.mark.parametrize("path", PATHS)
def test_cross_attention_causal_is_top_left(path, lq, lk):
    q, k = _qk(lq=lq, lk=lk)
    _check(q, k, path, valid=torch.ones(lq, lk).tril().bool(), is_causal=True)
    _check(q, k, path)


@pytest.mark.parametrize("mask_shape", [(6, 7), (2, 1, 6, 7), (2, 4, 6, 7), (1, 1, 1, 7)])
@pytest.mark.parametrize("path", PATHS)
def test_bool_attn_mask_with_fully_masked_row(path, mask_shape):
    q, k = _qk(lk=7)
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(mask_shape, generator=g) > 0.35
    if mask.shape[-2] > 1:
        mask[..., 2, :] = False  # query 2 sees nothing
        mask[..., 3, :] = False
        mask[..., 3, 5] = True  # query 3 sees one key
    out = _check(q, k, path, valid=mask, attn_mask=mask)
    if mask.shape[-2] > 1:
        assert (out.entropy[..., 2] == 0).all() and (out.n_keys[..., 2] == 0).all()
        assert (out.normalized[..., 2] == 0).all()
        assert out.entropy[..., 3].abs().max() < 1e-6 and (out.n_keys[..., 3] == 1).all()


@pytest.mark.parametrize("path", PATHS)
def test_bool_attn_mask_and_causal(path):
    q, k = _qk()
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(1, 1, 6, 6, generator=g) > 0.3
    _check(q, k, path, valid=mask & torch.ones(6, 6).tril().bool(), attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("path", ["materialized", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_additive_float_mask_finite_bias(path, dtype):
    q, k = _qk(lk=7, dtype=dtype)
    g = torch.Generator().manual_seed(13)
    bias = (torch.randn(2, 1, 6, 7, generator=g, dtype=torch.float64) * 2).to(dtype)
    _check(q, k, path, bias=bias, attn_mask=bias)


@pytest.mark.parametrize("blocked", [-INF, "finfo.min"])
@pytest.mark.parametrize("path", ["materialized", "chunked"])
def test_additive_float_mask_bias_and_blocked_entries(path, blocked):
    q, k = _qk(lk=7)
    g = torch.Generator().manual_seed(14)
    bias = torch.randn(2, 1, 6, 7, generator=g)
    blocked_at = torch.rand(2, 1, 6, 7, generator=g) > 0.6
    blocked_at[:, :, 1] = True  # fully masked query 1
    value = torch.finfo(bias.dtype).min if blocked == "finfo.min" else -INF
    mask = bias.masked_fill(blocked_at, value)
    out = _check(q, k, path, valid=~blocked_at, bias=bias.masked_fill(blocked_at, 0.0), attn_mask=mask)
    assert (out.n_keys[..., 1] == 0).all() and (out.entropy[..., 1] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocked", [-INF, "finfo.min"])
@pytest.mark.parametrize("path", PATHS)
def test_additive_zero_or_blocked_mask_is_a_boolean_mask(path, blocked, mask_dtype):
    """A float mask of 0 / -inf (or HF's finfo.min) is a pure mask: every path, fused included, handles it."""
    q, k = _qk(lk=7)
    g = torch.Generator().manual_seed(15)
    keep = torch.rand(2, 1, 6, 7, generator=g) > 0.4
    keep[0, :, 4] = False
    value = torch.finfo(mask_dtype).min if blocked == "finfo.min" else -INF
    mask = torch.zeros(2, 1, 6, 7, dtype=mask_dtype).masked_fill(~keep, value)
    _check(q, k, path, valid=keep, attn_mask=mask)


def test_fused_rejects_a_finite_bias_clearly():
    q, k = _qk()
    bias = torch.randn(6, 6)
    with pytest.raises(EntrotrainError, match="chunked"):
        attention_entropy(q, k, attn_mask=bias, path="fused")
    # ... even when -inf entries are present too
    with pytest.raises(EntrotrainError, match="bias"):
        attention_entropy(q, k, attn_mask=bias.masked_fill(torch.eye(6).bool(), -INF), path="fused")


@pytest.mark.parametrize("path", PATHS)
def test_key_padding_mask(path):
    q, k = _qk(lk=7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    pad[1, :3] = True
    _check(q, k, path, valid=valid_keys(2, 4, 6, 7, key_padding_mask=pad), key_padding_mask=pad)


@pytest.mark.parametrize("path", PATHS)
def test_key_padding_everything_padded_in_one_row(path):
    q, k = _qk(lk=5)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    out = _check(q, k, path, valid=valid_keys(2, 4, 6, 5, key_padding_mask=pad), key_padding_mask=pad)
    assert (out.entropy[1] == 0).all() and (out.n_keys[1] == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_key_padding_with_causal_and_bool_mask(path):
    q, k = _qk()
    g = torch.Generator().manual_seed(16)
    mask = torch.rand(6, 6, generator=g) > 0.2
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 0] = True  # query 0 of row 1 then sees nothing (causal)
    valid = valid_keys(2, 4, 6, 6, attn_mask=mask, key_padding_mask=pad, is_causal=True)
    out = _check(q, k, path, valid=valid, attn_mask=mask, key_padding_mask=pad, is_causal=True)
    assert (out.n_keys[1, :, 0] == 0).all()


@pytest.mark.parametrize("window", [1, 2, 3, 10])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_sliding_window(path, causal, window):
    q, k = _qk(lq=7)
    valid = valid_keys(2, 4, 7, 7, is_causal=causal, window=window)
    out = _check(q, k, path, valid=valid, is_causal=causal, window=window)
    if window == 1:
        assert out.entropy.abs().max() < 1e-6 and (out.n_keys == 1).all()


@pytest.mark.parametrize("path", PATHS)
def test_sliding_window_cross_attention(path):
    q, k = _qk(lq=5, lk=8)
    for causal in (True, False):
        _check(q, k, path, valid=valid_keys(2, 4, 5, 8, is_causal=causal, window=3), is_causal=causal, window=3)


def test_window_must_be_positive():
    q, k = _qk()
    with pytest.raises(EntrotrainError, match="window"):
        attention_entropy(q, k, window=0)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_grouped_and_multi_query(path, causal, kv_heads):
    q, k = _qk(h=8, hk=kv_heads, lq=5, lk=6)
    valid = torch.ones(5, 6).tril().bool() if causal else None
    out = _check(q, k, path, valid=valid, is_causal=causal)  # the brute force uses repeat_interleave
    # and it is *not* the other common layout (repeat: head h reads kv head h % kv_heads)
    if kv_heads == 2:
        wrong, _, _ = attention_entropy64(q, k.repeat(1, 4, 1, 1), valid=valid)
        assert (out.entropy.double() - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_custom_scale(path):
    q, k = _qk(lk=7)
    out = _check(q, k, path, scale=0.9)
    default = attention_entropy(q, k, path=path)
    assert (out.entropy - default).abs().max() > 1e-3  # the scale is used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_low_precision_inputs(path, dtype):
    q, k = _qk(dtype=dtype, lk=7, scale=1.5)
    g = torch.Generator().manual_seed(17)
    mask = torch.rand(6, 7, generator=g) > 0.3
    mask[0] = False
    out = _check(q, k, path, valid=mask, attn_mask=mask, tol=1e-4)  # brute force on the rounded q, k
    assert out.entropy.dtype == torch.float32


@pytest.mark.parametrize("path", PATHS)
def test_huge_scores_near_one_hot(path):
    q, k = _qk(lk=7, scale=12.0)  # |scores| ~ 1e2 .. 1e3
    tol = 2e-3 if path == "fused" else 1e-4
    out = _check(q, k, path, is_causal=True, valid=torch.ones(6, 7).tril().bool(), tol=tol)
    assert (out.entropy >= 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_uniform_and_one_hot_rows(path):
    q = torch.zeros(1, 2, 3, 4)
    k = torch.randn(1, 2, 5, 4)
    out = _check(q, k, path)  # q = 0: uniform over 5 keys
    torch.testing.assert_close(out.entropy, torch.full((1, 2, 3), math.log(5)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.normalized, torch.ones(1, 2, 3), atol=1e-6, rtol=0)
    k = torch.eye(4)[:4].reshape(1, 1, 4, 4).expand(1, 2, 4, 4).contiguous()
    q = 1e3 * k[:, :, :3]  # query i points at key i: one-hot
    out = _check(q, k, path, scale=1.0, tol=2e-3 if path == "fused" else 1e-5)
    assert out.entropy.abs().max() < 1e-5


def test_nan_query_gives_nan_rows_only():
    q, k = _qk()
    q[0, 1, 2, 0] = float("nan")
    for path in PATHS:
        h = attention_entropy(q, k, path=path, is_causal=True)
        assert torch.isnan(h[0, 1, 2]), path
        finite = torch.ones_like(h, dtype=torch.bool)
        finite[0, 1, 2] = False
        assert torch.isfinite(h[finite]).all(), path


# ------------------------------------------------------------------ agreement with SDPA's own semantics
_GQA_SDPA = needs_torch(2, 5, "the reference calls F.scaled_dot_product_attention(enable_gqa=), new in torch 2.5")


@pytest.mark.parametrize(
    "case",
    ["none", "causal", "causal-cross", "bool", "float-bias", pytest.param("gqa", marks=_GQA_SDPA), "scale"],
)
def test_matches_sdpa_probabilities(case):
    """Entropy of the probabilities SDPA itself computes (value = identity), float64, same mask arguments."""
    g = torch.Generator().manual_seed(18)
    lq, lk, hk = 5, 5, 4
    if case == "causal-cross":
        lq, lk = 4, 7
    if case == "gqa":
        hk = 2
    q = torch.randn(2, 4, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hk, lk, 8, generator=g, dtype=torch.float64)
    kwargs: dict = {}
    if case.startswith("causal"):
        kwargs["is_causal"] = True
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, lq, lk, generator=g) > 0.3
        kwargs["attn_mask"][..., 0] = True  # SDPA gives NaN rows for fully masked queries
    if case == "float-bias":
        kwargs["attn_mask"] = torch.randn(lq, lk, generator=g, dtype=torch.float64)
    if case == "scale":
        kwargs["scale"] = 0.37
    sdpa_kwargs = dict(kwargs)
    if case == "gqa":
        sdpa_kwargs["enable_gqa"] = True
    p = probs_from_sdpa(q, k, **sdpa_kwargs)
    ref = probs_entropy_rows64(p)
    for path in PATHS:
        if case == "float-bias" and path == "fused":
            continue
        got = attention_entropy(q, k, path=path, **kwargs)
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0, msg=lambda m: f"{path}: {m}")
    torch.testing.assert_close(attention_entropy_from_probs(p), ref, atol=1e-12, rtol=0)


def test_sdpa_probabilities_with_key_padding_as_bool_mask():
    g = torch.Generator().manual_seed(19)
    q = torch.randn(2, 2, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64)
    pad = torch.tensor([[False] * 4 + [True] * 2, [True] + [False] * 5])
    p = probs_from_sdpa(q, k, attn_mask=~pad[:, None, None, :])
    ref = probs_entropy_rows64(p)
    for path in PATHS:
        torch.testing.assert_close(attention_entropy(q, k, key_padding_mask=pad, path=path), ref, atol=1e-9, rtol=0)


# ------------------------------------------------------------------ path selection
@pytest.fixture
def path_spy(monkeypatch):
    calls: list[str] = []
    real_fused, real_chunked = attention_module._fused, attention_module._chunked

    def fused(*args, **kwargs):
        calls.append("fused")
        return real_fused(*args, **kwargs)

    def chunked(*args, **kwargs):
        calls.append("chunked")
        return real_chunked(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_fused", fused)
    monkeypatch.setattr(attention_module, "_chunked", chunked)
    return calls


def test_auto_picks_fused_for_fp32_without_grad(path_spy):
    q, k = _qk()
    attention_entropy(q, k, is_causal=True)
    assert path_spy == ["fused"]
    q.requires_grad_(True)
    with torch.no_grad():
        attention_entropy(q, k)
    assert path_spy == ["fused", "fused"]


def test_auto_picks_fused_when_grad_is_needed_and_is_differentiable(path_spy):
    """The fused path is differentiable (issue 18; its gradients are tested in test_attention_fused_grad.py)."""
    q, k = _qk()
    q.requires_grad_(True)
    h = attention_entropy(q, k, is_causal=True)
    assert path_spy == ["fused"]
    assert h.requires_grad
    h.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_auto_picks_chunked_for_bias_and_float64(path_spy):
    q, k = _qk()
    attention_entropy(q, k, attn_mask=torch.randn(6, 6))
    attention_entropy(q.double(), k.double())
    assert path_spy == ["chunked", "chunked"]


def test_fused_refuses_an_attn_mask_that_requires_grad():
    q, k = _qk()
    mask = torch.zeros(6, 6).masked_fill(torch.eye(6).bool(), -INF).requires_grad_(True)
    with pytest.raises(EntrotrainError, match="chunked"):
        attention_entropy(q, k, attn_mask=mask, path="fused")


# ------------------------------------------------------------------ invalid input
def test_invalid_inputs_name_the_shape():
    q, k = _qk()
    with pytest.raises(EntrotrainError, match=r"\(2, 6, 8\)"):
        attention_entropy(q[:, 0], k)
    with pytest.raises(EntrotrainError, match=r"\(2, 4, 6, 8\).*\(2, 4, 6, 5\)"):
        attention_entropy(q, k[..., :5])
    with pytest.raises(EntrotrainError, match="4 heads and k 3"):
        attention_entropy(q, k[:, :3])
    with pytest.raises(EntrotrainError, match="'flash'"):
        attention_entropy(q, k, path="flash")  # type: ignore[arg-type]
    with pytest.raises(EntrotrainError, match=r"\(5, 6\)"):
        attention_entropy(q, k, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match=r"\(2, 5\)"):
        attention_entropy(q, k, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match=r"at most 4 dims"):
        attention_entropy(q, k, attn_mask=torch.ones(1, 2, 4, 6, 6, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match="int64"):
        attention_entropy(q, k, attn_mask=torch.ones(6, 6, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="floating"):
        attention_entropy(q.long(), k)
    with pytest.raises(EntrotrainError, match=r"\(2, 4, 6\)"):
        attention_entropy_from_scores(torch.randn(2, 4, 6))
    with pytest.raises(EntrotrainError, match=r"\(2, 4, 6\)"):
        attention_entropy_from_probs(torch.rand(2, 4, 6))


_EMPTY_CASES = [
    ("no-queries", (1, 2, 0, 4), (1, 2, 3, 4)),
    ("no-keys", (1, 2, 3, 4), (1, 2, 0, 4)),
    ("no-batch", (0, 2, 3, 4), (0, 2, 3, 4)),
]

_EMPTY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from entrotrain.functional import attention_entropy_stats
    for path in sys.argv[1:]:
        for name, q_shape, k_shape in %r:
            try:
                out = attention_entropy_stats(torch.randn(q_shape), torch.randn(k_shape), path=path)
            except Exception as err:
                print(path, name, "raised", type(err).__name__, err, flush=True)
                continue
            ok = tuple(out.entropy.shape) == (q_shape[0], 2, q_shape[2]) and bool((out.entropy == 0).all())
            ok = ok and bool((out.n_keys == 0).all())
            print(path, name, "ok" if ok else "wrong %%s" %% (out,), flush=True)
    """
    % (_EMPTY_CASES,)
)


@pytest.mark.parametrize("name,q_shape,k_shape", _EMPTY_CASES, ids=[c[0] for c in _EMPTY_CASES])
@pytest.mark.parametrize("path", ["materialized", "chunked"])
def test_empty_sequences(path, name, q_shape, k_shape):
    """Zero queries: an empty ``(B, H, 0)`` result. Zero keys: every query sees nothing (entropy 0, n_keys 0);
    SDPA itself returns zeros there. Not a reshape / range / amax error."""
    out = attention_entropy_stats(torch.randn(q_shape), torch.randn(k_shape), path=path)
    assert tuple(out.entropy.shape) == (q_shape[0], 2, q_shape[2])
    assert (out.entropy == 0).all() and (out.n_keys == 0).all()


def test_empty_sequences_fused_and_auto_do_not_kill_the_process():
    """Same on ``fused`` and ``auto`` (which picks fused for fp32): run in a subprocess, since the CPU flash
    kernel dies with SIGFPE on an empty sequence."""
    run = subprocess.run(
        [sys.executable, "-c", _EMPTY_SCRIPT, "fused", "auto"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    report = f"rc={run.returncode}\n{run.stdout}\n{run.stderr[-2000:]}"
    assert run.returncode == 0, report
    assert run.stdout.split().count("ok") == 2 * len(_EMPTY_CASES), report


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("path,chunk", [("materialized", 1 << 24), ("chunked", 5), ("chunked", 1)])
def test_gradcheck_attention_entropy(path, chunk, monkeypatch):
    """float64 gradcheck; chunk 5 = one query per block (B*H*Nk = 10), so every block is checkpointed."""
    checkpoints = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        checkpoints.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    g = torch.Generator().manual_seed(20)
    q = torch.randn(1, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)  # GQA
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[1] = False  # fully masked query
    bias = torch.randn(3, 5, generator=g, dtype=torch.float64).masked_fill(torch.eye(3, 5).bool(), -INF)

    def fn(q_, k_):
        outs = []
        for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": bias}):
            out = attention_entropy_stats(q_, k_, path=path, chunk_elements=chunk, **kwargs)
            outs += [out.entropy, out.normalized]
        return tuple(outs)

    assert torch.autograd.gradcheck(fn, (q, k))
    # several blocks, each checkpointed, on the chunked path (3 queries = 3 blocks per call); none materialized
    assert len(checkpoints) == 0 if path == "materialized" else len(checkpoints) >= 3


def test_chunked_checkpoint_gradients_equal_materialized():
    q, k = _qk(dtype=torch.float64, lk=7)
    mask = torch.rand(6, 7) > 0.3
    grads = []
    for path, chunk in [("materialized", 1 << 24), ("chunked", 8 * 7), ("chunked", 1)]:
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        attention_entropy(qq, kk, path=path, chunk_elements=chunk, attn_mask=mask, is_causal=True).sum().backward()
        grads.append((qq.grad, kk.grad))
    for gq, gk in grads[1:]:
        torch.testing.assert_close(gq, grads[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(gk, grads[0][1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", ["materialized", "chunked"])
def test_no_nan_backward_with_masked_rows(path):
    q, k = _qk(lk=7)
    q.requires_grad_(True)
    k.requires_grad_(True)
    mask = torch.zeros(2, 1, 6, 7).masked_fill(torch.rand(2, 1, 6, 7) > 0.5, -INF)
    mask[:, :, 0] = -INF  # fully masked
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1] = True  # fully padded batch row
    h = attention_entropy(q, k, path=path, chunk_elements=SMALL_CHUNK, attn_mask=mask, key_padding_mask=pad,
                          is_causal=True, normalize=True)
    assert torch.isfinite(h).all()
    h.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[:, :, 0] == 0).all()


def test_gradient_matches_brute_force_autograd():
    """The gradient of the library's entropy equals that of an explicit float64 softmax entropy."""
    q, k = _qk(dtype=torch.float64, h=4, hk=2)
    mask = torch.rand(6, 6) > 0.3
    valid = mask & torch.ones(6, 6).tril().bool()
    qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    attention_entropy(qq, kk, path="chunked", chunk_elements=SMALL_CHUNK, attn_mask=mask, is_causal=True).sum().backward()
    q2, k2 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    s = (q2 @ k2.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    total = 0.0
    for b in range(2):
        for h in range(4):
            for i in range(6):
                sv = s[b, h, i][valid[i]]
                if sv.numel():
                    p = torch.softmax(sv, 0)
                    total = total - (p * torch.log_softmax(sv, 0)).sum()
    total.backward()
    torch.testing.assert_close(qq.grad, q2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(kk.grad, k2.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ from scores / from probs
def _scores(seed=21, shape=(2, 3, 5, 6), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)


@pytest.mark.parametrize(
    "case", ["none", "causal", "bool", "bias", "bias-inf", "padding", "window", "window-causal", "minus-inf-scores"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_from_scores_matches_brute_force(case, dtype):
    s = _scores(dtype=dtype)
    b, h, lq, lk = s.shape
    g = torch.Generator().manual_seed(22)
    kwargs: dict = {}
    valid = torch.ones(b, h, lq, lk, dtype=torch.bool)
    s64 = s.double()
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(lq, lk, generator=g) > 0.4
        kwargs["attn_mask"][2] = False
    if case.startswith("bias"):
        bias = torch.randn(b, 1, lq, lk, generator=g, dtype=torch.float64).to(dtype)
        s64 = s64 + bias.double()
        if case == "bias-inf":
            bias = bias.masked_fill(torch.rand(b, 1, lq, lk, generator=g) > 0.5, -INF)
            bias[:, :, 0] = -INF
        kwargs["attn_mask"] = bias
    if case == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5 + [True], [True] * 6])
    if case.startswith("window"):
        kwargs["window"] = 2
        kwargs["is_causal"] = case == "window-causal"
    if case == "minus-inf-scores":
        s = s.masked_fill(torch.rand(s.shape, generator=g) > 0.5, -INF)
        s[0, 0, 0] = -INF
        s64 = s.double()
    valid = valid_keys(b, h, lq, lk, **kwargs)
    ref = torch.zeros(b, h, lq, dtype=torch.float64)
    count = torch.zeros(b, h, lq, dtype=torch.long)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (b, h, lq))).tolist():
        ref[tuple(idx)], count[tuple(idx)] = row_entropy64(s64[tuple(idx)], valid[tuple(idx)])
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    got = attention_entropy_from_scores(s, **kwargs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)
    got_n = attention_entropy_from_scores(s, normalize=True, **kwargs)
    ref_n = torch.where(count >= 2, ref / torch.log(count.clamp_min(2).double()), torch.zeros_like(ref))
    torch.testing.assert_close(got_n.double(), ref_n, atol=tol, rtol=0)


def test_from_scores_gradcheck_and_finite_grad_with_minus_inf():
    s = _scores(shape=(1, 2, 5, 6)).requires_grad_(True)
    mask = torch.rand(5, 6) > 0.3
    mask[0] = False
    assert torch.autograd.gradcheck(lambda x: attention_entropy_from_scores(x, attn_mask=mask, is_causal=True), (s,))
    assert torch.autograd.gradcheck(lambda x: attention_entropy_from_scores(x, normalize=True, window=2), (s,))
    s2 = _scores().masked_fill(torch.rand(2, 3, 5, 6) > 0.5, -INF)
    s2[0, 0, 0] = -INF
    s2.requires_grad_(True)
    h = attention_entropy_from_scores(s2, is_causal=True)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(s2.grad).all()
    assert (s2.grad[s2.detach() == -INF] == 0).all()


def test_from_scores_equals_qk_path():
    q, k = _qk(dtype=torch.float64, lk=7)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    torch.testing.assert_close(
        attention_entropy_from_scores(s, is_causal=True, key_padding_mask=pad),
        attention_entropy(q, k, is_causal=True, key_padding_mask=pad, path="materialized"),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_from_probs_matches_brute_force(dtype, tol):
    s = _scores()
    pad = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    valid = valid_keys(2, 3, 5, 6, key_padding_mask=pad, is_causal=True)
    p = torch.softmax(s.masked_fill(~valid, -INF), -1).to(dtype)
    ref_h, ref_norm, ref_n = attention_entropy64(torch.zeros(2, 3, 5, 1), torch.zeros(2, 3, 6, 1), valid=valid)
    ref = probs_entropy_rows64(p)
    got = attention_entropy_from_probs(p, is_causal=True, key_padding_mask=pad)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(got.double(), attention_entropy_from_scores(s, is_causal=True, key_padding_mask=pad).double(), atol=tol, rtol=0)
    got_n = attention_entropy_from_probs(p, is_causal=True, key_padding_mask=pad, normalize=True)
    expected_n = torch.where(ref_n >= 2, ref / torch.log(ref_n.clamp_min(2).double()), torch.zeros_like(ref))
    torch.testing.assert_close(got_n.double(), expected_n, atol=tol, rtol=0)
    # no mask: every key counts for normalisation
    got_n_all = attention_entropy_from_probs(p, normalize=True)
    torch.testing.assert_close(got_n_all.double(), ref / math.log(6), atol=tol, rtol=0)


def test_from_probs_finite_gradient_with_zeros():
    p = torch.softmax(_scores().masked_fill(torch.ones(5, 6).triu(1).bool(), -INF), -1).requires_grad_(True)
    assert (p == 0).any()
    h = attention_entropy_from_probs(p, is_causal=True, normalize=True)
    h.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert (p.grad[p.detach() == 0] == 0).all()


# ------------------------------------------------------------------ normalised entropy helper
def test_normalized_entropy_helper():
    h = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.3])
    n = torch.tensor([0, 1, 2, 8, 3])
    got = normalized_entropy(h, n)
    expected = torch.tensor([0.0, 0.0, 1.0 / math.log(2), 2.0 / math.log(8), 0.3 / math.log(3)])
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)
