"""TinyMoE: shapes and row order of the router logits, the MoE layer against a float64 sparse-dispatch brute force,
gates (Switch raw p vs Mixtral renormalised), where the router's gradient comes from, and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from entrotrain.models.tiny_moe import MoELayer, TinyMoE


def test_shapes_and_router_logits_per_layer():
    model = TinyMoE(n_tokens=8, d_model=16, d_hidden=8, n_layer=3, n_experts=5, top_k=2)
    logits, router = model(torch.rand(4, 1, 8, 8))
    assert logits.shape == (4, 10)
    assert isinstance(router, tuple) and len(router) == 3 and all(z.shape == (4 * 8, 5) for z in router)
    assert all(z.requires_grad for z in router)
    whole = TinyMoE(n_tokens=1, d_model=16, d_hidden=8, n_layer=1, n_experts=3)
    assert whole(torch.rand(6, 64))[1][0].shape == (6, 3)


def test_router_rows_are_batch_major_tokens():
    torch.manual_seed(0)
    model = TinyMoE(n_tokens=4, d_model=8, d_hidden=8, n_layer=1, n_experts=3).double()
    x = torch.rand(3, 64, dtype=torch.float64)
    _, (z,) = model(x)
    layer = model.layers[0]
    for b in range(3):
        for t in range(4):
            h = model.embed(x[b, t * 16 : (t + 1) * 16]) + model.pos[t]
            assert torch.allclose(z[b * 4 + t], layer.router(layer.norm(h)), atol=1e-12)


def _brute_layer(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Sparse dispatch, row by row: only the top-k experts run; gates p (or renormalised p)."""
    out = torch.empty_like(x)
    for r in range(len(x)):
        h = layer.norm(x[r])
        p = torch.softmax(layer.router(h), -1)
        top = sorted(range(len(p)), key=lambda e: -float(p[e].detach()))[: layer.top_k]
        gates = [p[e] for e in top]
        if layer.renormalize:
            total = sum(gates)
            gates = [g / total for g in gates]
        y = torch.zeros_like(h)
        for e, g in zip(top, gates):
            y = y + g * (F.gelu(h @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e])
        out[r] = x[r] + y
    return out


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True), (3, True)])
def test_moe_layer_equals_sparse_dispatch(top_k, renormalize):
    torch.manual_seed(top_k)
    layer = MoELayer(6, 5, n_experts=4, top_k=top_k, renormalize=renormalize).double()
    with torch.no_grad():
        layer.b1.normal_()
        layer.b2.normal_()
    x = torch.randn(7, 6, dtype=torch.float64)
    y, z = layer(x)
    assert torch.allclose(y, _brute_layer(layer, x), atol=1e-12)
    assert torch.allclose(z, layer.router(layer.norm(x)), atol=1e-12)


def test_router_gradient_from_the_task_loss():
    torch.manual_seed(0)
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    for renormalize, has_grad in ((False, True), (True, False)):  # top-1 renormalised gate is 1: no router gradient
        model = TinyMoE(d_model=8, d_hidden=8, n_layer=1, n_experts=4, top_k=1, renormalize=renormalize)
        F.cross_entropy(model(x)[0], y).backward()
        grad = model.layers[0].router.weight.grad
        size = 0.0 if grad is None else float(grad.abs().max())
        assert (size > 1e-4) if has_grad else (size < 1e-7)  # p/p = 1 up to rounding


def test_router_init_std():
    torch.manual_seed(0)
    model = TinyMoE(d_model=64, n_experts=8, router_init_std=2.0)
    assert 1.8 < float(model.layers[0].router.weight.detach().std()) < 2.2


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n_tokens": 3}, "n_tokens"), ({"top_k": 9}, "top_k"), ({"top_k": 0}, "top_k"), ({"n_experts": 0}, "positive")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyMoE(**kwargs)


def test_bad_input_size():
    with pytest.raises(ValueError, match="64 values"):
        TinyMoE()(torch.rand(2, 1, 7, 7))
