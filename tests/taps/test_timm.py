"""timm ViT attention, fused (through the SDPA interception) and non-fused (``TimmAttentionAdapter``).

The timm tests skip when timm is not installed (it is not in this project's environment: installing it would
replace torch). The adapter itself is also tested on a small module that follows timm's ``Attention`` contract
(``qkv``, ``q_norm``, ``k_norm``, ``scale``, ``fused_attn``; written here, not copied from timm), so its logic runs
everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.taps import AttentionTap
from entrotrain.taps.attention_stats import ENTROPY_SUM, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS
from entrotrain.taps.attention_tap import default_adapters
from entrotrain.taps.timm_attention import TimmAttentionAdapter, timm_attention_classes
from tests.helpers.reference import attention_entropy64, no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)

DIM, HEADS, TOKENS = 16, 4, 7


class ToyAttention(nn.Module):
    """timm's Attention contract: q, k, v from one qkv projection, optional q/k norms, fused or explicit scores."""

    def __init__(self, qk_norm: bool = False, fused: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, DIM // HEADS
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if is_causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            elif attn_mask is not None and attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            elif attn_mask is not None:
                scores = scores + attn_mask
            out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, DIM))


class ToyViT(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyAttention(**kwargs) for _ in range(2))

    def forward(self, x, **kwargs):
        for block in self.blocks:
            x = x + block(x, **kwargs)
        return x


def _reference(model: ToyViT, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Per block: (5, H) sums of a float64 brute force on q, k recomputed from the weights."""
    ref = copy.deepcopy(model).double()
    h = x.double()
    out = []
    n = x.shape[1]
    for block in ref.blocks:
        q, k, _ = block.qkv(h).view(*h.shape[:2], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        q, k = block.q_norm(q), block.k_norm(k)
        valid, bias = None, None
        if kwargs.get("is_causal"):
            valid = torch.ones(n, n, dtype=torch.bool).tril()
        elif kwargs.get("attn_mask") is not None and kwargs["attn_mask"].dtype == torch.bool:
            valid = kwargs["attn_mask"]
        elif kwargs.get("attn_mask") is not None:
            bias = kwargs["attn_mask"]
        entropy, normalized, n_keys = attention_entropy64(q, k, valid=valid, bias=bias, scale=block.scale)
        has, has2 = n_keys >= 1, n_keys >= 2
        out.append(torch.stack([
            torch.where(has, entropy, 0.0).sum((0, 2)), torch.where(has2, normalized, 0.0).sum((0, 2)),
            has.sum((0, 2)).double(), has2.sum((0, 2)).double(), torch.zeros(HEADS, dtype=torch.float64),
        ]))
        h = h + block(h, **kwargs)
    return out


def _masks():
    g = torch.Generator().manual_seed(5)
    allowed = torch.rand(TOKENS, TOKENS, generator=g) > 0.4
    allowed[:, 0] = True
    return {
        "none": {},
        "causal": {"is_causal": True},
        "bool": {"attn_mask": allowed},
        "float": {"attn_mask": torch.randn(TOKENS, TOKENS, generator=g)},
    }


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "non-fused"])
def test_toy_timm_attention_fused_and_not(fused, qk_norm, mask):
    torch.manual_seed(0)
    model = ToyViT(qk_norm=qk_norm, fused=fused)
    x = torch.randn(2, TOKENS, DIM)
    kwargs = _masks()[mask]
    reference_out = model(x, **kwargs)
    qkv_calls = []
    handles = [b.qkv.register_forward_hook(lambda *a: qkv_calls.append(1)) for b in model.blocks]
    with AttentionTap(model, adapters=[*default_adapters(), TimmAttentionAdapter(classes=[ToyAttention])]) as tap:
        out = model(x, **kwargs)
    for handle in handles:
        handle.remove()
    assert torch.equal(out, reference_out)
    assert len(qkv_calls) == 2  # nothing recomputed through the module (a σReparam qkv would step twice)
    assert list(tap.stats) == ["blocks.0", "blocks.1"] and tap.calls == 2
    for got, want in zip(tap.stats.values(), _reference(model, x, **kwargs)):
        torch.testing.assert_close(got[ROWS], want[ROWS], rtol=0, atol=0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # sums over 14 queries: 1e-5 nats per query


def test_toy_non_fused_without_the_adapter_is_not_captured_and_hooks_are_removed():
    model = ToyViT(fused=False)
    with AttentionTap(model) as tap:
        model(torch.randn(1, TOKENS, DIM))
    assert tap.stats == {}
    tap = AttentionTap(model, adapters=[TimmAttentionAdapter(classes=[ToyAttention])])
    with tap:
        model(torch.randn(1, TOKENS, DIM))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_timm_adapter_is_a_default_adapter():
    assert sum(isinstance(a, TimmAttentionAdapter) for a in default_adapters()) == 1


def test_no_timm_no_classes():
    if "timm" not in __import__("sys").modules:
        assert timm_attention_classes() == ()
        assert TimmAttentionAdapter().install(AttentionTap(nn.Linear(2, 2)), nn.Linear(2, 2)) == []


# ------------------------------------------------------------------ real timm (skips when not installed)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "non-fused"])
def test_timm_vision_transformer(fused):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16, patch_size=8, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=3, qk_norm=True
    ).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    probs: list[torch.Tensor] = []
    ref = copy.deepcopy(model).double()
    for block in ref.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, a: probs.append(a[0]))  # pre-dropout weights
    with torch.no_grad():
        ref(x.double())
    with AttentionTap(model) as tap:  # the default adapters include timm's
        out = model(x)
    assert torch.equal(out, reference)
    assert list(tap.stats) == ["blocks.0.attn", "blocks.1.attn"]
    for stats, p in zip(tap.stats.values(), probs):  # p (B, H, 5, 5): 4 patches + class token, float64
        entropy = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)
        n = p.shape[-1]
        torch.testing.assert_close(stats[ENTROPY_SUM] / stats[ROWS], entropy.mean((0, 2)), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            stats[NORMALIZED_SUM] / stats[NORMALIZED_ROWS], entropy.mean((0, 2)) / torch.log(torch.tensor(n)),
            rtol=0, atol=1e-5,
        )
