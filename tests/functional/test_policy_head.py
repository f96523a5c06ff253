"""Fused output head vs materialised logits: values and gradients (hidden, weight, bias) in float64 and fp32, bf16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import linear_entropy_and_logprobs, token_entropy, token_logprobs


def _naive(h, w, b, labels, temperature):
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z / temperature
    p = torch.softmax(z, -1)
    ent = torch.logsumexp(z, -1) - (p * z).sum(-1)
    lp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    lp = torch.where(labels >= 0, lp, torch.zeros_like(lp))
    return ent, lp


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 512])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_materialised_logits(temperature, use_bias, chunk_size, dtype, tol):
    g = torch.Generator().manual_seed(0)
    n, d, v = 23, 16, 50
    h = (torch.randn(n, d, generator=g) * 0.7).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.7).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g)).to(dtype).requires_grad_() if use_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    ent, lp = linear_entropy_and_logprobs(h, w, labels, bias=b, temperature=temperature, chunk_size=chunk_size)
    ge, gl = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    ((ent * ge).sum() + (lp * gl).sum()).backward()
    grads = [h.grad, w.grad] + ([b.grad] if use_bias else [])
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b2 = b.detach().double().requires_grad_() if use_bias else None
    ent2, lp2 = _naive(h2, w2, b2, labels, temperature)
    ((ent2 * ge.double()).sum() + (lp2 * gl.double()).sum()).backward()
    torch.testing.assert_close(ent.double(), ent2.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(lp.double(), lp2.detach(), atol=tol, rtol=0)
    for got, ref in zip(grads, [h2.grad, w2.grad] + ([b2.grad] if use_bias else [])):
        torch.testing.assert_close(got.double(), ref, atol=tol * 10, rtol=0)


def test_entropy_only_and_agrees_with_token_functions():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g)
    stats = linear_entropy_and_logprobs(h, w, temperature=0.8)
    assert stats.logprobs is None
    z = h @ w.t()
    torch.testing.assert_close(stats.entropy, token_entropy(z, temperature=0.8), atol=1e-5, rtol=0)
    stats.entropy.sum().backward()
    ref = h.detach().clone().requires_grad_()
    token_entropy(ref @ w.t(), temperature=0.8).sum().backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-5, rtol=0)
    labels = torch.randint(0, 30, (9,), generator=g)
    lp = linear_entropy_and_logprobs(h.detach(), w, labels).logprobs
    torch.testing.assert_close(lp, token_logprobs(z.detach(), labels), atol=1e-5, rtol=0)


def test_bf16_inputs():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(17, 32, generator=g).bfloat16()
    w = (torch.randn(64, 32, generator=g) * 0.3).bfloat16()
    labels = torch.randint(0, 64, (17,), generator=g)
    ent, lp = linear_entropy_and_logprobs(h, w, labels, chunk_size=5)
    assert ent.dtype == torch.float32
    z = (h @ w.t()).double()  # the bf16 matmul's rounded logits are what we take the entropy of
    torch.testing.assert_close(ent.double(), token_entropy(z).double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(lp.double(), token_logprobs(z, labels), atol=1e-4, rtol=0)
    hh = h.clone().requires_grad_()
    ent, _ = linear_entropy_and_logprobs(hh, w, labels)
    ent.sum().backward()
    assert hh.grad.dtype == torch.bfloat16 and torch.isfinite(hh.grad.float()).all()


def test_errors():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(EntrotrainError, match="same D"):
        linear_entropy_and_logprobs(h, torch.randn(5, 3))
    with pytest.raises(EntrotrainError, match="bias"):
        linear_entropy_and_logprobs(h, w, bias=torch.randn(4))
    with pytest.raises(EntrotrainError, match="labels"):
        linear_entropy_and_logprobs(h, w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="dtype"):
        linear_entropy_and_logprobs(h, w.double())


@pytest.mark.parametrize("which", ["entropy", "logprobs"])
def test_one_output_gradient(which):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (11,), generator=g)
    ent, lp = linear_entropy_and_logprobs(h, w, labels, temperature=1.3, chunk_size=4)
    (ent if which == "entropy" else lp).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ent2, lp2 = _naive(h2, w2, None, labels, 1.3)
    (ent2 if which == "entropy" else lp2).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-10, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    v=st.integers(1, 9),
    off=st.lists(st.booleans(), min_size=9, max_size=9),
    chunk=st.integers(1, 4),
    temperature=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_minus_inf_logits_match_the_token_functions(v, off, chunk, temperature, seed):
    """A -inf bias entry (a token switched off), up to every entry (no distribution): entropy and log-prob equal
    token_entropy / token_logprobs on the materialised logits (an all -inf row: entropy 0, log-prob NaN, 0 for a
    negative label), and the entropy's gradient is token_entropy's (0 at a -inf logit and for an all -inf row);
    before, any -inf logit gave a NaN entropy (0 * -inf) in every row."""
    g = torch.Generator().manual_seed(seed)
    n, d = 6, 3
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    b[torch.tensor(off[:v])] = float("-inf")
    b.requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = -100
    ent, lp = linear_entropy_and_logprobs(h, w, labels, bias=b, temperature=temperature, chunk_size=chunk)
    ref = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    z = ref[0] @ ref[1].t() + ref[2]
    ent2 = token_entropy(z, temperature=temperature)
    torch.testing.assert_close(ent, ent2, atol=1e-10, rtol=0)
    torch.testing.assert_close(lp, token_logprobs(z.detach(), labels, temperature=temperature), atol=1e-10, rtol=0,
                               equal_nan=True)
    assert lp[0] == 0
    grads = torch.autograd.grad(ent.sum(), (h, w, b))
    for got, want in zip(grads, torch.autograd.grad(ent2.sum(), ref)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_zero_width_hidden_states_give_the_bias_distribution():
    # D = 0: every logit is the bias (docstring: softmax(bias / T); uniform, ln V, without a bias)
    bias = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    out = linear_entropy_and_logprobs(torch.zeros(2, 0, dtype=torch.float64), torch.zeros(3, 0, dtype=torch.float64),
                                      torch.tensor([2, 0]), bias=bias, temperature=0.5)  # fmt: skip
    z = (bias / 0.5).expand(2, 3)
    torch.testing.assert_close(out.entropy, token_entropy(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logprobs, torch.log_softmax(z, -1)[[0, 1], [2, 0]], rtol=1e-12, atol=1e-12)
    plain = linear_entropy_and_logprobs(torch.zeros(2, 0), torch.zeros(3, 0)).entropy
    torch.testing.assert_close(plain, torch.full((2,), float(torch.log(torch.tensor(3.0)))))
