r"""A tiny mixture-of-experts classifier for 8×8 digits: tokens → residual top-k MoE feed-forward layers → mean pool.

Each image is cut into ``n_tokens`` tokens of ``64 / n_tokens`` pixels (8 = one token per pixel row), embedded with a
learned position, and passed through ``n_layer`` pre-LN residual MoE layers. In layer :math:`\ell`, for a token
:math:`h` (after LayerNorm), the router gives logits :math:`z = W_g h \in \mathbb{R}^E`, probabilities
:math:`p = \mathrm{softmax}(z)` (float32) and the top-k experts :math:`T(h)`; the layer adds

.. math::

    y = \sum_{e \in T(h)} g_e\, \mathrm{FFN}_e(h), \qquad g_e = p_e \ \text{(Switch, Qwen2-MoE, OLMoE)}
    \quad\text{or}\quad g_e = p_e / \textstyle\sum_{j\in T(h)} p_j \ \text{(``renormalize``, Mixtral)}.

With ``top_k=1`` and ``renormalize=True`` the gate is always 1 and the router gets no gradient from the task loss:
keep ``renormalize=False`` for top-1 (Fedus et al. 2021, "Switch Transformers", eq. 2). Experts are computed densely
(every expert on every token, then gated: the same output as a sparse dispatch, cheaper at this size).

Module names: ``layers.{l}.router`` (an ``nn.Linear`` whose output is the ``(rows, E)`` router logits: a tap's glob
``model.layers.*.router``), ``layers.{l}.norm``, ``embed``, ``head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MoELayer", "TinyMoE"]


class MoELayer(nn.Module):
    """Pre-LN residual top-k MoE feed-forward layer: ``x + Σ_{e∈top-k} g_e FFN_e(LN(x))``.

    Shapes: ``forward(x)``: ``x`` ``(rows, d)``; returns ``(x + y, router_logits)`` with logits ``(rows, E)``.
    """

    def __init__(
        self, d_model: int, d_hidden: int, n_experts: int, top_k: int, renormalize: bool = False,
        router_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.top_k, self.renormalize = top_k, renormalize
        self.norm = nn.LayerNorm(d_model)
        self.router = nn.Linear(d_model, n_experts, bias=False)
        if router_init_std is not None:
            nn.init.normal_(self.router.weight, std=router_init_std)
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) / d_model**0.5)
        self.b1 = nn.Parameter(torch.zeros(n_experts, d_hidden))
        self.w2 = nn.Parameter(torch.randn(n_experts, d_hidden, d_model) / d_hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(n_experts, d_model))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.norm(x)
        logits = self.router(h)
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p).to(h.dtype)  # (rows, E), top-k entries non-zero
        hidden = F.gelu(torch.einsum("rd,edh->reh", h, self.w1) + self.b1)
        out = torch.einsum("reh,ehd->red", hidden, self.w2) + self.b2  # every expert on every token
        return x + torch.einsum("re,red->rd", gates, out), logits


class TinyMoE(nn.Module):
    """Digits → ``n_tokens`` tokens → ``n_layer`` :class:`MoELayer` → LayerNorm → mean over tokens → linear head.

    Args:
        in_features: pixels per image (64).
        n_tokens: tokens per image (must divide ``in_features``); 1 routes whole images.
        d_model, d_hidden: token width and expert hidden width.
        n_layer: MoE layers.
        n_experts: experts ``E`` per layer.
        top_k: experts per token.
        renormalize: renormalise the top-k gates to sum 1 (Mixtral); off = raw softmax gates (Switch).
        router_init_std: normal init of the router weights with this std (default: ``nn.Linear``'s uniform).
        num_classes: classes ``K``.

    Shapes:
        ``forward(x)``: ``x`` ``(B, ...)`` with ``in_features`` values; returns ``(logits (B, K), router_logits)``
        where ``router_logits`` is a tuple of ``n_layer`` tensors ``(B·n_tokens, E)`` (row ``b·n_tokens + t``),
        as HF MoE models return with ``output_router_logits=True``.
    """

    def __init__(
        self, in_features: int = 64, n_tokens: int = 8, d_model: int = 32, d_hidden: int = 64, n_layer: int = 2,
        n_experts: int = 8, top_k: int = 1, renormalize: bool = False, router_init_std: float | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if n_tokens < 1 or in_features % n_tokens:
            raise ValueError(f"n_tokens must divide in_features={in_features}, got {n_tokens}")
        if min(d_model, d_hidden, n_layer, n_experts) < 1:
            raise ValueError("d_model, d_hidden, n_layer and n_experts must be positive")
        self.in_features, self.n_tokens = in_features, n_tokens
        self.embed = nn.Linear(in_features // n_tokens, d_model)
        self.pos = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)
        self.layers = nn.ModuleList(
            MoELayer(d_model, d_hidden, n_experts, top_k, renormalize, router_init_std) for _ in range(n_layer)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} values per sample, got {x.shape[1]}")
        b = len(x)
        h = (self.embed(x.reshape(b, self.n_tokens, -1)) + self.pos).reshape(b * self.n_tokens, -1)
        router_logits = []
        for layer in self.layers:
            h, logits = layer(h)
            router_logits.append(logits)
        pooled = self.norm(h).reshape(b, self.n_tokens, -1).mean(1)
        return self.head(pooled), tuple(router_logits)
