"""The tap on ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``: per-head entropy equals the float64
entropy of the module's own ``need_weights=True, average_attn_weights=False`` weights (dropout 0, or eval mode for
the pre-dropout reference), masks in MHA's conventions, exactly one site per MHA (the SDPA inside is not counted
twice), and the module's outputs are unchanged.

Tolerance: 2e-5 nats on per-head means (MHA's weights are float32 probabilities).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from entrotrain.errors import TapError
from entrotrain.taps import AttentionTap, mha_query_key
from entrotrain.taps.attention_stats import ENTROPY_SUM, NONFINITE, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS
from tests.helpers.reference import no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)
from tests.helpers.reference import probs_entropy_rows64

E, H, L, S, N = 16, 4, 5, 7, 3
INF = float("inf")


class Wrap(nn.Module):
    def __init__(self, mha: nn.Module):
        super().__init__()
        self.attn = mha

    def forward(self, query, key, value, **kwargs):
        return self.attn(query, key, value, **kwargs)[0]


def _real_queries(kwargs: dict) -> torch.Tensor | None:
    """Self-attention: the queries are the keys, so a padded key is a padded query (``None``: all real)."""
    pad = kwargs.get("key_padding_mask")
    if pad is None:
        return None
    if pad.dtype == torch.bool:
        return ~pad
    if ((pad != 0) & torch.isfinite(pad)).any():
        return None  # finite values: MHA adds them as a bias, they mark no padding
    return pad > -INF


def _reference_stats(
    mha: nn.MultiheadAttention, query, key, value, n_keys: torch.Tensor, real: torch.Tensor | None = None, **kwargs
):
    """Per-head mean entropy / normalised entropy from MHA's own per-head weights over the real queries, float64."""
    was_training = mha.training
    mha.eval()  # pre-dropout weights
    with torch.no_grad():
        _, w = mha(query, key, value, need_weights=True, average_attn_weights=False, **kwargs)
    mha.train(was_training)
    if w.dim() == 3:  # unbatched: (H, L, S)
        w = w[None]
    ent = probs_entropy_rows64(w)  # (N, H, L)
    n = n_keys.expand_as(ent)
    if real is not None:  # padded queries are not scored: as if they had no valid key
        n = torch.where(real[:, None, :], n, 0)
    mean = torch.stack([ent[:, h][n[:, h] >= 1].mean() for h in range(ent.shape[1])])
    norm = ent / torch.log(n.clamp_min(2).double())
    mean_norm = torch.stack([norm[:, h][n[:, h] >= 2].mean() for h in range(ent.shape[1])])
    return mean, mean_norm, (n >= 1).sum((0, 2)).double(), (n >= 2).sum((0, 2)).double()


def _assert_stats(stats, ref, tol=2e-5):
    mean, mean_norm, rows, norm_rows = ref
    torch.testing.assert_close(stats[ROWS], rows, atol=0, rtol=0)
    torch.testing.assert_close(stats[NORMALIZED_ROWS], norm_rows, atol=0, rtol=0)
    torch.testing.assert_close(stats[ENTROPY_SUM] / stats[ROWS], mean, atol=tol, rtol=0)
    torch.testing.assert_close(stats[NORMALIZED_SUM] / stats[NORMALIZED_ROWS], mean_norm, atol=tol, rtol=0)
    assert (stats[NONFINITE] == 0).all()


