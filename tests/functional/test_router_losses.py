"""Router losses: HF's load_balancing_loss_func (with/without a 2-D mask), float64 brute forces written row by row
(load balancing, z-loss, DynMoLE's hybrid routing and loss), gradients, and the loss contracts as properties
(empty / all-masked → 0 with zero gradient, masked garbage never leaks, half precision computed in float32, NaN in a
valid row → non-finite, bad input → EntrotrainError)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.functional.router_losses import (
    dynmole_router_loss,
    dynmole_router_terms,
    dynmole_routing,
    load_balancing_loss,
    router_z_loss,
)
from tests.helpers.contracts import call

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402


def _layers(n_layers=3, rows=12, n_exp=6, seed=0, dtype=torch.float32, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, n_exp, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(n_layers)]


# ---------------------------------------------------------------- float64 brute forces (loops over rows)
def _softmax_row(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def _rows(layers, mask):
    """(layer, row) pairs of the valid rows, and every row as a list of floats."""
    flat = None if mask is None else mask.reshape(-1).tolist()
    for z in layers:
        for r, row in enumerate(z.double().tolist()):
            if flat is None or flat[r]:
                yield row


def brute_load_balancing(layers, top_k, mask=None):
    rows = list(_rows(layers, mask))
    n_exp = layers[0].shape[1]
    if not rows:
        return 0.0
    f, p_sum = [0.0] * n_exp, [0.0] * n_exp
    for row in rows:
        p = _softmax_row(row)
        for i in sorted(range(n_exp), key=lambda j: -p[j])[:top_k]:
            f[i] += 1
        for i in range(n_exp):
            p_sum[i] += p[i]
    t = len(rows)
    return n_exp * sum(f[i] / t * p_sum[i] / t for i in range(n_exp))


def brute_z_loss(layers, mask=None):
    rows = list(_rows(layers, mask))
    if not rows:
        return 0.0
    return sum((max(r) + math.log(sum(math.exp(v - max(r)) for v in r))) ** 2 for r in rows) / len(rows)


def brute_tsallis_norm(p, q, eps):
    n = len(p)
    p = [v + eps for v in p]
    if q == 1.0:
        return -sum(v * math.log(v) for v in p) / math.log(n)
    return (1 - sum(v**q for v in p)) / (q - 1) / ((1 - n ** (1 - q)) / (q - 1))


def brute_dynmole_row(p, q, eps, top_p, keep_top_k, threshold):
    """DynMoLE's _dynamic_routing for one row: (normalised entropy, masked weights)."""
    order = sorted(range(len(p)), key=lambda j: -p[j])
    keep = [False] * len(p)
    cum = 0.0
    for rank, j in enumerate(order):
        cum += p[j]
        keep[j] = cum <= top_p or rank < keep_top_k
    ent = brute_tsallis_norm(p, q, eps)
    if threshold < 1.0 and ent > threshold:
        keep = [True] * len(p)
    return ent, [v if k else 0.0 for v, k in zip(p, keep)]


def brute_dynmole(layers, beta, alpha, q=1.1, eps=1e-5, top_p=0.75, keep_top_k=2, threshold=0.9, mask=None,
                  mask_entropy=True):
    n_exp = layers[0].shape[1]
    flat = None if mask is None else mask.reshape(-1).tolist()
    ent_sum = ent_n = 0.0
    f, p_sum, t = [0.0] * n_exp, [0.0] * n_exp, 0
    for z in layers:
        for r, row in enumerate(z.double().tolist()):
            valid = flat is None or bool(flat[r])
            p = _softmax_row(row)
            ent, w = brute_dynmole_row(p, q, eps, top_p, keep_top_k, threshold)
            if valid or not mask_entropy:
                ent_sum, ent_n = ent_sum + ent, ent_n + 1
            if valid:
                t += 1
                f = [a + b for a, b in zip(f, w)]
                p_sum = [a + b for a, b in zip(p_sum, p)]
    ent_mean = ent_sum / ent_n if ent_n else 0.0
    balance = n_exp * sum(a / t * b / t for a, b in zip(f, p_sum)) if t else 0.0
    return beta * ent_mean + alpha * balance


# ---------------------------------------------------------------- HF and brute-force equality
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_equals_hf_and_brute_force(top_k, masked):
    layers = _layers(n_layers=3, rows=12, n_exp=6, seed=top_k)
    mask = None
    if masked:
        mask = (torch.rand(3, 4, generator=torch.Generator().manual_seed(5)) < 0.6).long()
        mask[0, 0] = 1
    ours = load_balancing_loss(layers, top_k, mask=mask)
    hf = load_balancing_loss_func(tuple(layers), 6, top_k, mask)
    assert abs(float(ours) - float(hf)) <= 1e-6
    assert float(load_balancing_loss([z.double() for z in layers], top_k, mask=mask)) == pytest.approx(
        brute_load_balancing(layers, top_k, mask), abs=1e-12
    )


