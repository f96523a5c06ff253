"""Triton fused output-head kernel (``hidden @ weightᵀ + bias`` → entropy, label log-probability) vs. float64 brute
force on materialised logits, and vs. the torch path ``entrotrain.functional.linear_entropy_and_logprobs`` when it
exists. Forward and backward (∂hidden, ∂weight, ∂bias).

Tolerances: float32 inputs: 2e-5 absolute on entropy / log-probability (logits O(10), float32 dot products of length
D), gradients 2e-5 + 1e-4 relative. bf16 inputs vs. float64 on the *same* bf16 values: forward 1e-4 (float32
accumulation; the kernel never rounds logits to bf16), gradients (bf16 out, one bf16 rounding of the logits gradient
plus the bf16 GEMM) 2e-2 relative of the largest entry.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", minversion="3.0")  # older triton: no kernels (dispatch.MIN_TRITON)

import entrotrain.kernels.linear_entropy as kmod  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402

try:
    from entrotrain.functional.policy_head import linear_entropy_and_logprobs as torch_linear
except ImportError:  # being written by another helper; the float64 brute force is the oracle meanwhile
    torch_linear = None


def _brute64(hidden, weight, labels, bias, temperature):
    """Entropy and log p(label) from float64 materialised logits (autograd-able in float64)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z / temperature
    lp = torch.log_softmax(z, -1)
    entropy = -(lp.exp() * lp).sum(-1)
    if labels is None:
        return entropy, None
    picked = lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return entropy, torch.where(labels >= 0, picked, torch.zeros_like(picked))


def _inputs(n, d, v, device, dtype=torch.float32, seed=0, weight_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * weight_scale
    bias = torch.randn(v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    labels[2] = v - 1
    return [x.to(device=device, dtype=dtype) for x in (hidden, weight, bias)] + [labels.to(device)]


@pytest.mark.parametrize("small_blocks", [False, True], ids=["default-blocks", "16-blocks"])
def test_fp32_forward_backward_against_float64(device, monkeypatch, small_blocks):
    if small_blocks:  # several row / vocab / feature tiles and vocabulary splits, partial last tiles
        for size in kmod.CONFIG:
            monkeypatch.setitem(kmod.CONFIG, size, (16, 16, 16, 4, 1))
    hidden, weight, bias, labels = _inputs(37, 40, 151, device)
    for x in (hidden, weight, bias):
        x.requires_grad_(True)
    out = kmod.linear_entropy_and_logprobs(hidden, weight, labels, bias=bias, temperature=0.7, chunk_size=16)
    ref64 = [x.detach().double().cpu().requires_grad_(True) for x in (hidden, weight, bias)]
    h64, l64 = _brute64(ref64[0], ref64[1], labels.cpu(), ref64[2], 0.7)
    assert out.entropy.dtype == torch.float32 and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.entropy.double().cpu(), h64.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logprobs.double().cpu(), l64.detach(), rtol=0, atol=2e-5)
    assert out.logprobs[1] == 0
    g = torch.Generator().manual_seed(9)
    g_h, g_l = torch.randn(37, generator=g), torch.randn(37, generator=g)
    grads = torch.autograd.grad((out.entropy * g_h.to(device)).sum() + (out.logprobs * g_l.to(device)).sum(),
                                (hidden, weight, bias))
    grads64 = torch.autograd.grad((h64 * g_h).sum() + (l64 * g_l).sum(), ref64)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=2e-5)


def test_entropy_only_no_bias_near_one_hot(device):
    hidden, weight, _, _ = _inputs(19, 24, 70, device, seed=1, weight_scale=4.0)  # logits O(20): near one-hot
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = kmod.linear_entropy_and_logprobs(hidden, weight)
    assert out.logprobs is None
    h64, _ = _brute64(hidden.detach().double().cpu(), weight.detach().double().cpu(), None, None, 1.0)
    assert torch.isfinite(out.entropy).all() and float(h64.min()) < 1e-6  # some rows really are one-hot
    torch.testing.assert_close(out.entropy.double().cpu(), h64, rtol=0, atol=1e-4)
    dh, dw = torch.autograd.grad(out.entropy.sum(), (hidden, weight))
    ref = [x.detach().double().cpu().requires_grad_(True) for x in (hidden, weight)]
    want = torch.autograd.grad(_brute64(ref[0], ref[1], None, None, 1.0)[0].sum(), ref)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(dh.double().cpu(), want[0], rtol=1e-4, atol=5e-5)  # float32 logits of size ~20
    torch.testing.assert_close(dw.double().cpu(), want[1], rtol=1e-4, atol=5e-5)


