"""Triton attention-entropy kernels vs. the torch ``chunked`` path (``entrotrain.functional.attention_entropy_stats``)
and float64 brute force (``tests/helpers/reference.py``), forward (entropy, normalised entropy, key counts) and
backward (∂q, ∂k of a weighted sum of entropies).

Tolerances: float32 inputs: 1e-5 absolute on entropies (nats, O(1)) against both oracles, key counts exact,
gradients 1e-5 + 1e-4 relative against the torch path. bf16 inputs: the torch path on the *same* bf16 values (both
accumulate in float32): entropies 1e-4, gradients (bf16 out) 2e-2 of the largest entry.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", minversion="3.0")  # older triton: no kernels (dispatch.MIN_TRITON)

import entrotrain.kernels.attention_entropy as kmod  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.functional.attention import attention_entropy_stats as torch_stats  # noqa: E402
from tests.helpers.reference import attention_entropy64, valid_keys  # noqa: E402

B, HQ, NQ, NK, D = 2, 4, 19, 23, 20  # odd sizes: no dimension is a multiple of a block


def _qk(device, *, kv_heads=2, n_q=NQ, n_k=NK, dtype=torch.float32, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B, N, H, D) storage viewed as (B, H, N, D): non-contiguous strides
        q = torch.randn(B, n_q, HQ, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, HQ, n_q, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, kv_heads, n_k, D, generator=g).to(device=device, dtype=dtype) * 1.5
    return q.requires_grad_(True), k.requires_grad_(True)


def _padding(device, n_k=NK):
    kpm = torch.zeros(B, n_k, dtype=torch.bool)
    kpm[0, :2] = True
    kpm[1, -6:] = True
    return kpm.to(device)


def _case(name, device):
    g = torch.Generator().manual_seed(7)
    if name == "plain":
        return {}
    if name == "causal":
        return dict(is_causal=True)
    if name == "causal+window+padding":
        return dict(is_causal=True, window=4, key_padding_mask=_padding(device))
    if name == "window+bool-mask":
        return dict(window=5, attn_mask=(torch.rand(NQ, NK, generator=g) > 0.25).to(device))
    if name == "bias+hf-min+padding":
        bias = torch.randn(1, HQ, NQ, NK, generator=g)
        bias[..., 3] = torch.finfo(torch.float32).min  # HF writes finfo.min for masked keys
        return dict(attn_mask=bias.to(device), key_padding_mask=_padding(device))
    if name == "all-padded-batch":
        kpm = torch.zeros(B, NK, dtype=torch.bool)
        kpm[1] = True  # batch 1 has no key at all: entropy 0, n_keys 0, zero gradient
        return dict(key_padding_mask=kpm.to(device), is_causal=True)
    raise KeyError(name)


CASES = ["plain", "causal", "causal+window+padding", "window+bool-mask", "bias+hf-min+padding", "all-padded-batch"]


def _compare(q, k, kwargs, *, atol=1e-5, grad_atol=1e-5, brute=True):
    got = kmod.attention_entropy_stats(q, k, **kwargs)
    want = torch_stats(q, k, path="chunked", **kwargs)
    assert got.entropy.dtype == torch.float32 and got.n_keys.dtype == torch.long
    assert torch.isfinite(got.entropy).all()
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=atol)
    torch.testing.assert_close(got.normalized, want.normalized, rtol=1e-5, atol=atol)
    assert torch.equal(got.n_keys, want.n_keys.expand_as(got.n_keys))
    if brute:
        mask = kwargs.get("attn_mask")
        bias = None
        if mask is not None and mask.is_floating_point():
            bias = torch.where(mask > torch.finfo(mask.dtype).min, mask, 0.0).cpu()
        valid = valid_keys(B, HQ, q.shape[2], k.shape[2], attn_mask=None if mask is None else mask.cpu(),
                           key_padding_mask=None if kwargs.get("key_padding_mask") is None
                           else kwargs["key_padding_mask"].cpu(),
                           is_causal=kwargs.get("is_causal", False), window=kwargs.get("window"))
        h64, n64, c64 = attention_entropy64(q.cpu(), k.cpu(), valid=valid, bias=bias)
        torch.testing.assert_close(got.entropy.double().cpu(), h64, rtol=0, atol=atol)
        torch.testing.assert_close(got.normalized.double().cpu(), n64, rtol=0, atol=atol)
        assert torch.equal(got.n_keys.cpu(), c64)
    weights = torch.randn(got.entropy.shape, generator=torch.Generator().manual_seed(3)).to(q.device)
    grads = torch.autograd.grad((got.entropy * weights).sum(), (q, k))
    grads_ref = torch.autograd.grad((want.entropy * weights).sum(), (q, k))
    for g, r in zip(grads, grads_ref):
        assert g.dtype == r.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), r.float(), rtol=1e-4, atol=grad_atol * max(1.0, float(r.abs().max())))
    return got, grads


@pytest.mark.parametrize("case", CASES)
def test_fp32_against_torch_and_float64(device, case):
    q, k = _qk(device)
    got, (dq, dk) = _compare(q, k, _case(case, device))
    if case == "all-padded-batch":
        assert (got.entropy[1] == 0).all() and (got.n_keys[1] == 0).all()
        assert (dq[1] == 0).all() and (dk[1] == 0).all()


@pytest.mark.parametrize("kv_heads", [1, 4], ids=["mqa", "mha"])
def test_small_blocks_gqa_cross_attention(device, monkeypatch, kv_heads):
    """16-wide blocks: several query and key blocks, causal / window block skipping, partial last blocks."""
    for table in (kmod.FWD_CONFIG, kmod.BWD_DQ_CONFIG, kmod.BWD_DK_CONFIG):
        for size in table:
            monkeypatch.setitem(table, size, (16, 16, 4, 1))
    q, k = _qk(device, kv_heads=kv_heads, n_q=37, n_k=41, seed=1, transposed=True)
    _compare(q, k, dict(is_causal=True, window=9, key_padding_mask=_padding(device, 41)), brute=False)
    _compare(q, k, dict(window=6), brute=False)


def test_q_and_k_sliced_from_a_fused_qkv(device):
    """nanoGPT-style q, k: slices of one (B, N, H, 3D) projection, i.e. strided views with gaps (not dense), whose
    ``empty_like`` is contiguous: the gradient buffers are written with their own strides, not q's / k's."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, NQ, HQ, 3 * D, generator=g).to(device).requires_grad_(True)
    q, k = qkv[..., :D].transpose(1, 2), qkv[..., D : 2 * D].transpose(1, 2)
    assert not q.is_contiguous() and torch.empty_like(q).stride() != q.stride()
    got = kmod.attention_entropy_stats(q, k, is_causal=True)
    want = torch_stats(q, k, is_causal=True, path="chunked")
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    weights = torch.randn(got.entropy.shape, generator=torch.Generator().manual_seed(6)).to(device)
    (grad,) = torch.autograd.grad((got.entropy * weights).sum(), qkv)
    (grad_ref,) = torch.autograd.grad((want.entropy * weights).sum(), qkv)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(grad_ref.abs().max())))
    assert (grad[..., 2 * D :] == 0).all()  # v's columns untouched


