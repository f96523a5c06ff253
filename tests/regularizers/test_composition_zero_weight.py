"""Weight 0 costs nothing and changes nothing: the loss and gradients are bit for bit the unregularised ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from entrotrain.errors import EntrotrainError
from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.regularizers import (
    AttentionEntropyMaximization,
    EntropyFloorRegularizer,
    MatrixEntropyRegularizer,
    Regularizer,
    RouterZLoss,
    TsallisRouterLoss,
)


class NaNPenalty(Regularizer):
    """A penalty that is NaN (a degenerate input): weight 0 must not turn it into 0 * NaN."""

    name = "nan"

    def penalty(self, x: Tensor) -> Tensor:
        return x.sum() * float("nan")


def _model_and_batch():
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)
    x = torch.randint(0, 20, (3, 16))
    return model, x, torch.randint(0, 20, (3, 16))


def _loss_and_grads(model, x, y, reg=None, capture_step=None, step=0):
    model.zero_grad()
    if reg is None:
        logits = model(x)
    else:
        with reg.capture(model, **({} if capture_step is None else {"step": capture_step})):
            logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if reg is not None:
        loss = loss + reg(step=step).total
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "make, capture_step",
    [
        (lambda: AttentionEntropyMaximization(0.0), None),
        (lambda: EntropyFloorRegularizer(0.0), None),
        (lambda: 0.0 * AttentionEntropyMaximization(0.1), None),
        (lambda: 0.0 * AttentionEntropyMaximization(0.1) + 0.0 * MatrixEntropyRegularizer(1.0, include=["ln_f"]), None),
        (lambda: AttentionEntropyMaximization(0.1, schedule="warmup", total_steps=10), 0),  # warm-up's step 0
    ],
)
def test_weight_zero_gives_the_unregularised_loss_and_gradients_bit_for_bit(make, capture_step):
    model, x, y = _model_and_batch()
    base_loss, base_grads = _loss_and_grads(model, x, y)
    loss, grads = _loss_and_grads(model, x, y, make(), capture_step=capture_step)
    assert torch.equal(loss, base_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, base_grads))


def test_zero_term_of_a_sum_is_not_evaluated_and_keeps_its_part():
    x = torch.ones(3, requires_grad=True)
    reg = 0.0 * NaNPenalty(1.0) + NaNPenalty(0.0, name="nan0")
    out = reg(x)
    assert out.total.item() == 0.0 and set(out.parts) == {"nan", "nan0"}
    assert all(v.item() == 0.0 for v in out.parts.values())
    out.total.backward()  # works, and reaches nothing
    assert x.grad is None
    assert NaNPenalty(0.0)(x).total.item() == 0.0


def test_zero_weight_router_losses_are_not_evaluated():
    logits = torch.full((4, 3), float("nan"))
    assert RouterZLoss(0.0)(logits).total.item() == 0.0
    out = TsallisRouterLoss(0.0, aux_weight=0.0)(logits)
    assert out.total.item() == 0.0 and set(out.parts) == {"tsallis_router/entropy", "tsallis_router/balance"}
    assert TsallisRouterLoss(0.0).is_active()  # the balance term (aux_weight) still counts


def test_capture_skipped_at_weight_zero_then_called_at_a_positive_weight_raises():
    model, x, _ = _model_and_batch()
    reg = AttentionEntropyMaximization(0.1, schedule="warmup", total_steps=10)
    with reg.capture(model, step=0) as tap:
        model(x)
    assert tap is None
    with pytest.raises(EntrotrainError, match="same step"):
        reg(step=3)
    with reg.capture(model, step=3) as tap:  # a positive weight arms the tap
        model(x)
    assert tap is not None and reg(step=3).total.item() < 0


def test_zero_weight_still_gives_the_regularisers_own_parameters_a_zero_gradient():
    """A learnable threshold stays 'used' (DDP without find_unused_parameters) with the zero gradient 0 * penalty
    gave it."""
    from entrotrain.regularizers import EntropyBandRegularizer

    model, x, y = _model_and_batch()
    band = EntropyBandRegularizer(2, 2, weight=0.0)
    base_loss, base_grads = _loss_and_grads(model, x, y)
    loss, grads = _loss_and_grads(model, x, y, band)
    assert torch.equal(loss, base_loss) and all(torch.equal(a, b) for a, b in zip(grads, base_grads))
    assert band.raw.grad is not None and torch.equal(band.raw.grad, torch.zeros(2, 2))


def test_zero_total_lives_on_the_inputs_device():
    """The exact zero is made on the device of the captured rows or records (meta stands in for an accelerator)."""
    from types import SimpleNamespace

    from entrotrain.functional.attention import AttentionEntropy

    rows = torch.empty(4, 3, device="meta")
    captures = {"proj": [SimpleNamespace(rows=rows)]}  # an ActivationTap's captures: objects with .rows
    assert MatrixEntropyRegularizer(0.0)(captures).total.device.type == "meta"
    t = torch.empty(1, 2, 3, device="meta")
    records = [("blocks.0.attn", AttentionEntropy(*([t] * len(AttentionEntropy._fields))))]
    assert AttentionEntropyMaximization(0.0)(records).total.device.type == "meta"
