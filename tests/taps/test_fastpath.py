"""torch's fused transformer inference paths while a tap is armed (:mod:`entrotrain.taps.fastpath`).

In eval mode without gradient, ``nn.TransformerEncoderLayer`` runs as one fused op (its ``self_attn`` is never
called) and ``nn.TransformerEncoder`` with a key padding mask packs its input into a nested tensor that its layers and
their hooks receive. Armed taps hold ``torch.backends.mha``'s fast path off on models that have these modules, and
only then; the switch comes back on every exit path, with several taps armed in any order.

Tolerance: the fused and the regular path differ by float rounding; on the models here the largest difference
measured is 4.9e-6 on outputs of magnitude <= 3.2 (float32): ``FUSED_ATOL = 2e-5``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from entrotrain.taps import fastpath
from entrotrain.taps.activation_tap import ActivationTap
from entrotrain.taps.attention_stats import ENTROPY_SUM, NONFINITE, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS
from entrotrain.taps.attention_tap import AttentionTap
from entrotrain.taps.router_tap import RouterTap
from tests.helpers.reference import no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)
from tests.helpers.reference import probs_entropy_rows64

E, H, FF = 16, 4, 32
FUSED_ATOL = 2e-5
switch = torch.backends.mha.get_fastpath_enabled

pytestmark = pytest.mark.skipif(
    not hasattr(torch.backends.mha, "set_fastpath_enabled"), reason="torch without torch.backends.mha's switch"
)


@pytest.fixture(autouse=True)
def switch_restored():
    """Every test starts and must end with the switch on and no hold (a failing test resets it for the next)."""
    assert switch() and fastpath._holds == 0
    yield
    ok = switch() and fastpath._holds == 0 and fastpath._lifts == 0
    torch.backends.mha.set_fastpath_enabled(True)
    fastpath._holds, fastpath._before, fastpath._lifts = 0, None, 0
    assert ok, "the fast path switch was left changed"


def encoder(nested: bool = True, seed: int = 0, norm_first: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # norm_first=True: "enable_nested_tensor is True, but ..."
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
    with torch.no_grad():  # peaked, head-distinct attention
        for layer in model.layers:
            layer.self_attn.in_proj_weight.normal_(0, 0.6)
    return model.eval()


def inputs(real: tuple[int, ...] = (9, 6, 2), length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch: row ``r`` has ``real[r]`` real tokens; the padding mask is True = pad (torch's)."""
    x = torch.randn(len(real), length, E, generator=torch.Generator().manual_seed(seed))
    pad = torch.arange(length)[None, :] >= torch.tensor(real)[:, None]
    return x, pad


