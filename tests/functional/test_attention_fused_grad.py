"""The differentiable ``fused`` attention-entropy path (issue 18, item 1): value and gradient against the chunked
path and a materialized float64 brute force.

Tolerances (measured, with margin):
- float32 inputs: value 2e-5, gradients 2e-5 absolute + 1e-4 relative (fp32 round-off of one flash fwd + bwd).
- float64 inputs: ``torch.autograd.gradcheck`` (the CPU flash kernel runs in float64), and 1e-10 against brute.
- bfloat16 inputs (computed in float32, gradients rounded back to bf16): 2e-2 relative to the gradient's scale,
  against the brute force on the bf16-rounded inputs.
- one-hot-ish scores (|s| ~ 3e1–3e3): gradients within eps32·scale·max|s|·max(|q|,|k|)·max|g| absolute (the
  cancellation in s − E_p[s] in float32; see test_adversarial_near_one_hot_scores).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrotrain.functional.attention as attention_module
import entrotrain.functional.attention_fused_grad as fused_grad_module
from entrotrain.errors import EntrotrainError
from entrotrain.functional.attention import attention_entropy, attention_entropy_stats
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.reference import valid_keys

INF = float("inf")


@pytest.fixture(autouse=True, params=["materialized-backward", "flash-backward"])
def backward_route(request, monkeypatch):
    """Every test runs with both backward routes: the materialised one (small score matrices, the default here) and
    the flash-attention backward (forced by a threshold of 0 elements)."""
    if request.param == "flash-backward":
        monkeypatch.setattr(fused_grad_module, "MATERIALIZED_BACKWARD_ELEMENTS", 0)
    calls: list[str] = []
    real = fused_grad_module._materialized_backward

    def spy(*args, **kwargs):
        calls.append("materialized")
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_grad_module, "_materialized_backward", spy)
    yield request.param
    if request.param == "flash-backward":
        assert not calls  # the threshold of 0 really routed every backward through the flash kernel


def brute64(q, k, valid, scale):
    """Materialized float64 entropy ``(B, H, Nq)``, differentiable: dense scores, masked log-softmax, −Σ p log p."""
    heads = q.shape[1]
    kk = k.repeat_interleave(heads // k.shape[1], dim=1)
    s = scale * torch.matmul(q, kk.transpose(-1, -2))
    s = s.masked_fill(~valid, -INF)
    any_valid = valid.any(-1, keepdim=True)
    s = torch.where(any_valid, s, 0.0)  # rows with no key: a dummy finite row, zeroed below
    logp = torch.where(valid, torch.log_softmax(s, dim=-1), 0.0)  # the double where: no 0 · (−inf) in backward
    h = -(torch.where(valid, logp.exp() * logp, 0.0)).sum(-1)
    return torch.where(any_valid[..., 0], h, 0.0)


def _inputs(b, h, hk, nq, nk, d, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, nq, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(b, h, nq, generator=g, dtype=torch.float64)  # upstream gradient g_i of L = Σ g_i H_i
    return q, k, w


def _value_and_grads(q, k, w, path, **kwargs):
    qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    h = attention_entropy(qq, kk, path=path, **kwargs)
    (h * w.to(h.dtype)).sum().backward()
    return h.detach(), qq.grad, kk.grad


def _brute_value_and_grads(q, k, w, valid, scale):
    qq, kk = q.double().requires_grad_(True), k.double().requires_grad_(True)
    h = brute64(qq, kk, valid, scale)
    (h * w).sum().backward()
    return h.detach(), qq.grad, kk.grad


def _masks(case, b, nq, nk, seed):
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {}
    if "causal" in case:
        kwargs["is_causal"] = True
    if "padding" in case:
        pad = torch.rand(b, nk, generator=g) < 0.3
        pad[-1] = True  # a fully padded batch row: no valid key, entropy 0, gradient 0
        kwargs["key_padding_mask"] = pad
    if "window" in case:
        kwargs["window"] = 3
    if "bool" in case:
        mask = torch.rand(nq, nk, generator=g) < 0.7
        mask[0] = False  # a fully masked query
        kwargs["attn_mask"] = mask
    if "float-inf" in case:
        kwargs["attn_mask"] = torch.zeros(nq, nk).masked_fill(torch.rand(nq, nk, generator=g) < 0.3, -INF)
    return kwargs


CASES = ["none", "causal", "padding", "causal+padding", "window", "causal+window", "bool", "float-inf",
         "causal+bool+padding"]


@pytest.mark.parametrize("gqa", [1, 2, 4], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("case", CASES)
def test_fused_value_and_gradients_equal_chunked_and_float64_brute(case, gqa):
    b, h, nq, nk, d = 2, 4, 7, 9, 8
    q, k, w = _inputs(b, h, h // gqa, nq, nk, d, seed=len(case) * 7 + gqa)
    kwargs = _masks(case, b, nq, nk, seed=gqa)
    valid = valid_keys(b, h, nq, nk, **kwargs)
    fused = _value_and_grads(q, k, w, "fused", **kwargs)
    chunked = _value_and_grads(q, k, w, "chunked", chunk_elements=h * nk * 2, **kwargs)  # several blocks
    brute = _brute_value_and_grads(q, k, w, valid, 1.0 / math.sqrt(d))
    assert fused[2].shape == k.shape
    for got, oracle in zip(fused, chunked):
        torch.testing.assert_close(got, oracle, atol=2e-5, rtol=1e-4)
    for got, want in zip(fused, brute):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    no_key = ~valid.any(-1)
    if no_key.any():  # a query with no valid key: entropy 0 and no gradient to its q
        assert (fused[0][no_key] == 0).all() and (fused[1][no_key] == 0).all()


@pytest.mark.parametrize("case", ["none", "causal", "causal+padding", "window", "bool"])
def test_gradcheck_fused_float64(case):
    b, h, nq, nk, d = 1, 2, 4, 5, 3
    q, k, _ = _inputs(b, h, 1, nq, nk, d, seed=3)  # GQA: one key head for two query heads
    q, k = q.double().requires_grad_(True), k.double().requires_grad_(True)
    kwargs = _masks(case, b, nq, nk, seed=5)
    if "padding" in case:
        kwargs["key_padding_mask"][-1, :2] = False  # keep some keys (one batch row only)

    def fn(q_, k_):
        out = attention_entropy_stats(q_, k_, path="fused", **kwargs)
        return out.entropy, out.normalized

    assert torch.autograd.gradcheck(fn, (q, k))
    valid = valid_keys(b, h, nq, nk, **kwargs)
    _, gq, gk = _value_and_grads(q.detach(), k.detach(), torch.ones(b, h, nq, dtype=torch.float64), "fused", **kwargs)
    _, bq, bk = _brute_value_and_grads(q.detach(), k.detach(), torch.ones(b, h, nq, dtype=torch.float64), valid,
                                       1.0 / math.sqrt(d))
    torch.testing.assert_close(gq, bq, atol=1e-10, rtol=0)
    torch.testing.assert_close(gk, bk, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", ["causal", "padding", "window"])
def test_bf16_is_computed_in_float32(case):
    b, h, nq, nk, d = 2, 4, 16, 16, 16
    q, k, w = _inputs(b, h, 2, nq, nk, d, seed=11, dtype=torch.bfloat16)
    kwargs = _masks(case, b, nq, nk, seed=2)
    hf, gq, gk = _value_and_grads(q, k, w, "fused", **kwargs)
    assert hf.dtype == torch.float32 and gq.dtype == torch.bfloat16 and gk.dtype == torch.bfloat16
    want = _brute_value_and_grads(q, k, w, valid_keys(b, h, nq, nk, **kwargs), 1.0 / math.sqrt(d))
    torch.testing.assert_close(hf.double(), want[0], atol=1e-5, rtol=1e-5)  # exact bf16 inputs, fp32 maths
    for got, ref in zip((gq, gk), want[1:]):
        torch.testing.assert_close(got.double(), ref, atol=2e-2 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("scale", [3.0, 10.0, 30.0])
def test_adversarial_near_one_hot_scores(scale):
    """Scores of size 3e1–3e3: near one-hot rows, tiny p in the gradient, large cancellation in s − E_p[s].

    The flash backward forms ``dO·v − dO·o = −g (s_ij − E_p[s]_i)`` in float32, so its absolute gradient error is
    bounded by ``eps32 · scale · max|s| · max(|q|, |k|) · max|g|`` (measured: 0.02–0.14 of that bound), even where
    the exact gradient is ~0 (|s| ~ 3e3: truly one-hot rows). The chunked oracle is closer there."""
    b, h, nq, nk, d = 1, 2, 8, 8, 16
    q, k, w = _inputs(b, h, h, nq, nk, d, seed=13, scale=scale)
    fused = _value_and_grads(q, k, w, "fused", is_causal=True)
    chunked = _value_and_grads(q, k, w, "chunked", is_causal=True)
    brute = _brute_value_and_grads(q, k, w, valid_keys(b, h, nq, nk, is_causal=True), 1.0 / math.sqrt(d))
    s_max = float((q.double() @ k.double().transpose(-1, -2)).abs().max()) / math.sqrt(d)
    bound = torch.finfo(torch.float32).eps * s_max * float(torch.maximum(q.abs().max(), k.abs().max()))
    bound *= float(w.abs().max()) / math.sqrt(d)
    torch.testing.assert_close(fused[0].double(), brute[0], atol=2e-3, rtol=0)
    for i in (1, 2):
        torch.testing.assert_close(fused[i].double(), brute[i], atol=bound, rtol=0)
        torch.testing.assert_close(fused[i], chunked[i], atol=bound, rtol=0)
    if scale == 3.0:  # a realistic |s| ~ 30: close to the gradient's own scale as well
        for i in (1, 2):
            torch.testing.assert_close(fused[i].double(), brute[i], atol=2e-5 * float(brute[i].abs().max()), rtol=0)


def test_uniform_attention_gradients():
    """q = 0: uniform rows, entropy ln|V_i|; dS = −g p (s − E_p s) = 0 so dk = 0, while dq = scale·Σ_j dS k_j = 0
    too (the maximum of entropy is stationary); the brute force agrees exactly."""
    b, h, nq, nk, d = 2, 2, 5, 5, 4
    _, k, w = _inputs(b, h, h, nq, nk, d, seed=17)
    q = torch.zeros(b, h, nq, d)
    hf, gq, gk = _value_and_grads(q, k, w, "fused", is_causal=True)
    torch.testing.assert_close(hf, torch.log(torch.arange(1, nq + 1, dtype=torch.float32)).expand(b, h, nq))
    assert gq.abs().max() < 1e-6 and gk.abs().max() < 1e-6
    # a near-uniform q: a non-zero gradient, equal to the brute force
    q = 1e-3 * torch.randn(b, h, nq, d, generator=torch.Generator().manual_seed(1))
    _, gq, gk = _value_and_grads(q, k, w, "fused", is_causal=True)
    _, bq, bk = _brute_value_and_grads(q, k, w, valid_keys(b, h, nq, nk, is_causal=True), 0.5)
    assert bq.abs().max() > 1e-4
    torch.testing.assert_close(gq.double(), bq, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gk.double(), bk, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ path selection with a gradient
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


def test_auto_with_grad_picks_fused_and_falls_back_where_it_cannot_apply(path_spy):
    q, k, _ = _inputs(2, 4, 2, 6, 6, 8, seed=0)
    q.requires_grad_(True)
    attention_entropy(q, k, is_causal=True).sum().backward()
    attention_entropy(q, k, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool), window=2).sum().backward()
    assert path_spy == ["fused", "fused"]
    attention_entropy(q, k, attn_mask=torch.randn(6, 6)).sum().backward()  # additive bias
    attention_entropy(q.detach().double().requires_grad_(True), k.double()).sum().backward()  # float64
    mask = torch.zeros(6, 6).masked_fill(torch.eye(6).bool(), -INF).requires_grad_(True)
    attention_entropy(q, k, attn_mask=mask).sum().backward()  # a mask that wants a gradient
    assert path_spy == ["fused", "fused", "chunked", "chunked", "chunked"]
    k_bad = k.clone()
    k_bad[0, 0, 5] = INF  # a non-finite key: chunked (keeps it out of the queries that mask it)
    attention_entropy(q, k_bad, is_causal=True).sum().backward()
    assert path_spy[-1] == "chunked"


def test_fused_is_first_order_only():
    q, k, _ = _inputs(1, 2, 2, 4, 4, 4, seed=1)
    q.requires_grad_(True)
    h = attention_entropy(q, k, path="fused")
    (gq,) = torch.autograd.grad(h.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()


def test_fused_gradient_with_zero_sized_dims_is_zero():
    for q_shape, k_shape in [((1, 2, 0, 4), (1, 2, 3, 4)), ((1, 2, 3, 4), (1, 2, 0, 4)), ((1, 2, 3, 0), (1, 2, 3, 0))]:
        q = torch.randn(q_shape, requires_grad=True)
        k = torch.randn(k_shape, requires_grad=True)
        h = attention_entropy(q, k, path="fused", is_causal=True)
        h.sum().backward()
        assert q.grad is not None and (q.grad == 0).all()


# ------------------------------------------------------------------ property test
@st.composite
def fused_case(draw):
    b = draw(st.integers(1, 2))
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 3))
    nq, nk, d = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    case = draw(st.sampled_from(CASES))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([None, 0.3, 2.0]))
    return b, h, hk, nq, nk, d, case, seed, scale


@given(fused_case())
@settings(max_examples=40, deadline=None)
def test_fused_gradients_match_float64_brute_property(params):
    b, h, hk, nq, nk, d, case, seed, scale = params
    q, k, w = _inputs(b, h, hk, nq, nk, d, seed=seed)
    kwargs = _masks(case, b, nq, nk, seed=seed)
    if "window" in case:
        kwargs["window"] = 1 + seed % 3
    got = _value_and_grads(q, k, w, "fused", scale=scale, **kwargs)
    want = _brute_value_and_grads(q, k, w, valid_keys(b, h, nq, nk, **kwargs), 1 / math.sqrt(d) if scale is None else scale)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, atol=2e-5, rtol=1e-4)


def test_fused_path_error_names_the_fix_for_a_bias():
    q, k, _ = _inputs(1, 2, 2, 4, 4, 4, seed=2)
    q.requires_grad_(True)
    with pytest.raises(EntrotrainError, match="chunked"):
        attention_entropy(q, k, attn_mask=torch.randn(4, 4), path="fused")


def test_non_finite_query_gives_the_same_gradient_pattern_as_chunked():
    """A NaN in one query: NaN entropy in that row only; with the row dropped from the loss the gradients' NaN
    pattern is the chunked oracle's (documented: a non-finite query poisons the key gradients it multiplies)."""
    patterns = []
    for path in ("fused", "chunked"):
        q, k, _ = _inputs(1, 2, 2, 5, 5, 4, seed=4)
        q[0, 0, 2, 1] = float("nan")
        q.requires_grad_(True)
        k.requires_grad_(True)
        h = attention_entropy(q, k, path=path, is_causal=True)
        assert torch.isnan(h).sum() == 1 and torch.isnan(h[0, 0, 2])
        torch.where(torch.isfinite(h), h, 0.0).sum().backward()
        patterns.append((torch.isnan(q.grad), torch.isnan(k.grad), torch.nan_to_num(q.grad), torch.nan_to_num(k.grad)))
    (fq, fk, fqv, fkv), (cq, ck, cqv, ckv) = patterns
    assert torch.equal(fq, cq) and torch.equal(fk, ck)
    assert not fq[0, 1].any() and not fk[0, 1].any()  # the other head is untouched
    torch.testing.assert_close(fqv, cqv, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fkv, ckv, atol=2e-5, rtol=1e-4)


