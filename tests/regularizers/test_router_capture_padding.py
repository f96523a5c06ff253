"""Router regularisers' ``capture`` leaves padded tokens out, as HF's own ``load_balancing_loss_func(...,
attention_mask)`` does: the RouterTap records the HF model's 2-D ``attention_mask`` (or a ``query_padding`` block's
mask) per router call and the loss gets it as its keep mask; a mask that does not fit keeps every row, warned once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from entrotrain.functional.router_losses import load_balancing_loss, router_z_loss
from entrotrain.regularizers.router_loss import LoadBalancingLoss, RouterZLoss
from entrotrain.taps.query_padding import query_padding

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

TOL = 1e-6  # float32 round-off of the pooled counts/probabilities (the values are ~2)


def test_captured_load_balancing_leaves_padding_out_as_hf_does():
    """Right-padded rows: the loss through ``capture`` equals HF's ``load_balancing_loss_func(..., attention_mask)``
    on the model's own router logits, and the same loss on each sequence run alone without its pads."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tests.helpers.router_models import lm_batch, tiny_moe

    model = tiny_moe("mixtral", n_experts=4, top_k=2)
    batch = lm_batch(batch=3, seq=7, pad_last=(0, 2, 4))
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    hf = float(load_balancing_loss_func(out.router_logits, 4, 2, batch["attention_mask"]))
    hf_all_rows = float(load_balancing_loss_func(out.router_logits, 4, 2, None))
    assert abs(hf - hf_all_rows) > 1e-3  # the pads matter here, so the test can tell

    reg = LoadBalancingLoss(1.0, top_k=2)
    with reg.capture(model):
        model(**batch)
    captured = float(reg().total.detach())
    assert abs(captured - hf) <= TOL

    lengths = batch["attention_mask"].sum(1).tolist()
    with reg.capture(model):  # each sequence alone, unpadded: no mask, the calls concatenated per router
        for b, n in enumerate(lengths):
            model(input_ids=batch["input_ids"][b : b + 1, :n])
    alone = float(reg().total.detach())
    assert abs(alone - hf) <= TOL


def test_captured_router_loss_without_padding_counts_every_row():
    """No attention_mask (or all ones): every row counts, as before."""
    pytest.importorskip("transformers")
    from tests.helpers.router_models import lm_batch, tiny_moe

    model = tiny_moe("qwen2_moe")
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    reg = RouterZLoss(1.0)
    with reg.capture(model):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert abs(float(reg().total.detach()) - float(router_z_loss(out.router_logits))) <= TOL


class _Routed(nn.Module):
    """A hand-written MoE stand-in: a router over ``(B, T, 4)`` tokens, flattened to ``(B·T, 3)`` logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(4, 3)

    def forward(self, x):
        return self.router(x.reshape(-1, 4))


def test_query_padding_block_masks_a_plain_router_and_a_misfit_keeps_every_row_with_one_warning():
    model = _Routed()
    x = torch.randn(3, 4, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    logits = model(x).detach()
    reg = LoadBalancingLoss(1.0, top_k=1, include=["router"])
    with query_padding(mask), reg.capture(model):
        model(x)
    expected = load_balancing_loss((logits,), 1, mask=mask)
    assert abs(float(reg().total.detach()) - float(expected)) <= TOL

    with pytest.warns(UserWarning, match="does not fit"):
        with query_padding(torch.ones(2, 5, dtype=torch.long)), reg.capture(model):
            model(x)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once per router, not per call
                model(x)
    every_row = load_balancing_loss((torch.cat([logits, logits]),), 1)
    assert abs(float(reg().total.detach()) - float(every_row)) <= TOL


def test_routers_with_different_masks_drop_their_own_padded_rows():
    """Routers whose recorded masks differ (they ran in different calls) cannot share one keep mask: each keeps its
    own real rows, which pools the same rows as the masked loss would."""
    from types import SimpleNamespace

    from entrotrain.regularizers.router_loss import _captured_inputs

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    keep_a = torch.tensor([True, True, False, True, False, True])
    tap = SimpleNamespace(names=["a", "b"], captures={"a": [a], "b": [b]}, masks={"a": [keep_a], "b": [None]})
    x = _captured_inputs(tap)
    assert x.mask is None and torch.equal(x.router_logits[0], a[keep_a]) and torch.equal(x.router_logits[1], b)
    tap.masks = {"a": [keep_a], "b": [keep_a]}
    tap.captures = {"a": [a], "b": [a.flip(0)]}
    x = _captured_inputs(tap)
    assert torch.equal(x.mask, keep_a) and x.router_logits[1].shape == (6, 3)


def test_capture_finds_deepseek_v3_topk_routers_and_leaves_padding_out():
    """DeepSeek-V3's ``DeepseekV3TopkRouter`` (lowercase k; a TapError before): ``capture`` finds both layers and the
    z-loss through it equals the loss on the logits the routers returned, over the real tokens only."""
    pytest.importorskip("transformers")
    from tests.helpers.router_models import lm_batch, tiny_moe

    model = tiny_moe("deepseek_v3", n_experts=8, top_k=2)
    batch = lm_batch(batch=3, seq=7, pad_last=(0, 2, 4))
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: logits.append(o[0].detach().clone()))
             for layer in model.model.layers]
    reg = RouterZLoss(1.0)
    with reg.capture(model):
        model(**batch)
    got = float(reg().total)
    for h in hooks:
        h.remove()
    assert len(logits) == 2
    keep = batch["attention_mask"].reshape(-1)
    assert got == pytest.approx(float(router_z_loss(logits, mask=keep)), rel=1e-6)
    assert abs(got - float(router_z_loss(logits))) > 1e-6
