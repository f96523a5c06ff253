"""A differentiable AttentionTap computes small SDPA calls with their entropy (``joint_attention``): same records,
same penalties and gradients as SDPA + the separate entropy path (float32 round-off), used only where it is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import entrotrain.taps.attention_tap as attention_tap
from entrotrain.models import TinyGPT
from entrotrain.regularizers import AttentionEntropyMaximization, EntropyFloorRegularizer
from entrotrain.taps import AttentionTap, query_padding
from tests.helpers.reference import no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)

VOCAB, SEQ, LAYERS = 32, 16, 2


def model(dropout: float = 0.0) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=LAYERS, n_head=2, n_embd=32, dropout=dropout)


def tokens(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def joint_calls(monkeypatch):
    """Counts the tap's calls of the joint attention."""
    calls = []
    real = attention_tap.joint_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_tap, "joint_attention", counting)
    return calls


def step(net, reg, joint: bool, **tap_kwargs):
    """Loss + penalty and its parameter gradients, with the regulariser's capture."""
    net.zero_grad(set_to_none=True)
    x = tokens()
    with reg.capture(net, joint_attention=joint, **tap_kwargs) as tap:
        logits = net(x)
    records = [(site, r.entropy.detach().clone(), r.n_keys.clone()) for site, r in tap.records]
    penalty = reg().total
    loss = F.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten()) + penalty
    loss.backward()
    return logits.detach(), penalty.detach(), records, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("reg_cls", [EntropyFloorRegularizer, AttentionEntropyMaximization])
@pytest.mark.parametrize("tap_kwargs", [{}, {"max_queries": 5}, {"max_rows": 3, "max_queries": 7}])
def test_joint_equals_the_separate_path(reg_cls, tap_kwargs, joint_calls):
    reg = reg_cls(weight=1.0)
    net = model()
    sep = step(net, reg, False, **tap_kwargs)
    assert joint_calls == []
    joint = step(net, reg, True, **tap_kwargs)
    assert len(joint_calls) == LAYERS
    torch.testing.assert_close(joint[0], sep[0], atol=2e-6, rtol=1e-6)  # logits
    torch.testing.assert_close(joint[1], sep[1], atol=1e-6, rtol=1e-5)  # penalty
    assert [s for s, *_ in joint[2]] == [s for s, *_ in sep[2]]
    for (_, h, n), (_, h_ref, n_ref) in zip(joint[2], sep[2]):
        assert h.shape == h_ref.shape and torch.equal(n, n_ref.expand_as(n))
        torch.testing.assert_close(h, h_ref, atol=2e-6, rtol=0)
    for g, g_ref in zip(joint[3], sep[3]):
        torch.testing.assert_close(g, g_ref, atol=2e-6, rtol=1e-4)


def test_padded_queries_are_left_out_as_on_the_separate_path(joint_calls):
    reg = AttentionEntropyMaximization(weight=1.0)
    net = model()
    real = torch.ones(4, SEQ, dtype=torch.bool)
    real[1, 10:] = False
    real[3, 4:] = False
    results = []
    for joint in (False, True):
        with query_padding(real):
            results.append(step(net, reg, joint))
    assert len(joint_calls) == LAYERS
    (_, pen_sep, rec_sep, _), (_, pen_joint, rec_joint, _) = results
    torch.testing.assert_close(pen_joint, pen_sep, atol=1e-6, rtol=1e-5)
    for (_, h, n), (_, h_ref, n_ref) in zip(rec_joint, rec_sep):
        assert torch.equal(n[3, :, 4:], torch.zeros_like(n[3, :, 4:]))  # padded: no key counted
        torch.testing.assert_close(h, h_ref, atol=2e-6, rtol=0)
        assert torch.equal(n, n_ref.expand_as(n))


def test_not_used_where_it_would_change_what_sdpa_computes(joint_calls):
    net, x = model(), tokens()
    with AttentionTap(net):  # a monitor's tap: SDPA untouched
        net(x)
    with torch.no_grad(), AttentionTap(net, differentiable=True):  # nothing to differentiate
        net(x)
    with AttentionTap(net, differentiable=True, path="chunked"):  # a path asked for
        net(x)
    dropped = model(dropout=0.1).train()
    with AttentionTap(dropped, differentiable=True):  # SDPA's dropout draws from the training RNG
        dropped(x)
    assert joint_calls == []


def test_a_monitor_tap_changes_nothing_and_sees_every_call(joint_calls):
    """A monitor's tap armed beside the regulariser's, below it (armed first) or above it: the joint path runs either
    way (training does not depend on whether a monitor logs this step) and the monitor records every site."""
    reg = AttentionEntropyMaximization(weight=1.0)
    net = model()
    alone = step(net, reg, True)
    for monitor_first in (True, False):
        monitor = AttentionTap(net)
        if monitor_first:
            monitor.arm()
        try:
            net.zero_grad(set_to_none=True)
            x = tokens()
            with reg.capture(net):
                if not monitor_first:
                    monitor.arm()
                logits = net(x)
        finally:
            monitor.disarm()
        penalty = reg().total
        (F.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten()) + penalty).backward()
        assert torch.equal(logits.detach(), alone[0]) and torch.equal(penalty.detach(), alone[1])
        for g, g_ref in zip((p.grad for p in net.parameters()), alone[3]):
            assert torch.equal(g, g_ref)
        assert sorted(monitor.stats) == sorted(site for site, *_ in alone[2]) and monitor.calls == LAYERS
    assert len(joint_calls) == 3 * LAYERS


