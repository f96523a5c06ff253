"""Attention regularisers against independent float64 brute force (loops over layers, heads, rows; softmax over the
valid keys), the Jha & Reagen reference loop, golden vector T5, gradients, capture, and a Lightning integration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.attention_entropy import (
    AttentionEntropyMaximization,
    EntropyBandRegularizer,
    EntropyFloorRegularizer,
)
from entrotrain.taps.attention_tap import AttentionTap
from tests.helpers.brute import causal_head_means
from tests.helpers.lightning_models import HEADS, VOCAB, TinyLM, quiet_trainer, token_loader

B, H, T, D = 3, 2, 5, 4


def _setup(seed: int = 0):
    """Two layers: ``l0`` causal + key padding (row 1: 2 padded keys, row 2: all padded → fully masked queries);
    ``l1`` a boolean attn_mask with one fully masked query row and some 1-key rows. Head 0 is sharp (×4)."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.tensor([4.0, 0.5], dtype=torch.float64).view(1, H, 1, 1)
    qs = [(torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * sharp).requires_grad_() for _ in range(2)]
    ks = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -2:] = True
    pad[2] = True
    allowed = torch.rand(B, 1, T, T, generator=g) > 0.4
    allowed[:, :, :, 0] = True
    allowed[0, 0, 2] = False  # fully masked query
    allowed[1, 0, 3] = False
    allowed[1, 0, 3, 1] = True  # one key only
    valid = [
        lambda b, i: [j for j in range(T) if j <= i and not pad[b, j]],
        lambda b, i: [j for j in range(T) if allowed[b, 0, i, j]],
    ]
    tap = AttentionTap(torch.nn.Identity(), differentiable=True)
    tap.record(qs[0], ks[0], name="l0", is_causal=True, key_padding_mask=pad)
    tap.record(qs[1], ks[1], name="l1", attn_mask=allowed)
    return qs, ks, valid, tap


def _brute(qs, ks, valid):
    """E[l][h][b][i] (nats, 0 when no key) and n[l][b][i] by loops, float64."""
    ents, counts = [], []
    for q, k, v in zip(qs, ks, valid):
        q, k = q.detach(), k.detach()
        e = [[[0.0] * T for _ in range(B)] for _ in range(H)]
        n = [[0] * T for _ in range(B)]
        for b in range(B):
            for i in range(T):
                keys = v(b, i)
                n[b][i] = len(keys)
                for h in range(H):
                    if keys:
                        s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in keys])
                        p = torch.softmax(s, 0)
                        e[h][b][i] = float(-(p * torch.log(p)).sum())
        ents.append(e)
        counts.append(n)
    return ents, counts


def _head_mean(e, n, h, min_keys, norm):
    vals = [
        e[h][b][i] / (math.log(n[b][i]) if norm else 1.0) for b in range(B) for i in range(T) if n[b][i] >= min_keys
    ]
    return sum(vals) / len(vals) if vals else 0.0


