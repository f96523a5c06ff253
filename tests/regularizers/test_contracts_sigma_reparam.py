"""Property tests of the failure contracts of σReparam (layer, joint-qk layer, converter, names), the weight schedules,
``combine_regularizers`` and ``functional.finite_row_mask``: every draw either raises ``EntrotrainError`` or gives the
documented finite answer, checked against a float64 brute-force reference.

Contract of the σReparam conversion (``SigmaReparamLinear.from_linear`` / ``sigma_reparam``):

- NaN/±Inf in a weight: ``EntrotrainError`` at conversion (σ(W) is undefined);
- otherwise the converted layer computes the original Linear's function: in eval mode for any ``init_iterations``
  (γ₀ and the eval σ both come from the stored ``u``), in training mode at the first forward when ``u`` is the exact
  top singular vector (``init_iterations=None``), to ``|y - y_ref| <= tol · (|x| |W|ᵀ + |b|)`` elementwise with
  ``tol = (C_in + 4) · eps(dtype)`` against the float64 ``x Wᵀ + b``; for weights of any scale (1e-20 .. 1e20), of
  rank 1, and all-zero (γ/σ := 0, a warning);
- forward and backward give finite outputs and gradients, and ``sigma``, γ and the effective weight stay finite over
  several training forwards.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from entrotrain.errors import EntrotrainError
from entrotrain.functional import finite_row_mask
from entrotrain.regularizers.composition import Regularizer, RegularizerSum, combine_regularizers, scheduled_weight
from entrotrain.regularizers.sigma_reparam import (
    SigmaReparamLinear,
    SigmaReparamQKJoint,
    sigma_reparam,
    sigma_reparam_names,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
KINDS = ["random", "zero", "rank1", "huge", "tiny"]
NONFINITE = [None, math.nan, math.inf, -math.inf]


def make_weight(kind: str, out_f: int, in_f: int, seed: int) -> Tensor:
    """A float64 ``(out_f, in_f)`` weight of the given kind."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    if kind == "zero":
        return torch.zeros_like(w)
    if kind == "rank1":
        return torch.outer(w[:, 0], torch.randn(in_f, generator=g, dtype=torch.float64))
    if kind == "huge":
        return w * 1e20
    if kind == "tiny":
        return w * 1e-20
    return w


def make_linear(w: Tensor, bias: bool, dtype: torch.dtype, seed: int) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w.to(dtype))
        if bias:
            g = torch.Generator().manual_seed(seed + 1)
            lin.bias.copy_(torch.randn(w.shape[0], generator=g, dtype=torch.float64).to(dtype))
    return lin


def assert_same_function(y: Tensor, x: Tensor, lin: nn.Linear, dtype: torch.dtype, what: str) -> None:
    """``y`` equals the float64 ``x Wᵀ + b`` of ``lin``'s (dtype-rounded) weights to the bound in the module doc."""
    x64, w64 = x.double(), lin.weight.detach().double()
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64) if lin.bias is None else lin.bias.detach().double()
    ref = x64 @ w64.T + b64
    scale = x64.abs() @ w64.abs().T + b64.abs()
    tol = (w64.shape[1] + 4) * torch.finfo(dtype).eps
    err = (y.double() - ref).abs()
    assert bool(torch.isfinite(y).all()), what
    assert bool((err <= tol * scale + 1e-300).all()), f"{what}: max err {float(err.max())}, bound {float((tol * scale).max())}"


@st.composite
def linear_cases(draw):
    return dict(
        in_f=draw(st.integers(1, 12)),
        out_f=draw(st.integers(1, 12)),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        kind=draw(st.sampled_from(KINDS)),
        nonfinite=draw(st.sampled_from(NONFINITE)),
        n_power_iterations=draw(st.integers(1, 3)),
        init_iterations=draw(st.one_of(st.none(), st.integers(1, 20))),
        seed=draw(st.integers(0, 2**16)),
        where=draw(st.integers(0, 10**6)),
    )


