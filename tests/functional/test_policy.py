"""Policy token statistics vs float64 brute force: entropy at a temperature, log-probs, covariance, 80/20, STEER.

Tolerances: fp32 vs float64 brute force 1e-5 (values) / 1e-6 (gradients, V1 vectors); bf16 inputs vs the float64
result *of the rounded inputs* 1e-4 (accumulation is float32).
"""

from __future__ import annotations

import math

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional import (
    entropy_from_logits,
    high_entropy_mask,
    policy_covariance,
    steer_weights,
    token_entropy,
    token_logprobs,
)
from entrotrain.functional.policy import covariance_sums

INF = float("inf")


def _naive_entropy(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = z.double() / temperature
    p = torch.softmax(z, -1)
    return torch.logsumexp(z, -1) - (p * torch.where(p > 0, z, 0.0)).sum(-1)


# ----------------------------------------------------------------------------------------- V1 vectors (note §12)


def test_v1_vectors():
    h = token_entropy(torch.tensor([[0.0, 0, 0, 0], [1.0, 2, 3, 3]])[:, :4])
    assert abs(float(h[0]) - math.log(4)) < 1e-6
    z = torch.tensor([1.0, 2.0, 3.0])
    assert abs(float(token_entropy(z)) - 0.8323956) < 1e-6
    assert abs(float(token_entropy(z, temperature=0.6)) - 0.5567490) < 1e-6
    assert abs(float(entropy_from_logits(z, temperature=0.6)) - 0.5567490) < 1e-6
    z = torch.tensor([2.0, 0.0, -1.0, 0.5], requires_grad=True)
    h = token_entropy(z)
    assert abs(float(h.detach()) - 0.8782812) < 1e-6
    h.backward()
    torch.testing.assert_close(z.grad, torch.tensor([-0.380565, 0.1406993, 0.0871142, 0.1527515]), atol=1e-6, rtol=0)
    z0 = torch.zeros(4, requires_grad=True)
    token_entropy(z0).backward()
    assert torch.equal(z0.grad, torch.zeros(4))


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_entropy_vs_brute_force_and_gradient(temperature, dtype):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 5, 37, generator=g) * 3).to(dtype)
    z[0, 0, ::3] = -INF
    z[0, 1] = -INF
    z[0, 1, 4] = 2.0  # one finite entry: entropy 0
    expected = torch.stack([_naive_entropy(r, temperature) for r in z.double().reshape(-1, 37)]).reshape(3, 5)
    expected = torch.nan_to_num(expected, nan=0.0)
    zz = z.clone().requires_grad_()
    got = token_entropy(zz, temperature=temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-4)
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)
    # gradient vs autograd on the naive formula (finite rows only)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    (got.double() * w).sum().backward()
    ref = z.double().clone().requires_grad_()
    zt = ref / temperature
    p = torch.softmax(zt, -1)
    hn = torch.logsumexp(zt, -1) - (p * torch.where(p > 0, zt, torch.zeros_like(zt))).sum(-1)
    (hn * w).sum().backward()
    # bf16 gradients are stored in bf16: 2^-8 relative rounding of |grad| <= 1
    gtol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 8e-3)
    torch.testing.assert_close(zz.grad.double(), torch.nan_to_num(ref.grad), atol=gtol, rtol=0)
    assert torch.isfinite(zz.grad.float()).all()


def test_token_entropy_mask_and_chunks():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, 11, generator=g, requires_grad=True)
    mask = torch.rand(4, 6, generator=g) > 0.3
    h = token_entropy(z, mask, temperature=0.7)
    assert torch.equal(h[~mask], torch.zeros(int((~mask).sum())))
    h.sum().backward()
    assert torch.equal(z.grad[~mask], torch.zeros_like(z.grad[~mask]))
    # the temperature never makes a scaled copy, and chunking changes nothing
    a = entropy_from_logits(z.detach(), temperature=0.7, chunk_elements=22)
    b = entropy_from_logits(z.detach(), temperature=0.7)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(EntrotrainError, match="temperature"):
        token_entropy(z, temperature=0.0)
    with pytest.raises(EntrotrainError, match=r"mask must have shape \(4, 6\)"):
        token_entropy(z, mask[:, :3])


# ----------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_logprobs(temperature, dtype):
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(2, 7, 50, generator=g) * 2).to(dtype)
    z[0, 0, 10:] = -INF
    labels = torch.randint(0, 10, (2, 7), generator=g)
    labels[1, 3] = -100  # ignored
    zz = z.clone().requires_grad_()
    got = token_logprobs(zz, labels, temperature=temperature)
    ref_in = z.double().clone().requires_grad_()
    ref = torch.log_softmax(ref_in / temperature, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ref = torch.where(labels >= 0, ref, torch.zeros_like(ref))
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-4)
    torch.testing.assert_close(got.double(), ref.detach(), atol=tol, rtol=0)
    w = torch.randn(2, 7, generator=g, dtype=torch.float64)
    (got.double() * w).sum().backward()
    (ref * w).sum().backward()
    # bf16 gradients are stored in bf16: 2^-8 relative rounding of |grad| <= 1
    gtol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 8e-3)
    torch.testing.assert_close(zz.grad.double(), ref_in.grad, atol=gtol, rtol=0)
    assert torch.equal(zz.grad[1, 3].float(), torch.zeros(50))
    with pytest.raises(EntrotrainError, match="labels"):
        token_logprobs(z, labels[:, :3])


