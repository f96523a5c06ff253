"""Triton logits-entropy kernel vs. the torch path (``entrotrain.functional.entropy_from_logits``) and float64 brute
force, forward and backward.

Tolerances: float32 input: 2e-6 + 1e-5 relative on the entropy vs. both oracles, gradients 1e-6 absolute (values
O(1)). bf16 / fp16 input: compared with the torch path on the *same* low-precision input (both accumulate in float32):
entropy 1e-5 + 1e-5 relative; gradients (stored in the input dtype) within two ulps of that dtype.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton", minversion="3.0")  # older triton: no kernels (dispatch.MIN_TRITON)

import entrotrain.kernels.logits_entropy as kmod  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.functional.entropy import entropy_from_logits as torch_entropy  # noqa: E402
from tests.helpers.reference import entropy_rows64  # noqa: E402

# The CPU interpreter runs tl.where's both branches in numpy, which warns on -inf - -inf in the lanes it then discards;
# every result here is checked for NaN explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

_TORCH_HAS_TEMPERATURE = "temperature" in inspect.signature(torch_entropy).parameters


def _adversarial(rows: int, vocab: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 4
    x[0] = float("-inf")  # no valid entry: entropy 0, gradient 0
    x[1, ::3] = float("-inf")  # some -inf
    x[2] = 0.0  # uniform: ln V
    x[3] = float("-inf")
    x[3, vocab // 2] = 5.0  # exact one-hot: 0
    x[4] = -1e4
    x[4, 1] = 1e4  # near one-hot, huge range
    x[5] += 3e3  # large common offset (centring matters)
    return x.to(device=device, dtype=dtype)


def _torch_path(x, mask=None, temperature=1.0, dim=-1):
    if _TORCH_HAS_TEMPERATURE:
        return torch_entropy(x, dim=dim, mask=mask, temperature=temperature, impl="torch")
    return torch_entropy(x / temperature if temperature != 1.0 else x, dim=dim, mask=mask, impl="torch")


@pytest.mark.parametrize("block", [None, 64], ids=["default-block", "block64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_forward_backward_fp32(device, monkeypatch, block, masked):
    if block is not None:
        monkeypatch.setattr(kmod, "BLOCK_V", block)  # many blocks, the last one partial
    x = _adversarial(9, 301, device).requires_grad_(True)
    mask = None
    if masked:
        mask = torch.rand(9, 301, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[6] = False  # fully masked row
        mask = mask.to(device)
    h = kmod.entropy_from_logits(x, mask=mask)
    h_ref = _torch_path(x, mask=mask)
    assert h.dtype == torch.float32 and h.shape == (9,)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=2e-6)
    h64 = entropy_rows64(x.cpu(), mask=None if mask is None else mask.cpu())
    torch.testing.assert_close(h.double().cpu(), h64, rtol=1e-5, atol=2e-6)
    assert h[0] == 0 and h[3] == 0
    torch.testing.assert_close(h[2].item(), torch.log(torch.tensor(301.0)).item() if not masked else h64[2].item())
    g = torch.randn(9, generator=torch.Generator().manual_seed(2)).to(device)
    (dx,) = torch.autograd.grad(h, x, g)
    (dx_ref,) = torch.autograd.grad(h_ref, x, g)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert (dx[0] == 0).all()
    if masked:
        assert (dx[~mask] == 0).all() and (dx[6] == 0).all()


def test_gradient_matches_float64_autograd(device):
    x = _adversarial(7, 50, device, seed=3)
    x[0] = torch.randn(50)  # keep every row differentiable in float64 (no -inf rows for autograd of log_softmax)
    rows = [0, 2, 6]  # finite rows without a large offset (fp32 cancellation in z - E[z] is the torch path's too)
    x64 = x[rows].detach().double().cpu().requires_grad_(True)
    lp = torch.log_softmax(x64, -1)
    (-(lp.exp() * lp).sum()).backward()
    xk = x[rows].clone().requires_grad_(True)
    kmod.entropy_from_logits(xk).sum().backward()
    torch.testing.assert_close(xk.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_torch_path(device, dtype):
    x = _adversarial(8, 130, device, dtype=dtype, seed=4)
    x[5] = torch.randn(130) * 4  # fp16 has no room for a 3e3 offset + detail; keep the row ordinary
    x = x.requires_grad_(True)
    h = kmod.entropy_from_logits(x)
    h_ref = _torch_path(x)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    g = torch.ones(8, device=device)
    (dx,) = torch.autograd.grad(h, x, g)
    (dx_ref,) = torch.autograd.grad(h_ref, x, g)
    assert dx.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2 * eps, atol=1e-6)


def test_dim_broadcast_mask_and_temperature(device):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 70, 4, generator=g) * 3).to(device).requires_grad_(True)
    mask = (torch.rand(70, 1, generator=g) > 0.4).to(device)  # broadcast over the other dims (stride-0 view)
    h = kmod.entropy_from_logits(x, dim=1, mask=mask, temperature=0.6)
    h_ref = _torch_path(x, dim=1, mask=mask, temperature=0.6)
    assert h.shape == (3, 4)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(h.double().cpu(), entropy_rows64(x.cpu() / 0.6, dim=1, mask=mask.cpu()), rtol=1e-5,
                               atol=2e-6)
    (dx,) = torch.autograd.grad(h.sum(), x)
    (dx_ref,) = torch.autograd.grad(h_ref.sum(), x)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_nan_rows_stay_nan_and_empty_shapes(device):
    x = torch.randn(3, 40).to(device)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    h = kmod.entropy_from_logits(x)
    assert torch.isfinite(h[0]) and torch.isnan(h[1]) and torch.isnan(h[2])
    assert kmod.entropy_from_logits(torch.zeros(0, 5, device=device)).shape == (0,)
    empty = kmod.entropy_from_logits(torch.zeros(4, 0, device=device))
    assert empty.shape == (4,) and (empty == 0).all()


def test_errors(device):
    x = torch.randn(2, 5, device=device)
    with pytest.raises(EntrotrainError, match="boolean"):
        kmod.entropy_from_logits(x, mask=torch.ones(2, 5, device=device))
    with pytest.raises(EntrotrainError, match="broadcast"):
        kmod.entropy_from_logits(x, mask=torch.ones(3, 5, dtype=torch.bool, device=device))
    with pytest.raises(EntrotrainError, match="temperature"):
        kmod.entropy_from_logits(x, temperature=0.0)
    with pytest.raises(EntrotrainError, match="float64"):
        kmod.entropy_from_logits(x.double())
