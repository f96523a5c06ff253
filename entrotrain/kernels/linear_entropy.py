r"""Triton kernel: fused output head, ``hidden @ weightᵀ (+ bias)`` → per-token entropy and label log-probability.

The logits :math:`z = (h W^\top + b)/T` are never materialised in the forward: a program owns ``BLOCK_N`` rows and a
contiguous range of the vocabulary (``splits`` ranges run in parallel when there are few rows), computes one
``BLOCK_N × BLOCK_V`` tile of logits at a time with ``tl.dot`` (float32 accumulation; IEEE float32 for float32
inputs, tensor cores for bf16 / fp16) and folds it into the online recurrence per row:

.. math::

    m' = \max(m, \max_j z_j),\quad l \leftarrow e^{m-m'} l + \sum_j e^{z_j-m'},\quad
    t \leftarrow e^{m-m'} (t + (m-m') l) + \sum_j e^{z_j-m'} (z_j - m')

plus the label's logit :math:`z_y`. The ``splits`` partial states are merged in float32 (``O(splits·N)``):
:math:`H = \ln l - t/l`, :math:`\operatorname{lse} = m + \ln l`, :math:`\log p_y = z_y - \operatorname{lse}`.
This is the online ``(max, Σexp, Σp·z)`` of verl's ``linear_cross_entropy`` (rl_entropy.md §5), in centred form.

Backward, chunked over rows (``chunk_size`` rows at a time, memory ``chunk_size × V`` in the input dtype): a kernel
recomputes each logits tile and writes

.. math:: \frac{\partial L}{\partial (hW^\top)_{ij}} = \frac{1}{T}\Big[-g^H_i\, p_{ij} (z_{ij} - E_{p_i}[z])
          + g^{\log p}_i (\mathbb 1[j = y_i] - p_{ij})\Big]

then cuBLAS does ``∂h = G W`` and ``∂W += Gᵀ h`` (``∂b += Σ_i G_i``), summed over the chunks in float32 and cast
to the weight's dtype once. The backward kernel runs on a 1-D grid, so any vocabulary launches.

Labels: negative ids (``-100`` padding) give log-probability 0 and no gradient; ids ``>= V`` are clamped to ``V-1``
here (:func:`entrotrain.functional.linear_entropy_and_logprobs` raises on them in eager mode and makes their
log-probability NaN under ``torch.compile``). A ``-inf`` logit has probability 0 and no gradient; a row whose logits
are all ``-inf`` (no distribution) gets entropy 0 with zero gradient and log-probability NaN with the gradient of
``p := 0`` (``onehot/T``), as the torch path (:func:`entrotrain.functional.linear_entropy_and_logprobs`) and
``token_entropy`` / ``token_logprobs``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError
from entrotrain.kernels.dispatch import (
    check_kernel_inputs,
    fallback_allowed,
    kernel_backward,
    on_device,
    require_triton,
)

require_triton()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["LinearEntropy", "linear_entropy_and_logprobs"]

#: ``(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)`` by element size on an H100 (sm_90) (ptxas, triton 3.9: 98304 B
#: shared memory, 255 registers and an 8 B spill a thread for the bf16 forward; ``benchmarks/kernel_compile_check.py``):
#: 2 bytes (bf16 / fp16): a 128 x 128 float32 accumulator on tensor cores; 4 bytes (fp32, IEEE dots, no TF32): small
#: tiles. Shrunk to the problem.
CONFIG = {2: (128, 128, 64, 8, 3), 4: (32, 64, 32, 4, 1)}
#: Rows per backward chunk: the ``chunk × V`` logits-gradient buffer (311 MiB at V = 151936 in bf16).
DEFAULT_CHUNK_SIZE = 1024


class LinearEntropy(NamedTuple):
    """Per-token ``entropy (N,)`` and ``logprobs (N,)`` (``None`` without labels), float32."""

    entropy: Tensor
    logprobs: Tensor | None


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, dim, s_hn, s_hd, s_wv, s_wd, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``(h[rows] @ w[cols]ᵀ + b[cols]) / T`` in float32, ``-inf`` outside the vocabulary."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + offs_d
        d_ok = ds < dim
        a = tl.load(h_ptr + rows[:, None] * s_hn + ds[None, :] * s_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * s_wv + ds[:, None] * s_wd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_UPCAST:  # Triton's CPU interpreter (3.9) gets bf16 tl.dot wrong; exact bf16 products fit float32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _linear_entropy_fwd(
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    n_rows, n_vocab, dim, s_hn, s_hd, s_wv, s_wd, inv_temp, vocab_per_split,
    HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows64 = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # every pointer offset is built in int64
    row_ok = rows64 < n_rows
    if HAS_LABELS:
        labels = tl.load(y_ptr + rows64, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    v_lo = pid_s.to(tl.int64) * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, n_vocab)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols, col_ok, dim, s_hn, s_hd, s_wv, s_wd,
                         inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        c = tl.where(e > 0, z - m_safe[:, None], 0.0)
        t = alpha * (t + shift * l) + tl.sum(e * c, axis=1)
        l = alpha * l + tl.sum(e, axis=1)
        m = m_new
        if HAS_LABELS:
            zy += tl.sum(tl.where((cols[None, :] == labels[:, None]) & col_ok[None, :], z, 0.0), axis=1)
    base = pid_s.to(tl.int64) * n_rows + rows64
    stride = n_splits.to(tl.int64) * n_rows
    tl.store(part_ptr + base, m, mask=row_ok)
    tl.store(part_ptr + stride + base, l, mask=row_ok)
    tl.store(part_ptr + 2 * stride + base, t, mask=row_ok)
    tl.store(part_ptr + 3 * stride + base, zy, mask=row_ok)


@triton.jit
def _linear_entropy_bwd(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, mean_ptr, gh_ptr, gl_ptr, dz_ptr,
    n_rows, n_vocab, dim, s_hn, s_hd, s_wv, s_wd, s_dn, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    # a 1-D grid, row blocks fastest (the programs that share a weight tile are adjacent): no grid axis caps V
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(n_rows, BLOCK_N)
    rows64 = (pid % row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = (pid // row_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows64 < n_rows
    col_ok = cols64 < n_vocab
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, dim, s_hn, s_hd, s_wv, s_wd, inv_temp,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    mean = tl.load(mean_ptr + rows64, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows64, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # 0 outside the vocabulary
    d = -g_h[:, None] * p * tl.where(p > 0, z - mean[:, None], 0.0)
    if HAS_LABELS:
        labels = tl.load(y_ptr + rows64, mask=row_ok, other=-1)
        g_l = tl.load(gl_ptr + rows64, mask=row_ok, other=0.0)
        g_l = tl.where(labels >= 0, g_l, 0.0)
        onehot = (cols64[None, :] == labels[:, None]).to(tl.float32)
        d += g_l[:, None] * (onehot - p)
    d = d * inv_temp
    tl.store(dz_ptr + rows64[:, None] * s_dn + cols64[None, :], d.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(dtype: torch.dtype, n: int, v: int, d: int) -> tuple[int, int, int, int, int]:
    """Tiles for this dtype, shrunk (to >= 16, ``tl.dot``'s minimum) when the problem is smaller."""
    bn0, bv0, bd0, warps, stages = CONFIG[2 if dtype in (torch.bfloat16, torch.float16) else 4]
    fit = lambda x, cap: min(cap, max(16, triton.next_power_of_2(x)))  # noqa: E731
    bn, bv, bd = fit(n, bn0), fit(v, bv0), fit(d, bd0)
    return bn, bv, bd, (warps if (bn, bv) == (bn0, bv0) else 4), stages


def _precision(dtype: torch.dtype) -> str:
    """IEEE float32 dots for float32 inputs (as torch's default matmul: no TF32), tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for bf16 / fp16 (tensor cores, fp32 accumulate)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _forward(hidden, weight, bias, labels, temperature):
    n, dim = hidden.shape
    v = weight.shape[0]
    bn, bv, bd, warps, stages = _blocks(hidden.dtype, n, v, dim)
    row_blocks = triton.cdiv(n, bn)
    v_blocks = triton.cdiv(v, bv)
    splits = max(1, min(v_blocks, triton.cdiv(2 * _sm_count(hidden.device), row_blocks)))
    per_split = triton.cdiv(v_blocks, splits) * bv
    splits = triton.cdiv(v, per_split)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    _linear_entropy_fwd[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, labels if labels is not None else hidden, part,
        n, v, dim, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature, per_split,
        HAS_BIAS=bias is not None, HAS_LABELS=labels is not None,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, DOT_PRECISION=_precision(hidden.dtype),
        DOT_UPCAST=hidden.device.type != "cuda",
        num_warps=warps, num_stages=stages,
    )
    m, l, t, zy = part.unbind(0)  # (splits, n) each; m = -inf (l = t = 0) where a split's logits are all -inf
    big = m.amax(0)
    big = torch.where(big == float("-inf"), 0.0, big)  # a row whose logits are all -inf: centre at 0, not nan
    alpha = torch.exp(m - big)
    shift = torch.where(m == float("-inf"), 0.0, m - big)  # not (-inf) * 0 = nan for such a split
    l_all = (alpha * l).sum(0)
    t_all = (alpha * (t + shift * l)).sum(0)
    log_l = torch.log(l_all)
    empty = l_all == 0  # every logit of the row is -inf: no distribution (a nan row keeps l = nan)
    centred_mean = torch.where(empty, 0.0, t_all / l_all)
    entropy = torch.where(empty, 0.0, log_l - centred_mean)  # as entropy_from_logits / token_entropy: 0
    lse = big + log_l  # -inf for such a row: its log-probability is -inf - (-inf) = nan, as token_logprobs
    mean = big + centred_mean
    logprobs = None
    if labels is not None:
        logprobs = torch.where(labels >= 0, zy.sum(0) - lse, 0.0)
    return entropy, logprobs, lse, mean


class _TritonLinearEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size):  # type: ignore[override]
        entropy, logprobs, lse, mean = _forward(hidden, weight, bias, labels, temperature)
        # a row whose logits are all -inf has lse = -inf; +inf makes its p = exp(z - lse) = 0 (not exp(nan)) in backward
        lse = torch.where(lse == float("-inf"), float("inf"), lse)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, mean)
        ctx.temperature, ctx.chunk_size, ctx.fallback = temperature, chunk_size, fallback_allowed()
        if logprobs is None:
            logprobs = torch.zeros_like(entropy)
            ctx.mark_non_differentiable(logprobs)
        return entropy, logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_entropy, g_logprobs):  # type: ignore[override]
        saved = ctx.saved_tensors
        return kernel_backward("fused-head-entropy", ctx.fallback,
                               lambda: _backward(ctx, *saved, g_entropy, g_logprobs),
                               lambda: _torch_backward(ctx, *saved[:4], g_entropy, g_logprobs))


def _torch_backward(ctx, hidden, weight, bias, labels, g_entropy, g_logprobs):
    """The same gradients through the torch path (:func:`entrotrain.functional.linear_entropy_and_logprobs`)."""
    from entrotrain.functional.policy_head import linear_entropy_and_logprobs as torch_head

    wanted = [x is not None and need for x, need in zip((hidden, weight, bias), ctx.needs_input_grad[:3])]
    with torch.enable_grad():
        h, w, b = (x.detach().requires_grad_(True) if want else x for x, want in zip((hidden, weight, bias), wanted))
        out = torch_head(h, w, None if labels is None else labels.long(), bias=b, temperature=ctx.temperature,
                         chunk_size=ctx.chunk_size, impl="torch")
        outputs = [out.entropy]
        grads = [torch.zeros_like(out.entropy) if g_entropy is None else g_entropy]
        if out.logprobs is not None and g_logprobs is not None:
            outputs.append(out.logprobs)
            grads.append(g_logprobs)
        inputs = [x for x, want in zip((h, w, b), wanted) if want]
        found = iter(torch.autograd.grad(outputs, inputs, grads, materialize_grads=True))
    return (*(next(found) if want else None for want in wanted), None, None, None)


def _bwd_grid(rows: int, v: int, block_n: int, block_v: int) -> tuple[int]:
    """The backward's launch grid: one axis of ``cdiv(rows, BLOCK_N) · cdiv(V, BLOCK_V)`` programs (CUDA allows
    2**31 - 1 on axis 0 but 65535 on axes 1 and 2, which held the vocabulary blocks: V <= 65535 · 128 ≈ 8.4M)."""
    return (triton.cdiv(rows, block_n) * triton.cdiv(v, block_v),)


def _backward(ctx, hidden, weight, bias, labels, lse, mean, g_entropy, g_logprobs):
    """The backward kernel over row chunks, then cuBLAS for ``∂h``, ``∂W`` and ``∂b``.

    ``∂W`` and ``∂b`` are summed over the row chunks in float32 and cast to the weight's dtype once. For bf16 inputs,
    ``N = 2048`` rows in 128 chunks of 16 (``D = 32``, ``V = 64``; :func:`linear_entropy_and_logprobs` under Triton's
    interpreter, against float64 on the same bf16 values), the largest error of ``∂W`` relative to ``max |∂W|`` was
    2.5e-2 when the sum ran in bf16; it is now 4.1e-3, as with one chunk of all 2048 rows (what is left: the bf16
    logits gradient and the final cast; one bf16 rounding of the exact gradient alone is 2.5e-3). The price: a float32
    ``V × D`` buffer (2.3 GiB at V = 151936, D = 4096) and one ``V × D`` product per chunk in the input dtype, as the
    torch path holds.
    """
    n, dim = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g_entropy = torch.zeros_like(lse) if g_entropy is None else g_entropy.float().contiguous()
    g_logprobs = torch.zeros_like(lse) if g_logprobs is None else g_logprobs.float().contiguous()
    d_hidden = torch.empty_like(hidden) if need_h else None
    # float32 sums over the row chunks, cast once at the end (a bf16 sum lost ~6x the accuracy: see _backward)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    d_bias = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
    chunk = max(1, min(ctx.chunk_size, n))
    dz = torch.empty(chunk, v, dtype=hidden.dtype, device=hidden.device)
    bn, bv, bd, warps, stages = _blocks(hidden.dtype, chunk, v, dim)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        h = hidden[start:stop]
        y = labels[start:stop] if labels is not None else None
        _linear_entropy_bwd[_bwd_grid(rows, v, bn, bv)](
            h, weight, bias if bias is not None else h, y if y is not None else h,
            lse[start:stop], mean[start:stop], g_entropy[start:stop], g_logprobs[start:stop], dz,
            rows, v, dim, h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            1.0 / ctx.temperature,
            HAS_BIAS=bias is not None, HAS_LABELS=y is not None,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, DOT_PRECISION=_precision(hidden.dtype),
            DOT_UPCAST=hidden.device.type != "cuda",
            num_warps=warps, num_stages=stages,
        )
        g = dz[:rows]
        if need_h:
            torch.matmul(g, weight, out=d_hidden[start:stop])
        if need_w:
            if g.dtype == torch.float32:
                d_weight.addmm_(g.t(), h)
            else:  # this chunk's product (float32 accumulation inside the GEMM) rounded once, summed in float32
                d_weight += torch.mm(g.t(), h)
        if need_b:
            d_bias += g.float().sum(0)
    if need_w:
        d_weight = d_weight.to(weight.dtype)
    if need_b:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias, None, None, None


def linear_entropy_and_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LinearEntropy:
    r"""Entropy and label log-probability of ``softmax((hidden @ weightᵀ + bias) / T)`` without the logits.

    .. math:: H_i = \operatorname{lse}(z_i) - \sum_j p_{ij} z_{ij}, \qquad \log p_{i y_i} = z_{i y_i} -
              \operatorname{lse}(z_i), \qquad z_i = (W h_i + b)/T

    Args:
        hidden: ``(N, D)`` float32 / bfloat16 / float16.
        weight: ``(V, D)`` output head, same dtype as ``hidden``.
        labels: optional ``(N,)`` integer ids; negative ids give log-probability 0.
        bias: optional ``(V,)``.
        temperature: :math:`T > 0`.
        chunk_size: rows per backward chunk (the backward holds one ``chunk_size × V`` gradient buffer).

    Returns:
        :class:`LinearEntropy` ``(entropy, logprobs)``, float32 ``(N,)``; ``logprobs`` is ``None`` without labels.
        Differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise EntrotrainError(f"{name} must be a 2-D floating tensor, got {getattr(x, 'shape', type(x))}.")
    if hidden.shape[1] != weight.shape[1]:
        raise EntrotrainError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must share the last dim (N, D) x (V, D)."
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise EntrotrainError(f"hidden, weight (and bias) must share a dtype, got {hidden.dtype} and {weight.dtype}.")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise EntrotrainError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}.")
    if not temperature > 0:
        raise EntrotrainError(f"temperature must be > 0, got {temperature!r}.")
    if weight.shape[0] == 0:
        raise EntrotrainError("weight has no rows: the vocabulary must not be empty.")
    if labels is not None:
        if labels.shape != hidden.shape[:1] or labels.is_floating_point():
            raise EntrotrainError(
                f"labels must be integer ids of shape ({hidden.shape[0]},), got {tuple(labels.shape)} {labels.dtype}."
            )
        labels = labels.to(device=hidden.device, dtype=torch.int32).clamp(max=weight.shape[0] - 1).contiguous()
    check_kernel_inputs(hidden, weight, bias)
    if hidden.shape[0] == 0:
        zero = (hidden.sum(-1) * 0).float()
        return LinearEntropy(zero, None if labels is None else zero.clone())
    with on_device(hidden):
        entropy, logprobs = _TritonLinearEntropy.apply(
            hidden, weight, bias, labels, float(temperature), int(chunk_size)
        )
    return LinearEntropy(entropy, logprobs if labels is not None else None)
