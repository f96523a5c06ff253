"""Float64 brute force for the HF attention matrix: entropy from the model's own attention weights, real queries only.

The reference never uses ``entrotrain``. A copy of the model runs in ``eager`` and hands back its post-softmax
weights ``p`` ``(B, H, Nq, Nk)`` per site (dropout is 0 everywhere), cast to float64: HF models in float32 with
``output_attentions=True`` (HF's eager softmax runs in float32 whatever the model dtype, so a float64 copy would gain
nothing), ``nn.MultiheadAttention`` in float64 with ``need_weights=True, average_attn_weights=False`` (train mode, so
no fused fast path). Entropy is then computed in float64. Per query row:

.. math:: H_i = -\\sum_j p_{ij} \\ln p_{ij} \\;(0 \\ln 0 = 0), \\qquad \\hat H_i = H_i / \\ln |V_i| \\;(|V_i| \\ge 2)

where the valid keys :math:`V_i` are built from their definitions (causal ``j <= i``, window ``i - j < w``, key padding
from the model's 1/0 ``attention_mask``), and the weights are checked against them: a real query's row sums to 1 and
puts exactly 0 on every invalid key, so the definitions are the model's. Per head, the means run over REAL queries
only (a padded query is not a token): ``entropy`` over real queries, ``normalized`` over real queries with
``|V_i| >= 2`` (as :mod:`entrotrain.functional.attention` defines the normalised entropy).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tests.helpers.hf_models import Family, Site


@dataclass
class SiteReference:
    """Per-head float64 means over real queries, and what they were computed from."""

    entropy: Tensor  # (H,) nats
    normalized: Tensor  # (H,)
    rows: int  # real queries per head
    normalized_rows: int  # real queries with |V_i| >= 2 per head
    all_queries_entropy: Tensor  # (H,) mean over every query row that has a valid key, padded ones included


def _torch_weights(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-head weights of every ``nn.MultiheadAttention`` call, by module name (forward order)."""
    weights: dict[str, Tensor] = {}
    originals = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            original = module.forward

            def forward(*args, _name=name, _original=original, **kwargs):
                kwargs.update(need_weights=True, average_attn_weights=False)
                out = _original(*args, **kwargs)
                weights[_name] = out[1]
                return out

            module.forward = forward
            originals.append(module)
    model.train()  # dropout is 0; train mode keeps nn.TransformerEncoderLayer off its fused fast path
    model(**batch)
    return weights


def attention_weights(family: Family, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Float64 post-softmax weights ``(B, H, Nq, Nk)`` per site name, from an eager float64 copy of ``model``."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        if not hasattr(ref, "set_attn_implementation"):
            return _torch_weights(ref.double(), batch)
        # HF: the model's own float32 eager run (its eager softmax runs in float32 whatever the dtype, and a float64
        # copy turns the finfo.min mask of a fully masked padded row into -inf, hence NaN that spreads to real rows)
        ref.set_attn_implementation("eager")
        out = ref.eval()(**batch, output_attentions=True)
    return {site.name: getattr(out, site.attentions[0])[site.attentions[1]].double() for site in family.sites}


def _token_mask(batch: dict[str, Tensor], field: str | None, n: int) -> Tensor:
    rows = next(iter(batch.values())).shape[0]
    if field is None:
        return torch.ones(rows, n, dtype=torch.bool)
    mask = batch[field].bool()
    assert mask.shape == (rows, n), (field, mask.shape, n)
    return mask


def valid_keys(site: Site, batch: dict[str, Tensor], n_q: int, n_k: int) -> Tensor:
    """``(B, Nq, Nk)``: which keys query ``i`` may attend to, from the definitions."""
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if site.causal:
        allowed &= j <= i
    if site.window is not None:
        allowed &= (i - j) < site.window
    return allowed[None] & _token_mask(batch, site.keys, n_k)[:, None, :]


def site_reference(site: Site, probs: Tensor, batch: dict[str, Tensor]) -> SiteReference:
    """Brute-force per-head means at one site from its float64 weights ``probs`` ``(B, H, Nq, Nk)``."""
    assert probs.dtype == torch.float64 and probs.dim() == 4, (probs.dtype, probs.shape)
    b, heads, n_q, n_k = probs.shape
    valid = valid_keys(site, batch, n_q, n_k)  # (B, Nq, Nk)
    real = _token_mask(batch, site.queries, n_q)  # (B, Nq)
    n_keys = valid.sum(-1)  # (B, Nq)
    entropy = torch.zeros(b, heads, n_q, dtype=torch.float64)
    for row in range(b):
        for h in range(heads):
            for q in range(n_q):
                p = probs[row, h, q]
                if real[row, q]:
                    # the model's weights obey the definitions: exactly 0 off V_i, a distribution on V_i
                    assert torch.all(p[~valid[row, q]] == 0), (site.name, row, h, q)
                    assert abs(float(p.sum()) - 1.0) < 1e-6, (site.name, row, h, q)  # eager softmax may run in fp32
                nz = p[p > 0]
                entropy[row, h, q] = -float((nz * nz.log()).sum())
    ent_sum = torch.zeros(heads, dtype=torch.float64)
    norm_sum = torch.zeros(heads, dtype=torch.float64)
    rows = norm_rows = 0
    for row in range(b):
        for q in range(n_q):
            if not real[row, q]:
                continue
            count = int(n_keys[row, q])
            assert count >= 1, (site.name, row, q)  # a real token always sees at least itself / one real key
            rows += 1
            ent_sum += entropy[row, :, q]
            if count >= 2:
                norm_rows += 1
                norm_sum += entropy[row, :, q] / math.log(count)
    has_keys = n_keys >= 1  # every query with a valid key, padded or not: what averaging padding in would give
    all_mean = entropy.permute(1, 0, 2)[:, has_keys].mean(-1)
    return SiteReference(ent_sum / rows, norm_sum / norm_rows, rows, norm_rows, all_mean)


def brute_force(family: Family, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, SiteReference]:
    """Per site name (forward order): the float64 per-head means over real queries."""
    weights = attention_weights(family, model, batch)
    assert set(weights) == set(family.site_names), (sorted(weights), family.site_names)
    return {site.name: site_reference(site, weights[site.name], batch) for site in family.sites}