def test_aem_matches_brute_force_and_gives_gradients():
    qs, ks, valid, tap = _setup()
    ents, counts = _brute(qs, ks, valid)
    for norm, min_keys in ((False, 1), (True, 2)):
        expected = sum(
            sum(_head_mean(e, n, h, min_keys, norm) for h in range(H)) / H for e, n in zip(ents, counts)
        ) / len(ents)
        out = AttentionEntropyMaximization(0.3, normalized=norm)(tap.records)
        assert out.total.item() == pytest.approx(-0.3 * expected, rel=1e-10)
        assert set(out.parts) == {"aem"}
    out.total.backward()
    for x in (*qs, *ks):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aem_golden_vector_t5():
    # logits (heads=2, 1 query, N=4) = [[[1,2,3,4]], [[0,0,0,0]]] as q·k with scale 1
    q = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    k = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    q[0, 0, 0, 0] = 1.0
    k[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    tap = AttentionTap(torch.nn.Identity(), differentiable=True)
    tap.record(q, k, name="mha", scale=1.0)
    assert AttentionEntropyMaximization(1.0)(tap.records).total.item() == pytest.approx(-1.166915662547658, abs=1e-12)
    assert AttentionEntropyMaximization()(tap).total.item() == pytest.approx(-0.1166915662547658, abs=1e-13)


def test_band_default_matches_brute_force_and_theta_gets_gradient():
    qs, ks, valid, tap = _setup()
    ents, counts = _brute(qs, ks, valid)
    reg = EntropyBandRegularizer(2, H, weight=0.7)
    assert torch.allclose(reg.threshold, torch.full((2, H), 0.5))
    with torch.no_grad():
        reg.raw.copy_(torch.tensor([[1.5, -2.0], [0.3, -0.4]]))
    theta = torch.sigmoid(reg.raw.detach().double())
    expected = 0.0
    for layer, (e, n) in enumerate(zip(ents, counts)):
        per_head = []
        for h in range(H):
            vals = [
                (max(abs(e[h][b][i] / math.log(n[b][i]) - float(theta[layer, h])) - 0.2, 0.0)) ** 2
                for b in range(B)
                for i in range(T)
                if n[b][i] >= 2
            ]
            per_head.append(sum(vals) / len(vals))
        expected += sum(per_head) / H / 2
    assert expected > 0
    out = reg(tap.records)
    assert out.total.item() == pytest.approx(0.7 * expected, rel=1e-6)
    out.total.backward()
    assert reg.raw.grad is not None and torch.isfinite(reg.raw.grad).all() and reg.raw.grad.abs().sum() > 0
    for x in (*qs, *ks):
        assert x.grad is not None and torch.isfinite(x.grad).all()


def _paper_reference(qs, ks, masks, theta, context_size, loss_coeff=1e-5, margin_factor=0.2, eps=None):
    """The loop of EntropyRegularization.compute_loss (§3.1), literally, from attention probabilities A."""
    t = context_size
    hmax = math.log(t)
    margin = margin_factor * hmax
    total = 0.0
    for layer, (q, k, allowed) in enumerate(zip(qs, ks, masks)):
        s = (q.detach() @ k.detach().transpose(-1, -2)) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)  # fully masked row: NaN, as eager attention
        log_a = torch.log(a) if eps is None else torch.log(a + eps)
        ent = -torch.nansum(a * log_a, dim=-1)  # (B, H, T)
        layer_loss = 0.0
        for h in range(a.shape[1]):
            d = ent[:, h, :] - theta[layer, h] * hmax
            pen = ((d * (d.abs() > margin)) ** 2).sum()
            layer_loss = layer_loss + pen
        total = total + layer_loss / a.shape[1]
    return loss_coeff * total / len(qs)


def test_band_paper_preset_reproduces_reference_loop():
    qs, ks, valid, tap = _setup()
    masks = [
        torch.tensor([[[j in valid[layer](b, i) for j in range(T)] for i in range(T)]
                      for b in range(B)]).unsqueeze(1).expand(B, H, T, T)
        for layer in range(2)
    ]
    reg = EntropyBandRegularizer(2, H, preset="paper")
    assert reg.weight == 1e-5
    with torch.no_grad():
        reg.raw.copy_(torch.tensor([[0.1, 0.9], [0.45, 0.7]]))  # raw θ, no sigmoid
    theta = reg.raw.detach().double()
    exact = _paper_reference(qs, ks, masks, theta, T)
    with_eps = _paper_reference(qs, ks, masks, theta, T, eps=1e-9)
    out = reg(tap.records)
    assert exact > 0
    assert out.total.item() == pytest.approx(float(exact), rel=1e-6)
    # the reference's ln(A + 1e-9) moves the loss by less than 1e-6 relative
    assert abs(float(with_eps) - float(exact)) / float(exact) < 1e-6
    # explicit context_size (the reference's argument) changes Hmax and margin
    reg_ctx = EntropyBandRegularizer(2, H, preset="paper", context_size=8)
    with torch.no_grad():
        reg_ctx.raw.copy_(reg.raw)
    expected_ctx = float(_paper_reference(qs, ks, masks, theta, 8))
    assert reg_ctx(tap.records).total.item() == pytest.approx(expected_ctx, rel=1e-6)
    out.total.backward()
    assert reg.raw.grad is not None and torch.isfinite(reg.raw.grad).all() and reg.raw.grad.abs().sum() > 0
    for x in (*qs, *ks):
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_band_checks_layers_and_heads():
    _, _, _, tap = _setup()
    with pytest.raises(EntrotrainError, match="n_layers=2"):
        EntropyBandRegularizer(3, H)(tap.records)
    with pytest.raises(EntrotrainError, match="n_heads"):
        EntropyBandRegularizer(2, 4)(tap.records)
    with pytest.raises(EntrotrainError, match="sigmoid"):
        EntropyBandRegularizer(2, H, init=1.5)


