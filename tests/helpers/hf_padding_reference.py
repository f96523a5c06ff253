"""Float64 brute force for HF models over real (non-padded) query tokens, from ``output_attentions`` of an eager run.

Each batch row is run alone with its padding stripped (and its real positions passed as ``position_ids``), so the
reference sees exactly the tokens a real query may attend to. This sidesteps HF's float64 eager masks, which turn a
fully masked (left-padded) row into NaN that then reaches the real rows of the next layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def real_query_reference(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    causal: bool,
    queries: torch.Tensor | None = None,
    position_ids: bool = True,
    key: str = "attentions",
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per attention layer: ``(mean entropy (H,), mean normalised entropy (H,), number of scored queries)`` over
    the real queries (and, with ``queries``, only those positions of the padded batch), float64.

    ``causal``: a real query at stripped index ``i`` has ``i + 1`` valid keys, else all real tokens of its row.
    """
    ref = copy.deepcopy(model).double().eval()
    ref.set_attn_implementation("eager")
    real = attention_mask.bool()
    sums: list[list[torch.Tensor]] = []
    for b in range(input_ids.shape[0]):
        positions = real[b].nonzero().flatten()
        if positions.numel() == 0:
            continue
        kwargs = {"input_ids": input_ids[b, positions][None]}
        if position_ids:
            kwargs["position_ids"] = positions[None]
        with torch.no_grad():
            layers = getattr(ref(**kwargs, output_attentions=True), key)
        chosen = torch.ones(positions.numel(), dtype=torch.bool)
        if queries is not None:
            chosen = torch.isin(positions, queries)
        n = positions.numel()
        n_keys = torch.arange(1, n + 1, dtype=torch.float64) if causal else torch.full((n,), float(n), dtype=torch.float64)
        for layer, probs in enumerate(layers):
            p = probs[0]  # (H, n, n)
            assert p.dtype == torch.float64 and torch.isfinite(p).all()
            plogp = torch.where(p > 0, p * p.log(), torch.zeros((), dtype=torch.float64))
            entropy = -plogp.sum(-1)[:, chosen]  # (H, chosen)
            keys = n_keys[chosen]
            has_norm = keys >= 2
            norm = torch.where(has_norm, entropy / keys.clamp_min(2).log(), 0.0)
            row = [entropy.sum(-1), norm.sum(-1), torch.tensor(float(chosen.sum())), has_norm.sum().double()]
            if len(sums) <= layer:
                sums.append(row)
            else:
                sums[layer] = [a + r for a, r in zip(sums[layer], row)]
    return [(e / rows, nsum / nrows, rows) for e, nsum, rows, nrows in sums]
