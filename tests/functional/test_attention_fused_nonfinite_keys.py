"""The ``fused`` attention-entropy path with non-finite keys, decided without a host sync under ``torch.compile``
(in eager mode one reduction over ``k`` sends them to the chunked path; the tests run the traced route by patching
``attention._tracing``).

Keys holding NaN/Inf enter the flash kernel as 0 and every query that sees one (through a valid key: causal,
window, padding, boolean / 0−∞ masks, GQA groups) gets NaN, so the path needs no ``float(k.sum())`` (a host sync
each call and a graph break under ``torch.compile``). Property: ``fused`` equals ``chunked``, values and gradients,
NaN where NaN, for NaN keys; for ±Inf keys ``fused`` is NaN wherever ``chunked`` is and equal elsewhere (``chunked``
drops a key from a query whose score on it is −Inf; ``fused`` gives NaN there, documented).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.functional import attention_entropy
from tests.helpers.reference import one_thread

AUTOUSE_FIXTURES = (one_thread,)  # one torch thread in this module

NAN, INF = float("nan"), float("inf")


def _as_traced():
    """The fused path as torch.compile runs it (eager mode sends non-finite keys to the chunked path after a host
    check; while dynamo traces, the fused path guards them itself)."""
    return mock.patch("entrotrain.functional.attention._tracing", lambda: True)


def _value_and_grads(q, k, weights, path, **kwargs):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    with _as_traced() if path == "fused" else contextlib.nullcontext():
        h = attention_entropy(q, k, path=path, **kwargs)
        gq, gk = torch.autograd.grad((h * weights).nansum(), (q, k))
    return h.detach(), gq, gk


@st.composite
def nonfinite_key_case(draw, values):
    batch, kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    n_q, n_k, dim = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, kv_heads * groups, n_q, dim, generator=g)
    k = torch.randn(batch, kv_heads, n_k, dim, generator=g)
    for value in draw(st.lists(st.sampled_from(values), min_size=1, max_size=3)):
        k.view(-1)[draw(st.integers(0, k.numel() - 1))] = value
    kwargs = {"is_causal": draw(st.booleans()), "window": draw(st.sampled_from([None, None, 1, 2, 3]))}
    if draw(st.booleans()):
        kwargs["key_padding_mask"] = torch.rand(batch, n_k, generator=g) < 0.3
    mask_kind = draw(st.sampled_from(["none", "none", "bool", "per-key -inf", "dense -inf"]))
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(n_q, n_k, generator=g) < 0.7
    elif mask_kind != "none":
        shape = (batch, 1, 1, n_k) if mask_kind == "per-key -inf" else (1, kv_heads * groups, n_q, n_k)
        kwargs["attn_mask"] = torch.where(torch.rand(shape, generator=g) < 0.7, 0.0, -INF)
    weights = torch.rand(batch, kv_heads * groups, n_q, generator=g)
    return q, k, weights, kwargs


def _assert_equal_with_nans(got, want, nan_superset=False):
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    if nan_superset:
        assert (want_nan <= got_nan).all(), "chunked is NaN where fused is not"
    else:
        assert torch.equal(got_nan, want_nan)
    torch.testing.assert_close(got.masked_fill(got_nan, 0.0), want.masked_fill(got_nan, 0.0), atol=1e-4, rtol=1e-4)


@settings(max_examples=80, deadline=None)
@given(nonfinite_key_case([NAN]))
def test_fused_equals_chunked_with_nan_keys_values_and_gradients(case):
    q, k, weights, kwargs = case
    fused = _value_and_grads(q, k, weights, "fused", **kwargs)
    chunked = _value_and_grads(q, k, weights, "chunked", **kwargs)
    for got, want in zip(fused, chunked):
        _assert_equal_with_nans(got, want)


@settings(max_examples=80, deadline=None)
@given(nonfinite_key_case([NAN, INF, -INF]))
def test_fused_is_nan_wherever_chunked_is_with_inf_keys_and_equal_elsewhere(case):
    q, k, weights, kwargs = case
    fused = _value_and_grads(q, k, weights, "fused", **kwargs)
    chunked = _value_and_grads(q, k, weights, "chunked", **kwargs)
    for got, want in zip(fused, chunked):
        _assert_equal_with_nans(got, want, nan_superset=True)


def test_a_nan_key_reaches_exactly_the_queries_that_see_it():
    """Causal + window 2 + GQA: key 3 of key head 0 is seen by queries 3 and 4 of query heads 0 and 1 only."""
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    k[0, 0, 3, 5] = NAN
    with _as_traced():
        h = attention_entropy(q, k, is_causal=True, window=2, path="fused")
    want = torch.zeros(1, 4, 6, dtype=torch.bool)
    want[0, :2, 3:5] = True
    assert torch.equal(torch.isnan(h), want)


def test_the_default_path_compiles_without_a_graph_break():
    """No host sync decides the path: the old ``float(k.sum())`` was one graph break under torch.compile."""
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    explained = torch._dynamo.explain(lambda q, k: attention_entropy(q, k, is_causal=True))(q, k)
    assert explained.graph_break_count == 0, explained.break_reasons
