"""RouterTap: HF router discovery, glob selection, detached captures equal to output_router_logits, hook lifecycle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.errors import EntrotrainError, TapError
from entrotrain.taps.router_tap import RouterTap, discover_routers, router_rows
from tests.helpers.router_models import KINDS, lm_batch, tiny_moe


def _hooks(model: nn.Module) -> int:
    """Forward hooks installed by a RouterTap (HF adds and keeps its own recording hooks: not counted)."""
    return sum("RouterTap" in getattr(h, "__qualname__", "") for m in model.modules() for h in m._forward_hooks.values())


@pytest.mark.parametrize("kind", KINDS)
def test_discovers_hf_routers_and_matches_output_router_logits(kind):
    model = tiny_moe(kind)
    tap = RouterTap(model)
    assert tap.names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert [tap.top_k(n) for n in tap.names] == [2, 2]
    batch = lm_batch()
    before = _hooks(model)
    with tap:
        assert _hooks(model) == before + 2
        out = model(**batch, output_router_logits=True)
    assert _hooks(model) == before and not tap.armed
    assert tap.order == tap.names
    for name, expected in zip(tap.order, out.router_logits):
        got = tap.logits(name)
        assert got.shape == (batch["input_ids"].numel(), 4)
        assert torch.equal(got, expected.detach()) and not got.requires_grad


def test_capture_is_detached_copy_and_changes_nothing():
    model = tiny_moe("mixtral")
    batch = lm_batch()
    torch.manual_seed(0)
    ref = model(**batch).logits
    tap = RouterTap(model)
    with tap:
        torch.manual_seed(0)
        got = model(**batch).logits
    assert torch.equal(ref, got)
    captured = tap.logits("model.layers.0.mlp.gate")
    assert captured.untyped_storage().data_ptr() != 0 and captured.grad_fn is None


class _Block(nn.Module):
    def __init__(self, e: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(5, e)
        self.shared_expert_gate = nn.Linear(5, 1)

    def forward(self, x):
        return x + self.router(x).softmax(-1).sum(-1, keepdim=True) * self.shared_expert_gate(x)


class _MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(5, 4)

    def forward(self, x):
        return x * self.gate(x).softmax(-1)[..., :1]


def test_globs_tuple_outputs_and_moe_gate_discovery():
    model = nn.Sequential(_Block(), _Block())
    with pytest.raises(TapError, match="include="):
        RouterTap(model)  # no HF router, no gate inside a MoE block: say what was searched and the fix
    tap = RouterTap(model, include="*.router")
    assert tap.names == ["0.router", "1.router"]
    x = torch.randn(2, 6, 5)
    with tap:
        model(x)
    assert tap.logits("1.router").shape == (12, 3)
    nested = nn.Sequential(_MoEBlock(), nn.Linear(5, 5))
    assert discover_routers(nested) == ["0.gate"]
    assert RouterTap(nested, exclude=["1*"]).names == ["0.gate"]
    with pytest.raises(TapError):
        RouterTap(nested, exclude=["0.*"])
    with pytest.raises(TapError, match="matches"):
        RouterTap(model, include="nope*")
    # tuple output: element output_index
    assert router_rows((torch.ones(2, 3, 4), None)).shape == (6, 4)
    with pytest.raises(TapError):
        router_rows((torch.ones(2, 4),), output_index=3)
    with pytest.raises(TapError):
        router_rows(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(EntrotrainError):
        RouterTap("model")  # type: ignore[arg-type]


def test_hooks_removed_on_exception_and_reset():
    model = tiny_moe("olmoe")
    before = _hooks(model)
    tap = RouterTap(model, on_capture=None)
    with pytest.raises(RuntimeError):
        with tap:
            model(**lm_batch())
            raise RuntimeError("boom")
    assert _hooks(model) == before
    assert tap.captures
    tap.reset()
    assert tap.captures == {} and tap.order  # layer order survives a reset
    seen = []
    tap2 = RouterTap(model, on_capture=lambda n, t: seen.append((n, t.shape)))
    with tap2:
        model(**lm_batch())
    assert [n for n, _ in seen] == tap2.names and tap2.captures == {}
    tap2.disarm()
    tap2.disarm()