def test_bf16_against_float64_of_same_values(device):
    hidden, weight, bias, labels = _inputs(21, 32, 90, device, dtype=torch.bfloat16, seed=2)
    for x in (hidden, weight, bias):
        x.requires_grad_(True)
    out = kmod.linear_entropy_and_logprobs(hidden, weight, labels, bias=bias)
    ref64 = [x.detach().double().cpu().requires_grad_(True) for x in (hidden, weight, bias)]
    h64, l64 = _brute64(ref64[0], ref64[1], labels.cpu(), ref64[2], 1.0)
    torch.testing.assert_close(out.entropy.double().cpu(), h64.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.logprobs.double().cpu(), l64.detach(), rtol=0, atol=1e-4)
    grads = torch.autograd.grad(out.entropy.sum() + out.logprobs.sum(), (hidden, weight, bias))
    grads64 = torch.autograd.grad(h64.sum() + l64.sum(), ref64)
    for got, want in zip(grads, grads64):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=2e-2 * float(want.abs().max()))


@pytest.mark.skipif(torch_linear is None, reason="entrotrain.functional.policy_head not written yet")
def test_matches_torch_path(device):
    hidden, weight, bias, labels = _inputs(13, 16, 50, device, seed=3)
    got = kmod.linear_entropy_and_logprobs(hidden, weight, labels, bias=bias, temperature=1.3)
    want = torch_linear(hidden, weight, labels, bias=bias, temperature=1.3, impl="torch")
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


def test_errors(device):
    hidden, weight, bias, labels = _inputs(4, 8, 20, device)
    with pytest.raises(EntrotrainError, match="share the last dim"):
        kmod.linear_entropy_and_logprobs(hidden, weight[:, :4])
    with pytest.raises(EntrotrainError, match="share a dtype"):
        kmod.linear_entropy_and_logprobs(hidden, weight.to(torch.bfloat16))
    with pytest.raises(EntrotrainError, match="labels"):
        kmod.linear_entropy_and_logprobs(hidden, weight, labels[:3])
    with pytest.raises(EntrotrainError, match="bias"):
        kmod.linear_entropy_and_logprobs(hidden, weight, bias=bias[:5])
    empty = kmod.linear_entropy_and_logprobs(hidden[:0], weight, labels[:0])
    assert empty.entropy.shape == (0,) and empty.logprobs.shape == (0,)


def test_a_vocabulary_split_that_is_all_minus_inf(device, monkeypatch):
    """A bias of -inf over a whole vocabulary split (padded vocabulary entries switched off): that split's partial
    state is m = -inf, l = 0, and merging it must weigh 0 (not (m - max) * l = -inf * 0 = NaN)."""
    monkeypatch.setattr(kmod, "_sm_count", lambda device: 4)  # 4 vocabulary splits of 16 entries each
    for size in kmod.CONFIG:
        monkeypatch.setitem(kmod.CONFIG, size, (16, 16, 16, 4, 1))
    hidden, weight, bias, labels = _inputs(5, 16, 64, device, seed=3)
    bias[48:] = float("-inf")
    labels[0] = 60  # a label on a switched-off entry: log-probability -inf, as the float64 oracle
    hidden.requires_grad_(True)
    out = kmod.linear_entropy_and_logprobs(hidden, weight, labels, bias=bias)
    assert torch.isfinite(torch.autograd.grad(out.entropy.sum(), hidden, retain_graph=True)[0]).all()
    _, lp64 = _brute64(hidden.double().cpu(), weight.double().cpu(), labels.cpu(), bias.double().cpu(), 1.0)
    lp_all = torch.log_softmax(hidden.double().cpu() @ weight.double().cpu().T + bias.double().cpu(), -1)
    h64 = -torch.where(lp_all > float("-inf"), lp_all.exp() * lp_all, 0.0).sum(-1)  # 0 log 0 = 0
    torch.testing.assert_close(out.entropy.double().cpu(), h64, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logprobs.double().cpu(), lp64, rtol=0, atol=2e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # -inf x 0 in a tile's padding
@pytest.mark.parametrize("case", ["bias-all-minus-inf", "one-row-all-minus-inf"])
def test_rows_whose_logits_are_all_minus_inf(device, monkeypatch, case):
    """Every logit of a row -inf (no distribution): entropy 0 with zero gradient and log-probability NaN (0 for a
    negative label), as the torch path and token_entropy / token_logprobs give; the other rows are untouched. Before,
    the kernel's split merge gave NaN (exp(-inf - -inf)) and its backward NaN gradients."""
    monkeypatch.setattr(kmod, "_sm_count", lambda device: 4)  # several vocabulary splits
    for size in kmod.CONFIG:
        monkeypatch.setitem(kmod.CONFIG, size, (16, 16, 16, 4, 1))
    hidden, weight, bias, labels = _inputs(5, 16, 40, device, seed=4)
    weight = weight.abs()  # a -inf in hidden[:, 0] makes every logit of that row -inf
    labels[3] = -100
    if case == "bias-all-minus-inf":
        bias[:] = float("-inf")
        empty = [0, 1, 2, 3, 4]
    else:
        bias[30:] = float("-inf")
        hidden[2, 0] = float("-inf")
        empty = [2]
    hidden.requires_grad_(True)
    bias.requires_grad_(True)
    out = kmod.linear_entropy_and_logprobs(hidden, weight, labels, bias=bias, chunk_size=2)
    want = torch_linear(hidden, weight, labels, bias=bias, chunk_size=2, impl="torch")
    assert (out.entropy[empty] == 0).all()
    assert all(out.logprobs[i].isnan() == (labels[i] >= 0) for i in empty)
    torch.testing.assert_close(out.entropy, want.entropy, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logprobs, want.logprobs, rtol=0, atol=2e-5, equal_nan=True)
    got = torch.autograd.grad(out.entropy.sum(), (hidden, bias), retain_graph=True)
    ref = torch.autograd.grad(want.entropy.sum(), (hidden, bias))
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5)
    assert (got[0][empty] == 0).all()
    # the log-prob gradient: token_logprobs' on the materialised logits (p := 0 where there is no distribution,
    # zero for the padding row; a -inf entry of hidden makes the weight's gradient non-finite on both sides)
    from entrotrain.functional import token_logprobs

    upstream = torch.linspace(0.5, 1.5, 5, device=hidden.device)
    ref_in = [x.detach().clone().requires_grad_(True) for x in (hidden, bias)]
    lp = token_logprobs(ref_in[0] @ weight.t() + ref_in[1], labels)
    torch.testing.assert_close(out.logprobs, lp, rtol=0, atol=2e-5, equal_nan=True)
    got = torch.autograd.grad(out.logprobs, (hidden, bias), upstream)
    for g, r in zip(got, torch.autograd.grad(lp, ref_in, upstream)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5, equal_nan=True)
    assert (got[0][3] == 0).all()  # the padding row