def test_token_logprobs_chunked_rows():
    # more rows than one chunk holds: exercise several chunks
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 20000, generator=g)
    labels = torch.randint(0, 20000, (300,), generator=g)
    got = token_logprobs(z, labels)
    ref = torch.log_softmax(z.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- covariance


def test_policy_covariance_brute_force():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(3, 8, generator=g) * 3
    adv = torch.randn(3, generator=g)
    mask = torch.rand(3, 8, generator=g) > 0.3
    cov = policy_covariance(logp, adv, mask)
    pairs = [(float(logp[b, t]), float(adv[b])) for b in range(3) for t in range(8) if mask[b, t]]
    ml = sum(p[0] for p in pairs) / len(pairs)
    ma = sum(p[1] for p in pairs) / len(pairs)
    for b in range(3):
        for t in range(8):
            want = (float(logp[b, t]) - ml) * (float(adv[b]) - ma) if mask[b, t] else 0.0
            assert abs(float(cov[b, t]) - want) < 1e-6
    # global sums: the sums of two halves give the means of the whole
    s1 = covariance_sums(logp[:2], adv[:2], mask[:2])
    s2 = covariance_sums(logp[2:], adv[2:], mask[2:])
    total = type(s1)(*(a + b for a, b in zip(s1, s2)))
    torch.testing.assert_close(policy_covariance(logp[:2], adv[:2], mask[:2], sums=total), cov[:2])


# ----------------------------------------------------------------------------------------- 80/20 mask


@pytest.mark.parametrize("top_fraction", [0.2, 0.5, 1.0, 0.01])
def test_high_entropy_mask_matches_torch_quantile(top_fraction):
    g = torch.Generator().manual_seed(5)
    ent = torch.rand(6, 40, generator=g) * 3
    mask = torch.rand(6, 40, generator=g) > 0.25
    got = high_entropy_mask(ent, mask, top_fraction)
    tau = torch.quantile(ent[mask], 1 - top_fraction)
    assert torch.equal(got, (ent >= tau) & mask)
    assert not got[~mask].any()
    assert abs(float(got.sum()) / float(mask.sum()) - top_fraction) < 0.05


def test_high_entropy_mask_beyond_quantile_limit_and_empty():
    ent = torch.arange(1 << 24 | 5, dtype=torch.float32).reshape(1, -1)
    mask = torch.ones_like(ent, dtype=torch.bool)
    got = high_entropy_mask(ent, mask, 0.5)
    assert abs(int(got.sum()) - ent.numel() // 2) <= 1
    assert not high_entropy_mask(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool)).any()
    with pytest.raises(EntrotrainError, match="top_fraction"):
        high_entropy_mask(ent, mask, 0.0)


# ----------------------------------------------------------------------------------------- STEER


def _steer_reference(logp, old, adv, ent, mask, w_min, w_max, linear):
    """STEER's compute_token_weights (reference note §7), in float64."""
    x = torch.clamp(torch.exp(logp), 1e-8, 1 - 1e-8)
    omega = (adv / torch.clamp(torch.exp(old), 1e-8, 1)) * x * (1 - x) * (torch.log(x) + ent)
    omega = omega.abs()
    omega[~torch.isfinite(omega)] = 0
    v = omega[mask]
    if not linear:
        k = -math.log(w_min) / max(float(v.max()), 0.02)
        return torch.clamp(torch.exp(-k * omega), w_min, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return torch.full_like(omega, (w_min + w_max) / 2)
    return torch.clamp(w_max - (omega - lo) * (w_max - w_min) / (hi - lo), w_min, w_max)


@pytest.mark.parametrize("linear,w_min,w_max", [(False, 0.8, 1.0), (True, 0.8, 1.2)])
def test_steer_weights(linear, w_min, w_max):
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(4, 9, generator=g, dtype=torch.float64) * 0.1
    adv = torch.randn(4, 9, generator=g, dtype=torch.float64)
    ent = torch.rand(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.2
    got = steer_weights(logp, old, adv, ent, mask, w_min=w_min, w_max=w_max, linear=linear)
    ref = _steer_reference(logp, old, adv, ent, mask, w_min, w_max, linear)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert got[mask].min() >= w_min - 1e-12 and got[mask].max() <= w_max + 1e-12
    flat = steer_weights(logp, old, torch.zeros_like(adv), ent, mask, w_min=w_min, w_max=w_max, linear=linear)
    assert torch.allclose(flat, torch.full_like(flat, (w_min + w_max) / 2 if linear else 1.0))
