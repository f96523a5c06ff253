"""entrotrain.functional dispatches to the Triton kernels through ``impl`` (and ``ENTROTRAIN_IMPL``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", minversion="3.0")  # older triton: no kernels (dispatch.MIN_TRITON)

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
    with pytest.raises(KernelUnavailableError, match="logits-entropy kernel failed.*PTX"):
        entropy_from_logits(z, impl="triton")
    with pytest.warns(RuntimeWarning, match="logits-entropy kernel failed"):
        got = entropy_from_logits(z)
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off: no second attempt, no second warning
        torch.testing.assert_close(entropy_from_logits(z), want)
    assert "logits-entropy" in dispatch._FAILED


class _BrokenLaunch:
    """Stands in for a compiled kernel whose launch fails, as Triton's does when a config needs too much memory."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

        return launch


def _head_case(device, impl):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(7, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(45, 16, generator=g).to(device).requires_grad_(True)
    b = torch.randn(45, generator=g).to(device).requires_grad_(True)
    labels = torch.tensor([0, 3, 44, -100, 7, 7, 1], device=device)
    out = linear_entropy_and_logprobs(h, w, labels, bias=b, temperature=0.8, impl=impl)
    return (out.entropy * torch.arange(7.0, device=device) + out.logprobs).sum(), (h, w, b)


def _logits_case(device, impl):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(5, 37, generator=g) * 3).to(device).requires_grad_(True)
    mask = (torch.rand(5, 37, generator=g) > 0.2).to(device)
    entropy = entropy_from_logits(z, mask=mask, temperature=0.7, impl=impl)
    return (entropy * torch.arange(5.0, device=device)).sum(), (z,)


def _attention_case(device, impl):
    q, k = _qk(device, requires_grad=True)
    bias = torch.randn(9, 9, generator=torch.Generator().manual_seed(4)).to(device)
    bias[:, 2] = float("-inf")
    kpm = torch.zeros(1, 9, dtype=torch.bool, device=device)
    kpm[0, -2:] = True
    out = attention_entropy(q, k, attn_mask=bias, key_padding_mask=kpm, is_causal=True, window=5, scale=0.3, impl=impl)
    return (out * torch.linspace(0.5, 2.0, 9, device=device)).sum(), (q, k)


@pytest.mark.parametrize(
    "module, kernel, name, case",
    [
        ("logits_entropy", "_logits_entropy_bwd", "logits-entropy", _logits_case),
        ("linear_entropy", "_linear_entropy_bwd", "fused-head-entropy", _head_case),
        ("attention_entropy", "_attn_entropy_bwd_dq", "attention-entropy", _attention_case),
    ],
    ids=["logits", "head", "attention"],
)
def test_a_failing_backward_kernel_falls_back_under_auto(device, monkeypatch, module, kernel, name, case):
    """The backward kernels compile at the first backward: one that fails (a config over the GPU's shared memory,
    say) must not crash a training run under impl="auto": one warning, the torch path's gradients, the kernel off for
    the rest of the run. impl="triton" raises KernelUnavailableError naming the error."""
    import importlib
    import warnings

    import entrotrain.kernels.dispatch as dispatch

    kmod = importlib.import_module(f"entrotrain.kernels.{module}")
    monkeypatch.setattr(dispatch, "_FAILED", {})
    loss, inputs = case(device, "torch")
    want = torch.autograd.grad(loss, inputs)
    monkeypatch.setattr(kmod, kernel, _BrokenLaunch())
    loss, inputs = case(device, "triton")
    with pytest.raises(KernelUnavailableError, match=f"{name} kernel failed in backward.*out of resource"):
        torch.autograd.grad(loss, inputs)
    assert not dispatch._FAILED
    loss, inputs = case(device, "auto")
    with pytest.warns(RuntimeWarning, match=f"{name} kernel failed in backward.*out of resource"):
        got = torch.autograd.grad(loss, inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert name in dispatch._FAILED
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off: the next forward and backward take the torch path silently
        loss, inputs = case(device, "auto")
        for a, b in zip(torch.autograd.grad(loss, inputs), want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("module, case", [("logits_entropy", _logits_case), ("linear_entropy", _head_case),
                                          ("attention_entropy", _attention_case)], ids=["logits", "head", "attention"])
def test_kernels_launch_under_their_inputs_device(device, monkeypatch, module, case):
    """Triton launches on the current CUDA device: each kernel forward runs inside dispatch.on_device(its input) (a
    model on cuda:1 without torch.cuda.set_device(1)). On CPU this checks the wiring; the guard is a no-op there."""
    import contextlib
    import importlib

    kmod = importlib.import_module(f"entrotrain.kernels.{module}")
    seen = []
    monkeypatch.setattr(kmod, "on_device", lambda t: seen.append(t.device) or contextlib.nullcontext())
    case(device, "triton")
    assert seen == [torch.device(device)]
