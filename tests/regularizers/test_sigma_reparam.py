"""σReparam layer and converter: function preservation, power iteration, exact gradients, compile, DDP."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from entrotrain.errors import EntrotrainError
from entrotrain.models import TinyGPT
from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear, sigma_reparam, sigma_reparam_names
from tests.helpers.scripts import run_script

DDP_SCRIPT = Path(__file__).with_name("sigma_ddp_run.py")


def _linear(dtype: torch.dtype, seed: int = 0, out: int = 64, inp: int = 32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_from_linear_preserves_output(dtype, training):
    lin = _linear(dtype)
    layer = SigmaReparamLinear.from_linear(lin).train(training)
    x = torch.randn(7, 32, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(layer(x), lin(x), rtol=tol, atol=tol)
    assert layer.gamma.item() == pytest.approx(torch.linalg.matrix_norm(lin.weight.double(), 2).item(), rel=1e-6)
    assert layer.weight is not lin.weight and torch.equal(layer.weight, lin.weight)


def test_from_linear_with_power_iteration_init():
    lin = _linear(torch.float64)
    layer = SigmaReparamLinear.from_linear(lin, init_iterations=200).eval()
    x = torch.randn(7, 32, dtype=torch.float64)
    assert torch.allclose(layer(x), lin(x), atol=1e-10)


def test_sigma_converges_to_spectral_norm():
    torch.manual_seed(1)
    layer = SigmaReparamLinear(32, 64)
    # random singular vectors, singular values 3 · 0.8^i (an i.i.d. Gaussian 64×32 has σ₂/σ₁ ≈ 0.93 and needs more)
    left = torch.linalg.qr(torch.randn(64, 32))[0]
    right = torch.linalg.qr(torch.randn(32, 32))[0]
    with torch.no_grad():
        layer.weight.copy_(left @ torch.diag(3 * 0.8 ** torch.arange(32.0)) @ right.T)
        layer.u.copy_(torch.nn.functional.normalize(torch.randn(32), dim=0))  # forget the SVD init
    x = torch.randn(2, 32)
    for _ in range(50):
        layer(x)
    exact = torch.linalg.matrix_norm(layer.weight.double(), 2)
    assert abs(layer.sigma.double() - exact) / exact < 1e-4
    v = torch.linalg.svd(layer.weight.double())[2][0]
    assert abs(torch.dot(layer.u.double(), v)).item() == pytest.approx(1.0, abs=1e-4)


def test_n_power_iterations_counts_steps():
    torch.manual_seed(2)
    a = SigmaReparamLinear(16, 24, n_power_iterations=3)
    with torch.no_grad():
        a.weight.normal_()
        a.u.copy_(torch.nn.functional.normalize(torch.randn(16), dim=0))
    b = copy.deepcopy(a)
    b.n_power_iterations = 1
    x = torch.randn(2, 16)
    a(x)
    for _ in range(3):
        b(x)
    assert torch.allclose(a.u, b.u, atol=1e-6) and torch.allclose(a.sigma, b.sigma, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_written_formula(training):
    torch.manual_seed(3)
    layer = SigmaReparamLinear(12, 20, dtype=torch.float64).train(training)
    with torch.no_grad():
        layer.weight.normal_()
        layer.gamma.fill_(1.7)
        layer.u.copy_(torch.nn.functional.normalize(torch.randn(12, dtype=torch.float64), dim=0))
    u0 = layer.u.clone()
    x = torch.randn(5, 12, dtype=torch.float64)
    g = torch.randn(5, 20, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    # Reference by hand: u, v constants from one power step (train) or none (eval).
    w = layer.weight.detach().clone().requires_grad_(True)
    gamma = layer.gamma.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    with torch.no_grad():
        v = torch.nn.functional.normalize(w @ u0, dim=0)
        u = torch.nn.functional.normalize(w.T @ v, dim=0) if training else u0
    w_hat = gamma * w / (v @ w @ u)
    (torch.nn.functional.linear(x, w_hat, b) * g).sum().backward()
    assert torch.allclose(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(layer.gamma.grad, gamma.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(layer.bias.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert layer.u.grad is None and not layer.u.requires_grad


def test_gradcheck_eval_mode():
    torch.manual_seed(4)
    layer = SigmaReparamLinear(6, 5, dtype=torch.float64).eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    u = layer.u.clone()

    def f(weight, gamma):
        return torch.func.functional_call(layer, {"weight": weight, "gamma": gamma}, (x,))

    w = layer.weight.detach().clone().requires_grad_(True)
    gamma = layer.gamma.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w, gamma))
    assert torch.equal(layer.u, u)


def test_eval_does_not_change_buffers_and_is_deterministic():
    layer = SigmaReparamLinear(16, 8)
    with torch.no_grad():
        layer.weight.normal_()
        layer.u.copy_(torch.nn.functional.normalize(torch.randn(16), dim=0))
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 16)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.train()
    layer(x)
    assert not torch.equal(before["u"], layer.u)


def test_state_dict_round_trip():
    lin = _linear(torch.float32, seed=5)
    a = SigmaReparamLinear.from_linear(lin)
    x = torch.randn(3, 32)
    for _ in range(3):
        a(x).sum().backward()
        with torch.no_grad():
            a.weight.add_(0.1 * a.weight.grad)
    assert set(a.state_dict()) == {"weight", "bias", "gamma", "u", "sigma"}
    b = SigmaReparamLinear(32, 64)
    b.load_state_dict(a.state_dict(), strict=True)
    for mode in (False, True):
        a.train(mode), b.train(mode)
        assert torch.equal(a(x), b(x))
    assert torch.equal(a.u, b.u)


def test_gamma_is_one_element_and_old_scalar_gamma_state_dicts_load():
    a = SigmaReparamLinear.from_linear(_linear(torch.float32, seed=8))
    state = a.state_dict()
    assert state["gamma"].shape == (1,)  # FSDP2's fully_shard refuses 0-d parameters
    state["gamma"] = state["gamma"].reshape(())  # as saved before
    b = SigmaReparamLinear(32, 64)
    b.load_state_dict(state, strict=True)
    assert torch.equal(b.gamma, a.gamma)


@pytest.mark.parametrize("training", [True, False])
def test_meta_conversion_then_loaded_weights_and_reset_is_function_preserving(training):
    from entrotrain.regularizers.sigma_reparam import reset_sigma_reparam_state

    torch.manual_seed(9)
    plain = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4, bias=False))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4, bias=False))
    sigma_reparam(model)  # no weights yet: the spectral state waits
    assert model[0].weight.is_meta and model[0].u.is_meta
    model.to_empty(device="cpu")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == []  # plain weights load as the converter converts them: u, γ = σ(W) from W
    x = torch.randn(5, 8)
    torch.testing.assert_close(model.train(training)(x), plain(x), rtol=1e-5, atol=1e-6)
    assert reset_sigma_reparam_state(model) is model  # idempotent after such a load
    torch.testing.assert_close(model.train(training)(x), plain(x), rtol=1e-5, atol=1e-6)
    exact = torch.linalg.matrix_norm(plain[2].weight.detach().double(), 2)
    assert float(model[2].gamma.detach()) == pytest.approx(float(exact), rel=1e-6)
    with pytest.raises(EntrotrainError, match="init_iterations"):
        reset_sigma_reparam_state(model, init_iterations=0)
    with pytest.raises(EntrotrainError, match="reset_gamma"):
        reset_sigma_reparam_state(model, reset_gamma="yes")  # type: ignore[arg-type]


def test_dtensor_parameters_are_gathered_and_refused_at_conversion():
    """World size 1 (gloo, in process): DTensor weight / γ as FSDP2 leaves them outside forward."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    try:
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    except ImportError:  # torch 2.3: DTensor is only torch.distributed._tensor's
        pytest.skip("needs torch.distributed.tensor.DTensor, which torch 2.3 lacks")
    from torch.distributed.device_mesh import init_device_mesh

    from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = _linear(torch.float32, seed=10)
        sharded = copy.deepcopy(lin)
        sharded.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(EntrotrainError, match="before fully_shard"):
            SigmaReparamLinear.from_linear(sharded)
        plain = SigmaReparamLinear.from_linear(lin)
        with torch.no_grad():
            plain.gamma.mul_(1.5)
        layer = copy.deepcopy(plain)
        layer.weight = nn.Parameter(distribute_tensor(plain.weight.detach(), mesh, [Shard(0)]))
        layer.gamma = nn.Parameter(distribute_tensor(plain.gamma.detach(), mesh, [Shard(0)]))
        effective = layer.effective_weight()
        assert not isinstance(effective, DTensor)
        torch.testing.assert_close(effective, plain.effective_weight(), rtol=0, atol=0)
        monitor = SigmaReparamMonitor()
        got = monitor.collect(nn.ModuleDict({"fc": layer}))
        assert got == monitor.collect(nn.ModuleDict({"fc": plain}))
        assert got["sigma_reparam/fc/gamma"] == pytest.approx(1.5 * float(plain.sigma), rel=1e-6)
        layer.reset_spectral_state()  # gathers W, writes γ's local shard
        assert isinstance(layer.gamma, DTensor)
        assert float(layer.gamma.full_tensor()) == pytest.approx(float(torch.linalg.matrix_norm(lin.weight.double(), 2)), rel=1e-6)
    finally:
        dist.destroy_process_group()


