"""The log-probability gradient contract shared by token_logprobs and the fused head (torch path here; the Triton
kernel in tests/kernels/test_linear_entropy_kernel.py): a negative label (padding) gets log-prob 0 with zero gradient
whatever the row's logits; a row of all -inf logits (no distribution) gets log-prob NaN and the gradient of p := 0,
``onehot/T`` times the upstream gradient; other rows the float64 ``log_softmax`` gradient."""

from __future__ import annotations

from unittest.mock import patch

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.functional import linear_entropy_and_logprobs, token_logprobs

INF = float("inf")
KINDS = ("finite", "all-minus-inf", "some-minus-inf", "nan", "plus-inf")


def _logits(kinds: list[str], v: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(len(kinds), v, generator=g, dtype=torch.float64) * 2
    for i, kind in enumerate(kinds):
        if kind == "all-minus-inf":
            z[i] = -INF
        elif kind == "some-minus-inf":
            z[i, : v // 2] = -INF
        elif kind == "nan":
            z[i, 0] = float("nan")
        elif kind == "plus-inf":
            z[i, -1] = INF
    return z


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6),
    padded=st.lists(st.booleans(), min_size=6, max_size=6),
    v=st.integers(2, 7),
    temperature=st.sampled_from([1.0, 0.7]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_padding_rows_have_zero_gradient_and_rows_without_a_distribution_take_p_zero(
    kinds, padded, v, temperature, dtype, seed
):
    """Before: a padding row (label -100) whose logits were all -inf, NaN or +Inf had a NaN gradient (softmax of
    such a row is NaN, times a zero upstream gradient is still NaN), and a valid row of all -inf logits a NaN
    gradient where the fused head gives onehot/T."""
    g = torch.Generator().manual_seed(seed)
    n = len(kinds)
    z = _logits(kinds, v, g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    pad = torch.tensor(padded[:n])
    labels[pad] = -100
    upstream = torch.randn(n, generator=g, dtype=dtype)
    out = token_logprobs(z, labels, temperature=temperature)
    (grad,) = torch.autograd.grad(out, z, upstream)
    ref_in = z.detach().double().requires_grad_(True)
    ref = torch.log_softmax(ref_in / temperature, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, upstream.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i, kind in enumerate(kinds):
        if pad[i]:
            assert out[i] == 0 and torch.equal(grad[i], torch.zeros(v, dtype=dtype)), (kind, grad[i])
        elif kind == "all-minus-inf":
            assert out[i].isnan()
            onehot = torch.zeros(v, dtype=dtype)
            onehot[labels[i]] = upstream[i] / temperature
            torch.testing.assert_close(grad[i], onehot, atol=tol, rtol=0)
        elif kind in ("nan", "plus-inf") and out[i].isnan():
            assert grad[i].isnan().any()  # bad data: NaN in its own row only
        else:
            torch.testing.assert_close(out[i].double(), ref[i].detach(), atol=tol, rtol=0)
            torch.testing.assert_close(grad[i].double(), ref_grad[i], atol=tol, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    v=st.integers(1, 7),
    off=st.lists(st.booleans(), min_size=7, max_size=7),
    padded=st.lists(st.booleans(), min_size=5, max_size=5),
    chunk=st.integers(1, 4),
    temperature=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_the_fused_head_log_prob_gradient_is_token_logprobs_on_the_logits(v, off, padded, chunk, temperature, seed):
    """linear_entropy_and_logprobs (torch path) and token_logprobs on the materialised logits give one log-prob
    gradient, -inf bias entries included, up to every entry (rows without a distribution; padding among them).
    Before, token_logprobs gave NaN there."""
    g = torch.Generator().manual_seed(seed)
    n, d = 5, 3
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    b[torch.tensor(off[:v])] = -INF
    b.requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.tensor(padded)] = -100
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    lp = linear_entropy_and_logprobs(h, w, labels, bias=b, temperature=temperature, chunk_size=chunk).logprobs
    got = torch.autograd.grad(lp, (h, w, b), upstream)
    ref = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    lp2 = token_logprobs(ref[0] @ ref[1].t() + ref[2], labels, temperature=temperature)
    torch.testing.assert_close(lp, lp2, atol=1e-10, rtol=0, equal_nan=True)
    for x, y in zip(got, torch.autograd.grad(lp2, ref, upstream)):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS + ("finite", "finite")), min_size=1, max_size=20),
    padded=st.lists(st.booleans(), min_size=20, max_size=20),
    v=st.integers(2, 9),
    temperature=st.sampled_from([1.0, 0.7]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_the_cpu_backward_skips_the_row_mask_without_changing_a_bit(kinds, padded, v, temperature, dtype, seed):
    """On CPU the backward masks only the chunks holding a row whose log-prob is NaN (one host read); on an
    accelerator and under torch.compile every chunk is masked (no sync). Both give the same gradient bits, signs of
    zeros included: on a padding row with finite logits, p · (-0) is what 0 · (-0) gives. Chunks of 2-3 rows here,
    most of them without a NaN row."""
    g = torch.Generator().manual_seed(seed)
    z = _logits(kinds, v, g).to(dtype)
    labels = torch.randint(0, v, (len(kinds),), generator=g)
    labels[torch.tensor(padded[: len(kinds)])] = -100
    up = torch.randn(len(kinds), generator=g)
    up[::4] = 0.0

    def grad(compiling: bool) -> torch.Tensor:
        x = z.clone().requires_grad_(True)
        with patch("torch.compiler.is_compiling", return_value=compiling), \
                patch("entrotrain.functional.policy.DEFAULT_CHUNK_ELEMENTS", 6 * v):
            out = token_logprobs(x, labels, temperature=temperature)
            out.backward(up.to(out.dtype))
        return x.grad.double().view(torch.int64)

    assert torch.equal(grad(False), grad(True))