def test_floor_matches_brute_force_and_only_collapsing_heads_get_gradient():
    qs, ks, valid, tap = _setup()
    ents, counts = _brute(qs, ks, valid)
    means = [[_head_mean(e, n, h, 2, True) for h in range(H)] for e, n in zip(ents, counts)]
    floor = 0.6
    below = [(layer, h) for layer in range(2) for h in range(H) if means[layer][h] < floor]
    assert below and len(below) < 2 * H, means  # both regimes present
    expected = sum(max(floor - m, 0.0) for row in means for m in row) / (2 * H)
    out = EntropyFloorRegularizer(2.0, floor=floor)(tap.records)
    assert out.total.item() == pytest.approx(2.0 * expected, rel=1e-10)
    out.total.backward()
    for layer in range(2):
        for h in range(H):
            g = qs[layer].grad[:, h]
            assert torch.isfinite(g).all()
            assert (g.abs().sum() > 0) == ((layer, h) in below)


def test_capture_on_a_model_and_sum_shares_one_tap():
    torch.manual_seed(0)
    model = TinyLM()
    idx = torch.randint(0, VOCAB, (2, 9))
    reg = AttentionEntropyMaximization(1.0) + EntropyBandRegularizer(2, HEADS) + EntropyFloorRegularizer(floor=0.9)
    assert any(p is reg.regs[1].raw for p in reg.parameters())
    with reg.capture(model) as tap:
        model(idx)
    assert [site for site, _ in tap.records] == ["blocks.0", "blocks.1"]
    out = reg(step=3)
    assert set(out.parts) == {"aem", "entropy_band", "entropy_floor"}
    out.total.backward()
    assert model.blocks[0].qkv.weight.grad is not None and torch.isfinite(model.blocks[0].qkv.weight.grad).all()
    assert reg.regs[1].raw.grad is not None
    with pytest.raises(EntrotrainError, match="capture"):
        reg()  # the records were released with the first call
    with pytest.raises(EntrotrainError, match="differentiable"):
        AttentionEntropyMaximization()(AttentionTap(model))