def test_load_balancing_values_at_balance_and_collapse():
    n_exp, rows = 4, 8
    balanced = torch.full((rows, n_exp), -10.0)
    balanced[torch.arange(rows), torch.arange(rows) % n_exp] = 10.0  # each expert top-1 for 2 rows, p ≈ one-hot
    assert float(load_balancing_loss(balanced, 1)) == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.full((rows, n_exp), -10.0)
    collapsed[:, 0] = 10.0
    assert float(load_balancing_loss(collapsed, 1)) == pytest.approx(n_exp, abs=1e-6)
    uniform = torch.zeros(rows, n_exp) + torch.arange(n_exp) * 1e-3  # ties broken; f has sum k, P = 1/E
    assert float(load_balancing_loss(uniform, 2)) == pytest.approx(2.0, abs=1e-2)
    assert float(load_balancing_loss(uniform, 2, normalize=True)) == pytest.approx(1.0, abs=1e-2)


def test_per_layer_is_the_mean_of_single_layer_losses():
    layers = _layers(n_layers=2, rows=10, n_exp=5, seed=3)
    per = [float(load_balancing_loss(z, 2)) for z in layers]
    assert float(load_balancing_loss(layers, 2, per_layer=True)) == pytest.approx(sum(per) / 2, rel=1e-6)
    assert float(load_balancing_loss(layers, 2)) != pytest.approx(sum(per) / 2, rel=1e-6)  # pooled differs


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_brute_force_and_gradcheck(masked):
    layers = [z.double().requires_grad_() for z in _layers(n_layers=2, rows=6, n_exp=4, seed=7)]
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]]) if masked else None
    assert float(router_z_loss(layers, mask=mask).detach()) == pytest.approx(brute_z_loss(layers, mask), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: router_z_loss([a, b], mask=mask), tuple(layers))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"q": 1.0},
        {"q": 2.0, "top_p": 0.5, "keep_top_k": 1},
        {"top_p": 0.0, "keep_top_k": 1, "entropy_threshold": 1.0},
        {"entropy_threshold": 0.5},  # many rows broadcast to all experts
        {"eps": 0.0, "keep_top_k": 0, "top_p": 1.0},
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_dynmole_loss_equals_brute_force(kwargs, masked):
    layers = _layers(n_layers=2, rows=8, n_exp=6, seed=11, dtype=torch.float64, scale=2.0)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]]) if masked else None
    ref_kwargs = {("threshold" if k == "entropy_threshold" else k): v for k, v in kwargs.items()}
    for mask_entropy in (True, False):
        ours = dynmole_router_loss(layers, entropy_weight=0.3, aux_weight=0.7, mask=mask, mask_entropy=mask_entropy,
                                   **kwargs)
        ref = brute_dynmole(layers, 0.3, 0.7, mask=mask, mask_entropy=mask_entropy, **ref_kwargs)
        assert float(ours) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_dynmole_mask_entropy_false_counts_pad_rows():
    layers = _layers(n_layers=1, rows=6, n_exp=4, seed=2, dtype=torch.float64)
    mask = torch.tensor([True, True, True, False, False, False])
    a = dynmole_router_terms(layers, mask=mask)
    b = dynmole_router_terms(layers, mask=mask, mask_entropy=False)
    assert float(a.balance) == float(b.balance)
    assert float(a.entropy) != pytest.approx(float(b.entropy), rel=1e-6)
    unmasked = dynmole_router_terms(layers)
    assert float(b.entropy) == pytest.approx(float(unmasked.entropy), rel=1e-12)


def test_dynmole_routing_weights_and_gradient():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    ent, w = dynmole_routing(p, top_p=0.75, keep_top_k=1, entropy_threshold=0.9)
    # row 0: cumsum 0.5, 0.8 > 0.75 -> exclusive top-p keeps expert 0 only; row 1 uniform -> entropy 1 > 0.9 -> all
    assert w[0].tolist() == [0.5, 0.0, 0.0, 0.0]
    assert w[1].tolist() == p[1].tolist()
    assert float(ent[1]) == pytest.approx(brute_tsallis_norm([0.25] * 4, 1.1, 1e-5), rel=1e-12)
    _, w_off = dynmole_routing(p, top_p=0.75, keep_top_k=1, entropy_threshold=1.0)  # >= 1 disables the broadcast
    assert w_off[1].tolist() == [0.25, 0.25, 0.25, 0.0]  # cumsum 0.25, 0.5, 0.75 <= 0.75
    z = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: dynmole_router_loss([x], entropy_weight=0.5, aux_weight=0.5), (z,))