@given(linear_cases())
def test_sigma_reparam_linear_conversion_contract(case):
    w = make_weight(case["kind"], case["out_f"], case["in_f"], case["seed"])
    if case["nonfinite"] is not None:
        w.view(-1)[case["where"] % w.numel()] = case["nonfinite"]
    dtype = case["dtype"]
    lin = make_linear(w, case["bias"], dtype, case["seed"])
    kwargs = dict(n_power_iterations=case["n_power_iterations"], init_iterations=case["init_iterations"])
    if case["nonfinite"] is not None:
        with pytest.raises(EntrotrainError, match="NaN/Inf"):
            SigmaReparamLinear.from_linear(lin, **kwargs)
        with pytest.raises(EntrotrainError, match="NaN/Inf"):
            sigma_reparam(nn.Sequential(lin), **kwargs)
        return
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer = SigmaReparamLinear.from_linear(lin, **kwargs)
    zero_warned = any("all-zero weight" in str(r.message) for r in record)
    assert zero_warned == (case["kind"] == "zero")
    g = torch.Generator().manual_seed(case["seed"] + 2)
    x = torch.randn(3, case["in_f"], generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        assert_same_function(layer.eval()(x), x, lin, dtype, "eval forward at step 0")
        if case["init_iterations"] is None:  # u is the exact top singular vector: one power step keeps σ
            assert_same_function(copy.deepcopy(layer).train()(x), x, lin, dtype, "training forward at step 0")
    layer.train()
    for step in range(3):
        layer.zero_grad()
        y = layer(x)
        assert bool(torch.isfinite(y).all()), step
        y.float().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), (step, name)
        assert bool(torch.isfinite(layer.sigma)) and bool(torch.isfinite(layer.gamma))
        assert bool(torch.isfinite(layer.effective_weight()).all())
        unit = torch.linalg.vector_norm(layer.u.double())
        assert abs(float(unit) - 1.0) < 1e-5, "u stays a unit vector"


