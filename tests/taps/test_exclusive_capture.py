"""exclusive_capture: inside the block only the named taps record; every other armed tap (attention via SDPA,
nn.MultiheadAttention, HF attention and record_attention, activations, routers) skips the calls, and its site
numbering is as if they never ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.taps import ActivationTap, AttentionTap, RouterTap, exclusive_capture, record_attention
from entrotrain.taps.exclusive import capture_allowed
from tests.helpers.lightning_models import TinyLM


def _stats(tap: AttentionTap) -> dict[str, torch.Tensor]:
    """Per-site sums the tap accumulated (empty when it scored nothing)."""
    return {name: value.clone() for name, value in tap.stats.items()}


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))


def test_nesting_and_arguments():
    a, b = object(), object()
    assert capture_allowed(a)
    with exclusive_capture(a):
        assert capture_allowed(a) and not capture_allowed(b)
        with exclusive_capture():
            assert not capture_allowed(a) and not capture_allowed(b)
        assert capture_allowed(a)
    assert capture_allowed(a) and capture_allowed(b)
    with pytest.raises(RuntimeError):
        with exclusive_capture(a):
            raise RuntimeError("boom")
    assert capture_allowed(b)  # the stack unwinds on exceptions


@pytest.mark.parametrize("differentiable", [False, True])
def test_attention_tap_sdpa_skips_excluded_forwards(tokens, differentiable):
    torch.manual_seed(0)
    model = TinyLM()
    with AttentionTap(model, differentiable=differentiable) as tap:
        with exclusive_capture():
            model(tokens)
        assert tap.records == [] and not _stats(tap)
        model(tokens)
    reference = AttentionTap(model, differentiable=differentiable)
    with reference:
        model(tokens)
    assert [name for name, _ in tap.records] == [name for name, _ in reference.records]
    got, expected = _stats(tap), _stats(reference)  # site names and sums as if the excluded forward never ran
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_attention_tap_named_in_the_block_still_records(tokens):
    model = TinyLM()
    with AttentionTap(model) as mine, AttentionTap(model) as other:
        with exclusive_capture(mine):
            model(tokens)
    assert _stats(mine) and not _stats(other)


def test_multihead_attention_adapter_and_record_attention_skip():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with AttentionTap(layer) as tap:
        with exclusive_capture(), torch.no_grad():
            layer(x)
            record_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
        assert not _stats(tap)
        with torch.no_grad():
            layer(x)
        assert _stats(tap)


def test_hf_attention_skips():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32, (1, 6))
    with AttentionTap(model) as tap:
        with exclusive_capture(), torch.no_grad():
            model(ids)
        assert not _stats(tap)
        with torch.no_grad():
            model(ids)
        assert _stats(tap)


def test_activation_and_router_taps_skip(tokens):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    act = ActivationTap(model, include=["0"])
    router = RouterTap(model, include=["2"])
    with act, router:
        with exclusive_capture(act):
            model(x)
        assert list(act.captures) == ["0"] and not router.captures
        with exclusive_capture():
            model(x)
        assert len(act.captures["0"]) == 1 and not router.captures
        model(x)
        assert len(act.captures["0"]) == 2 and len(router.captures["2"]) == 1