def test_scale_and_normalize(device):
    q, k = _qk(device, seed=2)
    got = kmod.attention_entropy(q, k, scale=0.7, normalize=True, is_causal=True)
    want = torch_stats(q, k, scale=0.7, is_causal=True, path="chunked").normalized
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    uniform = kmod.attention_entropy(torch.zeros(1, 1, 5, 16, device=device), torch.zeros(1, 1, 5, 16, device=device),
                                     is_causal=True)
    torch.testing.assert_close(uniform[0, 0].cpu(), torch.log(torch.arange(1.0, 6.0)))


def test_bf16_against_torch_path_same_values(device):
    q, k = _qk(device, dtype=torch.bfloat16, seed=4)
    got = kmod.attention_entropy_stats(q, k, is_causal=True, key_padding_mask=_padding(device))
    want = torch_stats(q, k, is_causal=True, key_padding_mask=_padding(device), path="chunked")
    torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.normalized, want.normalized, rtol=0, atol=1e-4)
    grads = torch.autograd.grad(got.entropy.sum(), (q, k))
    grads_ref = torch.autograd.grad(want.entropy.sum(), (q, k))
    for g, r in zip(grads, grads_ref):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), rtol=0, atol=2e-2 * float(r.abs().max()))


def test_errors(device):
    q, k = _qk(device)
    with pytest.raises(EntrotrainError, match="multiple of the key heads"):
        kmod.attention_entropy(q, k[:, :1].expand(B, 3, NK, D))
    with pytest.raises(EntrotrainError, match="share a dtype"):
        kmod.attention_entropy(q, k.to(torch.float16))
    with pytest.raises(EntrotrainError, match="key_padding_mask"):
        kmod.attention_entropy(q, k, key_padding_mask=torch.zeros(B, NK + 1, dtype=torch.bool, device=device))
    bias = torch.zeros(NQ, NK, device=device, requires_grad=True)
    with pytest.raises(EntrotrainError, match="no gradient to attn_mask"):
        kmod.attention_entropy(q, k, attn_mask=bias)
    with pytest.raises(EntrotrainError, match="window"):
        kmod.attention_entropy(q, k, window=0)


