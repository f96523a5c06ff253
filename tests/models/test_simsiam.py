"""SimSiam: shapes, the loss formula, what stop-gradient does to the gradients, and the rank collapse without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from entrotrain.functional.representation import rankme
from entrotrain.models import SimSiam
from tests.helpers.reference import one_thread  # noqa: F401,E402  (autouse fixture)


def _manual_loss(model: SimSiam, x1, x2, detach: bool) -> torch.Tensor:
    h = model.backbone(torch.cat([x1, x2]).flatten(1))
    z = model.projector(h)
    p = model.predictor(z)
    z1, z2 = z.chunk(2)
    p1, p2 = p.chunk(2)
    if detach:
        z1, z2 = z1.detach(), z2.detach()
    cos = lambda a, b: (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).mean()  # noqa: E731
    return -0.5 * (cos(p1, z2) + cos(p2, z1))


def test_shapes_and_input_check():
    model = SimSiam(hidden_dim=32, feature_dim=16, pred_dim=4)
    z, p = model(torch.rand(5, 1, 8, 8))
    assert z.shape == p.shape == (5, 16)
    assert model.encode(torch.rand(5, 64)).shape == (5, 32)
    with pytest.raises(ValueError, match="64 values"):
        model(torch.rand(5, 1, 7, 7))
    with pytest.raises(ValueError, match="positive"):
        SimSiam(pred_dim=0)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_loss_and_gradients_match_the_formula(stop_gradient):
    torch.manual_seed(0)
    model = SimSiam(hidden_dim=32, feature_dim=16, pred_dim=4, stop_gradient=stop_gradient)
    x1, x2 = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    loss = model.loss(x1, x2)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for detach in (True, False):
        ref = _manual_loss(model, x1, x2, detach)
        assert torch.allclose(loss, ref, atol=1e-6)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads))
        assert same == (detach == stop_gradient)  # the gradients tell the two apart
    assert -1.0 <= float(loss) <= 1.0


def test_without_stop_gradient_the_projection_rank_collapses():
    pytest.importorskip("sklearn")
    from entrotrain.tasks.image_classification import load_digits_tensors
    from entrotrain.tasks.self_supervised import augment_digits

    x, _ = load_digits_tensors()
    probe, train = x[:300], x[300:]
    ranks = {}
    for sg in (True, False):
        torch.manual_seed(0)
        model = SimSiam(stop_gradient=sg)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        for _ in range(250):
            batch = train[torch.randint(0, len(train), (128,))]
            loss = model.loss(augment_digits(batch), augment_digits(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            ranks[sg] = float(rankme(model(probe)[0]))
    assert ranks[False] < ranks[True] / 2, ranks