class AEMTinyLM(TinyLM):
    def __init__(self, lam: float) -> None:
        super().__init__(lr=1e-2)
        self.reg = AttentionEntropyMaximization(lam)

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        with self.reg.capture(self):
            logits = self(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        reg = self.reg(step=self.global_step)
        self.log_dict({f"reg/{k}": v for k, v in reg.parts.items()})
        self.log("train/loss", loss)
        return loss + reg.total


def _trained_entropy(lam: float, steps: int) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = AEMTinyLM(lam)
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(model, token_loader())
    (idx,) = next(iter(token_loader()))
    model.eval()
    with torch.no_grad():
        model(idx[:, :-1])
    ent = torch.stack([causal_head_means(*blk.last_qk)[0].mean() for blk in model.blocks]).mean()
    return float(ent), dict(trainer.callback_metrics)


def test_lightning_training_step_with_aem():
    ent_reg, metrics = _trained_entropy(5.0, 8)
    ent_base, _ = _trained_entropy(0.0, 8)
    assert torch.isfinite(metrics["train/loss"]) and "reg/aem" in metrics
    assert metrics["reg/aem"].item() < 0
    assert ent_reg > ent_base


# ------------------------------------------------------------------------------------- degenerate input


def _degenerate(case: str):
    """One site of float64 records for a degenerate attention pattern, and the leaves (q, k)."""
    from entrotrain.functional.attention import attention_entropy_stats

    b, h, n, m, mask = 2, 2, 3, 3, None
    if case == "zero_heads":
        h = 0
    elif case == "all_masked":
        mask = torch.zeros(b, h, n, m, dtype=torch.bool)
    elif case == "single_key":
        m = 1
    elif case == "empty_batch":
        b = 0
    elif case == "zero_queries":
        n = 0
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, n, D, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(b, h, m, D, generator=g, dtype=torch.float64).requires_grad_()
    return [("l0", attention_entropy_stats(q, k, attn_mask=mask, path="materialized"))], (q, k)


_REGS = {
    "aem": lambda heads: AttentionEntropyMaximization(1.0),
    "aem_normalized": lambda heads: AttentionEntropyMaximization(1.0, normalized=True),
    "floor": lambda heads: EntropyFloorRegularizer(1.0, floor=0.5),
    "band": lambda heads: EntropyBandRegularizer(1, heads, weight=1.0),
    "band_paper": lambda heads: EntropyBandRegularizer(1, heads, preset="paper", weight=1.0),
}


@pytest.mark.parametrize("case", ["zero_heads", "all_masked", "single_key", "empty_batch", "zero_queries"])
@pytest.mark.parametrize("reg_name", list(_REGS))
def test_degenerate_attention_gives_zero_penalty_and_finite_gradient(case, reg_name):
    records, leaves = _degenerate(case)
    heads = records[0][1].entropy.shape[1]
    if reg_name.startswith("band") and heads == 0:
        with pytest.raises(EntrotrainError, match="n_heads"):
            _REGS[reg_name](1)(records)
        return
    reg = _REGS[reg_name](heads)
    out = reg(records)
    assert torch.isfinite(out.total) and float(out.total.detach()) == 0.0  # no defined entropy: nothing to penalise
    params = [p for p in (*leaves, *reg.parameters()) if p.requires_grad]
    grads = torch.autograd.grad(out.total, params, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", ["all_masked", "empty_batch", "zero_queries"])
def test_band_paper_with_context_size_is_zero_with_zero_gradient_on_all_masked_input(case):
    """DESIGN.md §8: the paper preset given ``context_size`` (the reference penalises each masked query's
    ``d = -θ ln T`` there) gives 0 and a zero gradient when no query has a key."""
    records, leaves = _degenerate(case)
    reg = EntropyBandRegularizer(1, 2, preset="paper", weight=1.0, context_size=8)
    out = reg(records)
    assert float(out.total.detach()) == 0.0
    params = [p for p in (*leaves, *reg.parameters()) if p.requires_grad]
    grads = torch.autograd.grad(out.total, params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_band_paper_with_context_size_keeps_the_reference_value_with_one_valid_query():
    """One query with a key in an otherwise all-masked batch: every query counts again, as the reference."""
    from entrotrain.functional.attention import attention_entropy_stats

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, H, 3, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, H, 3, D, generator=g, dtype=torch.float64)
    allowed = torch.zeros(2, H, 3, 3, dtype=torch.bool)
    allowed[0, :, 1, :2] = True  # one query (per head) with two keys
    records = [("l0", attention_entropy_stats(q, k, attn_mask=allowed, path="materialized"))]
    reg = EntropyBandRegularizer(1, H, preset="paper", context_size=8)
    theta = reg.raw.detach().double()
    expected = _paper_reference([q], [k], [allowed], theta, 8)
    assert float(expected) > 0
    assert reg(records).total.item() == pytest.approx(float(expected), rel=1e-9)


def test_floor_ignores_heads_without_a_defined_entropy():
    qs, ks, _, _ = _setup()
    from entrotrain.functional.attention import attention_entropy_stats

    live = attention_entropy_stats(qs[0], ks[0], is_causal=True, path="materialized")
    nothing = torch.zeros(B, H, T, T, dtype=torch.bool)
    dead = attention_entropy_stats(qs[1], ks[1], attn_mask=nothing, path="materialized")
    floor = EntropyFloorRegularizer(1.0, floor=1.0)
    alone = floor([("l0", live)]).total
    both = floor([("l0", live), ("l1", dead)]).total
    # the dead site's heads add 0 (not the floor): the mean over all 2H heads halves the live site's penalty
    assert float(alone) > 0 and torch.allclose(both, alone / 2)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: AttentionEntropyMaximization(float("nan")), "weight"),
        (lambda: AttentionEntropyMaximization(-0.1), "weight"),
        (lambda: AttentionEntropyMaximization(0.1, normalized="yes"), "normalized"),
        (lambda: AttentionEntropyMaximization(0.1, schedule="cosine", total_steps=0), "total_steps"),
        (lambda: AttentionEntropyMaximization(0.1, schedule="cosine", total_steps=10, final_weight=-1), "final_weight"),
        (lambda: EntropyBandRegularizer(0, 2), "n_layers"),
        (lambda: EntropyBandRegularizer(1, 2.0), "n_heads"),
        (lambda: EntropyBandRegularizer(1, 2, margin_factor=float("nan")), "margin_factor"),
        (lambda: EntropyBandRegularizer(1, 2, init=float("inf")), "init"),
        (lambda: EntropyBandRegularizer(1, 2, preset="paper", context_size=0), "context_size"),
        (lambda: EntropyBandRegularizer(1, 2, preset="orig"), "preset"),
        (lambda: EntropyFloorRegularizer(floor=float("nan")), "floor"),
        (lambda: EntropyFloorRegularizer(floor=0.0), "floor"),
    ],
)
def test_attention_regularizer_arguments_are_validated(build, match):
    with pytest.raises(EntrotrainError, match=match):
        build()
