"""RouterTap: HF router discovery, glob selection, detached captures equal to output_router_logits, hook lifecycle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.errors import EntrotrainError, TapError
from entrotrain.taps.router_tap import RouterTap, chosen_experts, discover_routers, router_rows, router_scoring
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


def test_discovers_deepseek_v3_topk_routers_with_their_choice_and_padding():
    """DeepseekV3TopkRouter (lowercase k; a TapError before): both layers found, scored by a sigmoid, and the ids
    the tap keeps are the ones the MoE block hands its experts; the padding mask lines up with the rows."""
    model = tiny_moe("deepseek_v3", n_experts=8)
    tap = RouterTap(model, token_masks=True)
    assert tap.names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert [tap.top_k(n) for n in tap.names] == [2, 2] and [tap.scoring(n) for n in tap.names] == ["sigmoid"] * 2
    assert all(tap.corrects_choice(n) for n in tap.names)
    picked = []
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda m, a: picked.append(a[1].clone()))
             for layer in model.model.layers]
    batch = lm_batch()
    with tap, torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    for name, ids in zip(tap.names, picked):
        assert torch.equal(tap.chosen_experts(name), ids)
        assert torch.equal(tap.masks[name][0], batch["attention_mask"].reshape(-1).bool())


class _Scored(nn.Module):
    def __init__(self, **attrs) -> None:
        super().__init__()
        for key, value in attrs.items():
            setattr(self, key, value)

    def forward(self, x):
        return x  # a softmax named in a comment does not count


class _SigmoidScored(nn.Module):
    def forward(self, x):
        # sigmoid instead of softmax normalization (as Laguna's comment says)
        return torch.sigmoid(x)


def test_router_class_endings_the_gate_inside_a_router_and_the_scoring_function():
    routers = [type(n, (nn.Module,), {})() for n in ("AXK1TopkRouter", "DeepseekV4HashRouter", "MixtralTopKRouter")]
    choice_router = type("AfmoeTokenChoiceRouter", (nn.Module,), {})()
    choice_router.gate = nn.Linear(5, 4)  # its own gate Linear is read through the router (which returns the ids)
    model = nn.ModuleDict({"a": routers[0], "b": routers[1], "c": routers[2], "d": choice_router})
    assert discover_routers(model) == ["a", "b", "c", "d"]
    assert router_scoring(_Scored(scoring_func="sigmoid")) == "sigmoid"
    assert router_scoring(_Scored(expert_selection_fn="softmax")) == "softmax"
    assert router_scoring(_Scored(scoring_func="sqrtsoftplus")) == "sqrtsoftplus"
    assert router_scoring(_Scored(scoring_func="relu")) == "softmax"
    assert router_scoring(_Scored(score_fn=nn.Sigmoid())) == "sigmoid"
    assert router_scoring(_Scored()) == "softmax"
    assert router_scoring(_SigmoidScored()) == "sigmoid"
    assert router_scoring(nn.Linear(5, 4)) == "softmax" and router_scoring(None) == "softmax"


def test_chosen_experts_is_the_last_integer_tensor_of_the_rows():
    logits, weights, ids = torch.randn(6, 4), torch.rand(6, 2), torch.randint(0, 4, (6, 2))
    assert torch.equal(chosen_experts((logits, weights, ids), 6), ids)
    assert torch.equal(chosen_experts((logits, weights, ids, torch.rand(6, 1)), 6), ids)  # Inkling: shared gammas
    assert chosen_experts((logits, weights), 6) is None and chosen_experts(logits, 6) is None
    assert chosen_experts((logits, ids[:5]), 6) is None