# ---------------------------------------------------------------- contracts as properties
LOSSES = {
    "lb": lambda layers, mask: load_balancing_loss(layers, 2, mask=mask),
    "lb_per_layer": lambda layers, mask: load_balancing_loss(layers, 1, mask=mask, per_layer=True),
    "z": lambda layers, mask: router_z_loss(layers, mask=mask),
    "dynmole": lambda layers, mask: dynmole_router_loss(layers, entropy_weight=0.5, aux_weight=0.5, mask=mask),
}


@st.composite
def router_batches(draw):
    n_layers, rows, n_exp = draw(st.integers(1, 3)), draw(st.integers(0, 7)), draw(st.integers(2, 6))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    layers = _layers(n_layers, rows, n_exp, seed=draw(st.integers(0, 2**16)), dtype=dtype)
    kind = draw(st.sampled_from(("none", "random", "all_false", "int01")))
    keep = torch.rand(rows, generator=torch.Generator().manual_seed(rows)) < 0.5
    mask = {"none": None, "random": keep, "all_false": torch.zeros(rows, dtype=torch.bool), "int01": keep.long()}[kind]
    return layers, mask, draw(st.sampled_from(sorted(LOSSES)))


def _value_and_grads(name, layers, mask):
    leaves = [z.detach().clone().requires_grad_() for z in layers]
    loss = LOSSES[name](leaves, mask)
    loss.backward()
    return loss.detach(), [z.grad for z in leaves]


@settings(max_examples=60)
@given(router_batches())
def test_loss_contracts(batch):
    layers, mask, name = batch
    loss, grads = _value_and_grads(name, layers, mask)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if layers[0].dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    valid = layers[0].shape[0] if mask is None else int(mask.bool().sum())
    if valid == 0:  # empty or all-masked: 0 with a zero gradient
        assert float(loss) == 0.0 and all(float(g.abs().sum()) == 0.0 for g in grads)
    if layers[0].dtype in (torch.bfloat16, torch.float16):  # computed in float32 from the upcast input
        ref = LOSSES[name]([z.float() for z in layers], mask)
        assert float(loss) == float(ref)
    if mask is not None and valid < layers[0].shape[0]:  # garbage in masked rows never leaks, value or gradient
        keep = mask.bool()[:, None]
        garbage = [torch.where(keep, z, torch.tensor(float("nan"), dtype=z.dtype)) for z in layers]
        zeros = [torch.where(keep, z, torch.zeros((), dtype=z.dtype)) for z in layers]
        lg, gg = _value_and_grads(name, garbage, mask)
        lz, gz = _value_and_grads(name, zeros, mask)
        assert torch.equal(lg, lz) and all(torch.equal(a, b) for a, b in zip(gg, gz))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_valid_row_gives_non_finite_loss(name, bad):
    layers = _layers(2, 5, 4, seed=1)
    layers[1][2, 1] = bad
    assert not torch.isfinite(LOSSES[name](layers, None))


@pytest.mark.parametrize(
    "fn",
    [
        lambda: load_balancing_loss(_layers(), 0),
        lambda: load_balancing_loss(_layers(), 7),
        lambda: load_balancing_loss(_layers(), 2.0),
        lambda: load_balancing_loss(_layers(), 2, mask=torch.ones(5, dtype=torch.bool)),
        lambda: load_balancing_loss(_layers(), 2, mask=torch.ones(12)),  # float mask: ambiguous
        lambda: load_balancing_loss(_layers(), 2, mask=torch.full((12,), 2)),
        lambda: load_balancing_loss([], 1),
        lambda: load_balancing_loss(torch.randn(2, 3, 4), 1),
        lambda: load_balancing_loss([torch.randn(3, 4), torch.randn(3, 5)], 1),
        lambda: load_balancing_loss([torch.randn(3, 4), torch.randn(2, 4)], 1, mask=torch.ones(3, dtype=torch.bool)),
        lambda: load_balancing_loss("logits", 1),
        lambda: load_balancing_loss([torch.arange(12).reshape(3, 4)], 1),
        lambda: router_z_loss(torch.randn(3)),
        lambda: dynmole_router_loss(_layers(), q=0.0),
        lambda: dynmole_router_loss(_layers(), top_p=1.5),
        lambda: dynmole_router_loss(_layers(), aux_weight=float("nan")),
        lambda: dynmole_router_loss(_layers(), keep_top_k=-1),
        lambda: dynmole_router_loss(_layers(), mask_entropy=1),
    ],
)
def test_bad_input_raises_entrotrain_error(fn):
    outcome, err = call(fn)
    assert outcome == "error", err
    assert str(err)
