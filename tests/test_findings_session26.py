"""Findings of session 26 on σReparam under activation checkpointing (each test failed before its fix).

The recomputation in backward repeated the power iteration from the ``u`` of the *last* training forward: a layer
whose forward ran twice before one backward (two micro-batches or two views with their losses summed, or a layer
called twice inside one checkpointed region) got the second forward's σ in the first forward's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from entrotrain.regularizers.sigma_reparam import SigmaReparamConv1D, SigmaReparamLinear, SigmaReparamQKJoint


def _layer(kind: str, n_power_iterations: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer: nn.Module = SigmaReparamLinear(6, 5, n_power_iterations=n_power_iterations)
    elif kind == "conv1d":
        layer = SigmaReparamConv1D(6, 5, n_power_iterations=n_power_iterations)
    else:
        layer = SigmaReparamQKJoint(SigmaReparamLinear(6, 8, n_power_iterations=n_power_iterations),
                                    SigmaReparamLinear(6, 4, n_power_iterations=n_power_iterations))
    with torch.no_grad():  # u far from converged, as after optimizer steps: each forward moves it visibly
        for sub in layer.modules():
            if isinstance(sub, SigmaReparamLinear):
                sub.u.copy_(F.normalize(torch.randn(sub.u.shape, dtype=sub.u.dtype), dim=0))
    return layer


def _inputs() -> list[torch.Tensor]:
    return [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _state(layer: nn.Module) -> torch.Tensor:
    grads = [p.grad.flatten() for p in layer.parameters()]
    us = [m.u for m in layer.modules() if isinstance(m, SigmaReparamLinear)]
    return torch.cat(grads + us)


def _two_forwards_one_backward(kind: str, style: str, n: int) -> torch.Tensor:
    layer = _layer(kind, n)
    if style == "plain":
        call = layer
    else:
        def call(x: torch.Tensor) -> torch.Tensor:
            return torch_checkpoint.checkpoint(layer, x, use_reentrant=style == "reentrant")
    outs = [call(x.requires_grad_(style == "reentrant")) for x in _inputs()]
    sum(o.square().sum() for o in outs).backward()
    return _state(layer)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "qk_joint"])
@pytest.mark.parametrize("style", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("n", [1, 3])
def test_two_forwards_before_one_backward_get_each_their_own_sigma(kind, style, n) -> None:
    plain = _two_forwards_one_backward(kind, "plain", n)
    assert torch.allclose(_two_forwards_one_backward(kind, style, n), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["non_reentrant", "reentrant"])
def test_a_layer_called_twice_in_one_checkpointed_region(style) -> None:
    """Weight sharing (ALBERT-style, a recurrent block): two calls inside one region, recomputed in order."""
    def run(checkpointed: bool) -> torch.Tensor:
        layer = _layer("linear", 1)
        square = nn.Linear(5, 6)
        torch.manual_seed(1)
        square.reset_parameters()

        def region(x: torch.Tensor) -> torch.Tensor:
            return layer(torch.tanh(square(layer(x))))

        x = _inputs()[0].requires_grad_(style == "reentrant")
        out = torch_checkpoint.checkpoint(region, x, use_reentrant=style == "reentrant") if checkpointed else region(x)
        out.square().sum().backward()
        return _state(layer)

    assert torch.allclose(run(True), run(False), rtol=1e-5, atol=1e-5)


def test_eval_forwards_and_a_deepcopy_between_forward_and_backward_change_nothing() -> None:
    def run(checkpointed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        layer = _layer("linear", 2)
        x = _inputs()[0]
        out = torch_checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        layer.eval()
        with torch.no_grad():
            layer(_inputs()[1])  # an eval forward: no update, no start kept
        twin = copy.deepcopy(layer)  # copies the kept starts too
        layer.train()
        out.square().sum().backward()
        assert set(twin.state_dict()) == {"weight", "bias", "gamma", "u", "sigma"}  # the starts are not state
        return _state(layer), twin.u

    (got, twin_u), (plain, plain_twin_u) = run(True), run(False)
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-5) and torch.equal(twin_u, plain_twin_u)


def test_gradient_accumulation_with_checkpointing_matches_the_plain_model() -> None:
    """Forward, backward, forward, backward (sound before the fix too)."""
    def run(checkpointed: bool) -> torch.Tensor:
        layer = _layer("linear", 1)
        for x in _inputs():
            out = torch_checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            out.square().sum().backward()
        return _state(layer)

    assert torch.allclose(run(True), run(False), rtol=1e-5, atol=1e-5)


def test_plain_training_keeps_no_recomputation_state() -> None:
    """Only a forward that checkpointing may recompute keeps its starting u and input fingerprint: a plain training
    step (the hot path) keeps nothing (the check ran inside the power iteration's no_grad, where it always held)."""
    layer = SigmaReparamLinear.from_linear(nn.Linear(6, 5))
    layer(torch.randn(3, 6)).square().sum().backward()
    assert layer._step_start is None and not layer._start_log()
    torch_checkpoint.checkpoint(layer, torch.randn(3, 6, requires_grad=True), use_reentrant=False).sum().backward()
    assert layer._step_start is not None and len(layer._start_log()) == 1
