r"""Fused output head: per-token entropy and log-probabilities straight from hidden states, logits never whole.

For hidden states :math:`h \in \mathbb{R}^{N \times D}`, the output head :math:`W \in \mathbb{R}^{V \times D}`
(optional bias :math:`b`) and temperature :math:`T`, with :math:`z = (h W^\top + b)/T` and :math:`p =
\mathrm{softmax}(z)`:

.. math::

    H = \operatorname{lse}(z) - E_p[z], \qquad \log \pi(y) = z_y - \operatorname{lse}(z)

computed ``chunk_size`` rows at a time, so at most one ``(chunk_size, V)`` block of logits exists (float32).
The backward recomputes each block (verl's ``FusedLinearForPPO`` idea) and applies, per row,

.. math::

    \frac{\partial L}{\partial z} = g_H\,\big(-p \odot (z - E_p[z])\big) + g_{\log\pi}\,(\mathbf{1}_y - p),

then divides by :math:`T` and maps through the head: :math:`\nabla h = \delta W`, :math:`\nabla W = \delta^\top h`,
:math:`\nabla b = \sum_i \delta_i`. A Triton version with the same signature lives in ``entrotrain.kernels``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entrotrain._validation import check_int, check_real, check_shape, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import TokenStats, _check_labels, _nan_out_of_range

__all__ = ["DEFAULT_HEAD_CHUNK", "linear_entropy_and_logprobs"]

#: Rows per block: ``DEFAULT_HEAD_CHUNK × V`` float32 logits at a time (verl's FusedLinearForPPO uses 512 too).
DEFAULT_HEAD_CHUNK = 512


def _block(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, acc: torch.dtype) -> Tensor:
    z = hidden @ weight.t()  # a fresh block: every later step is in place, one (rows, V) block in all
    if bias is not None:
        z.add_(bias)
    z = z.to(acc)
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _LinearEntropyLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None, temperature: float, rows: int
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        entropy = torch.empty(n, dtype=acc, device=hidden.device)
        logprobs = torch.zeros(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        mean = torch.empty(n, dtype=acc, device=hidden.device)
        safe = None if labels is None else labels.clamp(0, weight.shape[0] - 1)  # ids >= V: checked or masked NaN
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            z = _block(hidden[start:stop], weight, bias, temperature, acc)
            m = z.amax(dim=-1, keepdim=True)
            m.masked_fill_(m == float("-inf"), 0.0)  # a row of -inf logits only: centre at 0, not -inf - -inf = nan
            z.sub_(m)  # centred in place: z - m
            if safe is not None:
                z_y = z.gather(-1, safe[start:stop, None]).squeeze(-1)  # -inf stays -inf: log-prob -inf
            e = torch.exp(z)
            l = e.sum(dim=-1)
            z.clamp_min_(torch.finfo(acc).min)  # weight exp(-inf) = 0 times the lowest finite value adds 0, not nan
            empty = l == 0  # every logit -inf: no distribution
            t = torch.where(empty, 0.0, (e.mul_(z)).sum(dim=-1) / l)  # E_p[z - m]
            log_l = torch.log(l)
            entropy[start:stop] = torch.where(empty, 0.0, log_l - t)
            m = m.squeeze(-1)
            lse[start:stop] = m + log_l  # -inf for an empty row: its log-prob is nan (as token_logprobs)
            mean[start:stop] = m + t
            if safe is not None:
                logprobs[start:stop] = z_y - log_l
            del z, e  # free this block before the next one is computed
        if labels is not None:
            logprobs = torch.where(labels >= 0, logprobs, torch.zeros((), dtype=acc, device=hidden.device))
        ctx.save_for_backward(hidden, weight, bias, labels, lse, mean)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(*(() if labels is not None else (logprobs,)))
        return entropy, logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entropy: Tensor | None, grad_logprobs: Tensor | None):  # type: ignore[override]
        hidden, weight, bias, labels, lse, mean = ctx.saved_tensors
        acc = lse.dtype
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        use_lp = grad_logprobs is not None and labels is not None
        if use_lp:
            valid_lab = labels >= 0
            safe = labels.clamp(0, weight.shape[0] - 1)
            g_lp = torch.where(valid_lab, grad_logprobs.to(acc), torch.zeros((), dtype=acc, device=lse.device))
        lse = torch.where(lse == float("-inf"), float("inf"), lse)  # a row of -inf logits only: p = 0, not nan
        for start in range(0, n, ctx.rows):
            stop = min(start + ctx.rows, n)
            # two (rows, V) blocks in all: z (reused for delta) and p, every later step in place
            z = _block(hidden[start:stop], weight, bias, ctx.temperature, acc)
            p = torch.sub(z, lse[start:stop, None]).exp_()
            z.clamp_min_(torch.finfo(acc).min)  # p = 0 at a -inf logit: p (z - E_p[z]) = 0, not 0 * -inf = nan
            if grad_entropy is not None:
                # dH/dz = -p (z - E_p[z])
                delta = z.sub_(mean[start:stop, None]).mul_(p).mul_(-grad_entropy[start:stop, None].to(acc))
                if use_lp:
                    delta.sub_(p.mul_(g_lp[start:stop, None]))
            elif use_lp:
                delta = p.mul_(-g_lp[start:stop, None])
            else:
                delta = z.zero_()
            if use_lp:  # dlogp/dz = onehot - p
                delta.scatter_add_(-1, safe[start:stop, None], g_lp[start:stop, None])
            if ctx.temperature != 1.0:
                delta.div_(ctx.temperature)
            d = delta.to(hidden.dtype)
            if need_h:
                grad_h[start:stop] = d @ weight
            if need_w:
                if d.dtype == acc:
                    grad_w.addmm_(d.t(), hidden[start:stop])
                else:
                    grad_w += (d.t() @ hidden[start:stop]).to(acc)
            if need_b:
                grad_b += delta.sum(dim=0)
            del z, p, delta, d  # free this block before the next one is computed
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def check_output_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, *, same_dtype: bool) -> None:
    """Validate an output-head call ``hidden (N, D) @ weight (V, D)ᵀ + bias (V,)``: floating tensors, matching ``D``,
    ``V >= 1``; with ``same_dtype`` also one dtype for all three. Raises :class:`EntrotrainError` naming the fix."""
    check_tensor(hidden, "hidden", floating=True, ndim=2, layout="(N, D)")
    check_tensor(weight, "weight", floating=True, ndim=2, layout="(V, D)")
    if hidden.shape[1] != weight.shape[1]:
        raise EntrotrainError(
            f"need hidden (N, D) and weight (V, D) with the same D, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if same_dtype and weight.dtype != hidden.dtype:
        raise EntrotrainError(
            f"hidden and weight must share a floating dtype, got {hidden.dtype} and {weight.dtype}; cast one, e.g. "
            "hidden.to(weight.dtype)."
        )
    if weight.shape[0] == 0:
        raise EntrotrainError(f"weight has no output row (V = 0, shape {tuple(weight.shape)}): a head needs V >= 1.")
    if bias is not None:
        check_tensor(bias, "bias", floating=True)
        check_shape(bias, (weight.shape[0],), "bias", like="(V,) of the weight")
        if same_dtype and bias.dtype != weight.dtype:
            raise EntrotrainError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}.")


def linear_entropy_and_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_HEAD_CHUNK,
    impl: str = "auto",
) -> TokenStats:
    r"""Per-token entropy and log-probabilities of ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``(N, D)`` hidden states (packed valid tokens), any floating dtype.
        weight: ``(V, D)`` output-head (``lm_head``) weight, same dtype as ``hidden``.
        labels: optional ``(N,)`` integer token ids ``< V``; negative ids give log-prob 0 and no gradient through
            it. In eager mode a label ``>= V`` raises (one max-reduction over the labels: a device sync, the labels
            are small); inside ``torch.compile`` that check is skipped (a host read breaks the graph) and such a
            token's log-prob is NaN, with no gradient, on either path.
        bias: optional ``(V,)``, the weight's dtype.
        temperature: :math:`T > 0`, finite.
        chunk_size: rows per block, an int >= 1; at most ``chunk_size × V`` float32 logits exist at once, forward
            and backward.
        impl: ``"auto"`` (the fused Triton kernel of :mod:`entrotrain.kernels` on CUDA tensors when triton is
            installed, this chunked torch path otherwise), ``"torch"`` or ``"triton"``; ``ENTROTRAIN_IMPL`` overrides.

    Returns:
        :class:`~entrotrain.functional.TokenStats` ``(entropy (N,), logprobs (N,) or None)``, float32 (float64 for
        float64 inputs), differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. ``N = 0`` gives empty
        tensors; ``D = 0`` gives ``softmax(bias / T)`` (uniform, :math:`\ln V`, without a bias). A ``-inf`` logit
        (e.g. a ``-inf`` bias entry switching a token off) has probability 0 and no gradient; a row whose logits
        are all ``-inf`` (no distribution) gets entropy 0 with zero gradient and log-probability NaN whose gradient
        takes ``p := 0`` (``onehot/T`` times the upstream gradient; 0 with no gradient for a negative label), as
        :func:`~entrotrain.functional.token_entropy` and :func:`~entrotrain.functional.token_logprobs` give on the
        materialised logits. Otherwise a row of ``hidden`` holding NaN/Inf gives NaN in that row only (a NaN
        ``weight`` or ``bias`` entry reaches every row); its gradient is NaN, even under a zero upstream gradient,
        and reaches ``weight`` and ``bias`` (the head has no token mask: pass the valid tokens only).

    Raises:
        EntrotrainError: shapes or dtypes that do not fit (named above), ``V = 0``, a label ``>= V``, a bad
            ``temperature`` or ``chunk_size``, an unknown ``impl``.
    """
    check_output_head(hidden, weight, bias, same_dtype=True)
    if labels is not None:
        check_tensor(labels, "labels", integer=True)
        check_shape(labels, (hidden.shape[0],), "labels", like="(N,) of the hidden states")
        _check_labels(labels, weight.shape[0])
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    lab = None if labels is None else labels.long()
    from entrotrain.kernels.dispatch import call_kernel, resolve_impl

    if resolve_impl(impl, hidden, weight, bias) == "triton":

        def kernel() -> TokenStats:
            from entrotrain.kernels.linear_entropy import linear_entropy_and_logprobs as triton_head

            out = triton_head(hidden, weight, lab, bias=bias, temperature=temperature, chunk_size=chunk_size)
            if labels is None:
                return TokenStats(out.entropy, None)
            return TokenStats(out.entropy, _nan_out_of_range(out.logprobs, lab, weight.shape[0]))

        def fallback() -> TokenStats:
            return linear_entropy_and_logprobs(
                hidden, weight, labels, bias=bias, temperature=temperature, chunk_size=chunk_size, impl="torch"
            )

        return call_kernel("fused-head-entropy", impl, kernel, fallback)
    entropy, logprobs = _LinearEntropyLogprobs.apply(hidden, weight, bias, lab, float(temperature), int(chunk_size))
    return TokenStats(entropy, None if lab is None else _nan_out_of_range(logprobs, lab, weight.shape[0]))
