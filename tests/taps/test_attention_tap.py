"""``AttentionTap`` on models that call ``F.scaled_dot_product_attention`` (or ``record_attention``): site names,
exact per-head statistics vs. a float64 brute force on explicitly materialised attention, bit-identical training,
no RNG use, clean removal, budgets, NaN accounting and the differentiable mode.

Tolerances: per-head mean entropy / normalised entropy vs. float64 brute force on the same q, k: 2e-5 (fp32
models, any path), 1e-10 for float64 models on the chunked / materialized paths.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention  # the second import style the tap must see

from entrotrain.errors import EntrotrainError, TapError
from entrotrain.taps import AttentionTap, record_attention
from entrotrain.taps.attention_stats import ENTROPY_SUM, N_STATS, NONFINITE, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS
from tests.helpers.reference import attention_entropy64, head_means
from tests.helpers.reference import no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)
from tests.helpers.torch_release import needs_torch

DIM, HEADS = 16, 4
TAP_PATHS = ["auto", "materialized", "chunked", "fused"]


# ------------------------------------------------------------------ models
class SDPAAttention(nn.Module):
    """q, k, v from one projection; SDPA through ``F.`` or through the directly imported name.

    Keeps the q, k (and masks) it scored, so tests can recompute the attention by brute force.
    """

    def __init__(self, *, direct_import=False, twice=False, kv_heads=HEADS, dropout=0.0, scale=None, causal=True):
        super().__init__()
        self.kv_heads = kv_heads
        self.hd = DIM // HEADS
        self.qkv = nn.Linear(DIM, DIM + 2 * kv_heads * self.hd)
        self.proj = nn.Linear(DIM, DIM)
        self.sdpa = scaled_dot_product_attention if direct_import else F.scaled_dot_product_attention
        self.twice, self.dropout, self.scale, self.causal = twice, dropout, scale, causal
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.poison: tuple[int, int, int] | None = None

    def forward(self, x, attn_mask=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([DIM, self.kv_heads * self.hd, self.kv_heads * self.hd], dim=-1)
        q = q.view(b, t, HEADS, self.hd).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        if self.poison is not None:
            q = q.clone()
            q[self.poison][0] = float("nan")
        self.seen.append((q, k))
        kwargs = dict(
            attn_mask=attn_mask,
            is_causal=self.causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        if self.kv_heads != HEADS:
            kwargs["enable_gqa"] = True
        y = self.sdpa(q, k, v, **kwargs)
        if self.twice:
            q2 = q * 0.5
            self.seen.append((q2, k))
            y = y + self.sdpa(q2, k, v, **kwargs)
        return self.proj(y.transpose(1, 2).reshape(b, t, DIM))


class Block(nn.Module):
    def __init__(self, **attn_kwargs):
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.attn = SDPAAttention(**attn_kwargs)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln(x), attn_mask=attn_mask)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, blocks_kwargs=({}, {"direct_import": True}, {"twice": True})):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(Block(**kw) for kw in blocks_kwargs)

    def forward(self, x, attn_mask=None):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return x

    def clear(self):
        for block in self.blocks:
            block.attn.seen.clear()


def _x(b=3, t=6, seed=0, dtype=torch.float32):
    return torch.randn(b, t, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _net(seed=0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def _no_hooks_anywhere(model: nn.Module) -> bool:
    import torch.nn.modules.module as mm

    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            if len(getattr(module, attr)):
                return False
    return not (mm._global_forward_hooks or mm._global_forward_pre_hooks)


def _no_function_mode() -> bool:
    return torch._C._len_torch_function_stack() == 0 and not torch.overrides._get_current_function_mode_stack()


def _assert_means(stats: torch.Tensor, ref, tol=2e-5):
    ref_h, ref_norm, ref_n = ref
    assert stats.shape == (N_STATS, ref_h.shape[1])
    assert stats.dtype == torch.float64
    mean_h, mean_norm = head_means(ref_h, ref_norm, ref_n)
    torch.testing.assert_close(stats[ENTROPY_SUM] / stats[ROWS], mean_h, atol=tol, rtol=0)
    torch.testing.assert_close(stats[NORMALIZED_SUM] / stats[NORMALIZED_ROWS], mean_norm, atol=tol, rtol=0)
    # the counts are exact
    torch.testing.assert_close(stats[ROWS], (ref_n >= 1).sum((0, 2)).double(), atol=0, rtol=0)
    torch.testing.assert_close(stats[NORMALIZED_ROWS], (ref_n >= 2).sum((0, 2)).double(), atol=0, rtol=0)
    assert (stats[NONFINITE] == 0).all()
    # and the sums (not only the means)
    torch.testing.assert_close(
        stats[ENTROPY_SUM], torch.where(ref_n >= 1, ref_h, 0).sum((0, 2)), atol=tol * ref_h[:, 0].numel(), rtol=0
    )


def _causal(t):
    return torch.ones(t, t).tril().bool()


# ------------------------------------------------------------------ names and exact per-head statistics
@pytest.mark.parametrize("path", TAP_PATHS)
def test_sites_and_per_head_stats_match_brute_force(path):
    model, x = _net(), _x()
    with AttentionTap(model, path=path) as tap:
        model(x)
    assert list(tap.stats) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn", "blocks.2.attn[1]"]
    assert tap.calls == 4
    seen = [(f"blocks.{i}.attn", qk) for i in range(3) for qk in model.blocks[i].attn.seen]
    sites = ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn", "blocks.2.attn[1]"]
    for site, (_, (q, k)) in zip(sites, seen):
        ref = attention_entropy64(q, k, valid=_causal(6))  # explicit softmax over j <= i, float64
        _assert_means(tap.stats[site], ref)
        assert tap.stats[site][ROWS].tolist() == [3 * 6] * HEADS
        assert tap.stats[site][NORMALIZED_ROWS].tolist() == [3 * 5] * HEADS


def test_direct_import_alone_is_captured():
    model, x = _net(blocks_kwargs=({"direct_import": True},)), _x()
    with AttentionTap(model) as tap:
        model(x)
    assert list(tap.stats) == ["blocks.0.attn"]
    q, k = model.blocks[0].attn.seen[0]
    _assert_means(tap.stats["blocks.0.attn"], attention_entropy64(q, k, valid=_causal(6)))


def test_stats_accumulate_over_calls_and_reset():
    model = _net(blocks_kwargs=({},))
    with AttentionTap(model) as tap:
        model(_x(seed=1))
        first = tap.stats["blocks.0.attn"].clone()
        model(_x(seed=2))
    q1, k1 = model.blocks[0].attn.seen[0]
    q2, k2 = model.blocks[0].attn.seen[1]
    r1 = attention_entropy64(q1, k1, valid=_causal(6))
    r2 = attention_entropy64(q2, k2, valid=_causal(6))
    both = tuple(torch.cat([a, b]) for a, b in zip(r1, r2))
    _assert_means(tap.stats["blocks.0.attn"], both)
    assert tap.calls == 2
    assert (tap.stats["blocks.0.attn"][ROWS] == 2 * first[ROWS]).all()
    tap.reset()
    assert tap.calls == 0 and (tap.stats["blocks.0.attn"] == 0).all()


@needs_torch(2, 5, "the reference calls F.scaled_dot_product_attention(enable_gqa=), new in torch 2.5")
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("path", ["auto", "chunked"])
def test_gqa_in_model(kv_heads, path):
    model, x = _net(blocks_kwargs=({"kv_heads": kv_heads},)), _x()
    with AttentionTap(model, path=path) as tap:
        model(x)
    q, k = model.blocks[0].attn.seen[0]
    assert k.shape[1] == kv_heads
    _assert_means(tap.stats["blocks.0.attn"], attention_entropy64(q, k, valid=_causal(6)))  # repeat_interleave


def test_custom_scale_and_attn_mask_are_read_from_the_sdpa_call():
    model, x = _net(blocks_kwargs=({"scale": 0.9},)), _x()
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(3, 1, 6, 6, generator=g)
    blocked = torch.rand(3, 1, 6, 6, generator=g) > 0.6
    blocked[0, :, 2] = True  # a fully masked query: SDPA makes it NaN, the tap scores 0 keys
    mask = bias.masked_fill(blocked, float("-inf"))
    with AttentionTap(model, path="chunked") as tap:
        model(x, attn_mask=mask)
    q, k = model.blocks[0].attn.seen[0]
    ref = attention_entropy64(q, k, valid=~blocked, bias=bias.masked_fill(blocked, 0), scale=0.9)
    _assert_means(tap.stats["blocks.0.attn"], ref)


def test_bool_attn_mask_read_from_the_sdpa_call_auto_path():
    model, x = _net(blocks_kwargs=({},)), _x()
    mask = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True
    with AttentionTap(model) as tap:
        model(x, attn_mask=mask)
    q, k = model.blocks[0].attn.seen[0]
    _assert_means(tap.stats["blocks.0.attn"], attention_entropy64(q, k, valid=mask))


def test_sdpa_in_the_root_module_and_outside_any_module():
    class Root(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k, is_causal=True)

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    model = Root()
    with AttentionTap(model) as tap:
        model(q, k)
    assert list(tap.stats) == ["Root"]
    _assert_means(tap.stats["Root"], attention_entropy64(q, k, valid=_causal(5)))


# ------------------------------------------------------------------ training is unchanged
def _train_step(model, x, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(x)
    rng_after_forward = torch.get_rng_state()
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], rng_after_forward


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("path", ["auto", "chunked"])
def test_outputs_gradients_and_rng_bit_identical(dropout, path):
    base = _net(blocks_kwargs=({"dropout": dropout}, {"dropout": dropout, "direct_import": True}, {"twice": True}))
    base.train()
    x = _x()
    plain, tapped = copy.deepcopy(base), copy.deepcopy(base)
    out0, grads0, rng0 = _train_step(plain, x, seed=123)
    with AttentionTap(tapped, path=path) as tap:
        out1, grads1, rng1 = _train_step(tapped, x, seed=123)
    assert tap.calls == 4  # it did score
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert torch.equal(rng0, rng1)
    if dropout:  # the check above would be vacuous if dropout did not draw from the RNG
        _, _, rng_other = _train_step(copy.deepcopy(base), x, seed=124)
        assert not torch.equal(rng0, rng_other)
        torch.manual_seed(123)
        plain.eval()
        assert not torch.equal(plain(x), out0)


def test_dropout_entropy_is_pre_dropout():
    model = _net(blocks_kwargs=({"dropout": 0.5},))
    model.train()
    with AttentionTap(model) as tap:
        model(_x())
    q, k = model.blocks[0].attn.seen[0]
    _assert_means(tap.stats["blocks.0.attn"], attention_entropy64(q, k, valid=_causal(6)))


# ------------------------------------------------------------------ lifecycle
def test_disarm_removes_everything_and_records_nothing():
    model, x = _net(), _x()
    assert _no_hooks_anywhere(model) and _no_function_mode()
    tap = AttentionTap(model)
    model(x)
    assert tap.stats == {} and tap.calls == 0  # never armed
    tap.arm()
    assert tap.armed and not _no_hooks_anywhere(model) and not _no_function_mode()
    tap.arm()  # idempotent
    model(x)
    tap.disarm()
    tap.disarm()  # twice is fine
    assert not tap.armed
    assert _no_hooks_anywhere(model) and _no_function_mode()
    snapshot = {name: value.clone() for name, value in tap.stats.items()}
    model(x)
    record_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), name="blocks.0.attn")
    assert tap.calls == 4
    assert all(torch.equal(snapshot[n], tap.stats[n]) for n in snapshot) and snapshot.keys() == tap.stats.keys()


def test_exception_inside_forward_removes_everything():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net(blocks_kwargs=({},))

        def forward(self, x):
            self.net(x)
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionTap(model) as tap:
            model(_x())
    assert not tap.armed
    assert _no_hooks_anywhere(model) and _no_function_mode()
    calls = tap.calls
    assert calls == 1
    model.net(_x())
    assert tap.calls == calls


def test_exception_inside_the_tap_leaves_nothing_behind():
    class ThreeD(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)  # (B, T, D): the tap cannot score it

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = ThreeD()

        def forward(self, x):
            return self.m(x)

    model = Wrap()
    with pytest.raises(TapError, match="3-D"):
        with AttentionTap(model):
            model(torch.randn(2, 5, 4))
    assert _no_hooks_anywhere(model) and _no_function_mode()


def test_excluded_module_with_3d_sdpa_does_not_raise():
    """The TapError says "or exclude the module with exclude=[...]": excluding it must then work."""

    class ThreeD(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = ThreeD()
            self.net = _net(blocks_kwargs=({},))

        def forward(self, x):
            return self.net(x) + self.odd(x)

    model = Wrap()
    x = _x()
    for tap in (AttentionTap(model, exclude="odd"), AttentionTap(model, include="net.**")):
        with tap:
            model(x)
        assert list(tap.stats) == ["net.blocks.0.attn"]


def test_two_taps_disarmed_in_any_order():
    """Two taps (e.g. a monitor and a regulariser) armed together, the first one disarmed first."""
    model, x = _net(blocks_kwargs=({},)), _x()
    first, second = AttentionTap(model), AttentionTap(model)
    first.arm()
    second.arm()
    model(x)
    assert first.calls == 1 and second.calls == 1
    first.disarm()
    model(x)
    assert first.calls == 1, f"a disarmed tap recorded: {list(first.stats)}"
    assert second.calls == 2, "the armed tap stopped recording"
    assert list(second.stats) == ["blocks.0.attn"]
    second.disarm()
    assert _no_hooks_anywhere(model) and _no_function_mode()


def test_not_a_module_and_bad_budgets():
    with pytest.raises(EntrotrainError, match="nn.Module"):
        AttentionTap(lambda x: x)  # type: ignore[arg-type]
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(EntrotrainError, match="max_rows"):
            AttentionTap(_net(), max_rows=bad)  # type: ignore[arg-type]
        with pytest.raises(EntrotrainError, match="max_queries"):
            AttentionTap(_net(), max_queries=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ include / exclude
@pytest.mark.parametrize(
    "include,exclude,expected",
    [
        (None, None, ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn", "blocks.2.attn[1]"]),
        ("blocks.1.**", None, ["blocks.1.attn"]),
        (["blocks.0.*", "blocks.2.attn"], None, ["blocks.0.attn", "blocks.2.attn"]),
        ("**.attn", None, ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]),
        ("*.attn", None, []),  # '*' is one name segment: 'blocks.0.attn' has three
        (None, "blocks.2.*", ["blocks.0.attn", "blocks.1.attn"]),
        (None, ["blocks.0.attn", "**.*[[]1]"], ["blocks.1.attn", "blocks.2.attn"]),
        ("blocks.2.**", "blocks.2.attn", ["blocks.2.attn[1]"]),
    ],
)
def test_include_exclude_globs(include, exclude, expected):
    model, x = _net(), _x()
    with AttentionTap(model, include=include, exclude=exclude) as tap:
        model(x)
    assert list(tap.stats) == expected
    assert tap.calls == len(expected)


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize("path", ["auto", "chunked"])
@pytest.mark.parametrize(
    "max_rows,rows,max_queries,queries",
    [
        (2, [0, 4], None, list(range(10))),
        (3, [0, 2, 4], 4, [0, 3, 6, 9]),
        (None, [0, 1, 2, 3, 4], 1, [9]),
        (1, [4], 2, [0, 9]),
        (5, [0, 1, 2, 3, 4], 10, list(range(10))),
    ],
)
def test_budgets_score_exactly_the_evenly_spaced_subset(path, max_rows, rows, max_queries, queries):
    model, x = _net(blocks_kwargs=({},)), _x(b=5, t=10)
    with AttentionTap(model, max_rows=max_rows, max_queries=max_queries, path=path) as tap:
        model(x)
    q, k = model.blocks[0].attn.seen[0]
    q_sub = q[rows][:, :, queries]
    valid = _causal(10)[queries]  # causal positions keep their original index
    ref = attention_entropy64(q_sub, k[rows], valid=valid)
    _assert_means(tap.stats["blocks.0.attn"], ref)
    assert tap.stats["blocks.0.attn"][ROWS].tolist() == [len(rows) * len(queries)] * HEADS


@pytest.mark.parametrize("path", ["auto", "chunked"])
def test_budgets_with_per_row_masks(path):
    """A 4-D per-batch-row mask is subsampled with the rows, and with the queries."""
    model, x = _net(blocks_kwargs=({},)), _x(b=5, t=10)
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(5, 1, 10, 10, generator=g) > 0.4
    mask[..., 3] = True
    mask[4, :, 6] = False  # row 4, query 6: no key at all
    with AttentionTap(model, max_rows=2, max_queries=4, path=path) as tap:
        model(x, attn_mask=mask)
    q, k = model.blocks[0].attn.seen[0]
    rows, queries = [0, 4], [0, 3, 6, 9]
    ref = attention_entropy64(q[rows][:, :, queries], k[rows], valid=mask[rows][:, :, queries])
    _assert_means(tap.stats["blocks.0.attn"], ref)
    assert tap.stats["blocks.0.attn"][ROWS].tolist() == [2 * 4 - 1] * HEADS


def test_budgets_with_bias_padding_and_window_via_record_attention():
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(5, 2, 10, 4, generator=g), torch.randn(5, 2, 10, 4, generator=g)
    bias = torch.randn(5, 1, 10, 10, generator=g)
    pad = torch.zeros(5, 10, dtype=torch.bool)
    pad[4, 7:] = True
    pad[0, 0] = True

    class Custom(nn.Module):
        def forward(self, q, k):
            record_attention(q, k, attn_mask=bias, key_padding_mask=pad, is_causal=True, window=4)
            return q

    model = nn.Sequential(Custom())
    with AttentionTap(model, max_rows=2, max_queries=4, path="chunked") as tap:
        model[0](q, k)
    rows, queries = [0, 4], [0, 3, 6, 9]
    pos = torch.zeros(10, 10, dtype=torch.bool)
    for i in range(10):
        for j in range(10):
            pos[i, j] = 0 <= i - j < 4
    valid = pos[queries] & ~pad[rows][:, None, None, :]
    ref = attention_entropy64(q[rows][:, :, queries], k[rows], valid=valid, bias=bias[rows][:, :, queries])
    _assert_means(tap.stats["0"], ref)
    assert tap.stats["0"][ROWS].tolist() == [7, 7]  # row 0, query 0 sees only the padded key 0


# ------------------------------------------------------------------ record_attention
class HandAttention(nn.Module):
    """softmax(q kᵀ) by hand: invisible to the SDPA interceptor, reported with record_attention."""

    def __init__(self, name=None, **record_kwargs):
        super().__init__()
        self.qk = nn.Linear(DIM, 2 * DIM)
        self.name, self.record_kwargs = name, record_kwargs
        self.seen = []

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        self.seen.append((q, k))
        record_attention(q, k, name=self.name, is_causal=True, **self.record_kwargs)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        s = s.masked_fill(~_causal(t), float("-inf"))
        return (s.softmax(-1) @ q).transpose(1, 2).reshape(b, t, DIM)


def test_record_attention_named_by_module_and_explicit_name():
    model = nn.ModuleDict({"custom": HandAttention(), "named": HandAttention(name="my.site")})
    x = _x()
    with AttentionTap(model) as tap:
        model["custom"](x)
        model["named"](x)
    assert list(tap.stats) == ["custom", "my.site"]
    for site, module in (("custom", model["custom"]), ("my.site", model["named"])):
        q, k = module.seen[0]
        _assert_means(tap.stats[site], attention_entropy64(q, k, valid=_causal(6)))


def test_record_attention_is_a_noop_without_an_armed_tap():
    bad = torch.randn(3, 4)  # would raise EntrotrainError if anything were computed
    record_attention(bad, bad)
    record_attention(bad, bad, name="x")
    model = nn.Sequential(HandAttention())
    tap = AttentionTap(model)
    model(_x())
    assert tap.stats == {} and tap.calls == 0
    with tap:
        record_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), name="x")  # armed: it is computed
    assert list(tap.stats) == ["x"]


def test_record_attention_bad_shape_raises_entrotrain_error_naming_it():
    model = nn.Sequential(HandAttention())
    with AttentionTap(model):
        with pytest.raises(EntrotrainError, match=r"\(3, 4\)"):
            record_attention(torch.randn(3, 4), torch.randn(3, 4), name="x")
        with pytest.raises(EntrotrainError, match=r"\(2, 5, 4\)"):
            record_attention(torch.randn(2, 5, 4), torch.randn(2, 5, 4), name="x")


def test_record_attention_outside_the_model_needs_a_name():
    model = nn.Sequential(HandAttention())
    q = k = torch.randn(1, 2, 3, 4)
    with AttentionTap(model) as tap:
        record_attention(q, k)  # not inside the model: ignored
        assert tap.stats == {}
        record_attention(q, k, name="outside")
    assert list(tap.stats) == ["outside"]
    _assert_means(tap.stats["outside"], attention_entropy64(q, k))


def test_record_attention_respects_include():
    model = nn.ModuleDict({"a": HandAttention(), "b": HandAttention()})
    with AttentionTap(model, include="b") as tap:
        model["a"](_x())
        model["b"](_x())
    assert list(tap.stats) == ["b"]


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("path", ["auto", "chunked", "materialized"])
def test_nan_query_is_counted_not_averaged(path):
    model, x = _net(blocks_kwargs=({},)), _x()
    model.blocks[0].attn.poison = (1, 2, 4)  # batch 1, head 2, query 4
    with AttentionTap(model, path=path) as tap:
        model(x)
    stats = tap.stats["blocks.0.attn"]
    assert stats[NONFINITE].tolist() == [0, 0, 1, 0]
    assert torch.isfinite(stats).all()
    q, k = model.blocks[0].attn.seen[0]
    ref_h, ref_norm, ref_n = attention_entropy64(q, k, valid=_causal(6))
    assert math.isnan(ref_h[1, 2, 4])
    keep = torch.isfinite(ref_h)
    h_sum = torch.where(keep, ref_h, 0).sum((0, 2))
    n_sum = torch.where(keep & (ref_n >= 2), ref_norm, 0).sum((0, 2))
    torch.testing.assert_close(stats[ENTROPY_SUM], h_sum, atol=1e-4, rtol=0)
    torch.testing.assert_close(stats[NORMALIZED_SUM], n_sum, atol=1e-4, rtol=0)
    assert stats[ROWS].tolist() == [18, 18, 17, 18]
    assert stats[NORMALIZED_ROWS].tolist() == [15, 15, 14, 15]


# ------------------------------------------------------------------ differentiable
def test_differentiable_gradient_reaches_qkv_and_equals_explicit_entropy():
    model = _net(blocks_kwargs=({}, {"direct_import": True})).double()
    x = _x(dtype=torch.float64)
    with AttentionTap(model, differentiable=True) as tap:
        model(x)
    assert [site for site, _ in tap.records] == ["blocks.0.attn", "blocks.1.attn"]
    loss = torch.stack([res.entropy.mean() for _, res in tap.records]).mean()
    assert loss.requires_grad
    model.zero_grad()
    loss.backward()
    grads = [model.blocks[i].attn.qkv.weight.grad.clone() for i in range(2)]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    # the same loss written out by hand: explicit softmax entropy of the same model forward
    model.zero_grad()
    model.clear()
    model(x)
    means = []
    for i in range(2):
        q, k = model.blocks[i].attn.seen[0]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        s = s.masked_fill(~_causal(6), float("-inf"))
        p = s.softmax(-1)
        means.append(-(p * s.log_softmax(-1).masked_fill(p == 0, 0)).sum(-1).mean())
    torch.stack(means).mean().backward()
    for i in range(2):
        torch.testing.assert_close(grads[i], model.blocks[i].attn.qkv.weight.grad, atol=1e-10, rtol=0)
    # the statistics are still detached float64 sums
    assert not any(v.requires_grad for v in tap.stats.values())


def test_monitoring_tap_keeps_no_graph():
    model = _net(blocks_kwargs=({},))
    with AttentionTap(model) as tap:
        model(_x())
    assert tap.records == []
    assert not tap.stats["blocks.0.attn"].requires_grad
