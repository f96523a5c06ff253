"""``high_entropy_mask`` (the 80/20 mask, Wang et al. 2025) against TRL's ``get_high_entropy_mask`` transcribed.

TRL 1.16 (``GRPOTrainer.get_high_entropy_mask``, one process): ``tau = torch.quantile(entropies[mask].float(),
1 - rho)``; the mask is ``entropies * mask.float() >= tau`` (float32: a half-precision entropy is compared with the
unrounded float32 tau) and the valid tokens. For float64 entropies the definition :math:`H \\ge \\tau` is taken
exactly (float64 quantile and comparison).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from entrotrain.functional import high_entropy_mask


def _trl_mask(entropies: torch.Tensor, mask: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """TRL's get_high_entropy_mask on one process (no padding sentinel to drop), float32 quantile."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(local, 1.0 - top_fraction)
    return ((entropies * mask.float()) >= threshold) & mask.bool()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_tau_is_not_rounded_before_the_comparison(dtype):
    # tau = 1 + 0.4 * 2^-7 lies between the two entropies; rounded to bf16/fp16 it fell to 1.0 and took both tokens
    ent = torch.tensor([[1.0, 1.0078125]], dtype=dtype)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert high_entropy_mask(ent, mask, 0.6).tolist() == [[False, True]]
    assert torch.equal(high_entropy_mask(ent, mask, 0.6), _trl_mask(ent, mask, 0.6))


def test_float64_entropies_get_a_float64_tau():
    # two entropies 1e-12 apart: a float32 tau (1.0) took both; the float64 median takes the larger one only
    ent = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert high_entropy_mask(ent, mask, 0.5).tolist() == [[False, True]]


@given(
    b=st.integers(1, 4),
    t=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    top_fraction=st.sampled_from([0.2, 0.35, 0.5, 0.6, 0.9, 1.0, 0.01]),
    steps=st.sampled_from([0, 2, 64, -1]),
)
@example(b=2, t=2, seed=117, dtype=torch.bfloat16, top_fraction=0.5, steps=-1)  # tau 1 + 2^-8 rounded to 1.0
def test_equals_trl_get_high_entropy_mask(b, t, seed, dtype, top_fraction, steps):
    """Random and adversarial entropies (ties on a coarse grid, masked rows, one-token rows): TRL's mask exactly."""
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    if steps > 0:  # many ties / values a few ulps apart after rounding to the dtype
        ent = torch.round(ent * steps) / steps + torch.rand(b, t, generator=g, dtype=torch.float64) * 1e-3
    elif steps < 0:  # neighbours in the dtype: 1 + k ulp, k in {0, 1, 2}: tau falls between two of them
        ent = 1 + torch.finfo(dtype).eps * torch.randint(0, 3, (b, t), generator=g).double()
    ent = ent.to(dtype)
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[torch.randint(0, b, (1,), generator=g)] = False  # one padding-only row
    assert torch.equal(high_entropy_mask(ent, mask, top_fraction), _trl_mask(ent, mask, top_fraction))