def test_bf16_weight_gradient_sums_the_row_chunks_in_float32(device):
    """bf16 inputs, 256 rows in 32 backward chunks of 8 (then one chunk: 2 row blocks x 2 vocabulary blocks): ∂W
    within 6e-3 of max |∂W| of float64 on the same bf16 values (4.5e-3; one chunk of all rows: 4.1e-3). Summed
    in bf16 across the 32 chunks it was 1.1e-2 off."""
    hidden, weight, _, labels = _inputs(256, 32, 160, device, dtype=torch.bfloat16, seed=5)
    weight.requires_grad_(True)
    ref = weight.detach().double().cpu().requires_grad_(True)
    h64, l64 = _brute64(hidden.double().cpu(), ref, labels.cpu(), None, 1.0)
    want = torch.autograd.grad(h64.sum() + l64.sum(), ref)[0]
    for chunk in (8, 256):
        out = kmod.linear_entropy_and_logprobs(hidden, weight, labels, chunk_size=chunk)
        got = torch.autograd.grad(out.entropy.sum() + out.logprobs.sum(), weight)[0]
        assert got.dtype == torch.bfloat16
        err = float((got.double().cpu() - want).abs().max() / want.abs().max())
        assert err < 6e-3, (chunk, err)


class _GridRecorder:
    """Stands in for a kernel: records the launch grid, runs nothing."""

    def __init__(self, grids, name):
        self.grids, self.name = grids, name

    def __getitem__(self, grid):
        self.grids.append((self.name, tuple(grid)))
        return lambda *args, **kwargs: None


def test_launch_grids_fit_cuda_limits_with_a_large_vocabulary(device, monkeypatch):
    """cdiv(V, BLOCK_V) = 65537 vocabulary blocks (BLOCK_V = 16 here; V > 65535 · 128 ≈ 8.4M with the real bf16
    tiles): every launch keeps grid axes 1 and 2 at most 65535 (CUDA's cap; the interpreter has none) and axis 0
    below 2**31, and the backward launches one program per (row block, vocabulary block). The backward put the
    vocabulary blocks on axis 1."""
    for size in kmod.CONFIG:
        monkeypatch.setitem(kmod.CONFIG, size, (16, 16, 16, 4, 1))
    grids = []
    for name in ("_linear_entropy_fwd", "_linear_entropy_bwd"):
        monkeypatch.setattr(kmod, name, _GridRecorder(grids, name))
    v = 16 * 65537
    weight = torch.zeros(1, 16, device=device).expand(v, 16)  # no V x D storage: the kernels do not run
    hidden = torch.zeros(20, 16, device=device, requires_grad=True)
    kmod.linear_entropy_and_logprobs(hidden, weight, chunk_size=20).entropy.sum().backward()
    assert [name for name, _ in grids] == ["_linear_entropy_fwd", "_linear_entropy_bwd"]
    for _, grid in grids:
        assert 1 <= len(grid) <= 3 and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid
    assert grids[1][1] == (2 * 65537,)  # 2 row blocks of 16 x 65537 vocabulary blocks