def test_a_foreign_mode_below_keeps_sdpa(joint_calls):
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        seen = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.seen += func is F.scaled_dot_product_attention
            return func(*args, **(kwargs or {}))

    net = model()
    with Counting(), AttentionTap(net, differentiable=True) as tap:
        net(tokens())
    assert joint_calls == [] and Counting.seen == LAYERS and len(tap.records) == LAYERS


def test_non_finite_keys_go_to_sdpa(joint_calls):
    net, x = model(), tokens()
    with torch.no_grad():
        net.blocks[0].attn.qkv.bias[32] = float("nan")  # the first key feature of layer 0
    with AttentionTap(net, differentiable=True) as tap:
        net(x)
    assert len(joint_calls) == 0  # layer 0 sees a NaN key; its NaN output reaches layer 1's keys too
    assert tap.calls == LAYERS


def test_model_output_after_the_capture_is_plain_sdpa():
    net, x = model(), tokens()
    before = net(x)
    reg = EntropyFloorRegularizer()
    with reg.capture(net):
        net(x)
    reg()
    assert torch.equal(net(x), before)


@pytest.mark.parametrize("joint", [True, False])
def test_activation_checkpointing_recomputes_without_the_tap(joint, joint_calls):
    """Non-reentrant checkpointing recomputes each block in backward with the tap disarmed: the entropy keeps its own
    saved tensors (torch raised CheckpointError before) and the joint path stands aside; gradients as without it."""
    from torch.utils.checkpoint import checkpoint

    reg = AttentionEntropyMaximization(weight=1.0)
    net = model()
    want = step(net, reg, False)
    for block in net.blocks:
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)
    got = step(net, reg, joint)
    assert joint_calls == []
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    for g, g_ref in zip(got[3], want[3]):
        torch.testing.assert_close(g, g_ref, atol=0, rtol=0)


def test_reentrant_checkpointing_is_named_not_silent():
    """Reentrant checkpointing runs the forward under no_grad: the records carry no graph. The tap says so."""
    from torch.utils.checkpoint import checkpoint

    net, reg = model(), AttentionEntropyMaximization(weight=1.0)
    for block in net.blocks:
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=True))(block.forward)
    x = tokens()
    with pytest.warns(UserWarning, match="use_reentrant=False") as caught:
        with reg.capture(net):
            net(x)
    assert sum("use_reentrant" in str(w.message) for w in caught) == 1  # once per arming
    assert not reg().total.requires_grad


@pytest.mark.parametrize("padded", [False, True])
def test_hf_sdpa_models_take_the_joint_path(padded, joint_calls):
    """An HF ``sdpa`` model (GQA Llama): the adapter leaves the regulariser's tap to the SDPA call inside
    ``sdpa_attention_forward``; records, penalty and gradients equal the adapter's separate path (padding included)."""
    pytest.importorskip("transformers")
    from tests.helpers.tiny_hf_lms import tiny_llama_lm

    lm = tiny_llama_lm(64)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding
        mask[2, 9:] = 0  # right padding
    reg = AttentionEntropyMaximization(weight=1.0)
    results = []
    for joint in (False, True):
        lm.zero_grad(set_to_none=True)
        with reg.capture(lm, joint_attention=joint) as tap:
            logits = lm(input_ids=ids, attention_mask=mask).logits
        records = [(site, r.entropy.detach(), r.n_keys) for site, r in tap.records]
        penalty = reg().total
        (logits.square().mean() + penalty).backward()
        results.append((logits.detach(), penalty.detach(), records, [p.grad.clone() for p in lm.parameters()]))
    assert len(joint_calls) == 2
    (logits0, pen0, rec0, grads0), (logits1, pen1, rec1, grads1) = results
    torch.testing.assert_close(logits1, logits0, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(pen1, pen0, atol=1e-6, rtol=1e-5)
    assert [s for s, *_ in rec1] == [s for s, *_ in rec0]
    for (_, h1, n1), (_, h0, n0) in zip(rec1, rec0):
        assert torch.equal(n1.expand_as(h1), n0.expand_as(h0))
        torch.testing.assert_close(h1, h0, atol=2e-6, rtol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, atol=2e-6, rtol=1e-4)


class AlibiAttention(torch.nn.Module):
    """Self-attention with an ALiBi bias and a causal −∞ mask, both in one additive ``attn_mask`` (as ALiBi models
    pass it to SDPA)."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        slopes = 2.0 ** -torch.arange(1, self.heads + 1, dtype=x.dtype)
        bias = (-(slopes[:, None, None] * (i - j))).masked_fill(j > i, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


def test_additive_masks_take_the_joint_path(joint_calls):
    torch.manual_seed(0)
    net = torch.nn.Sequential(AlibiAttention(), AlibiAttention())
    x = torch.randn(3, 10, 32)
    reg = EntropyFloorRegularizer(weight=1.0, floor=0.9)  # high floor: every head below it, gradients flow
    results = []
    for joint in (False, True):
        net.zero_grad(set_to_none=True)
        with reg.capture(net, joint_attention=joint) as tap:
            y = net(x)
        records = [r.entropy.detach() for _, r in tap.records]
        penalty = reg().total
        (y.square().mean() + penalty).backward()
        results.append((y.detach(), penalty.detach(), records, [p.grad.clone() for p in net.parameters()]))
    assert len(joint_calls) == 2
    (y0, pen0, rec0, g0), (y1, pen1, rec1, g1) = results
    assert float(pen0) > 0
    torch.testing.assert_close(y1, y0, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(pen1, pen0, atol=1e-6, rtol=1e-5)
    for h1, h0 in zip(rec1, rec0):
        torch.testing.assert_close(h1, h0, atol=2e-6, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