def _inputs(batch_first: bool, cross=False, kdim=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = S if cross else L
    q = torch.randn(N, L, E, generator=g)
    kv = torch.randn(N, s, kdim, generator=g) if cross else q
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv, s


def _masks(case: str, s: int, g: torch.Generator):
    """MHA-convention masks for ``case`` and the number of valid keys per (N, H, L) query."""
    kwargs: dict = {}
    valid = torch.ones(N, H, L, s, dtype=torch.bool)
    if "kpm-bool" in case:
        pad = torch.zeros(N, s, dtype=torch.bool)
        pad[0, -2:] = True
        pad[2, 0] = True
        kwargs["key_padding_mask"] = pad
        valid &= ~pad[:, None, None, :]
    if "kpm-float" in case:
        pad = torch.zeros(N, s, dtype=torch.bool)
        pad[1, 1:3] = True
        kwargs["key_padding_mask"] = torch.zeros(N, s).masked_fill(pad, -INF)
        valid &= ~pad[:, None, None, :]
    if "kpm-bias" in case:  # a finite float key_padding_mask is an additive bias in MHA
        kwargs["key_padding_mask"] = torch.randn(N, s, generator=g)
    if "mask-bool" in case:  # MHA: True = NOT allowed
        blocked = torch.rand(L, s, generator=g) > 0.6
        blocked[:, 0] = False
        kwargs["attn_mask"] = blocked
        valid &= ~blocked
    if "mask-3d" in case:  # (N * H, L, S), batch-major
        blocked = torch.rand(N * H, L, s, generator=g) > 0.6
        blocked[..., 1] = False
        kwargs["attn_mask"] = blocked
        valid &= ~blocked.view(N, H, L, s)
    if "mask-float" in case:
        bias = torch.randn(L, s, generator=g)
        if "inf" in case:
            blocked = torch.rand(L, s, generator=g) > 0.6
            blocked[:, 2] = False
            bias = bias.masked_fill(blocked, -INF)
            valid &= ~blocked
        kwargs["attn_mask"] = bias
    return kwargs, valid.sum(-1)


CASES = [
    "none",
    "kpm-bool",
    "kpm-float",
    "mask-bool",
    "mask-3d",
    "mask-float",
    "mask-float-inf",
    "kpm-bool+mask-bool",
    "kpm-float+mask-float-inf",
]


@pytest.mark.parametrize("need_weights", [None, False], ids=["need_weights-default", "need_weights-False"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_mha_self_attention_matches_its_own_weights(case, batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    model = Wrap(mha)
    x, _, s = _inputs(batch_first)
    kwargs, n_keys = _masks(case, s, torch.Generator().manual_seed(1))
    call = dict(kwargs) if need_weights is None else dict(kwargs, need_weights=need_weights)
    expected_out = copy.deepcopy(model)(x, x, x, **call)
    with AttentionTap(model) as tap:
        out = model(x, x, x, **call)
    assert torch.equal(out, expected_out)
    assert list(tap.stats) == ["attn"] and tap.calls == 1  # one site, not double counted
    _assert_stats(tap.stats["attn"], _reference_stats(mha, x, x, x, n_keys, _real_queries(kwargs), **kwargs))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_float_key_padding_mask_with_finite_values_is_a_bias(batch_first):
    """MHA adds a float key_padding_mask to the scores ("directly added"), finite values included."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    model = Wrap(mha)
    x, _, s = _inputs(batch_first)
    kwargs, n_keys = _masks("kpm-bias", s, torch.Generator().manual_seed(2))
    with AttentionTap(model) as tap:
        model(x, x, x, **kwargs)
    _assert_stats(tap.stats["attn"], _reference_stats(mha, x, x, x, n_keys, **kwargs))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["none", "kpm-bool", "mask-bool"])
def test_mha_cross_attention_with_kdim_vdim(case, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=6, vdim=5, bias=False)
    model = Wrap(mha)
    q, kv, s = _inputs(batch_first, cross=True, kdim=6)
    v = torch.randn(*kv.shape[:-1], 5)
    kwargs, n_keys = _masks(case, s, torch.Generator().manual_seed(3))
    with AttentionTap(model) as tap:
        model(q, kv, v, **kwargs)
    assert list(tap.stats) == ["attn"]
    _assert_stats(tap.stats["attn"], _reference_stats(mha, q, kv, v, n_keys, **kwargs))


def test_mha_unbatched_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H)
    model = Wrap(mha)
    x = torch.randn(L, E)
    with AttentionTap(model) as tap:
        model(x, x, x)
    _assert_stats(tap.stats["attn"], _reference_stats(mha, x, x, x, torch.full((1, H, L), L)))


def test_mha_training_with_dropout_pre_dropout_entropy_and_unchanged_training():
    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(E, H, dropout=0.4, batch_first=True)).train()
    plain = copy.deepcopy(model)
    x, _, _ = _inputs(True)

    def step(m):
        torch.manual_seed(7)
        m.zero_grad()
        out = m(x, x, x, need_weights=False)
        rng = torch.get_rng_state()
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()], rng

    out0, g0, rng0 = step(plain)
    with AttentionTap(model) as tap:
        out1, g1, rng1 = step(model)
    assert torch.equal(out0, out1) and torch.equal(rng0, rng1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    _assert_stats(tap.stats["attn"], _reference_stats(model.attn, x, x, x, torch.full((N, H, L), L)))


def test_mha_excluded_is_not_scored_at_all():
    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(E, H, batch_first=True))
    x, _, _ = _inputs(True)
    with AttentionTap(model, exclude="attn") as tap:
        model(x, x, x, need_weights=False)
    assert tap.stats == {}


def test_mha_add_bias_kv_is_refused_clearly():
    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True))
    x, _, _ = _inputs(True)
    with pytest.raises(TapError, match="add_bias_kv"):
        with AttentionTap(model):
            model(x, x, x)


def test_mha_query_key_recomputes_the_projections():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x, _, _ = _inputs(True)
    out = mha_query_key(mha, (x, x, x), {"key_padding_mask": torch.zeros(N, L, dtype=torch.bool)})
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = (x @ w_q.T + b_q).view(N, L, H, E // H).transpose(1, 2)
    k = (x @ w_k.T + b_k).view(N, L, H, E // H).transpose(1, 2)
    torch.testing.assert_close(out["q"], q)
    torch.testing.assert_close(out["k"], k)
    assert out["scale"] == pytest.approx(1 / math.sqrt(E // H))
    assert out["is_causal"] is False and out["attn_mask"] is None


# ------------------------------------------------------------------ nn.TransformerEncoderLayer
class EncoderWrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, **kwargs):
        return self.layer(x, **kwargs)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_causal(batch_first, mask_kind):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    model = EncoderWrap(layer)
    x, _, _ = _inputs(batch_first)
    if mask_kind == "float":
        mask = nn.Transformer.generate_square_subsequent_mask(L)
    else:
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    expected = copy.deepcopy(model)(x, src_mask=mask, is_causal=True)
    with AttentionTap(model) as tap:
        out = model(x, src_mask=mask, is_causal=True)
    assert torch.equal(out, expected)
    assert list(tap.stats) == ["layer.self_attn"] and tap.calls == 1
    n_keys = torch.arange(1, L + 1).expand(N, H, L)
    # post-norm layer: self_attn sees x itself
    _assert_stats(tap.stats["layer.self_attn"], _reference_stats(layer.self_attn, x, x, x, n_keys, attn_mask=mask))


def test_transformer_encoder_layer_with_padding_in_eval_no_grad():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True).eval()
    model = EncoderWrap(layer)
    x, _, _ = _inputs(True)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[1, -2:] = True
    with torch.no_grad():
        with AttentionTap(model) as tap:
            model(x, src_key_padding_mask=pad)
    assert list(tap.stats) == ["layer.self_attn"]
    n_keys = (~pad).sum(-1)[:, None, None].expand(N, H, L)
    reference = _reference_stats(layer.self_attn, x, x, x, n_keys, ~pad, key_padding_mask=pad)
    assert tap.stats["layer.self_attn"][ROWS].tolist() == [N * L - 2] * H  # the 2 padded queries are not scored
    _assert_stats(tap.stats["layer.self_attn"], reference)


@pytest.mark.parametrize("kind", ["mha", "encoder-layer"])
def test_eval_no_grad_fast_path_outputs_bit_identical(kind):
    """Inference / validation with the tap armed: the module must compute bit for bit what it computes without
    it. (A TorchFunctionMode makes ``has_torch_function`` true, which turns off MHA's native fast path.)"""
    torch.manual_seed(0)
    if kind == "mha":
        model = Wrap(nn.MultiheadAttention(E, H, batch_first=True)).eval()
        x, _, _ = _inputs(True)
        run = lambda: model(x, x, x, need_weights=False)  # noqa: E731
        site = "attn"
    else:
        model = EncoderWrap(nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True)).eval()
        x, _, _ = _inputs(True)
        run = lambda: model(x)  # noqa: E731
        site = "layer.self_attn"
    with torch.no_grad():
        expected = run()
        with AttentionTap(model) as tap:
            out = run()
    assert list(tap.stats) == [site]  # it did score
    assert torch.equal(out, expected), f"max |diff| = {(out - expected).abs().max().item():.3g}"


def test_mha_as_the_root_module_is_named_like_other_root_sites():
    """A root module's site is its class name (as for SDPA called in the root's forward), never ''."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x, _, _ = _inputs(True)
    with AttentionTap(mha) as tap:
        mha(x, x, x)
    assert list(tap.stats) == ["MultiheadAttention"]


def test_transformer_encoder_names_every_layer_once():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    )
    model = EncoderWrap(enc)
    x, _, _ = _inputs(True)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    with AttentionTap(model) as tap:
        model(x, mask=mask, is_causal=True)
    assert list(tap.stats) == ["layer.layers.0.self_attn", "layer.layers.1.self_attn"]
    assert all(v[ROWS].tolist() == [N * L] * H for v in tap.stats.values())
    # layer 0 sees x: exact reference
    n_keys = torch.arange(1, L + 1).expand(N, H, L)
    ref = _reference_stats(enc.layers[0].self_attn, x, x, x, n_keys, attn_mask=mask)
    _assert_stats(tap.stats["layer.layers.0.self_attn"], ref)
