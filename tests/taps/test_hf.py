"""HFAttentionAdapter: exact per-head entropy of tiny HF Llama models (GQA), bit-identical outputs, clean removal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported (conftest sets it per test too)
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from entrotrain.taps import AttentionTap  # noqa: E402
from tests.helpers.hf_padding_reference import real_query_reference  # noqa: E402
from entrotrain.taps import hf  # noqa: E402
from entrotrain.taps.attention_stats import ENTROPY_SUM, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS  # noqa: E402
from entrotrain.taps.hf import HFAttentionAdapter  # noqa: E402
from entrotrain.taps.sampling import evenly_spaced  # noqa: E402

LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 2, 4, 2, 64, 10
SITES = [f"model.layers.{i}.self_attn" for i in range(LAYERS)]


def tiny_llama(impl: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """A fresh config per model: HF models built from one config object share it (and its attn implementation)."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        initializer_range=0.3,  # peaked, head-distinct attention: a head-order mistake cannot hide in the tolerance
        attention_dropout=0.0,
        attn_implementation=impl,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def inputs(padded: bool | str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padded == "left":
        mask[1, :4] = 0  # left padding: row 1 has 6 real tokens, at the end
    elif padded:
        mask[1, 6:] = 0  # right padding: row 1 has 6 real tokens
    return {"input_ids": ids, "attention_mask": mask}


def brute_force(model: nn.Module, batch, queries: torch.Tensor | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: per-head mean entropy and mean normalised entropy over the real (non-padded) queries, float64,
    from an eager float64 run's weights (each row alone, padding stripped, its positions kept)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    reference = real_query_reference(model, ids, mask, causal=True, queries=queries)
    assert len(reference) == LAYERS
    return [(entropy, norm) for entropy, norm, _ in reference]


def head_means(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return stats[ENTROPY_SUM] / stats[ROWS], stats[NORMALIZED_SUM] / stats[NORMALIZED_ROWS]


def assert_clean(model: nn.Module, impl: str, root: nn.Module | None = None) -> None:
    assert model.config._attn_implementation == impl
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in (root or model).modules())
    assert hf._TAPS == [] and hf._PATCHES == {}
    assert not hasattr(modeling_llama.eager_attention_forward, "__entrotrain_original__")


def armed_implementation(impl: str) -> str:
    """What the config says while armed: sdpa is switched to the wrapper, eager is left as is (its function wrapped)."""
    return "entrotrain_sdpa" if impl == "sdpa" else "eager"


@pytest.mark.parametrize("padded", [False, "right", "left"], ids=["full", "right", "left"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_exact_per_head_entropy_and_bit_identical_outputs(impl, padded):
    model = tiny_llama(impl).train()  # train mode: dropout is 0, so the forward is deterministic
    batch = inputs(padded)
    reference = model(**batch).logits

    tap = AttentionTap(model)
    with tap:
        assert model.config._attn_implementation == armed_implementation(impl)
        logits = model(**batch).logits
    assert torch.equal(logits, reference)
    assert_clean(model, impl)

    assert list(tap.stats) == SITES
    assert tap.calls == LAYERS  # SDPA calls inside the wrapped attention are not scored a second time
    for site, (want_entropy, want_norm) in zip(SITES, brute_force(model, batch)):
        assert tap.stats[site].shape == (5, HEADS)
        assert torch.all(tap.stats[site][ROWS] == batch["attention_mask"].sum())  # padded queries are not scored
        entropy, norm = head_means(tap.stats[site])
        torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-5)
        torch.testing.assert_close(norm, want_norm, rtol=0, atol=1e-5)
        # GQA: query head h reads key head h // 2 (repeat_kv). Every head is distinct, far beyond the tolerance, so
        # a head scored against the wrong key head would not match.
        gaps = (want_entropy[:, None] - want_entropy[None, :]).abs() + torch.eye(HEADS, dtype=torch.float64)
        assert gaps.min() > 1e-3
        assert want_norm.max() < 0.98  # peaked attention, far from the uniform 1.0


def test_padding_is_what_changes_the_scores():
    """Same ids with and without left padding: the padded query is dropped and the real ones lose the padded keys."""
    model = tiny_llama("sdpa")
    stats = []
    for padded in (False, "left"):
        with AttentionTap(model, max_rows=1, max_queries=3) as tap:  # row 1, queries 0, 4, 9 (0 is a padded query)
            model(**inputs(padded))
        stats.append(tap.stats[SITES[0]])
    assert torch.all(stats[0][ROWS] == 3) and torch.all(stats[1][ROWS] == 2)
    assert (stats[0][ENTROPY_SUM] - stats[1][ENTROPY_SUM]).abs().max() > 1e-2


def test_sdpa_and_eager_agree_and_eager_weights_unchanged():
    batch = inputs(True)
    results = {}
    for impl in ("sdpa", "eager"):
        model = tiny_llama(impl, seed=3)
        with AttentionTap(model) as tap:
            out = model(**batch, output_attentions=(impl == "eager"))
        results[impl] = tap.stats
        if impl == "eager":
            untapped = model(**batch, output_attentions=True)
            assert all(torch.equal(a, b) for a, b in zip(out.attentions, untapped.attentions))
    for site in SITES:
        torch.testing.assert_close(results["sdpa"][site], results["eager"][site], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("padded", ["right", "left"])
def test_query_budget_keeps_the_mask(padded):
    """Evenly spaced positions first, then the padded ones among them are dropped."""
    model = tiny_llama("sdpa")
    batch = inputs(padded)
    with AttentionTap(model, max_queries=4) as tap:
        model(**batch)
    queries = evenly_spaced(SEQ, 4)
    for site, (want_entropy, want_norm) in zip(SITES, brute_force(model, batch, queries)):
        assert torch.all(tap.stats[site][ROWS] == batch["attention_mask"][:, queries].sum())
        entropy, norm = head_means(tap.stats[site])
        torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-5)
        torch.testing.assert_close(norm, want_norm, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "include, exclude", [("model.layers.1.*", None), (None, "*.layers.0.*"), (None, ["model.layers.0.self_attn"])]
)
def test_include_exclude(include, exclude):
    model = tiny_llama("sdpa")
    with AttentionTap(model, include=include, exclude=exclude) as tap:
        model(**inputs(False))
    assert list(tap.stats) == [SITES[1]]  # the excluded layer is not picked up by the generic SDPA capture either
    assert tap.calls == 1


class Holder(nn.Module):
    """What a LightningModule looks like to the tap: the HF model is a child."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(VOCAB, 1)

    def forward(self, **batch):
        return self.head(self.model(**batch).logits)


def test_child_model_names_and_nested_taps():
    model = tiny_llama("eager")
    holder = Holder(model)
    batch = inputs(True)
    reference = holder(**batch)
    outer, inner = AttentionTap(holder), AttentionTap(model)
    outer.arm()
    inner.arm()
    out = holder(**batch)
    outer.disarm()  # the inner tap still holds the wrapped eager function
    assert modeling_llama.eager_attention_forward.__entrotrain_original__ is not None
    holder(**batch)
    inner.disarm()
    assert_clean(model, "eager", root=holder)
    assert torch.equal(out, reference)
    assert list(outer.stats) == [f"model.{s}" for s in SITES]
    assert list(inner.stats) == SITES
    for site in SITES:
        torch.testing.assert_close(outer.stats[f"model.{site}"] * 2, inner.stats[site])  # inner saw two forwards


def test_untapped_model_sharing_the_config_is_untouched():
    model = tiny_llama("sdpa")
    twin = LlamaForCausalLM(model.config)  # same config object
    batch = inputs(True)
    reference = twin(**batch).logits
    with AttentionTap(model, capture_sdpa=False) as tap:  # the adapter alone (generic SDPA capture sees any call)
        assert twin.config._attn_implementation == "entrotrain_sdpa"
        assert torch.equal(twin(**batch).logits, reference)
    assert tap.stats == {} and tap.calls == 0
    assert twin.config._attn_implementation == "sdpa"


def test_differentiable_records_keep_the_graph():
    model = tiny_llama("sdpa")
    batch = inputs(False)
    with AttentionTap(model, differentiable=True) as tap:
        model(**batch)
    assert [site for site, _ in tap.records] == SITES
    loss = sum(result.entropy.mean() for _, result in tap.records)
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with AttentionTap(model) as plain:
        with torch.no_grad():
            model(**batch)
    for site in SITES:
        torch.testing.assert_close(plain.stats[site], tap.stats[site], rtol=1e-6, atol=1e-5)


def test_unsupported_implementation_warns_and_is_left_alone():
    model = tiny_llama("sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"  # never run: only the install is checked
    with pytest.warns(UserWarning, match="captured for"):
        tap = AttentionTap(model).arm()
    assert model.config._attn_implementation == "flash_attention_2"
    tap.disarm()
    assert hf._TAPS == [] and hf._PATCHES == {}


def test_softcap_is_not_scored(monkeypatch):
    model = tiny_llama("sdpa")
    sdpa = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_without_softcap(*args, softcap=None, **kwargs):
        return sdpa(*args, **kwargs)

    attn = model.model.layers[0].self_attn
    original_forward = attn.forward

    def forward(*args, **kwargs):  # the layer passes softcap= to the attention function, as Gemma 2 does
        return original_forward(*args, softcap=1.0, **kwargs)

    monkeypatch.setattr(attn, "forward", forward)
    monkeypatch.setitem(transformers.modeling_utils.AttentionInterface._global_mapping, "sdpa", sdpa_without_softcap)
    with pytest.warns(UserWarning, match="not scored: the call passes `softcap`"):
        with AttentionTap(model) as tap:
            model(**inputs(False))
    assert list(tap.stats) == [SITES[1]]


def test_install_without_transformers_imported_is_a_no_op(monkeypatch):
    model = tiny_llama("sdpa")
    tap = AttentionTap(model, adapters=[])
    monkeypatch.delitem(sys.modules, "transformers")
    assert HFAttentionAdapter().install(tap, model) == []
    assert model.config._attn_implementation == "sdpa"


def test_module_does_not_import_transformers():
    code = (
        "import sys\n"
        "from entrotrain.taps.attention_tap import AttentionTap, default_adapters\n"
        "import torch\n"
        "adapters = default_adapters()\n"
        "assert any(type(a).__name__ == 'HFAttentionAdapter' for a in adapters), adapters\n"
        "with AttentionTap(torch.nn.Linear(2, 2)):\n"
        "    pass\n"
        "assert 'transformers' not in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=root
    )
    assert result.returncode == 0, result.stderr


def _installed_state(model: nn.Module) -> tuple:
    """Every value an armed tap may replace on a Llama: the config's raw implementation and the eager function."""
    return vars(model.config)["_attn_implementation_internal"], modeling_llama.eager_attention_forward


@pytest.mark.parametrize("last_armed_first", [True, False], ids=["nested", "fifo"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_two_taps_on_one_model_share_and_restore_exactly(impl, last_armed_first):
    model = tiny_llama(impl)
    batch = inputs(True)
    reference = model(**batch).logits
    before = _installed_state(model)
    first, second = AttentionTap(model).arm(), AttentionTap(model.model).arm()
    armed = _installed_state(model)
    assert armed != before and model.config._attn_implementation == armed_implementation(impl)
    assert torch.equal(model(**batch).logits, reference)
    gone, kept = (second, first) if last_armed_first else (first, second)
    gone.disarm()
    assert _installed_state(model) == armed  # the other tap still holds the switch / the wrapper
    assert [p.holders for p in hf._PATCHES.values()] == [1]
    model(**batch)
    kept.disarm()
    after = _installed_state(model)
    assert all(a is b for a, b in zip(after, before))  # the exact original objects
    assert_clean(model, impl)
    assert all(len(tap.stats) == LAYERS for tap in (first, second))
    torch.testing.assert_close(sum(kept.stats.values()), 2 * sum(gone.stats.values()))  # kept saw both forwards


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_failed_arming_restores_its_own_holds_only(impl, monkeypatch):
    model = tiny_llama(impl)
    before = _installed_state(model)
    holder = AttentionTap(model).arm()
    armed = _installed_state(model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(HFAttentionAdapter, "_watch_masks", staticmethod(boom))  # after the switch and the wraps
    with pytest.raises(RuntimeError, match="boom"):
        AttentionTap(model).arm()
    assert _installed_state(model) == armed and [p.holders for p in hf._PATCHES.values()] == [1]
    holder.disarm()
    assert all(a is b for a, b in zip(_installed_state(model), before))
    with pytest.raises(RuntimeError, match="boom"):
        AttentionTap(model).arm()  # no other holder: the failed arming itself restores everything
    assert_clean(model, impl)


def test_values_changed_by_hand_are_left_alone():
    model = tiny_llama("sdpa")
    model.config._attn_implementation_internal = "entrotrain_sdpa"  # switched by hand: not the tap's to restore
    with AttentionTap(model):
        assert hf._PATCHES == {}
    assert model.config._attn_implementation == "entrotrain_sdpa"
    model.config._attn_implementation_internal = "sdpa"
    with AttentionTap(model):
        model.config._attn_implementation_internal = "eager"  # changed by hand while armed: kept on disarm
    assert model.config._attn_implementation == "eager" and hf._PATCHES == {}
