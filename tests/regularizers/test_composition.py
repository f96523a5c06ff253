"""Regularizer base: weights, schedules (constant, cosine, warm-up), step handling and ``+`` / ``*`` composition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.composition import Regularizer, RegularizerSum, scheduled_weight


class Const(Regularizer):
    """Penalty = sum of the input tensor (keeps the graph)."""

    name = "const"

    def penalty(self, x: Tensor) -> Tensor:
        return x.sum()


class Square(Regularizer):
    name = "square"

    def penalty(self, x: Tensor) -> Tensor:
        return (x**2).sum()


def test_weight_scales_total_and_parts_are_detached():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    out = Const(0.5)(x)
    assert out.total.item() == pytest.approx(1.5)
    assert out.total.requires_grad and not out.parts["const"].requires_grad
    assert set(out.parts) == {"const"} and out.parts["const"].item() == pytest.approx(1.5)
    out.total.backward()
    assert torch.equal(x.grad, torch.tensor([0.5, 0.5]))


def test_sum_and_scalar_multiple():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = Const(0.5), Square(2.0)
    reg = a + 3 * b
    assert isinstance(reg, RegularizerSum)
    out = reg(x)
    assert out.total.item() == pytest.approx(0.5 * 3 + 3 * 2.0 * 5)
    assert out.parts["const"].item() == pytest.approx(1.5) and out.parts["square"].item() == pytest.approx(30.0)
    assert sum(p.item() for p in out.parts.values()) == pytest.approx(out.total.item())
    out.total.backward()
    assert torch.allclose(x.grad, 0.5 + 3 * 2.0 * 2 * x.detach())
    # nested sums flatten; the coefficient distributes; repeated names stay unique
    nested = 2 * (reg + Const(1.0))
    assert nested.coefficients == [2.0, 6.0, 2.0]
    parts = nested(x).parts
    assert set(parts) == {"const", "square", "const.1"}
    assert parts["const.1"].item() == pytest.approx(2 * 3.0)
    assert (a * 2).coefficients == [2.0]


def test_cosine_schedule_matches_formula():
    w0, wf, total = 1.0, 0.1, 100
    reg = Const(w0, schedule="cosine", final_weight=wf, total_steps=total)
    for t in (0, total // 2, total, 2 * total):
        expected = wf + (w0 - wf) * (1 + math.cos(math.pi * min(t, total) / total)) / 2
        assert reg.current_weight(t) == pytest.approx(expected)
    assert reg.current_weight(0) == pytest.approx(w0)
    assert reg.current_weight(50) == pytest.approx((w0 + wf) / 2)
    assert reg.current_weight(100) == pytest.approx(wf)
    x = torch.ones(1)
    assert reg(x, step=50).total.item() == pytest.approx((w0 + wf) / 2)
    assert reg.step == 50
    reg.set_step(100)
    assert reg(x).total.item() == pytest.approx(wf)


def test_warmup_and_sum_propagates_step():
    a = Const(2.0, schedule="warmup", total_steps=10)
    b = Const(1.0, schedule="cosine", final_weight=0.0, total_steps=10, name="b")
    reg = a + b
    reg.set_step(5)
    assert a.current_weight() == pytest.approx(1.0) and b.current_weight() == pytest.approx(0.5)
    out = reg(torch.ones(1), step=10)
    assert out.parts["const"].item() == pytest.approx(2.0) and out.parts["b"].item() == pytest.approx(0.0)
    assert scheduled_weight(3, 4.0) == 4.0


def test_errors_name_the_fix():
    with pytest.raises(EntrotrainError, match="total_steps"):
        Const(1.0, schedule="cosine")
    with pytest.raises(EntrotrainError, match="schedule must be"):
        Const(1.0, schedule="linear", total_steps=3)  # type: ignore[arg-type]
    with pytest.raises(EntrotrainError, match="capture"):
        Const(1.0)()
    with pytest.raises(EntrotrainError, match="only be added"):
        Const(1.0) + 3  # type: ignore[operator]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": float("nan")}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"weight": -1.0}, "weight"),
        ({"weight": 1.0, "schedule": "cosine", "total_steps": 0}, "total_steps"),
        ({"weight": 1.0, "schedule": "warmup", "total_steps": 2.5}, "total_steps"),
        ({"weight": 1.0, "schedule": "cosine", "total_steps": 5, "final_weight": float("nan")}, "final_weight"),
        ({"weight": 1.0, "name": ""}, "name"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        Const(**kwargs)


def test_bad_steps_and_coefficients_raise():
    reg = Const(1.0, schedule="cosine", total_steps=10)
    with pytest.raises(EntrotrainError, match="step"):
        reg.set_step(1.5)  # type: ignore[arg-type]
    with pytest.raises(EntrotrainError, match="step"):
        reg(torch.ones(1), step="3")  # type: ignore[arg-type]
    reg.set_step(torch.tensor(4))  # a global_step tensor is fine
    assert reg.step == 4
    with pytest.raises(EntrotrainError, match="coefficient"):
        float("nan") * reg
    with pytest.raises(EntrotrainError, match="coefficient"):
        reg * -2.0
    with pytest.raises(EntrotrainError, match="at least one"):
        RegularizerSum([])
    with pytest.raises(EntrotrainError, match="schedule"):
        scheduled_weight(0, 1.0, "exp")  # type: ignore[arg-type]
    assert scheduled_weight(-5, 2.0, "warmup", total_steps=4) == 0.0  # negative steps count as 0


def test_mixed_sum_captures_attention_and_activations_under_one_with():
    """A sum of an attention regulariser and two representation regularisers (different modules) captures each
    term's input in one ``with``; its total equals the terms called on their own captures."""
    from entrotrain.regularizers import AttentionEntropyMaximization
    from entrotrain.regularizers.representation import MatrixEntropyRegularizer, VendiRegularizer
    from tests.helpers.lightning_models import TinyLM, token_loader

    torch.manual_seed(0)
    model = TinyLM().double()
    x = next(iter(token_loader(n=8, batch_size=8)))[0][:, :-1]
    aem = AttentionEntropyMaximization(0.5)
    ment = MatrixEntropyRegularizer(1.0, order=2, include=["blocks.0"])
    vendi = VendiRegularizer(0.25, include=["blocks.1"])
    reg = aem + 2.0 * ment + vendi
    with reg.capture(model) as taps:
        model(x)
    assert isinstance(taps, list) and len(taps) == 3
    out = reg()
    assert set(out.parts) == {aem.name, ment.name, vendi.name}
    with aem.capture(model):
        model(x)
    with ment.capture(model):
        model(x)
    with vendi.capture(model):
        model(x)
    expected = aem().total + 2.0 * ment().total + vendi().total
    torch.testing.assert_close(out.total, expected, rtol=1e-12, atol=1e-12)
    out.total.backward()  # the graph reaches the model through every term
    assert all(p.grad is not None for p in model.blocks[0].parameters() if p.requires_grad)
    with pytest.raises(EntrotrainError, match="capture"):
        reg()  # what was captured was released by the call


