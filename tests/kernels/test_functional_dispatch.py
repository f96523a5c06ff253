"""entrotrain.functional dispatches to the Triton kernels through ``impl`` (and ``ENTROTRAIN_IMPL``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.functional import (  # noqa: E402
    attention_entropy,
    attention_entropy_stats,
    entropy_from_logits,
    linear_entropy_and_logprobs,
)
from entrotrain.kernels.dispatch import KernelUnavailableError  # noqa: E402


def _qk(device, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 8, generator=g).to(device).requires_grad_(requires_grad)
    k = torch.randn(1, 2, 9, 8, generator=g).to(device).requires_grad_(requires_grad)
    return q, k


def test_attention_impl_triton_matches_torch(device):
    q, k = _qk(device)
    want = attention_entropy_stats(q, k, is_causal=True, window=4, impl="torch")
    got = attention_entropy_stats(q, k, is_causal=True, window=4, impl="triton")
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.n_keys.to(want.n_keys.dtype), want.n_keys)


def test_attention_impl_triton_gradient_matches_torch(device):
    q, k = _qk(device, requires_grad=True)
    attention_entropy(q, k, is_causal=True, impl="torch").sum().backward()
    want = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    attention_entropy(q, k, is_causal=True, impl="triton").sum().backward()
    torch.testing.assert_close(q.grad, want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k.grad, want[1], atol=2e-5, rtol=1e-4)


def test_env_override_pins_torch(device, monkeypatch):
    q, k = _qk(device)
    monkeypatch.setenv("ENTROTRAIN_IMPL", "torch")
    assert attention_entropy_stats(q, k, impl="triton").entropy.shape == (1, 4, 9)  # env wins: no kernel needed


def test_explicit_torch_paths_reject_the_kernel(device):
    q, k = _qk(device)
    with pytest.raises(EntrotrainError, match="path='chunked'"):
        attention_entropy_stats(q, k, path="chunked", impl="triton")


def test_triton_without_a_runnable_device_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernel can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = _qk("cpu")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        attention_entropy_stats(q, k, impl="triton")
    torch.testing.assert_close(  # auto falls back silently
        attention_entropy_stats(q, k).entropy, attention_entropy_stats(q, k, impl="torch").entropy
    )


def test_logits_entropy_impl_triton_matches_torch(device):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(5, 37, generator=g) * 3).to(device).requires_grad_(True)
    z.data[1, :10] = float("-inf")
    want = entropy_from_logits(z, temperature=0.7, impl="torch")
    (gw,) = torch.autograd.grad(want.sum(), z)
    got = entropy_from_logits(z, temperature=0.7, impl="triton")
    (gg,) = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gg, gw, atol=1e-5, rtol=1e-4)


def test_linear_head_impl_triton_matches_torch(device):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(7, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(45, 16, generator=g).to(device).requires_grad_(True)
    labels = torch.tensor([0, 3, 44, -100, 7, 7, 1], device=device)
    want = linear_entropy_and_logprobs(h, w, labels, impl="torch")
    gw = torch.autograd.grad((want.entropy + want.logprobs).sum(), (h, w))
    got = linear_entropy_and_logprobs(h, w, labels, impl="triton")
    gg = torch.autograd.grad((got.entropy + got.logprobs).sum(), (h, w))
    torch.testing.assert_close(got.entropy, want.entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=2e-5, rtol=1e-5)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_impl_torch_never_reaches_a_kernel(device, monkeypatch):
    """impl="torch" holds all the way down: the attention torch path scores its rows with the logits-entropy torch path,
    not the logits kernel (which ``auto`` would pick here, under the interpreter or on CUDA)."""
    import entrotrain.kernels.logits_entropy as logits_kernel

    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel ran under impl='torch'")

    monkeypatch.setattr(logits_kernel, "entropy_from_logits", boom)
    q, k = _qk(device, requires_grad=True)
    attention_entropy(q, k, is_causal=True, path="chunked").sum().backward()
    attention_entropy(q, k, is_causal=True, impl="torch").sum().backward()
    assert q.grad is not None


def test_a_failing_kernel_falls_back_once_under_auto_and_raises_when_explicit(device, monkeypatch):
    """A kernel that fails to compile or launch (never seen on this GPU, say) must not break monitoring under
    impl="auto": one warning, then the torch path for the rest of the run. impl="triton" surfaces the error."""
    import warnings

    import entrotrain.kernels.dispatch as dispatch
    import entrotrain.kernels.logits_entropy as logits_kernel

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(dispatch, "_FAILED", {})
    monkeypatch.setattr(logits_kernel, "entropy_from_logits", broken)
    z = torch.randn(4, 33, generator=torch.Generator().manual_seed(3)).to(device)
    want = entropy_from_logits(z, impl="torch")
    with pytest.raises(RuntimeError, match="PTX"):
        entropy_from_logits(z, impl="triton")
    with pytest.warns(RuntimeWarning, match="logits-entropy kernel failed"):
        got = entropy_from_logits(z)
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off: no second attempt, no second warning
        torch.testing.assert_close(entropy_from_logits(z), want)
    assert "logits-entropy" in dispatch._FAILED