def test_no_bias():
    lin = nn.Linear(8, 4, bias=False)
    layer = SigmaReparamLinear.from_linear(lin)
    assert layer.bias is None and "bias" not in layer.state_dict()
    x = torch.randn(2, 8)
    assert torch.allclose(layer(x), lin(x), atol=1e-6)


def test_autocast_power_iteration_in_float32():
    layer = SigmaReparamLinear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    assert layer.u.dtype == torch.float32 and layer.sigma.dtype == torch.float32


def test_invalid_arguments():
    with pytest.raises(EntrotrainError, match="n_power_iterations"):
        SigmaReparamLinear(4, 4, n_power_iterations=0)
    with pytest.raises(EntrotrainError, match="init_iterations"):
        SigmaReparamLinear.from_linear(nn.Linear(4, 4), init_iterations=0)
    with pytest.raises(EntrotrainError, match="nn.Linear"):
        SigmaReparamLinear.from_linear(nn.Conv1d(4, 4, 1))  # type: ignore[arg-type]


def test_compiled_forward_backward_matches_eager():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    lin = _linear(torch.float32, seed=6)
    eager = SigmaReparamLinear.from_linear(lin)
    with torch.no_grad():
        eager.u.copy_(torch.nn.functional.normalize(torch.randn(32), dim=0))
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(4, 32)
    start = time.perf_counter()
    try:
        for _ in range(2):
            y_c = compiled(x)
            y_c.square().sum().backward()
    except Exception as exc:  # noqa: BLE001 (no working C++ toolchain etc.)
        if type(exc).__name__ == "Unsupported":  # dynamo cannot trace our code: a bug here, not the machine's
            raise
        pytest.skip(f"torch.compile failed on this machine: {type(exc).__name__}: {str(exc)[:200]}")
    if time.perf_counter() - start > 60:
        pytest.skip("torch.compile took > 60 s on this machine")
    for _ in range(2):
        y_e = eager(x)
        y_e.square().sum().backward()
    assert torch.allclose(y_c, y_e, atol=1e-5)
    assert torch.allclose(compiled_layer.weight.grad, eager.weight.grad, atol=1e-5)
    assert torch.allclose(compiled_layer.gamma.grad, eager.gamma.grad, atol=1e-5)
    assert torch.allclose(compiled_layer.u, eager.u, atol=1e-6)  # the buffer mutation survives compilation


