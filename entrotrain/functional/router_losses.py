r"""Auxiliary losses of mixture-of-experts routers: load balancing (Switch / HF), ST-MoE z-loss, DynMoLE's Tsallis loss.

**Input convention** (every function here). ``router_logits`` is what HF MoE models return with
``output_router_logits=True``: one raw pre-softmax tensor ``(rows, E)`` per MoE layer (a tuple or list), or one
``(rows, E)`` tensor for a single layer. ``mask`` (optional) is a *keep* mask — ``bool`` True = a real token, or HF's
integer 0/1 ``attention_mask`` — with ``rows`` elements, e.g. ``(batch, seq)`` flattened row-major as HF flattens the
hidden states; the same mask applies to every layer (then every layer must have ``rows`` rows). Masked rows are
replaced by zeros before any arithmetic: NaN/Inf there never reaches a value or a gradient. Statistics are **pooled
across layers** (one :math:`f` and :math:`P` over all layers' rows, as HF and DynMoLE do), unless stated.

With :math:`p(x) = \mathrm{softmax}(z(x))` over the :math:`E` experts and the set :math:`X` of valid rows of all
layers (:math:`T = |X|`):

- :func:`load_balancing_loss` — HF transformers' ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, OLMoE), the
  Switch Transformer loss (Fedus et al. 2021, eq. 4–6) generalised to top-k:
  :math:`L = E \sum_i f_i P_i`, :math:`f_i = \frac1T \sum_{x} \mathbf 1[i \in \mathrm{topk}(p(x))]`,
  :math:`P_i = \frac1T\sum_x p_i(x)`. Its value at perfect balance is **top_k** (:math:`\sum_i f_i = k`);
  ``normalize=True`` divides by ``top_k`` (balanced value 1). **Switch** is ``top_k=1`` (top-1 dispatch fraction,
  balanced value 1); HF's SwitchTransformers ``mean(f·P)·E²`` per group equals it for one group per layer, with
  ``per_layer=True`` (a mean of per-layer losses instead of pooled statistics).
- :func:`router_z_loss` — ST-MoE (Zoph et al. 2022, eq. 5): :math:`L_z = \frac1T\sum_x (\log\sum_j e^{z_j(x)})^2`,
  on logits (float32), pooled over layers' valid rows; finite logits whose loss overflows (|lse| > ~1.8e19 in
  float32: a diverged router) give ``+inf`` with a finite gradient, and no host sync.
- :func:`dynmole_router_loss` — DynMoLE (Li et al. 2025; code ``mikecovlee/DynMoLE`` @9354b27,
  ``adapters/dynmole/model.py::_dynamic_load_balancing_loss_func``):
  :math:`L = \beta\,\overline{\hat S_q} + \alpha\, E \sum_i f_i P_i`, where :math:`\hat S_q` is the normalised Tsallis
  entropy of :math:`p + \epsilon` (not renormalised; :func:`entrotrain.functional.routing.tsallis_entropy`),
  :math:`f_i` the mean of the **masked routing weights** :math:`w_i(x) = p_i(x)\,m_i(x)` (soft, not counts) with the
  hybrid-routing mask :math:`m` of :func:`dynmole_routing`, and :math:`P_i` the mean probability.
- :func:`sequence_balance_loss` — DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eqs.
  17–20): per sequence, :math:`\sum_i f_i P_i` with :math:`f` the counts of the experts **the router picked** (ids
  given, not a top-k here) and :math:`P` the mean normalised sigmoid scores; a mean over sequences per layer, **summed**
  over layers (an exception to the pooling below).

Choices (reference note ``representation_routing.md``, "Choices an implementation must state", 3–4):

- Load balancing: :math:`f` from **top-k counts** (HF) in :func:`load_balancing_loss`, from **soft masked weights**
  in :func:`dynmole_router_loss` (DynMoLE); **pooled** over layers (HF, DynMoLE), ``per_layer=True`` for the mean of
  per-layer losses; balanced value **top_k** (HF) or 1 (``normalize=True``, Switch); 2-D ``(B, S)`` or flat masks;
  packed/4-D masks and KV-cached decoding (a layer with a different row count) are refused with the fix.
  Coefficients are the regularisers' weights (Switch 0.01, HF Mixtral/Qwen 0.001, OLMoE 0.01, z-loss 0.001).
- Router entropy: Tsallis :math:`q = 1.1`, :math:`\epsilon = 10^{-5}` **without renormalisation**, divided by
  :math:`S_q^{\max} = (1 - E^{1-q})/(q-1)` (all as DynMoLE); **pad rows are excluded from the entropy mean by
  default** (``mask_entropy=True``: padding is not data) — DynMoLE averages the entropy over every row, pads
  included: ``mask_entropy=False`` reproduces it exactly. The routing weights are **not renormalised** after
  masking; top-p is **exclusive** (the expert whose cumulative probability crosses ``top_p`` is dropped) with a floor
  of ``keep_top_k`` experts; tokens whose normalised entropy is **>** ``entropy_threshold`` use all experts, and a
  threshold **>= 1 disables** this broadcast (DynMoLE's gate). Masked means divide by the valid-row count (DynMoLE
  adds 1e-8 to it: a relative difference of 1e-8/count, below float32 resolution).
- Dtypes: computed in float32 (float64 stays float64). Empty or all-masked input gives 0 with a zero gradient. A
  NaN/Inf logit in a *valid* row is data: the pooled loss is then non-finite (mask such rows out).
- HF capture: pass ``outputs.router_logits`` of ``output_router_logits=True`` (raw logits of every MoE layer, pad rows
  included) with the batch's ``attention_mask``, and add the loss yourself rather than trust ``outputs.loss`` (HF adds
  ``router_aux_loss_coef · aux_loss`` only when labels are given, and never a z-loss).
- DDP: each rank's statistics come from its own rows (as HF and DynMoLE): no collective in the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_int, check_real, check_tensor, keep_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.entropy import accumulation_dtype
from entrotrain.functional.routing import (
    _chosen_experts,
    check_eps,
    check_order,
    check_scoring,
    scoring_logits,
    tsallis_entropy,
)

__all__ = [
    "DynMoLETerms",
    "RouterLogits",
    "dynmole_router_loss",
    "dynmole_router_terms",
    "dynmole_routing",
    "load_balancing_loss",
    "router_z_loss",
    "sequence_balance_loss",
    "sequence_balance_sums",
]

#: One ``(rows, E)`` tensor or a sequence of them (one per MoE layer), as HF's ``outputs.router_logits``.
RouterLogits = Union[Tensor, Sequence[Tensor]]


def _layers(router_logits: RouterLogits, mask: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
    """Validated per-layer logits (float32/64, masked rows zeroed) and the flat keep mask (or ``None``)."""
    if isinstance(router_logits, Tensor):
        if router_logits.dim() == 3:
            raise EntrotrainError(
                f"router_logits is one 3-D tensor of shape {tuple(router_logits.shape)}; pass one (rows, E) tensor per "
                "layer: tuple(router_logits.unbind(0)) for (layers, rows, E), or router_logits.flatten(0, 1) for "
                "(batch, seq, E) of one layer."
            )
        layers = [router_logits]
    elif isinstance(router_logits, (tuple, list)):
        layers = list(router_logits)
    else:
        raise EntrotrainError(
            f"router_logits must be a (rows, E) tensor or a tuple/list of them (one per MoE layer, as HF's "
            f"outputs.router_logits), got {type(router_logits).__name__}."
        )
    if not layers:
        raise EntrotrainError(
            "router_logits is an empty sequence: no MoE layer was recorded; run the model with "
            "output_router_logits=True (HF) or return one (rows, E) tensor per MoE layer."
        )
    for i, z in enumerate(layers):
        check_tensor(z, f"router_logits[{i}]", floating=True, ndim=2, layout="(rows, n_experts)")
    n_exp = layers[0].shape[1]
    if n_exp < 1 or any(z.shape[1] != n_exp for z in layers):
        raise EntrotrainError(
            f"every layer's router_logits must have the same number of experts >= 1, got shapes "
            f"{[tuple(z.shape) for z in layers]}."
        )
    dtype = accumulation_dtype(layers[0].dtype)
    device = layers[0].device
    layers = [z.to(device=device, dtype=dtype) for z in layers]
    keep = keep_mask(mask, "mask")
    if keep is None:
        return layers, None
    rows = layers[0].shape[0]
    if keep.numel() != rows or any(z.shape[0] != rows for z in layers):
        raise EntrotrainError(
            f"mask has {keep.numel()} elements (shape {tuple(keep.shape)}) but the layers have "
            f"{[z.shape[0] for z in layers]} rows; it must have one element per row of every layer: HF's 2-D "
            "(batch, seq) attention_mask for (batch*seq, E) logits. Packed/4-D masks and KV-cached decoding are not "
            "supported: build a flat keep mask of the rows."
        )
    keep = keep.reshape(-1).to(device)
    layers = [torch.where(keep[:, None], z, torch.zeros((), dtype=dtype, device=device)) for z in layers]
    return layers, keep


def _keep_weights(keep: Tensor | None, z: Tensor) -> Tensor:
    """``(rows, 1)`` 0/1 weights of the valid rows in ``z``'s dtype."""
    if keep is None:
        return torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
    return keep[:, None].to(z.dtype)