class _GridRecorder:
    """Stands in for a kernel: records the launch grid, runs nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_launch_grids_fit_cuda_limits_with_many_heads(device, monkeypatch):
    """batch · heads = 70000 > 65535, CUDA's cap on grid axes 1 and 2 (the interpreter has none): every launch keeps
    its axes 1 and 2 at most 65535 and axis 0 below 2**31."""
    grids = []
    for name in ("_attn_entropy_fwd", "_attn_entropy_bwd_dq", "_attn_entropy_bwd_dk"):
        monkeypatch.setattr(kmod, name, _GridRecorder(grids))
    q = torch.zeros(2, 35000, 1, 16, device=device, requires_grad=True)
    k = torch.zeros(2, 35000, 1, 16, device=device, requires_grad=True)
    kmod.attention_entropy(q, k).sum().backward()
    assert len(grids) == 3
    for grid in grids:
        assert 1 <= len(grid) <= 3 and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid


def test_head_dim_zero_is_uniform_attention_as_the_torch_path(device):
    """head_dim 0: every score is 0, so the entropy is ln |V_i| (the torch path's contract), not 0."""
    q = torch.zeros(B, HQ, 6, 0, device=device, requires_grad=True)
    k = torch.zeros(B, 2, 6, 0, device=device, requires_grad=True)
    kwargs = dict(is_causal=True, key_padding_mask=_padding(device, 6))
    got = kmod.attention_entropy_stats(q, k, **kwargs)
    want = torch_stats(q, k, **kwargs)
    torch.testing.assert_close(got.entropy, want.entropy)
    assert torch.equal(got.n_keys, want.n_keys) and float(got.entropy.max()) > 1.0
    torch.testing.assert_close(torch_stats(q, k, impl="triton", **kwargs).entropy, want.entropy)  # dispatched
    dq, dk = torch.autograd.grad(got.entropy.sum(), (q, k))
    assert dq.shape == q.shape and dk.shape == k.shape


def test_non_finite_q_or_k_gives_nan_for_the_queries_that_read_it(device):
    """As the torch path: a NaN in one query, or +inf in one key, makes NaN exactly the entropies that read it (a
    NaN-dropping max / clamp gave 0 there), and leaves the others as they were."""
    q, k = _qk(device, kv_heads=4, seed=8)
    q, k = q.detach().clone(), k.detach().clone()
    q[0, 0, 5, 3] = float("nan")
    k[1, 2, 7, 0] = float("inf")
    got = kmod.attention_entropy_stats(q, k, is_causal=True)
    want = torch_stats(q, k, is_causal=True, path="chunked")
    assert torch.equal(got.entropy.isnan(), want.entropy.isnan()) and 0 < int(want.entropy.isnan().sum()) < NQ * 2
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.normalized, want.normalized, rtol=1e-5, atol=1e-5, equal_nan=True)