def regular_path(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The model's output with torch's fast path off (not through entrotrain)."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def brute_stats(model: nn.TransformerEncoder, x: torch.Tensor, pad: torch.Tensor) -> dict[str, tuple]:
    """Float64 per-head means over real queries from each layer's own ``need_weights`` probabilities (train mode:
    dropout is 0, and no fused path), with each layer's input from the regular path."""
    out = {}
    h = x
    model.train()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            src = layer.norm1(h) if layer.norm_first else h
            _, w = layer.self_attn(src, src, src, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
            ent = probs_entropy_rows64(w)  # (B, H, L)
            real = ~pad[:, None, :].expand_as(ent)
            n_keys = (~pad).sum(-1)[:, None, None].expand_as(ent).double()
            norm_real = real & (n_keys >= 2)
            mean = torch.stack([ent[:, j][real[:, j]].mean() for j in range(H)])
            norm = torch.stack([(ent[:, j] / n_keys[:, j].log())[norm_real[:, j]].mean() for j in range(H)])
            out[f"layers.{i}.self_attn"] = (mean, norm, int(real[:, 0].sum()), int(norm_real[:, 0].sum()))
            h = layer(h, src_key_padding_mask=pad)
    model.eval()
    return out


def assert_matches(stats: dict[str, torch.Tensor], ref: dict[str, tuple]) -> None:
    assert list(stats) == list(ref)
    for site, (mean, norm, rows, norm_rows) in ref.items():
        s = stats[site].double()
        assert torch.all(s[NONFINITE] == 0)
        assert torch.all(s[ROWS] == rows) and torch.all(s[NORMALIZED_ROWS] == norm_rows), site
        torch.testing.assert_close(s[ENTROPY_SUM] / s[ROWS], mean, atol=2e-5, rtol=0)
        torch.testing.assert_close(s[NORMALIZED_SUM] / s[NORMALIZED_ROWS], norm, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ the switch
def test_held_only_while_armed_and_only_on_models_with_fused_paths():
    model = encoder()
    tap = AttentionTap(model)
    assert switch()  # built, not armed: untouched
    with tap:
        assert not switch()
    assert switch()
    with AttentionTap(nn.Sequential(nn.MultiheadAttention(E, H))):  # no fused encoder path: never touched
        assert switch()
    with ActivationTap(model, include="layers.0"):
        assert not switch()
    assert switch()


def test_restored_on_exceptions_inside_and_when_arming_fails():
    model = encoder()
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionTap(model):
            raise RuntimeError("boom")
    assert switch()

    class Failing:
        def install(self, tap, model):
            raise RuntimeError("adapter failed")

    with pytest.raises(RuntimeError, match="adapter failed"):
        AttentionTap(model, adapters=[Failing()]).arm()
    assert switch() and fastpath._holds == 0
    x, pad = inputs()
    with pytest.raises(RuntimeError, match="in the forward"):  # inside a captured MHA call (after the tap's hook)
        with torch.no_grad(), AttentionTap(model) as tap:
            handle = model.layers[0].self_attn.register_forward_pre_hook(_raise)
            try:
                model(x, src_key_padding_mask=pad)
            finally:
                handle.remove()
    assert not tap.armed and fastpath._lifts == 0


def _raise(module, args):
    assert switch()  # lifted by the tap's hook, which ran first
    raise RuntimeError("in the forward")


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_nested_holds_release_in_any_order(order):
    """A monitor's tap and a regulariser's (two sessions) arm and disarm in any order: off while either is armed."""
    model = encoder()
    first, second = AttentionTap(model), ActivationTap(model, include="layers.*")
    first.arm()
    second.arm()
    (second if order == "lifo" else first).disarm()
    assert not switch()
    (first if order == "lifo" else second).disarm()
    assert switch()
    first.disarm()  # twice: nothing more released
    assert switch() and fastpath._holds == 0


def test_a_switch_the_user_turned_off_stays_off():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with AttentionTap(encoder()):
            assert not switch()
        assert not switch()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_release_is_idempotent():
    hold = fastpath.FastpathHold(encoder())
    assert hold.held and not switch()
    hold.remove()
    hold()
    assert switch() and fastpath._holds == 0
    assert not fastpath.FastpathHold(nn.Linear(2, 2)).held


def test_a_captured_multihead_attention_keeps_its_native_fast_path():
    """Inside an MHA call the tap has captured, the switch is back on (the module runs as without the tap);
    everywhere else in the armed forward it is off."""
    model = encoder()
    seen = []
    x, pad = inputs()
    with torch.no_grad(), AttentionTap(model):
        handles = [model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: seen.append(("mha", switch()))),
                   model.layers[0].linear1.register_forward_pre_hook(lambda m, a: seen.append(("ffn", switch())))]
        model(x, src_key_padding_mask=pad)
    for h in handles:
        h.remove()
    assert seen == [("mha", True), ("ffn", False)]


# ------------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("capture_sdpa", [True, False])
@pytest.mark.parametrize("nested", [True, False])
def test_eval_no_grad_values_match_brute_force(capture_sdpa, nested):
    """Eval + no_grad, where torch would take the fused layer / the nested packing: every layer is scored, as the
    float64 brute force over real queries. (Before: capture_sdpa=False on a nested-tensor encoder raised torch's
    'Nested tensor dimension 0 cannot be transposed'.)"""
    model = encoder(nested=nested)
    x, pad = inputs()
    ref = brute_stats(model, x, pad)
    with torch.no_grad(), AttentionTap(model, capture_sdpa=capture_sdpa) as tap:
        model(x, src_key_padding_mask=pad)
    assert tap.calls == 2
    assert_matches(tap.stats, ref)


@settings(max_examples=10, deadline=None)
@given(
    real=st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda r: max(r) >= 2),
    norm_first=st.booleans(),
    seed=st.integers(0, 3),
)
def test_padding_patterns_in_eval_match_brute_force(real, norm_first, seed):
    """All-padding and one-token rows included, pre- and post-norm (norm_first turns nested packing off)."""
    model = encoder(seed=seed, norm_first=norm_first)
    x, pad = inputs(tuple(real), seed=seed)
    ref = brute_stats(model, x, pad)
    with torch.no_grad(), AttentionTap(model) as tap:
        model(x, src_key_padding_mask=pad)
    assert_matches(tap.stats, ref)


@pytest.mark.parametrize("include", ["layers.0", "layers.1.linear1", "layers.0.self_attn"])
def test_activation_tap_inside_a_nested_tensor_encoder(include):
    """An activation tap inside an ``nn.TransformerEncoder`` in eval with padding received nested tensors (torch's
    'NestedTensorImpl doesn't support sizes'); it now gets the regular path's dense output."""
    model = encoder()
    x, pad = inputs()
    expected = {}
    module = dict(model.named_modules())[include]
    handle = module.register_forward_hook(lambda m, a, out: expected.setdefault("out", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        regular_path(model, x, src_key_padding_mask=pad)
    handle.remove()
    with torch.no_grad(), ActivationTap(model, include=include) as tap:
        model(x, src_key_padding_mask=pad)
    rows = tap.rows(include)
    assert rows.shape == (x.shape[0] * x.shape[1], expected["out"].shape[-1])
    torch.testing.assert_close(rows, expected["out"].reshape(rows.shape), atol=1e-6, rtol=0)


def test_router_tap_arms_and_releases_the_switch():
    """Every ForwardHookTap holds it (one place: ForwardHookTap.arm)."""
    model = nn.Sequential(encoder(), nn.Linear(E, 4))
    with RouterTap(model, include="1"):
        assert not switch()
    assert switch()


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("make", ["attention", "activation"])
def test_outputs_training_bit_identical_eval_within_rounding(make):
    """Training: bit for bit (the fused paths are eval-only). Eval: bit for bit the regular path at the real
    positions, within FUSED_ATOL of the fused one; unarmed again: the fused path's bits again."""
    model = encoder()
    x, pad = inputs()
    arm = (lambda: AttentionTap(model)) if make == "attention" else (lambda: ActivationTap(model, include="layers.*"))
    model.train()
    untapped = model(x, src_key_padding_mask=pad)
    with arm():
        tapped = model(x, src_key_padding_mask=pad)
    assert torch.equal(tapped, untapped)
    model.eval()
    real = ~pad
    with torch.no_grad():
        fused = model(x, src_key_padding_mask=pad)
        regular = regular_path(model, x, src_key_padding_mask=pad)
        with arm() as tap:
            tapped = model(x, src_key_padding_mask=pad)
        again = model(x, src_key_padding_mask=pad)
    assert tap is not None
    assert torch.equal(again, fused)  # nothing changes once disarmed
    assert not torch.equal(fused[real], regular[real])  # the case does take a different (fused) path
    if make == "activation":  # the switch off is the only change
        assert torch.equal(tapped, regular)
    diff = (tapped - fused)[real].abs().max().item()
    assert diff <= FUSED_ATOL, diff