def _pooled(layers: list[Tensor], keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every layer's rows in one ``(L·rows, E)`` tensor (layer-major, as DynMoLE's ``unpack_router_logits``) and
    their ``(L·rows, 1)`` 0/1 valid-row weights."""
    z = layers[0] if len(layers) == 1 else torch.cat(layers)
    return z, _keep_weights(None if keep is None else keep.repeat(len(layers)), z)


def _balance(f: Tensor, p_mean: Tensor) -> Tensor:
    r""":math:`E \sum_i f_i P_i`."""
    return f.shape[-1] * (f * p_mean).sum(-1)


def load_balancing_loss(
    router_logits: RouterLogits,
    top_k: int,
    *,
    mask: Tensor | None = None,
    normalize: bool = False,
    per_layer: bool = False,
    sum_layers: bool = False,
    scoring: str = "softmax",
) -> Tensor:
    r"""Switch/HF load-balancing loss :math:`E\sum_i f_i P_i` with top-k dispatch counts.

    :math:`f_i = \frac1T\sum_x \mathbf 1[i\in\mathrm{topk}(p(x))]` (``torch.topk`` of the float32 probabilities, HF's
    tie order), :math:`P_i = \frac1T\sum_x p_i(x)` over the valid rows :math:`x` of every layer (pooled: HF's
    ``load_balancing_loss_func``, transformers 5.x, to ≤1e-6 with and without a 2-D attention mask). Gradient flows
    through :math:`P` only. Balanced value ``top_k`` (1 with ``normalize``); at full collapse onto ``top_k`` experts
    it is :math:`E` (:math:`E/k` normalised).

    Fedus et al. 2021, "Switch Transformers" (eq. 4–6): Switch is ``top_k=1``.

    **Megatron-LM** (``megatron/core/transformer/moe/moe_utils.py::switch_load_balancing_loss_func``, the
    ``moe_router_load_balancing_type="aux_loss"`` loss, times ``moe_aux_loss_coeff``) is, for one micro-batch,
    ``normalize=True, sum_layers=True, scoring=<moe_router_score_function>``: it divides by ``top_k`` (balanced value
    1), computes :math:`f, P` per MoE layer and each layer adds its own loss with the full coefficient (a sum over
    layers, not a pool or a mean), and with ``moe_router_score_function="sigmoid"`` its :math:`p` are the normalised
    sigmoid scores :math:`\sigma(z_e)/(\sum_j\sigma(z_j) + 10^{-20})` and :math:`f` counts their top k
    (``compute_routing_scores_for_aux_loss``; the :math:`10^{-20}` is left out here: a relative difference below
    float32 resolution). Not reproduced: its ``global_aux_loss`` (counts all-reduced over data-parallel ranks; here
    every rank uses its own rows) and its division of the coefficient by the tensor/context-parallel size.

    Args:
        router_logits: ``(rows, E)`` per MoE layer (tuple/list) or one tensor, any floating dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        mask: keep mask with one element per row (HF ``(B, S)`` attention_mask), applied to every layer.
        normalize: divide by ``top_k`` (balanced value 1).
        per_layer: the mean over layers of each layer's loss instead of pooled :math:`f, P`.
        sum_layers: the **sum** over layers of each layer's loss (Megatron-LM; ``per_layer`` is then implied).
        scoring: the distribution :math:`p` and its top k: ``'softmax'`` (default; HF, Switch) or the normalised
            ``'sigmoid'`` / ``'sqrtsoftplus'`` scores (:func:`~entrotrain.functional.routing.scoring_logits`).

    Returns:
        A scalar, float32 (float64 for float64 input); 0 with a zero gradient when no row is valid.
    """
    layers, keep = _layers(router_logits, mask)
    n_exp = layers[0].shape[1]
    top_k = check_int(top_k, "top_k", low=1, high=n_exp)
    normalize = check_bool(normalize, "normalize")
    per_layer = check_bool(per_layer, "per_layer")
    sum_layers = check_bool(sum_layers, "sum_layers")
    check_scoring(scoring)
    z, w = _pooled(layers, keep)  # one softmax / top-k over every layer's rows
    p = torch.softmax(scoring_logits(z, scoring), dim=-1)
    hits = torch.zeros_like(p).scatter_(-1, torch.topk(p, top_k, dim=-1).indices, 1.0)
    stats = torch.cat([hits * w, p * w, w], dim=-1)  # (rows, 2E + 1): counts, probabilities, valid rows
    if per_layer or sum_layers:
        sums = torch.stack([s.sum(0) for s in stats.split([x.shape[0] for x in layers])])  # (L, 2E + 1)
    else:
        sums = stats.sum(0, keepdim=True)
    rows = sums[:, -1:].clamp_min(1)
    per = _balance(sums[:, :n_exp] / rows, sums[:, n_exp:-1] / rows)
    loss = per.sum() if sum_layers else per.mean()
    return loss / top_k if normalize else loss


def router_z_loss(
    router_logits: RouterLogits, *, mask: Tensor | None = None, sum_layers: bool = False
) -> Tensor:
    r"""ST-MoE router z-loss :math:`\frac1T\sum_x \big(\log\sum_j e^{z_j(x)}\big)^2` over the valid rows of all layers.

    Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable Sparse Expert Models" (eq. 5; coefficient 0.001);
    HF ``router_z_loss_func`` (sum over tokens / tokens). Computed on float32 logits (float64 stays float64).

    **Megatron-LM** (``moe_utils.py::z_loss_func`` times ``moe_z_loss_coeff``) takes the mean over one layer's
    (valid) tokens and each MoE layer adds its own: ``sum_layers=True``. The default pools the rows of all layers,
    which is the *mean* over layers when they have the same rows: :math:`1/L` of Megatron's value for :math:`L`
    layers.

    Args:
        router_logits: ``(rows, E)`` per MoE layer or one tensor.
        mask: keep mask with one element per row, applied to every layer.
        sum_layers: the sum over layers of each layer's mean (Megatron-LM) instead of one mean over the pooled rows.

    Returns:
        A scalar >= 0; 0 with a zero gradient when no row is valid.

    A diverged router whose finite logits reach :math:`|\mathrm{lse}| \gtrsim 1.8\cdot10^{19}` (float32) has a loss
    beyond the dtype: ``+inf`` (the value, not a NaN; its gradient :math:`2\,\mathrm{lse}\cdot p / T` stays finite).
    It is not refused: a check would cost a host sync on every training step. Pass float64 logits to compute it.
    """
    layers, keep = _layers(router_logits, mask)
    sum_layers = check_bool(sum_layers, "sum_layers")
    z, w = _pooled(layers, keep)
    terms = torch.logsumexp(z, dim=-1).square() * w[:, 0]
    if sum_layers:
        sizes = [x.shape[0] for x in layers]
        return sum(t.sum() / v.sum().clamp_min(1) for t, v in zip(terms.split(sizes), w[:, 0].split(sizes)))
    return terms.sum() / w.sum().clamp_min(1)


def _check_dynmole(q: float, eps: float, top_p: float, keep_top_k: int, entropy_threshold: float) -> tuple:
    q = check_order(q)
    eps = check_eps(eps)
    top_p = check_real(top_p, "top_p", low=0.0, high=1.0)
    keep_top_k = check_int(keep_top_k, "keep_top_k", low=0)
    entropy_threshold = check_real(entropy_threshold, "entropy_threshold", low=0.0)
    return q, eps, top_p, keep_top_k, entropy_threshold


def dynmole_routing(
    probs: Tensor,
    *,
    q: float = 1.1,
    eps: float = 1e-5,
    top_p: float = 0.75,
    keep_top_k: int = 2,
    entropy_threshold: float = 0.9,
) -> tuple[Tensor, Tensor]:
    r"""DynMoLE's hybrid routing of router probabilities ``probs (rows, E)``: ``(entropy_norm, weights)``.

    Per row: sort :math:`p` descending; keep the experts whose cumulative probability is :math:`\le` ``top_p``
    (exclusive: the crossing expert is dropped), and at least the first ``keep_top_k``; if the normalised Tsallis
    entropy :math:`\hat S_q(p+\epsilon)` is > ``entropy_threshold`` (and the threshold is < 1) keep every expert.
    ``weights`` :math:`= p \odot m`, **not renormalised**. DynMoLE ``adapters/dynmole/model.py::_dynamic_routing``.

    Returns:
        ``entropy_norm`` ``(rows,)`` and ``weights`` ``(rows, E)``, float32 (float64 stays); differentiable through
        ``probs`` (the mask is a constant).
    """
    check_tensor(probs, "probs", floating=True, ndim=2, layout="(rows, n_experts)")
    q, eps, top_p, keep_top_k, entropy_threshold = _check_dynmole(q, eps, top_p, keep_top_k, entropy_threshold)
    p = probs.to(accumulation_dtype(probs.dtype))
    with torch.no_grad():
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        keep_sorted = torch.cumsum(sorted_p, dim=-1) <= top_p
        keep_sorted[..., :keep_top_k] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    entropy = tsallis_entropy(p, q, normalize=True, eps=eps)
    if entropy_threshold < 1.0:
        keep = keep | (entropy.detach() > entropy_threshold)[:, None]
    return entropy, p * keep.to(p.dtype)


class DynMoLETerms(NamedTuple):
    r"""The two unweighted terms of DynMoLE's router loss: ``entropy`` :math:`\overline{\hat S_q}` and ``balance``
    :math:`E\sum_i f_i P_i` (scalars that keep the graph)."""

    entropy: Tensor
    balance: Tensor


def dynmole_router_terms(
    router_logits: RouterLogits,
    *,
    q: float = 1.1,
    eps: float = 1e-5,
    top_p: float = 0.75,
    keep_top_k: int = 2,
    entropy_threshold: float = 0.9,
    mask: Tensor | None = None,
    mask_entropy: bool = True,
) -> DynMoLETerms:
    r"""The unweighted terms of :func:`dynmole_router_loss` (pooled over layers' rows).

    ``entropy`` :math:`= \overline{\hat S_q(p(x)+\epsilon)}` over the valid rows (``mask_entropy=True``) or over every
    row, pads included (``mask_entropy=False``: DynMoLE's exact behaviour); ``balance`` :math:`= E\sum_i f_i P_i`
    with :math:`f_i` the mean masked routing weight of :func:`dynmole_routing` and :math:`P_i` the mean probability,
    both over the valid rows. Arguments as :func:`dynmole_router_loss`.
    """
    mask_entropy = check_bool(mask_entropy, "mask_entropy")
    q, eps, top_p, keep_top_k, entropy_threshold = _check_dynmole(q, eps, top_p, keep_top_k, entropy_threshold)
    raw = None
    if mask is not None and not mask_entropy:  # DynMoLE: the entropy sees the pad rows as they are
        raw, _ = _layers(router_logits, None)
    z, w = _pooled(*_layers(router_logits, mask))
    probs = torch.softmax(z, dim=-1)
    kwargs = dict(q=q, eps=eps, top_p=top_p, keep_top_k=keep_top_k, entropy_threshold=entropy_threshold)
    entropy, weights = dynmole_routing(probs, **kwargs)
    rows = w.sum().clamp_min(1)
    if raw is not None:
        ent_raw, _ = dynmole_routing(torch.softmax(torch.cat(raw), dim=-1), **kwargs)
        entropy_mean = ent_raw.sum() / max(ent_raw.numel(), 1)
    else:
        entropy_mean = (entropy * w[:, 0]).sum() / rows
    balance = _balance((weights * w).sum(0) / rows, (probs * w).sum(0) / rows)
    return DynMoLETerms(entropy_mean, balance)


def dynmole_router_loss(
    router_logits: RouterLogits,
    *,
    entropy_weight: float = 0.01,
    aux_weight: float = 0.001,
    q: float = 1.1,
    eps: float = 1e-5,
    top_p: float = 0.75,
    keep_top_k: int = 2,
    entropy_threshold: float = 0.9,
    mask: Tensor | None = None,
    mask_entropy: bool = True,
) -> Tensor:
    r"""DynMoLE's router loss :math:`\beta\,\overline{\hat S_q} + \alpha\,E\sum_i f_i P_i` (module docstring).

    Li et al. 2025, "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing Mechanism";
    code ``_dynamic_load_balancing_loss_func`` (``router_dyn_loss_coef`` β = 0.01, ``router_aux_loss_coef``
    α = 0.001). Minimising the entropy term *sharpens* each token's routing; the balance term spreads the load.

    Args:
        router_logits: ``(rows, E)`` per MoE layer (tuple/list) or one tensor; layers are concatenated (DynMoLE's
            ``unpack_router_logits``).
        entropy_weight: β, finite >= 0.
        aux_weight: α, finite >= 0.
        q: Tsallis order > 0 (1 = Shannon, normalised by :math:`\ln E`).
        eps: added to the probabilities in the entropy, not renormalised.
        top_p: cumulative-probability budget of the hybrid routing, in [0, 1] (0: only ``keep_top_k``).
        keep_top_k: experts always kept per token (>= 0; top-k floor). To describe a plain top-k router use
            ``top_p=0, keep_top_k=k, entropy_threshold=1``.
        entropy_threshold: normalised entropy above which a token uses all experts; >= 1 disables.
        mask: keep mask with one element per row of every layer.
        mask_entropy: exclude masked rows from the entropy mean (default; ``False`` = DynMoLE).

    Returns:
        A scalar; 0 with a zero gradient on empty or all-masked input (``mask_entropy=True``).
    """
    beta = check_real(entropy_weight, "entropy_weight", low=0.0)
    alpha = check_real(aux_weight, "aux_weight", low=0.0)
    terms = dynmole_router_terms(
        router_logits, q=q, eps=eps, top_p=top_p, keep_top_k=keep_top_k, entropy_threshold=entropy_threshold,
        mask=mask, mask_entropy=mask_entropy,
    )
    return beta * terms.entropy + alpha * terms.balance


def sequence_balance_sums(
    router_logits: Tensor,
    chosen: Tensor | None,
    *,
    keep: Tensor | None,
    seq_len: int,
    scoring: str = "sigmoid",
    top_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One router call's sequence-wise balance: ``(sum over its sequences of L_b, number of sequences)``.

    ``router_logits`` ``(B·S, E)`` (rows row-major over (batch, seq)), ``chosen`` ``(B·S, K)`` the expert ids the
    router picked (or ``top_k``: the top ``top_k`` of the scores instead, ``chosen`` ignored; Megatron-LM's
    ``seq_aux_loss``), ``keep`` ``(B·S,)`` bool (``None``: every row real), ``seq_len`` = S. Per sequence :math:`b`
    with :math:`T_b \ge 1` real tokens, :math:`L_b = \sum_i f_i P_i` (:func:`sequence_balance_loss`); a sequence
    without a real token is not counted. Means over sequences of several calls: sum the first elements, divide by the
    sum of the second. Gradient flows through :math:`P` only."""
    check_tensor(router_logits, "router_logits", floating=True, ndim=2, layout="(rows, n_experts)")
    rows, n_exp = router_logits.shape
    seq_len = check_int(seq_len, "seq_len", low=1)
    top_k = check_int(top_k, "top_k", low=1, high=n_exp, none_ok=True)
    if rows % seq_len:
        raise EntrotrainError(
            f"the router's {rows} rows do not split into sequences of {seq_len} tokens; its logits must be "
            "(batch*seq, E), row-major over (batch, seq), with the (batch, seq) attention_mask of that call."
        )
    dtype = accumulation_dtype(router_logits.dtype)
    keep = torch.ones(rows, dtype=torch.bool, device=router_logits.device) if keep is None else keep.reshape(-1)
    z = torch.where(keep[:, None], router_logits.to(dtype), torch.zeros((), dtype=dtype, device=keep.device))
    w = keep.to(dtype)[:, None]
    p = torch.softmax(scoring_logits(z, check_scoring(scoring)), dim=-1) * w  # s'_{i,t} of the real tokens
    if top_k is not None:
        ids = torch.topk(p.detach(), top_k, dim=-1).indices
    else:
        ids = _chosen_experts(chosen, rows, router_logits.device)
    real = (ids >= 0) & (ids < n_exp)  # an id outside [0, E) counts nowhere (column E, dropped)
    hits = torch.zeros(rows, n_exp + 1, dtype=dtype, device=z.device)
    hits = hits.scatter_(1, torch.where(real, ids, n_exp), 1.0)[:, :n_exp] * w  # 1[i chosen for t]: once per token
    batch = rows // seq_len
    tokens = w.reshape(batch, seq_len).sum(1)  # T_b
    denom = tokens.clamp_min(1)[:, None]
    f = n_exp / ids.shape[1] * hits.reshape(batch, seq_len, n_exp).sum(1) / denom
    big_p = p.reshape(batch, seq_len, n_exp).sum(1) / denom
    has = (tokens > 0).to(dtype)
    return ((f * big_p).sum(-1) * has).sum(), has.sum()


def sequence_balance_loss(
    router_logits: RouterLogits,
    chosen: Tensor | Sequence[Tensor] | None,
    *,
    mask: Tensor | None = None,
    seq_len: int | None = None,
    scoring: str | Sequence[str] = "sigmoid",
    top_k: int | None = None,
) -> Tensor:
    r"""DeepSeek-V3's complementary sequence-wise balance loss, summed over MoE layers (unweighted: times α).

    DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), §2.1.2, eqs. 17–20, per layer and per
    sequence of :math:`T` real tokens, with :math:`N_r` routed experts and :math:`K_r` chosen per token:

    .. math::
        L_{\mathrm{Bal}} = \sum_{i=1}^{N_r} f_i P_i,\quad
        f_i = \frac{N_r}{K_r T}\sum_{t=1}^{T}\mathbf 1[i \in \mathrm{chosen}_t],\quad
        s'_{i,t} = \frac{s_{i,t}}{\sum_j s_{j,t}},\quad P_i = \frac1T\sum_{t=1}^{T} s'_{i,t}

    with :math:`s = \sigma(z)` (``scoring='sigmoid'``, DeepSeek-V3; ``'softmax'`` / ``'sqrtsoftplus'`` for routers
    scoring otherwise) and :math:`\mathrm{chosen}_t` the experts **the router itself picked** (DeepSeek-V3: the
    top :math:`K_r` of :math:`s + b` with its ``e_score_correction_bias`` :math:`b`, group-limited; not a top-k of
    :math:`s`). Each layer's value is the mean over its sequences (those with a real token); the layers' values are
    **summed** (α is per layer in the paper). Balanced routing gives 1 per layer. Gradient flows through :math:`P`
    only (:math:`f` is a count). Computed in float32 (float64 stays float64).

    **Megatron-LM**'s ``seq_aux_loss`` (``moe_utils.py::sequence_load_balancing_loss_func`` times
    ``moe_aux_loss_coeff``; each MoE layer adds its own, a sum over layers as here) computes the same
    :math:`\sum_i f_i P_i` per sequence and its mean over the batch, with two differences: :math:`f` counts the top
    :math:`K_r` of the scores :math:`s'` (``compute_routing_scores_for_aux_loss``), not the experts the router picked
    with its ``expert_bias`` (pass ``top_k`` for Megatron's); and its tokens are ``[seq, batch]``-major with every
    sequence :math:`S` tokens long (no padding mask: :math:`T = S`), where this function takes rows row-major over
    ``(batch, seq)`` and leaves padded tokens out. Its ``'softmax'`` scores are ``scoring='softmax'``; its
    ``'sigmoid'`` ones add :math:`10^{-20}` to :math:`\sum_j s_{j,t}` (left out here).

    Args:
        router_logits: ``(batch·seq, E)`` raw logits per MoE layer (tuple/list) or one tensor, rows row-major over
            ``(batch, seq)`` (HF's layout).
        chosen: ``(batch·seq, K)`` integer expert ids per layer, parallel to ``router_logits`` (HF ``*TopkRouter``
            returns them third). Ids outside ``[0, E)`` count nowhere; an expert listed twice for a token counts
            once (the indicator of eq. 18). Ignored (may be ``None``) when ``top_k`` is given.
        mask: keep mask: the ``(batch, seq)`` attention_mask (it also gives ``seq``), or ``rows`` flat elements with
            ``seq_len``.
        seq_len: tokens per sequence, when ``mask`` is not 2-D.
        scoring: the routers' scoring function, one for every layer or one per layer.
        top_k: count the top ``top_k`` experts of the scores :math:`s'` instead of ``chosen`` (Megatron-LM); ``None``
            (default) counts the ids the routers returned.

    Returns:
        A scalar; 0 with a zero gradient when no token is real.

    Raises:
        EntrotrainError: no way to split the rows into sequences (no 2-D mask and no ``seq_len``), ``chosen`` not one
            ``(rows, K)`` integer tensor per layer, a bad ``scoring``, and the checks of the other losses here.
    """
    layers, keep = _layers(router_logits, mask)
    ids = [chosen] if isinstance(chosen, Tensor) else list(chosen) if isinstance(chosen, (tuple, list)) else None
    if top_k is not None:
        ids = [None] * len(layers)
    if ids is None or len(ids) != len(layers):
        raise EntrotrainError(
            f"chosen must hold one (rows, K) tensor of expert ids per router layer ({len(layers)}), got "
            f"{len(ids) if ids is not None else type(chosen).__name__}: pass the ids each router returned "
            "(HF *TopkRouter: the third element of its output)."
        )
    scorings = [scoring] * len(layers) if isinstance(scoring, str) else list(scoring)
    if len(scorings) != len(layers):
        raise EntrotrainError(f"scoring must be one string or one per layer ({len(layers)}), got {len(scorings)}.")
    if mask is not None and mask.dim() == 2:
        if seq_len is not None and seq_len != mask.shape[1]:
            raise EntrotrainError(f"seq_len={seq_len} contradicts the (batch, seq) mask of shape {tuple(mask.shape)}.")
        seq_len = mask.shape[1]
    if seq_len is None:
        raise EntrotrainError(
            "the sequence-wise balance loss needs the sequences of the router rows (rows = batch*seq): pass the "
            "(batch, seq) attention_mask as mask, or seq_len=."
        )
    total = layers[0].new_zeros(())
    for z, c, sc in zip(layers, ids, scorings):
        loss_sum, n_seq = sequence_balance_sums(z, c, keep=keep, seq_len=seq_len, scoring=sc, top_k=top_k)
        total = total + loss_sum / n_seq.clamp_min(1)
    return total