@settings(max_examples=25)
@given(linear_cases())
def test_sigma_reparam_conv1d_conversion_contract(case):
    """The same contract for transformers' Conv1D (weight stored ``(in, out)``): refused when non-finite, else the
    converted layer computes the Conv1D's function ``x W + b`` (compared with the Linear of ``Wᵀ``)."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    from entrotrain.regularizers.sigma_reparam import SigmaReparamConv1D

    w = make_weight(case["kind"], case["out_f"], case["in_f"], case["seed"])
    if case["nonfinite"] is not None:
        w.view(-1)[case["where"] % w.numel()] = case["nonfinite"]
    dtype = case["dtype"]
    lin = make_linear(w, True, dtype, case["seed"])  # Conv1D always has a bias
    conv = conv1d(case["out_f"], case["in_f"]).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    kwargs = dict(n_power_iterations=case["n_power_iterations"], init_iterations=case["init_iterations"])
    if case["nonfinite"] is not None:
        with pytest.raises(EntrotrainError, match="NaN/Inf"):
            sigma_reparam(nn.Sequential(conv), **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-zero warning, covered above
        model = sigma_reparam(nn.Sequential(conv), **kwargs)
    layer = model[0]
    assert isinstance(layer, SigmaReparamConv1D) and layer.weight.shape == conv.weight.shape
    x = torch.randn(3, case["in_f"], generator=torch.Generator().manual_seed(case["seed"] + 2), dtype=torch.float64)
    x = x.to(dtype)
    with torch.no_grad():
        assert_same_function(layer.eval()(x), x, lin, dtype, "Conv1D eval forward at step 0")
        if case["init_iterations"] is None:
            assert_same_function(copy.deepcopy(layer).train()(x), x, lin, dtype, "Conv1D training forward at step 0")
    layer.train()
    for step in range(2):
        layer.zero_grad()
        y = layer(x)
        y.float().sum().backward()
        assert bool(torch.isfinite(y).all()), step
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in layer.parameters()), step
    assert abs(float(torch.linalg.vector_norm(layer.u.double())) - 1.0) < 1e-5


@settings(max_examples=25)
@given(
    c=st.integers(1, 4),
    in_f=st.integers(1, 12),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_qk_joint_conversion_contract(c, in_f, bias, dtype, kind, seed):
    w = make_weight(kind, 3 * c, in_f, seed)
    lin = make_linear(w, bias, dtype, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-zero warning, covered above
        joint = SigmaReparamQKJoint.from_linear(lin)
    assert joint.qk.out_features == 2 * c and joint.v.out_features == c
    x = torch.randn(4, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        assert_same_function(joint.eval()(x), x, lin, dtype, "qk-joint eval forward")
        assert_same_function(copy.deepcopy(joint).train()(x), x, lin, dtype, "qk-joint training forward")
    joint.train()
    y = joint(x)
    y.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in joint.parameters())
    for part, rows in ((joint.qk, slice(0, 2 * c)), (joint.v, slice(2 * c, 3 * c))):  # σ of each block, float64 SVD
        exact = torch.linalg.matrix_norm(lin.weight.detach()[rows].double(), ord=2)
        assert float(part.gamma.detach()) == pytest.approx(float(exact), rel=10 * torch.finfo(dtype).eps, abs=0.0)


@given(out_f=st.integers(1, 12).filter(lambda n: n % 3), in_f=st.integers(1, 12))
def test_qk_joint_refuses_rows_not_a_multiple_of_three(out_f, in_f):
    with pytest.raises(EntrotrainError, match="3·C"):
        SigmaReparamQKJoint.from_linear(nn.Linear(in_f, out_f))


# ------------------------------------------------------------------------------------------ converter


class Net(nn.Module):
    """Named Linears ``a``, ``blocks.0``, ``blocks.2``, ``attn.qkv`` (3·C rows), ``head``."""

    def __init__(self, d: int, c: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Linear(d, d, dtype=dtype)
        self.blocks = nn.Sequential(nn.Linear(d, d, dtype=dtype), nn.Tanh(), nn.Linear(d, d, bias=False, dtype=dtype))
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * c, dtype=dtype)
        self.head = nn.Linear(3 * c, 2, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn.qkv(self.blocks(self.a(x))))


LINEAR_NAMES = ["a", "blocks.0", "blocks.2", "attn.qkv", "head"]
GLOBS = ["*", "**", "a", "blocks.*", "*.0", "head", "attn.*", "*qkv", "**.qkv", "nomatch", "b*", "blocks.**"]


def _glob(name: str, pattern: str) -> bool:
    """Segment globs by brute force: ``*`` within one segment (fnmatch on the segment), ``**`` = any segments."""

    def match(names: list[str], parts: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(names[i:], parts[1:]) for i in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and match(names[1:], parts[1:])

    return match(name.split("."), pattern.split("."))


@given(
    d=st.integers(1, 6),
    c=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    include=st.lists(st.sampled_from(GLOBS), min_size=1, max_size=3),
    exclude=st.lists(st.sampled_from(GLOBS), max_size=2),
    joint=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_converter_picks_exactly_the_globbed_linears_and_preserves_the_function(d, c, dtype, include, exclude, joint, seed):
    torch.manual_seed(seed)
    model = Net(d, c, dtype)
    original = copy.deepcopy(model)
    chosen = [n for n in LINEAR_NAMES if any(_glob(n, p) for p in include) and not any(_glob(n, p) for p in exclude)]
    qk_joint = "**.qkv" if joint else ()
    if not chosen:
        with pytest.raises(EntrotrainError, match="matched include"):
            sigma_reparam(model, include=include, exclude=exclude, qk_joint=qk_joint)
        return
    assert sigma_reparam(model, include=include, exclude=exclude, qk_joint=qk_joint) is model
    expected = []
    for name in chosen:
        expected += [f"{name}.qk", f"{name}.v"] if joint and name == "attn.qkv" else [name]
    assert sigma_reparam_names(model) == expected
    for name in LINEAR_NAMES:
        module = model.get_submodule(name)
        kind = (SigmaReparamQKJoint if joint and name == "attn.qkv" else SigmaReparamLinear) if name in chosen else nn.Linear
        assert type(module) is kind, name
    x = torch.randn(5, d, dtype=dtype)
    with torch.no_grad():
        ref = original.double()(x.double())
        for mode in (False, True):
            y = copy.deepcopy(model).train(mode)(x)
            tol = 64 * torch.finfo(dtype).eps
            assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max() + 1)), mode


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_power_iterations": 0}, {"n_power_iterations": 1.5}, {"n_power_iterations": True},
        {"n_power_iterations": "2"}, {"init_iterations": 0}, {"init_iterations": 2.0}, {"include": [1]},
        {"exclude": [None]}, {"qk_joint": [3]},
    ],
)
def test_converter_refuses_bad_arguments(kwargs):
    with pytest.raises(EntrotrainError):
        sigma_reparam(Net(3, 1, torch.float32), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_features": 0}, {"out_features": -1}, {"in_features": 2.0}, {"bias": 1}, {"n_power_iterations": 0},
        {"eps": math.nan}, {"eps": 0.0}, {"eps": -1e-3}, {"eps": math.inf},
    ],
)
def test_layer_refuses_bad_arguments(kwargs):
    args = {"in_features": 3, "out_features": 2, **kwargs}
    with pytest.raises(EntrotrainError):
        SigmaReparamLinear(**args)


def test_converter_refuses_a_non_module():
    with pytest.raises(EntrotrainError, match="nn.Module"):
        sigma_reparam([nn.Linear(2, 2)])


# ------------------------------------------------------------------------------------------ weight schedules


def brute_weight(step: int, w0: float, schedule: str, wT: float, total: int | None) -> float:
    """The schedule written out with ``Fraction``-free float64 arithmetic in a different order."""
    if schedule == "constant":
        return w0
    t = min(max(step, 0), total)
    if schedule == "warmup":
        return w0 * t / total
    c = (1.0 + math.cos(math.pi * t / total)) / 2.0
    return c * w0 + (1.0 - c) * wT


finite_weights = st.one_of(st.just(0.0), st.floats(0.0, 1e6, allow_nan=False), st.floats(1e-300, 1e-290))


@given(
    step=st.integers(-50, 10**6),
    weight=finite_weights,
    final_weight=finite_weights,
    schedule=st.sampled_from(["constant", "cosine", "warmup"]),
    total_steps=st.integers(1, 1000),
)
def test_scheduled_weight_matches_the_formula(step, weight, final_weight, schedule, total_steps):
    got = scheduled_weight(step, weight, schedule, final_weight, total_steps)
    assert isinstance(got, float) and math.isfinite(got) and got >= 0.0
    want = brute_weight(step, weight, schedule, final_weight, total_steps)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)
    if schedule != "constant":
        lo, hi = sorted((weight, final_weight if schedule == "cosine" else 0.0))
        assert lo * (1 - 1e-12) <= got <= hi * (1 + 1e-12)


BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, -1e-300, "1", None, True, [1.0]]


@given(
    which=st.sampled_from(["step", "weight", "final_weight", "schedule", "total_steps"]),
    data=st.data(),
)
def test_scheduled_weight_refuses_bad_parameters(which, data):
    args = {"step": 3, "weight": 1.0, "schedule": "cosine", "final_weight": 0.1, "total_steps": 10}
    bad = {
        "step": [1.5, "3", None, True, math.nan],
        "weight": BAD_NUMBERS,
        "final_weight": BAD_NUMBERS,
        "schedule": ["linear", None, "", 1, "Cosine"],
        "total_steps": [0, -1, 2.5, None, True, "10"],
    }[which]
    args[which] = data.draw(st.sampled_from(bad))
    with pytest.raises(EntrotrainError, match=which):
        scheduled_weight(args["step"], args["weight"], args["schedule"], args["final_weight"], args["total_steps"])


# ------------------------------------------------------------------------------------------ combine_regularizers


class Scaled(Regularizer):
    """Penalty = ``k`` · sum of the input (keeps the graph)."""

    def __init__(self, k: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def penalty(self, x: Tensor) -> Tensor:
        return self.k * x.sum()


@st.composite
def regularizer_specs(draw):
    schedule = draw(st.sampled_from(["constant", "cosine", "warmup"]))
    return dict(
        k=draw(st.floats(-10, 10, allow_nan=False)),
        weight=draw(st.floats(0, 100, allow_nan=False)),
        schedule=schedule,
        final_weight=draw(st.floats(0, 100, allow_nan=False)),
        total_steps=draw(st.integers(1, 50)),
        name=draw(st.sampled_from(["r", "s", "t"])),
    )


@given(specs=st.lists(regularizer_specs(), max_size=5), step=st.integers(-3, 80))
def test_combine_regularizers_equals_the_weighted_sum(specs, step):
    regs = [Scaled(**s) for s in specs]
    combined = combine_regularizers(regs)
    if not specs:
        assert combined is None and combine_regularizers(None) is None
        return
    x = torch.linspace(-1, 2, 7, dtype=torch.float64, requires_grad=True)
    out = combined(x, step=step)
    want = sum(
        brute_weight(step, s["weight"], s["schedule"], s["final_weight"], s["total_steps"]) * s["k"] * float(x.detach().sum())
        for s in specs
    )
    assert math.isfinite(float(out.total))
    assert float(out.total) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert len(out.parts) == len(specs) and all(not v.requires_grad for v in out.parts.values())
    assert float(sum(out.parts.values())) == pytest.approx(float(out.total), rel=1e-9, abs=1e-9)
    out.total.backward()
    assert (x.grad is None) if not combined.is_active() else bool(torch.isfinite(x.grad).all())  # weight 0: not run


@pytest.mark.parametrize("coeff", [math.nan, math.inf, -1.0, -1e-9])
def test_composition_refuses_bad_coefficients(coeff):
    reg = Scaled(1.0)
    with pytest.raises(EntrotrainError, match="coefficient"):
        coeff * reg
    with pytest.raises(EntrotrainError, match="coefficient"):
        RegularizerSum([(coeff, reg)])


@pytest.mark.parametrize(
    "regs",
    [[3], [Scaled(1.0), 3], ["a", "b"], "ab", [Scaled(1.0), None], [nn.Linear(2, 2)], Scaled(1.0)],
)
def test_combine_regularizers_refuses_what_is_not_a_list_of_regularizers(regs):
    with pytest.raises(EntrotrainError, match="regularizers"):
        combine_regularizers(regs)


# ------------------------------------------------------------------------------------------ finite_row_mask

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@given(
    n=st.integers(0, 6),
    d=st.integers(0, 5),
    dtype=st.sampled_from(FLOAT_DTYPES + INT_DTYPES),
    specials=st.lists(st.tuples(st.integers(0, 100), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_finite_row_mask_matches_a_loop_over_rows(n, d, dtype, specials, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        for pos, value in specials:
            if x.numel():
                x.view(-1)[pos % x.numel()] = value
        x = x.to(dtype)
    else:
        x = torch.randint(0, 2, (n, d), generator=g).to(dtype)
    mask = finite_row_mask(x)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    expected = [all(math.isfinite(float(v)) for v in row) for row in x.tolist()]
    assert mask.tolist() == expected


@pytest.mark.parametrize("x", [torch.ones(3), torch.ones(2, 3, 4), torch.tensor(1.0), [[1.0, 2.0]], None])
def test_finite_row_mask_refuses_what_is_not_a_matrix(x):
    with pytest.raises(EntrotrainError, match="x"):
        finite_row_mask(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-20, 1e20])
@pytest.mark.parametrize("init_iterations", [None, 30])
def test_power_iteration_is_scale_free(dtype, scale, init_iterations):
    """Regression: ``F.normalize`` divided by ``eps=1e-12`` instead of ``‖W u‖`` for weights of 1e-20 (training
    output 1e5× too large) and ``‖W u‖²`` overflowed float32 for weights of 1e20 (σ = 0, output = bias only)."""
    lin = make_linear(make_weight("random", 4, 5, 0) * scale, False, dtype, 0)
    layer = SigmaReparamLinear.from_linear(lin, init_iterations=init_iterations)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    exact = torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2)
    with torch.no_grad():
        assert_same_function(layer.eval()(x), x, lin, dtype, "eval")
        if init_iterations is None:
            assert_same_function(layer.train()(x), x, lin, dtype, "training")
        for _ in range(20):
            layer.train()(x)
    assert float(layer.sigma) == pytest.approx(float(exact), rel=1e-5)
