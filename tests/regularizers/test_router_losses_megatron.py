"""LoadBalancingLoss, SequenceBalanceLoss and RouterZLoss against Megatron-LM's router losses.

The references below are float64 re-implementations, written for this test from the formulas Megatron-LM computes
(NVIDIA/Megatron-LM, Apache-2.0; read, not copied):

- ``megatron/core/transformer/moe/moe_utils.py::switch_load_balancing_loss_func`` (main @00611e6):
  ``coeff * E / (k * T^2) * sum_e (sum_t p_te) * tokens_per_expert_e``, with ``tokens_per_expert`` the column sums
  of the routing map and ``T`` the (valid) tokens; with a padding mask, ``p`` of pad tokens is zeroed and ``T`` is
  the valid count.
- ``moe_utils.py::sequence_load_balancing_loss_func`` as ``router.py`` @005742ff calls it for
  ``moe_router_load_balancing_type="seq_aux_loss"``: tokens ``[seq, batch]``-major,
  ``cost[b, e] = sum_s map[s, b, e] / (S * k / E)``, loss ``= coeff * mean_b sum_e cost[b, e] * mean_s p[s, b, e]``.
- ``moe_utils.py::z_loss_func``: ``coeff * mean_t logsumexp(z_t)^2`` (mean over valid tokens with a padding mask).
- ``compute_routing_scores_for_aux_loss``: ``p = softmax(z)`` or, for ``moe_router_score_function="sigmoid"``,
  ``sigmoid(z) / (sum sigmoid(z) + 1e-20)``; the routing map of the losses is the top k of ``p``.
- Every MoE layer adds its own losses with the full coefficient (``MoEAuxLossAutoScaler`` per router): the total is
  the sum over layers.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.functional.router_losses import sequence_balance_loss
from entrotrain.regularizers.router_loss import LoadBalancingLoss, RouterZLoss, SequenceBalanceLoss

REL = 1e-6


def _scores(z: torch.Tensor, score_function: str) -> torch.Tensor:
    """Megatron's aux-loss scores of float64 logits ``(tokens, E)``."""
    if score_function == "softmax":
        return torch.softmax(z, dim=-1)
    s = torch.sigmoid(z)
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def _topk_map(p: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 ``(tokens, E)``: the top ``k`` of each row of ``p``."""
    return torch.zeros_like(p).scatter(-1, p.topk(k, dim=-1).indices, 1.0)


def megatron_aux(layers, k, coeff, score_function, valid=None) -> torch.Tensor:
    """Sum over layers of Megatron's switch load-balancing loss (``valid``: keep flags of the tokens)."""
    total = torch.zeros((), dtype=torch.float64)
    for z in layers:
        p = _scores(z.double(), score_function)
        counts_map = _topk_map(p, k)
        if valid is not None:
            p = p * valid[:, None]
            counts_map = counts_map * valid[:, None]
        n_tokens = counts_map.sum() / k
        n_exp = z.shape[-1]
        per_expert = [p[:, e].sum() * counts_map[:, e].sum() for e in range(n_exp)]
        total = total + coeff * n_exp / (k * n_tokens**2) * sum(per_expert)
    return total


def megatron_seq_aux(layers_sb, batch, seq, k, coeff, score_function) -> torch.Tensor:
    """Sum over layers of Megatron's seq_aux_loss; ``layers_sb`` are ``(S*B, E)`` in Megatron's [seq, batch] order."""
    total = torch.zeros((), dtype=torch.float64)
    for z in layers_sb:
        p = _scores(z.double(), score_function)
        hits = _topk_map(p, k)
        n_exp = z.shape[-1]
        per_sequence = []
        for b in range(batch):
            rows = [s * batch + b for s in range(seq)]  # token (s, b) of the [seq, batch] layout
            cost = hits[rows].sum(0) / (seq * k / n_exp)
            per_sequence.append((cost * p[rows].mean(0)).sum())
        total = total + coeff * torch.stack(per_sequence).mean()
    return total


def megatron_z(layers, coeff, valid=None) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for z in layers:
        lse2 = torch.logsumexp(z.double(), dim=-1) ** 2
        total = total + coeff * (lse2.mean() if valid is None else (lse2 * valid).sum() / valid.sum())
    return total


def _seq_major_to_rows(z: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Megatron's [seq, batch]-major tokens as entrotrain's (batch, seq) row-major rows."""
    return z.reshape(seq, batch, -1).transpose(0, 1).reshape(batch * seq, -1)


cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16),
    "layers": st.integers(1, 3),
    "batch": st.integers(1, 4),
    "seq": st.integers(1, 6),
    "experts": st.integers(2, 8),
    "score_function": st.sampled_from(["softmax", "sigmoid"]),
    "scale": st.sampled_from([0.5, 2.0]),
})


def _case(c):
    g = torch.Generator().manual_seed(c["seed"])
    k = 1 + c["seed"] % min(3, c["experts"] - 1)
    layers_sb = [torch.randn(c["seq"] * c["batch"], c["experts"], generator=g) * c["scale"] for _ in range(c["layers"])]
    return k, layers_sb


@settings(max_examples=40, deadline=None)
@given(cases)
def test_load_balancing_loss_is_megatron_s_aux_loss_summed_over_layers(c):
    k, layers = _case(c)
    coeff, sf = 0.01, c["score_function"]
    ours = LoadBalancingLoss(coeff, k, normalize=True, sum_layers=True, scoring=sf)(layers).total
    assert float(ours) == pytest.approx(float(megatron_aux(layers, k, coeff, sf)), rel=REL)


@settings(max_examples=40, deadline=None)
@given(cases)
def test_sequence_balance_loss_with_top_k_is_megatron_s_seq_aux_loss(c):
    k, layers_sb = _case(c)
    coeff, sf, batch, seq = 1e-3, c["score_function"], c["batch"], c["seq"]
    expected = float(megatron_seq_aux(layers_sb, batch, seq, k, coeff, sf))
    rows = [_seq_major_to_rows(z, batch, seq) for z in layers_sb]
    ours = SequenceBalanceLoss(coeff, scoring=sf, seq_len=seq, top_k=k)({"router_logits": rows}).total
    assert float(ours) == pytest.approx(expected, rel=REL)
    # the same with the ids given: Megatron's routing map of the loss is the top k of the scores
    ids = [_scores(z.double(), sf).topk(k, dim=-1).indices for z in rows]
    given_ids = coeff * sequence_balance_loss(rows, ids, seq_len=seq, scoring=sf)
    assert float(given_ids) == pytest.approx(expected, rel=REL)


@settings(max_examples=40, deadline=None)
@given(cases)
def test_router_z_loss_summed_over_layers_is_megatron_s_z_loss(c):
    _, layers = _case(c)
    ours = RouterZLoss(1e-3, sum_layers=True)(layers).total
    assert float(ours) == pytest.approx(float(megatron_z(layers, 1e-3)), rel=REL)
    default = RouterZLoss(1e-3)(layers).total  # pooled rows of equal-size layers: the mean over layers
    assert float(default) == pytest.approx(float(megatron_z(layers, 1e-3)) / len(layers), rel=REL)


def test_padding_masks_and_where_the_defaults_differ():
    """Megatron's padding mask (pad tokens' scores and routing map zeroed, T = valid tokens; z-loss over valid
    tokens) is our keep mask; the defaults differ from Megatron as the docstrings say (balanced value top_k, layers
    pooled, softmax scores)."""
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(24, 6, generator=g) * 1.5 for _ in range(3)]
    valid = (torch.arange(24) % 5 != 4).double()
    keep = valid.bool()
    for sf in ("softmax", "sigmoid"):
        ours = LoadBalancingLoss(0.01, 2, normalize=True, sum_layers=True, scoring=sf)(layers, keep).total
        assert float(ours) == pytest.approx(float(megatron_aux(layers, 2, 0.01, sf, valid)), rel=REL)
    z_ours = RouterZLoss(1e-3, sum_layers=True)(layers, keep).total
    assert float(z_ours) == pytest.approx(float(megatron_z(layers, 1e-3, valid)), rel=REL)
    megatron = float(megatron_aux(layers, 2, 1.0, "softmax"))
    per_layer_mean = float(LoadBalancingLoss(1.0, 2, per_layer=True)(layers).total)
    assert per_layer_mean * len(layers) / 2 == pytest.approx(megatron, rel=REL)  # mean -> sum, / top_k
    assert not math.isclose(float(LoadBalancingLoss(1.0, 2)(layers).total), megatron, rel_tol=1e-3)
    sigmoid = float(megatron_aux(layers, 2, 1.0, "sigmoid"))
    assert not math.isclose(float(LoadBalancingLoss(1.0, 2, normalize=True, sum_layers=True)(layers).total), sigmoid,
                            rel_tol=1e-3)


def test_gradients_equal_megatron_s():
    """Float64 logits: the gradient of each loss equals the reference's (f and the routing map are constants)."""
    g = torch.Generator().manual_seed(5)
    layers = [torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for sf in ("softmax", "sigmoid"):
        ours = torch.autograd.grad(
            LoadBalancingLoss(0.01, 2, normalize=True, sum_layers=True, scoring=sf)(layers).total, layers
        )
        ref = torch.autograd.grad(megatron_aux(layers, 2, 0.01, sf), layers)
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)
        rows = [_seq_major_to_rows(z, 3, 4) for z in layers]
        ours = torch.autograd.grad(SequenceBalanceLoss(0.01, scoring=sf, seq_len=4, top_k=2)(
            {"router_logits": rows}).total, layers)
        ref = torch.autograd.grad(megatron_seq_aux(layers, 3, 4, 2, 0.01, sf), layers)
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)
    ours = torch.autograd.grad(RouterZLoss(1e-3, sum_layers=True)(layers).total, layers)
    ref = torch.autograd.grad(megatron_z(layers, 1e-3), layers)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)
