r"""Triton kernel: entropy of ``softmax(logits / T)`` row by row, one pass over the vocabulary.

Each program owns one row and walks the vocabulary in blocks of ``BLOCK_V`` with the online recurrence kept per lane
(running max :math:`m`, :math:`l = \sum e^{z-m}`, centred :math:`t = \sum e^{z-m}(z-m)`). When the max moves from
:math:`m` to :math:`m'` with :math:`\alpha = e^{m-m'}`:

.. math:: l \leftarrow \alpha l + \sum e^{z-m'}, \qquad t \leftarrow \alpha\,(t + (m-m')\,l) + \sum e^{z-m'}(z-m')

and at the end the lanes are merged the same way and :math:`H = \ln l - t/l`,
:math:`\operatorname{lse} = m + \ln l`, :math:`E_p[z] = m + t/l` (the centred form of DESIGN §2: every term bounded,
``-inf`` / masked entries weigh exactly 0, no NaN). Reads the logits once, writes three floats per row: memory
beyond the input is ``O(rows)``.

Backward (entropy bonus): :math:`\partial H/\partial x_j = -\tfrac{1}{T} p_j (z_j - E_p[z])`, ``z = x / T``, one more
pass that writes the gradient in the logits' dtype.

bf16 / fp16 / fp32 in, float32 accumulation and output. Rows with no valid entry: entropy 0, zero gradient.
Rows holding ``nan`` or ``+inf`` give ``nan`` (as the torch path).
"""

from __future__ import annotations

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

__all__ = ["entropy_from_logits", "logits_entropy_rows"]

#: Vocabulary block per step. 4096 lanes x 3 float32 accumulators over 8 warps = 48 registers a thread on an H100.
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _online_update(m, l, t, z):
    """One step of the per-lane (max, sum, centred weighted sum) recurrence, with one ``exp`` per element.

    With :math:`d = z - m` and :math:`e = e^{-|d|}`: a new max (:math:`d > 0`) rescales the old state by
    :math:`e = e^{m - z}` and adds :math:`e^0 = 1` (centred term 0): :math:`l \\leftarrow e\\,l + 1`,
    :math:`t \\leftarrow e\\,(t - d\\,l)`; otherwise :math:`l \\leftarrow l + e`, :math:`t \\leftarrow t + e\\,d`.
    ``z = -inf`` (or masked) leaves the lane unchanged; a NaN ``z`` makes it NaN.
    """
    d = z - m
    up = d > 0
    e = tl.exp(-tl.abs(d))
    l_up = l * e + 1.0
    t_up = tl.where(l > 0, e * (t - d * l), 0.0)  # l = 0: nothing seen yet (m = -inf, d = +inf)
    l_new = tl.where(up, l_up, l + e)
    t_new = tl.where(up, t_up, t + e * d)
    m_new = tl.where(up, z, m)
    seen = z != float("-inf")
    return tl.where(seen, m_new, m), tl.where(seen, l_new, l), tl.where(seen, t_new, t)