# ---------------------------------------------------------------------------------------------- converter
def _gpt(dropout: float = 0.0) -> TinyGPT:
    torch.manual_seed(7)
    model = TinyGPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    with torch.no_grad():  # move weights away from the tiny init so that σ(W) is far from 1
        for name, p in model.named_parameters():
            if "blocks" in name and p.ndim == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("training", [True, False])
def test_converter_is_function_preserving(training):
    model = _gpt()
    idx = torch.randint(0, 50, (3, 16))
    before = model.train(training)(idx)
    out = sigma_reparam(model, exclude=("lm_head",))
    assert out is model
    names = sigma_reparam_names(model)
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert model.lm_head.weight is model.tok_emb.weight  # tying untouched
    after = model.train(training)(idx)
    assert torch.allclose(before, after, atol=1e-5)


def test_converter_include_exclude_globs():
    model = sigma_reparam(_gpt(), include="blocks.*.attn.*", exclude=["**.proj"])
    assert sigma_reparam_names(model) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert isinstance(model.blocks[0].mlp.fc, nn.Linear)


def test_converter_errors():
    with pytest.raises(EntrotrainError, match=r"no nn.Linear.*blocks.0.attn.qkv"):
        sigma_reparam(_gpt(), include="nothing*")
    with pytest.raises(EntrotrainError, match="weight tying"):
        sigma_reparam(_gpt())