def test_sum_of_representation_regularizers_captures_its_own_modules():
    from entrotrain.regularizers.representation import MatrixEntropyRegularizer
    from tests.helpers.lightning_models import TinyLM, token_loader

    torch.manual_seed(0)
    model = TinyLM().double()
    x = next(iter(token_loader(n=8, batch_size=8)))[0][:, :-1]
    a = MatrixEntropyRegularizer(1.0, order=1, include=["blocks.0"])
    b = MatrixEntropyRegularizer(1.0, order=1, include=["blocks.1"])
    with (a + b).capture(model):
        model(x)
    total = (a + b)().total
    with a.capture(model):
        model(x)
    with b.capture(model):
        model(x)
    torch.testing.assert_close(total, a().total + b().total, rtol=1e-12, atol=1e-12)


def test_python_sum_of_regularizers_and_adding_a_non_regularizer():
    """``sum([a, b])`` starts from 0 (it raised Python's TypeError); ``reg + 3`` raises EntrotrainError naming the fix."""
    x = torch.tensor([1.0, 2.0])
    total = sum([Const(0.5), Square(2.0)])
    assert isinstance(total, RegularizerSum) and total(x).total.item() == pytest.approx(0.5 * 3 + 2.0 * 5)
    assert isinstance(Const(1.0) + 0, RegularizerSum)
    for bad in (3, "a", torch.ones(1), True):
        with pytest.raises(EntrotrainError, match="only be added to another Regularizer"):
            Const(1.0) + bad
    with pytest.raises(EntrotrainError, match="only be added"):
        3 + Const(1.0)


def test_sum_of_several_capture_groups_refuses_positional_inputs():
    """A sum whose terms read different capture groups (router and activation, attention and router) called with
    positional inputs raises, naming the keyword form by group: before, every term got the one tensor, so router
    logits were silently scored as activations. A sum of one group still takes positional inputs."""
    from entrotrain.regularizers import AttentionEntropyMaximization, LoadBalancingLoss, RouterZLoss
    from entrotrain.regularizers.representation import MatrixEntropyRegularizer

    x = torch.randn(8, 4)
    for reg, groups in (
        (RouterZLoss(1e-3) + MatrixEntropyRegularizer(1.0), "activation=..., router=..."),
        (AttentionEntropyMaximization(0.01) + RouterZLoss(1e-3), "attention=..., router=..."),
        (0.0 * RouterZLoss(1e-3) + MatrixEntropyRegularizer(1.0), "activation=..., router=..."),
    ):
        with pytest.raises(EntrotrainError, match=f"several capture groups.*reg\\({groups}\\)"):
            reg(x)
    same_group = RouterZLoss(1e-3) + LoadBalancingLoss(1e-2, top_k=2)
    torch.testing.assert_close(
        same_group(x).total, RouterZLoss(1e-3)(x).total + LoadBalancingLoss(1e-2, top_k=2)(x).total
    )
    mixed = RouterZLoss(1e-3) + MatrixEntropyRegularizer(1.0)
    torch.testing.assert_close(
        mixed(router=x, activation=x).total, RouterZLoss(1e-3)(x).total + MatrixEntropyRegularizer(1.0)(x).total
    )