def test_backward_route_follows_the_threshold(backward_route):
    """The route is picked by ``B·H·Nq·Nk`` against ``MATERIALIZED_BACKWARD_ELEMENTS``: below it, materialised."""
    q, k, w = _inputs(2, 4, 2, 6, 7, 8, seed=21)
    calls = []
    real = fused_grad_module._materialized_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_grad_module, "_materialized_backward", spy)
        _value_and_grads(q, k, w, "fused", is_causal=True)
    assert len(calls) == (1 if backward_route == "materialized-backward" else 0)


@pytest.mark.parametrize("case", ["causal", "causal+padding", "window", "causal+bool+padding", "float-inf"])
@pytest.mark.parametrize("gqa", [1, 4], ids=["mha", "mqa"])
def test_both_backward_routes_agree_on_a_larger_call(case, gqa, monkeypatch, backward_route):
    """The materialised and the flash backward on one call of several kernel blocks (N = 70 keys, D = 32, a
    non-contiguous q as a model's ``transpose(1, 2)`` gives it): the same gradients to float32 round-off, and both
    equal the float64 brute force."""
    if backward_route == "flash-backward":
        pytest.skip("this test runs both routes itself")
    b, h, nq, nk, d = 2, 4, 70, 70, 32
    g = torch.Generator().manual_seed(gqa)
    q = torch.randn(b, nq, h, d, generator=g).transpose(1, 2)  # (B, H, N, D), non-contiguous
    k = torch.randn(b, h // gqa, nk, d, generator=g)
    w = torch.randn(b, h, nq, generator=g, dtype=torch.float64)
    kwargs = _masks(case, b, nq, nk, seed=gqa)
    routes = {}
    for threshold in (1 << 30, 0):
        monkeypatch.setattr(fused_grad_module, "MATERIALIZED_BACKWARD_ELEMENTS", threshold)
        routes[threshold] = _value_and_grads(q, k, w, "fused", **kwargs)
    brute = _brute_value_and_grads(q, k, w, valid_keys(b, h, nq, nk, **kwargs), 1.0 / math.sqrt(d))
    mat, flash = routes.values()
    for a, f, want in zip(mat, flash, brute):
        torch.testing.assert_close(a, f, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("version, release", [("2.15.0", (2, 15)), ("2.9.0+cpu", (2, 9)), ("2.8.0+cu128", (2, 8)),
                                              ("2.3.1", (2, 3)), ("2.10.0a0+git1234", (2, 10)), ("junk", (0, 0))])
def test_release_reads_major_and_minor(version, release):
    assert fused_grad_module._release(version) == release


@pytest.mark.parametrize("case", ["none", "causal+padding", "causal+bool+padding", "bool"])
@pytest.mark.parametrize("gqa", [2, 4], ids=["gqa2", "mqa"])
def test_route_for_older_kernels_equals_chunked(case, gqa, monkeypatch):
    """The route taken on torch < 2.9 (keys repeated over each query group: the older CPU flash kernels read ``H`` key
    heads past a ``(B, H_kv, N, D)`` key, wrong entropies and a heap corruption in the backward on 2.3.1 and 2.8.0)
    and on torch < 2.5 (a query with no valid key: NaN from the kernel, set to ō = 0, lse = 0), run here on any torch:
    values and gradients equal the chunked path's. On 2.3.1 / 2.8.0 the GQA cases of
    test_fused_value_and_gradients_equal_chunked_and_float64_brute fail without it."""
    monkeypatch.setattr(fused_grad_module, "_KERNEL_GQA", False)
    monkeypatch.setattr(fused_grad_module, "_KERNEL_EMPTY_ROWS_ZERO", False)
    b, h, nq, nk, d = 2, 4, 7, 9, 8
    q, k, w = _inputs(b, h, h // gqa, nq, nk, d, seed=len(case) + gqa)
    kwargs = _masks(case, b, nq, nk, seed=gqa)
    fused = _value_and_grads(q, k, w, "fused", **kwargs)
    chunked = _value_and_grads(q, k, w, "chunked", **kwargs)
    assert fused[2].shape == k.shape
    for got, want in zip(fused, chunked):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