def test_converter_shared_module_converted_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sigma_reparam(model)
    assert isinstance(model[0], SigmaReparamLinear) and model[0] is model[2]


def test_converter_skips_multihead_attention():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        sigma_reparam(model)
    assert sigma_reparam_names(model) == ["fc"]


def test_two_rank_ddp_keeps_ranks_identical(tmp_path):
    run_script(DDP_SCRIPT, tmp_path, str(tmp_path))
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert set(s0) == set(s1) and any(k.endswith(".u") for k in s0)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # training actually moved the weights and the power iteration
    init = torch.load(tmp_path / "init.pt")
    assert not torch.equal(init["model.blocks.0.attn.qkv.weight"], s0["model.blocks.0.attn.qkv.weight"])
    assert not torch.equal(init["model.blocks.0.attn.qkv.u"], s0["model.blocks.0.attn.qkv.u"])


# ---------------------------------------------------------------------------------------------- joint q-k granularity
def test_qk_joint_granularity_is_function_preserving_and_splits_the_norms():
    from entrotrain.models import TinyGPT
    from entrotrain.regularizers.sigma_reparam import SigmaReparamQKJoint

    torch.manual_seed(0)
    model = TinyGPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32).double()
    idx = torch.randint(0, 50, (3, 16))
    before = model(idx)
    qkv_weight = model.blocks[0].attn.qkv.weight.detach().clone()
    sigma_reparam(model, include=["blocks.**"], qk_joint="**.attn.qkv")
    joint = model.blocks[0].attn.qkv
    assert isinstance(joint, SigmaReparamQKJoint)
    assert "blocks.0.attn.qkv.qk" in sigma_reparam_names(model) and "blocks.0.attn.qkv.v" in sigma_reparam_names(model)
    assert isinstance(model.blocks[0].attn.proj, SigmaReparamLinear)  # the rest stays per projection
    torch.testing.assert_close(model(idx), before, rtol=1e-10, atol=1e-10)
    model.eval()
    torch.testing.assert_close(model(idx), before, rtol=1e-10, atol=1e-10)
    c = qkv_weight.shape[1]
    assert float(joint.qk.gamma) == pytest.approx(float(torch.linalg.matrix_norm(qkv_weight[: 2 * c], 2)), rel=1e-10)
    assert float(joint.v.gamma) == pytest.approx(float(torch.linalg.matrix_norm(qkv_weight[2 * c :], 2)), rel=1e-10)
    torch.testing.assert_close(joint.effective_weight(), qkv_weight, rtol=1e-10, atol=1e-10)


def test_qk_joint_needs_three_equal_blocks():
    from entrotrain.regularizers.sigma_reparam import SigmaReparamQKJoint

    with pytest.raises(EntrotrainError, match="3·C output rows"):
        SigmaReparamQKJoint.from_linear(nn.Linear(8, 10))


