"""Representation regularisers: values against float64 brute forces, sign/normalisation, composition and schedules,
capture through a differentiable ActivationTap, and SimSiamTask integration (2-rank DDP MMCR: test_mmcr_ddp.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.representation import MatrixEntropyRegularizer, MMCRLoss, VendiRegularizer
from entrotrain.taps.activation_tap import ActivationTap
from tests.functional.test_spectral_objectives import brute_matrix_entropy, brute_mmcr, brute_vendi_entropy


def _x(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,d", [(10, 4), (4, 10)])
def test_matrix_entropy_penalty_is_minus_weighted_entropy(order, normalize, n, d):
    x = _x(n, d, seed=n + d)
    out = MatrixEntropyRegularizer(0.3, order, normalize=normalize)(x)
    h = brute_matrix_entropy(x.numpy(), order)
    expected = -0.3 * h / (math.log(min(n, d)) if normalize else 1.0)
    assert float(out.total) == pytest.approx(expected, abs=1e-10)
    assert set(out.parts) == {"matrix_entropy"} and not out.parts["matrix_entropy"].requires_grad


@pytest.mark.parametrize("q", [1.0, 2.0, 0.5])
def test_vendi_penalty(q):
    x = _x(9, 5, seed=2)
    out = VendiRegularizer(0.5, q)(x)
    assert float(out.total) == pytest.approx(-0.5 * brute_vendi_entropy(x.numpy(), q) / math.log(5), abs=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_mmcr_layouts_and_value(lam):
    n, k, d = 6, 3, 4
    z = _x(n * k, d, seed=4)  # sample-major rows
    ref = brute_mmcr(z.numpy(), k, lam)
    assert float(MMCRLoss(1.0, lam, n_views=k)(z).total) == pytest.approx(ref, abs=1e-10)
    assert float(MMCRLoss(2.0, lam)(z.reshape(n, k, d)).total) == pytest.approx(2 * ref, abs=1e-10)
    view_major = z.reshape(n, k, d).transpose(0, 1).reshape(n * k, d)
    assert float(MMCRLoss(1.0, lam, n_views=k, layout="view_major")(view_major).total) == pytest.approx(ref, abs=1e-10)


def test_composition_and_schedule():
    x = _x(8, 5, seed=1)
    a = MatrixEntropyRegularizer(0.2, 2)
    b = VendiRegularizer(1.0, 1.0, schedule="warmup", total_steps=10)
    total = (a + 3 * b)(x, step=5)
    expected = float(a(x).total) + 3 * 0.5 * float(VendiRegularizer(1.0, 1.0)(x).total)
    assert float(total.total) == pytest.approx(expected, abs=1e-12)
    assert set(total.parts) == {"matrix_entropy", "vendi"}
    assert float(sum(total.parts.values())) == pytest.approx(float(total.total), abs=1e-12)


def test_gradient_increases_entropy():
    torch.manual_seed(0)
    x = (_x(16, 6) @ torch.diag(torch.tensor([3.0, 1, 0.3, 0.1, 0.01, 0.01], dtype=torch.float64))).requires_grad_()
    reg = MatrixEntropyRegularizer(1.0, 1)
    before = float(reg(x).total.detach())
    reg(x).total.backward()
    with torch.no_grad():
        after = float(reg(x - 0.05 * x.grad).total)
    assert after < before  # a descent step on −H raises H


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_capture_regularises_the_named_module_and_backpropagates():
    torch.manual_seed(0)
    net = _Net().double()
    x = _x(12, 5, seed=3)
    reg = MatrixEntropyRegularizer(1.0, 1, include=["body"])
    with reg.capture(net) as tap:
        out = net(x)
    assert not tap.armed
    with torch.no_grad():
        expected = float(MatrixEntropyRegularizer(1.0, 1)(net.body(x)).total)
    assert torch.equal(out, net(x))  # the capture changes nothing in the forward
    total = reg().total
    assert float(total.detach()) == pytest.approx(expected, abs=1e-12)
    total.backward()
    assert net.body[0].weight.grad is not None and net.body[0].weight.grad.abs().sum() > 0
    assert net.head.weight.grad is None  # the head is after the captured module
    with pytest.raises(EntrotrainError, match="nothing was captured"):
        reg()  # released by the call


def test_capture_of_a_module_called_twice_pools_rows_and_sums_modules():
    net = _Net().double()
    x1, x2 = _x(6, 5, seed=1), _x(7, 5, seed=2)
    reg = VendiRegularizer(1.0, 2.0)
    tap = ActivationTap(net, include=["body", "head"], differentiable=True)
    with tap:
        net(x1)
        net(x2)
    with torch.no_grad():
        x = torch.cat([x1, x2])
        expected = 0.5 * (float(reg(net.body(x)).total) + float(reg(net(x)).total))
    assert float(reg(tap).total.detach()) == pytest.approx(expected, abs=1e-12)


def test_differentiable_tap_keeps_graph_and_default_tap_detaches():
    net = _Net().double()
    x = _x(4, 5)
    plain, graph = ActivationTap(net, include=["body"]), ActivationTap(net, include=["body"], differentiable=True)
    with plain, graph:
        net(x)
    assert not plain.rows("body").requires_grad and graph.rows("body").requires_grad
    torch.testing.assert_close(plain.rows("body"), graph.rows("body").detach(), rtol=0, atol=0)
    with pytest.raises(EntrotrainError, match="not differentiable"):
        MatrixEntropyRegularizer()(plain)
    with pytest.raises(EntrotrainError):
        ActivationTap(net, include=["body"], differentiable="yes")


def test_bad_arguments():
    for bad in (
        lambda: MatrixEntropyRegularizer(order=3),
        lambda: MatrixEntropyRegularizer(-1.0),
        lambda: VendiRegularizer(q=0.0),
        lambda: MMCRLoss(lam=-1.0),
        lambda: MMCRLoss(n_views=0),
        lambda: MMCRLoss(layout="rows"),
        lambda: MMCRLoss(distributed="yes"),
        lambda: MMCRLoss(distributed=True)(_x(4, 3)),
        lambda: MMCRLoss(n_views=3)(_x(4, 3)),
        lambda: MatrixEntropyRegularizer()(torch.ones(3)),
        lambda: MatrixEntropyRegularizer()("z"),
        lambda: MatrixEntropyRegularizer()({}),
    ):
        with pytest.raises(EntrotrainError):
            bad()
    with pytest.raises(EntrotrainError, match="include"):
        with MatrixEntropyRegularizer().capture(_Net()):
            pass


def test_empty_and_bf16_inputs():
    z = torch.zeros(0, 4, requires_grad=True)
    out = MatrixEntropyRegularizer()(z).total
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    loss = MMCRLoss(n_views=2)(torch.zeros(0, 4)).total
    assert float(loss) == 0.0
    x = _x(8, 4).bfloat16().requires_grad_()
    out = MatrixEntropyRegularizer()(x).total
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(x.grad.float()).all()


# ---------------------------------------------------------------------------------------------------- SimSiam


def test_simsiam_task_regularizers_add_to_the_loss_and_default_is_unchanged():
    from entrotrain.tasks.self_supervised import SimSiamTask

    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = (x, torch.zeros(16, dtype=torch.long))
    losses = []
    for regs in (None, [MatrixEntropyRegularizer(0.5, 2)]):
        torch.manual_seed(0)
        task = SimSiamTask(stop_gradient=False, regularizers=regs)
        task.log = task.log_dict = lambda *a, **k: None  # no trainer attached
        torch.manual_seed(1)
        losses.append(task.training_step(batch, 0))
        if regs is None:
            torch.manual_seed(1)
            plain = task.model.loss(*task._views(x))
            assert torch.equal(losses[0], plain)
            torch.manual_seed(1)
            simsiam, z = task.model.loss(*task._views(x), return_projections=True)
            assert z.shape == (32, 64)
    expected = simsiam + MatrixEntropyRegularizer(0.5, 2)(z).total
    assert float(losses[1].detach()) == pytest.approx(float(expected.detach()), abs=1e-6)


def test_capture_before_an_inplace_relu_keeps_the_pre_activation():
    torch.manual_seed(0)
    net = _Net().double()
    x = _x(10, 5, seed=6)
    reg = MatrixEntropyRegularizer(1.0, 2, include=["body.0"])  # followed by ReLU(inplace=True)
    with reg.capture(net):
        net(x).sum().backward(retain_graph=True)
    with torch.no_grad():
        expected = float(MatrixEntropyRegularizer(1.0, 2)(net.body[0](x)).total)
    total = reg().total
    assert float(total.detach()) == pytest.approx(expected, abs=1e-12)
    total.backward()
    assert torch.isfinite(net.body[0].weight.grad).all()


@settings(max_examples=25)
@given(
    n=st.integers(0, 7),
    d=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    which=st.sampled_from(["me1", "me2", "vendi1", "vendi2"]),
    weight=st.floats(0.0, 3.0),
)
def test_normalised_penalty_lies_in_minus_weight_to_zero(n, d, dtype, which, weight):
    reg = {
        "me1": MatrixEntropyRegularizer(weight, 1),
        "me2": MatrixEntropyRegularizer(weight, 2),
        "vendi1": VendiRegularizer(weight, 1.0),
        "vendi2": VendiRegularizer(weight, 2.0),
    }[which]
    x = _x(n, d, seed=n * 8 + d).to(dtype).requires_grad_()
    total = reg(x).total
    assert -weight - 1e-4 <= float(total.detach()) <= 1e-6
    total.backward()
    assert (x.grad is None) if weight == 0 else torch.isfinite(x.grad.float()).all()  # weight 0 is not evaluated
