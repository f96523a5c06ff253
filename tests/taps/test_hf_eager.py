"""HF models whose code branches on ``_attn_implementation == "eager"`` (GPT-2, DecisionTransformer): captured without
any change to the model, ``reorder_and_upcast_attn=True`` included; exact per-head entropy over real queries against a
float64 brute force from ``output_attentions``; outputs bit-identical; everything restored on disarm and on error."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2  # noqa: E402

from entrotrain.taps import AttentionTap  # noqa: E402
from entrotrain.taps import hf  # noqa: E402
from entrotrain.taps.attention_stats import ENTROPY_SUM, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS  # noqa: E402
from tests.helpers.hf_padding_reference import real_query_reference  # noqa: E402

LAYERS, HEADS, VOCAB, SEQ = 2, 4, 64, 10
ORIGINAL_EAGER = modeling_gpt2.eager_attention_forward
ORIGINAL_REORDERED = modeling_gpt2.GPT2Attention.__dict__["_upcast_and_reordered_attn"]


def tiny_gpt2(impl: str = "eager", reorder: bool = False, by_layer: bool = False, seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=LAYERS,
        n_head=HEADS,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        initializer_range=0.3,  # peaked, head-distinct attention
        reorder_and_upcast_attn=reorder,
        scale_attn_by_inverse_layer_idx=by_layer,  # layer 1 scores at half scale: a wrong scale cannot hide
        attn_implementation=impl,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def tiny_bert(impl: str, seed: int = 0) -> BertModel:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.3,
        attn_implementation=impl,
    )
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False)


def batch(padding: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, 6:] = 0
        mask[2, 3:] = 0
    elif padding == "left":
        mask[1, :4] = 0
        mask[2, :7] = 0
    return {"input_ids": ids, "attention_mask": mask}


def plain_eager(model: nn.Module) -> nn.Module:
    """The same weights on the plain eager path (the float64 reference cannot run GPT-2's float32-only reordered path)."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if hasattr(module, "reorder_and_upcast_attn"):
            module.reorder_and_upcast_attn = False
    return plain


def assert_matches(tap: AttentionTap, model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool) -> None:
    reference = real_query_reference(plain_eager(model), inputs["input_ids"], inputs["attention_mask"], causal=causal)
    assert len(tap.stats) == LAYERS == len(reference)
    for stats, (entropy, norm, rows) in zip(tap.stats.values(), reference):
        assert torch.all(stats[ROWS] == rows) and rows == inputs["attention_mask"].sum()
        torch.testing.assert_close(stats[ENTROPY_SUM] / stats[ROWS], entropy, rtol=0, atol=1e-5)
        torch.testing.assert_close(stats[NORMALIZED_SUM] / stats[NORMALIZED_ROWS], norm, rtol=0, atol=1e-5)
        assert (entropy[:, None] - entropy[None, :]).abs().add(torch.eye(HEADS)).min() > 1e-3  # heads distinct


def assert_restored(model: nn.Module, impl: str = "eager") -> None:
    assert model.config._attn_implementation == impl
    assert modeling_gpt2.eager_attention_forward is ORIGINAL_EAGER
    assert modeling_gpt2.GPT2Attention.__dict__["_upcast_and_reordered_attn"] is ORIGINAL_REORDERED
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert hf._TAPS == [] and hf._PATCHES == {}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("reorder", [False, True], ids=["eager", "reorder_and_upcast"])
def test_gpt2_eager_is_captured_exactly_and_bit_identically(reorder, padding):
    model = tiny_gpt2("eager", reorder=reorder, by_layer=True).train()  # dropout 0: deterministic
    inputs = batch(padding)
    reference = model(**inputs).logits
    with AttentionTap(model) as tap:
        assert model.config._attn_implementation == "eager"  # the model is not switched: its branch stays taken
        assert modeling_gpt2.eager_attention_forward is not ORIGINAL_EAGER
        logits = model(**inputs).logits
    assert torch.equal(logits, reference)
    assert_restored(model)
    assert list(tap.stats) == [f"transformer.h.{i}.attn" for i in range(LAYERS)]
    assert tap.calls == LAYERS
    assert_matches(tap, model, inputs, causal=True)


def test_gpt2_eager_and_sdpa_agree():
    inputs = batch("right")
    results = []
    for impl, reorder in (("eager", False), ("eager", True), ("sdpa", False)):
        model = tiny_gpt2(impl, reorder=reorder, seed=3)
        with AttentionTap(model) as tap:
            model(**inputs)
        results.append(tap.stats)
    for other in results[1:]:
        assert list(other) == list(results[0])
        for site in other:
            torch.testing.assert_close(other[site], results[0][site], rtol=1e-6, atol=1e-5)


def test_gpt2_eager_weights_unchanged_by_the_tap():
    model = tiny_gpt2("eager")
    inputs = batch("left")
    untapped = model(**inputs, output_attentions=True).attentions
    with AttentionTap(model):
        tapped = model(**inputs, output_attentions=True).attentions
    assert all(torch.equal(a, b) for a, b in zip(tapped, untapped))


def test_restored_after_an_exception_and_shared_between_taps():
    model = tiny_gpt2("eager", reorder=True)
    inputs = batch("right")

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.transformer.h[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionTap(model):
            model(**inputs)
    handle.remove()
    assert_restored(model)

    first, second = AttentionTap(model).arm(), AttentionTap(model.transformer).arm()
    first.disarm()  # the second tap still holds the wrapped function and method
    assert modeling_gpt2.eager_attention_forward is not ORIGINAL_EAGER
    model(**inputs)
    second.disarm()
    assert_restored(model)
    assert first.stats == {} and list(second.stats) == [f"h.{i}.attn" for i in range(LAYERS)]


def test_untapped_gpt2_running_while_armed_is_not_scored():
    model, other = tiny_gpt2("eager"), tiny_gpt2("eager", seed=5)
    inputs = batch("none")
    reference = other(**inputs).logits
    with AttentionTap(model) as tap:
        assert torch.equal(other(**inputs).logits, reference)  # same module file, so the same wrapped function
    assert tap.stats == {}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_padded_queries_are_excluded(impl, padding):
    model = tiny_bert(impl).eval()
    inputs = batch(padding)
    reference = model(**inputs).last_hidden_state
    with AttentionTap(model) as tap:
        out = model(**inputs).last_hidden_state
    assert torch.equal(out, reference)
    assert_matches(tap, model, inputs, causal=False)


def test_decision_transformer_reordered_path_is_captured():
    """The other model file that branches on "eager" (a GPT-2 copy): the same mechanism covers it."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    config = DecisionTransformerConfig(
        state_dim=3, act_dim=2, hidden_size=32, n_layer=LAYERS, n_head=HEADS, n_inner=64, max_ep_len=16,
        reorder_and_upcast_attn=True, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    results = []
    for impl in ("eager", "sdpa"):
        config._attn_implementation = impl
        torch.manual_seed(0)
        model = DecisionTransformerModel(config).eval()
        gen = torch.Generator().manual_seed(2)
        inputs = {
            "states": torch.randn(2, 4, 3, generator=gen),
            "actions": torch.randn(2, 4, 2, generator=gen),
            "rewards": torch.randn(2, 4, 1, generator=gen),
            "returns_to_go": torch.randn(2, 4, 1, generator=gen),
            "timesteps": torch.arange(4)[None].expand(2, 4),
            "attention_mask": torch.ones(2, 4, dtype=torch.long),
        }
        with AttentionTap(model) as tap:
            model(**inputs)
        assert len(tap.stats) == LAYERS
        results.append(tap.stats)
    for site in results[0]:
        torch.testing.assert_close(results[0][site], results[1][site], rtol=1e-6, atol=1e-5)