# ------------------------------------------------------------------------------------- trust under failure


def _zero_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    nn.init.zeros_(model[0].weight)  # zero-initialised projection (a common init for output layers)
    return model


@pytest.mark.parametrize("init_iterations", [None, 3])
@pytest.mark.parametrize("training", [True, False])
def test_zero_weight_converts_to_the_same_function_with_finite_gradients(init_iterations, training):
    model = _zero_model()
    x = torch.randn(9, 6)
    expected = model(x)
    with pytest.warns(UserWarning, match="all-zero weight"):
        sigma_reparam(model, include="0", init_iterations=init_iterations)
    layer = model[0]
    model.train(training)
    y = model(x)
    assert torch.equal(y, expected)  # 0 + bias exactly, not 0/0 = NaN
    y.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(layer.u).all() and torch.linalg.vector_norm(layer.u) == pytest.approx(1.0)
    assert float(layer.sigma) == 0.0 and torch.isfinite(layer.sigma)
    # a few optimiser steps keep everything finite
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(x)).all()


def test_nonfinite_weight_is_refused_at_conversion():
    lin = _linear(torch.float32)
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    with pytest.raises(EntrotrainError, match="NaN/Inf"):
        SigmaReparamLinear.from_linear(lin)
    model = nn.Sequential(lin)
    with pytest.raises(EntrotrainError, match="exclude"):
        sigma_reparam(model)


def test_transient_nan_weight_does_not_poison_the_power_iteration_state():
    layer = SigmaReparamLinear.from_linear(_linear(torch.float32)).train()
    x = torch.randn(7, 32)
    layer(x)
    u, sigma = layer.u.clone(), layer.sigma.clone()
    w = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert not torch.isfinite(layer(x)).all()  # NaN data gives NaN output ...
    assert torch.equal(layer.u, u) and torch.equal(layer.sigma, sigma)  # ... but the buffers keep their last value
    with torch.no_grad():
        layer.weight.copy_(w)
    fresh = copy.deepcopy(layer)
    assert torch.equal(layer(x), fresh(x)) and torch.isfinite(layer(x)).all()


def test_zero_weight_power_iteration_keeps_a_unit_u():
    layer = SigmaReparamLinear.from_linear(_linear(torch.float64)).train()
    with torch.no_grad():
        layer.weight.zero_()
    u = layer.u.clone()
    y = layer(torch.randn(3, 32, dtype=torch.float64))
    assert torch.isfinite(y).all() and torch.equal(layer.u, u)  # u = normalize(0) = 0 would stay 0 for good


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_features": 0, "out_features": 4}, "in_features"),
        ({"in_features": 4, "out_features": -1}, "out_features"),
        ({"in_features": 4, "out_features": 4, "eps": float("nan")}, "eps"),
        ({"in_features": 4, "out_features": 4, "eps": 0.0}, "eps"),
        ({"in_features": 4, "out_features": 4, "bias": "yes"}, "bias"),
        ({"in_features": 4, "out_features": 4, "n_power_iterations": 1.5}, "n_power_iterations"),
    ],
)
def test_constructor_arguments_are_validated(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        SigmaReparamLinear(**kwargs)


def test_converter_arguments_are_validated():
    with pytest.raises(EntrotrainError, match="nn.Module"):
        sigma_reparam("model")  # type: ignore[arg-type]
    with pytest.raises(EntrotrainError, match="n_power_iterations"):
        sigma_reparam(nn.Sequential(nn.Linear(3, 3)), n_power_iterations=0)
    with pytest.raises(EntrotrainError, match="init_iterations"):
        sigma_reparam(nn.Sequential(nn.Linear(3, 3)), init_iterations=-2)


def test_qk_joint_refuses_a_non_linear():
    from entrotrain.regularizers.sigma_reparam import SigmaReparamQKJoint

    with pytest.raises(EntrotrainError, match="nn.Linear"):
        SigmaReparamQKJoint.from_linear(nn.Conv1d(4, 12, 1))  # type: ignore[arg-type]