@triton.jit
def _logits_entropy_fwd(
    x_ptr, mask_ptr, h_ptr, lse_ptr, mean_ptr,
    n_cols, stride_xr, stride_xc, stride_mr, stride_mc, inv_temp,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = (start + offs).to(tl.int64)  # int64: cols * stride passes 2**31 for a (V, rows) layout
        inside = cols < n_cols
        z = tl.load(x_row + cols * stride_xc, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        if HAS_MASK:
            keep = tl.load(mask_ptr + row * stride_mr + cols * stride_mc, mask=inside, other=0)
            z = tl.where(keep != 0, z, float("-inf"))
        m, l, t = _online_update(m, l, t, z)
    # merge the lanes
    big = tl.max(m, axis=0)  # a NaN lane has NaN l, t: the row comes out NaN
    big_safe = tl.where(big == float("-inf"), 0.0, big)
    alpha = tl.exp(m - big_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - big_safe)
    l_all = tl.sum(alpha * l, axis=0)
    t_all = tl.sum(alpha * (t + shift * l), axis=0)
    has_any = (l_all > 0) | (l_all != l_all)
    l_safe = tl.where(has_any, l_all, 1.0)
    centred_mean = t_all / l_safe
    log_l = tl.log(l_safe)
    tl.store(h_ptr + row, tl.where(has_any, log_l - centred_mean, 0.0))
    tl.store(lse_ptr + row, tl.where(has_any, big_safe + log_l, float("-inf")))
    tl.store(mean_ptr + row, tl.where(has_any, big_safe + centred_mean, 0.0))


@triton.jit
def _logits_entropy_bwd(
    x_ptr, mask_ptr, lse_ptr, mean_ptr, g_ptr, dx_ptr,
    n_cols, stride_xr, stride_xc, stride_mr, stride_mc, stride_dr, stride_dc, inv_temp,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    row_ok = lse != float("-inf")
    lse_safe = tl.where(row_ok, lse, 0.0)
    mean = tl.where(row_ok, tl.load(mean_ptr + row), 0.0)
    scale = -tl.load(g_ptr + row).to(tl.float32) * inv_temp
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = (start + offs).to(tl.int64)
        inside = cols < n_cols
        z = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=inside, other=float("-inf")).to(tl.float32)
        z = z * inv_temp
        if HAS_MASK:
            keep = tl.load(mask_ptr + row * stride_mr + cols * stride_mc, mask=inside, other=0)
            z = tl.where(keep != 0, z, float("-inf"))
        p = tl.exp(z - lse_safe)
        d = scale * p * tl.where(p > 0, z - mean, 0.0)
        d = tl.where(row_ok, d, 0.0)
        tl.store(dx_ptr + row * stride_dr + cols * stride_dc, d.to(dx_ptr.dtype.element_ty), mask=inside)


def _mask_arg(mask: Tensor | None, like: Tensor) -> tuple[Tensor, int, int]:
    if mask is None:
        return like, 0, 0  # never read (HAS_MASK=False)
    m8 = mask.view(torch.uint8)  # same element size: a view, strides (incl. broadcast zeros) kept
    return m8, m8.stride(0), m8.stride(1)


def logits_entropy_rows(logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> tuple[Tensor, ...]:
    """Forward kernel on a ``(rows, V)`` matrix (any strides): float32 ``(entropy, lse, mean)`` of ``z = x/T``."""
    n, v = logits.shape
    out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if n == 0:
        return tuple(out)
    m8, smr, smc = _mask_arg(mask, logits)
    block = min(BLOCK_V, triton.next_power_of_2(max(v, 16)))
    _logits_entropy_fwd[(n,)](
        logits, m8, out[0], out[1], out[2],
        v, logits.stride(0), logits.stride(1), smr, smc, 1.0 / temperature,
        HAS_MASK=mask is not None, BLOCK=block, num_warps=NUM_WARPS if block >= 2048 else 4,
    )
    return tuple(out)


class _TritonLogitsEntropy(torch.autograd.Function):
    """Row entropy of a ``(rows, V)`` matrix; saves the input, the mask and two floats per row."""

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor | None, temperature: float) -> Tensor:  # type: ignore[override]
        entropy, lse, mean = logits_entropy_rows(logits, mask, temperature)
        ctx.save_for_backward(logits, mask if mask is not None else torch.empty(0), lse, mean)
        ctx.has_mask, ctx.temperature, ctx.fallback = mask is not None, temperature, fallback_allowed()
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, mask, lse, mean = ctx.saved_tensors
        mask = mask if ctx.has_mask else None

        def torch_path():  # the same gradient through entrotrain.functional's torch path
            from entrotrain.functional.entropy import entropy_from_logits as torch_entropy

            with torch.enable_grad():
                x = logits.detach().requires_grad_(True)
                (dx,) = torch.autograd.grad(torch_entropy(x, -1, mask, temperature=ctx.temperature, impl="torch"),
                                            x, grad)
            return dx, None, None

        return kernel_backward("logits-entropy", ctx.fallback, lambda: _backward(ctx, logits, mask, lse, mean, grad),
                               torch_path)


def _backward(ctx, logits: Tensor, mask: Tensor | None, lse: Tensor, mean: Tensor, grad: Tensor):
    """The backward kernel: ``∂H/∂x`` of every row, in the logits' dtype."""
    n, v = logits.shape
    dx = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n and v:
        m8, smr, smc = _mask_arg(mask, logits)
        block = min(BLOCK_V, triton.next_power_of_2(max(v, 16)))
        _logits_entropy_bwd[(n,)](
            logits, m8, lse, mean, grad.contiguous(), dx,
            v, logits.stride(0), logits.stride(1), smr, smc, dx.stride(0), dx.stride(1), 1.0 / ctx.temperature,
            HAS_MASK=mask is not None, BLOCK=block, num_warps=NUM_WARPS if block >= 2048 else 4,
        )
    return dx, None, None


def entropy_from_logits(
    logits: Tensor,
    dim: int = -1,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_elements: int | None = None,
) -> Tensor:
    r"""Entropy (nats) of ``softmax(logits / temperature, dim)``, as :func:`entrotrain.functional.entropy_from_logits`.

    .. math:: H = \operatorname{lse}(z) - \sum_j \mathrm{softmax}(z)_j z_j, \qquad z = x / T

    Args:
        logits: ``(..., V, ...)`` float32, bfloat16 or float16, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        dim: the category dimension.
        mask: optional boolean tensor broadcastable to ``logits``; ``False`` entries take no part.
        temperature: :math:`T > 0`.
        chunk_elements: accepted for signature compatibility and ignored: the kernel needs no scratch.

    Returns:
        float32 tensor of ``logits.shape`` without ``dim``; differentiable,
        :math:`\partial H/\partial x_j = -p_j (z_j - E_p[z]) / T`. Rows without a valid entry: 0.
    """
    del chunk_elements
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise EntrotrainError("logits must be a floating-point torch.Tensor.")
    if logits.dim() == 0:
        raise EntrotrainError("logits must have at least one dimension (the categories), got a scalar.")
    if not temperature > 0:
        raise EntrotrainError(f"temperature must be > 0, got {temperature!r}.")
    check_kernel_inputs(logits)
    dim = dim % logits.dim()
    if mask is not None:
        if mask.dtype != torch.bool:
            raise EntrotrainError(f"mask must be boolean (True = the entry takes part), got {mask.dtype}; use .bool().")
        try:
            mask = torch.broadcast_to(mask.to(logits.device), logits.shape).movedim(dim, -1)
        except RuntimeError as err:
            raise EntrotrainError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to logits of shape {tuple(logits.shape)}."
            ) from err
    x = logits.movedim(dim, -1)
    batch_shape = x.shape[:-1]
    rows = x.reshape(batch_shape.numel(), x.shape[-1])
    if mask is not None:
        mask = mask.reshape(rows.shape)  # a view when the broadcast allows it, else one boolean copy
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return (rows.sum(-1) * 0).float().reshape(batch_shape)
    with on_device(rows):
        return _TritonLogitsEntropy.apply(rows, mask, float(temperature)).reshape(batch_shape)
