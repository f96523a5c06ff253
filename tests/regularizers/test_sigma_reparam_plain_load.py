"""A plain layer's weights load into its σReparam replacement as the converter converts it: ``u`` the top right
singular vector of the loaded ``W``, ``γ = σ(W)``, the same outputs, no missing key (a checkpoint saved before
σReparam was applied, e.g. a run rolled back to before its collapse and resumed with the cure)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from entrotrain.models import TinyGPT
from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear, sigma_reparam


def _plain_and_reparam() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = TinyGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(1)  # different weights: the load must bring the plain ones over
    other = TinyGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    sigma_reparam(other, include=["blocks.**"])
    return plain, other


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_plain_weights_load_function_preservingly(mode):
    plain, other = _plain_and_reparam()
    result = other.load_state_dict(plain.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randint(0, 32, (3, 8))
    plain.train(mode == "train")
    other.train(mode == "train")
    assert torch.allclose(other(x), plain(x), atol=1e-5, rtol=1e-5)
    layer = other.blocks[0].attn.qkv
    w = plain.blocks[0].attn.qkv.weight.detach().double()
    sigma = torch.linalg.matrix_norm(w, ord=2)
    assert float(layer.gamma) == pytest.approx(float(sigma), rel=1e-6)
    assert float(layer.sigma) == pytest.approx(float(sigma), rel=1e-6)
    top = torch.linalg.svd(w).Vh[0]
    assert abs(float(top @ layer.u.double())) == pytest.approx(1.0, abs=1e-6)


def test_a_reparametrised_state_keeps_its_own_gamma_and_u():
    _, other = _plain_and_reparam()
    saved = copy.deepcopy(other.state_dict())
    saved["blocks.0.attn.qkv.gamma"] = torch.tensor([3.0])
    saved["blocks.0.attn.qkv.u"] = saved["blocks.0.attn.qkv.u"].flip(0)
    fresh = copy.deepcopy(other)
    fresh.load_state_dict(saved)
    assert float(fresh.blocks[0].attn.qkv.gamma) == 3.0
    assert torch.equal(fresh.blocks[0].attn.qkv.u, saved["blocks.0.attn.qkv.u"])


def test_a_state_without_the_weight_still_reports_every_missing_key():
    layer = SigmaReparamLinear(4, 3)
    result = layer.load_state_dict({"bias": torch.zeros(3)}, strict=False)
    assert sorted(result.missing_keys) == ["gamma", "sigma", "u", "weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        SigmaReparamLinear(4, 3).load_state_dict({"bias": torch.zeros(3)})


def test_hf_conv1d_plain_weights_load_function_preservingly():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config).eval()
    other = transformers.GPT2LMHeadModel(config).eval()
    sigma_reparam(other, include=["transformer.h.**"])
    assert other.load_state_dict(plain.state_dict(), strict=True).missing_keys == []
    x = torch.randint(0, 32, (2, 8))
    assert torch.allclose(other(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_plain_fused_qkv_loads_into_a_qk_joint_layer_function_preservingly(mode):
    """qk_joint: the fused ``qkv.weight`` / ``qkv.bias`` of a plain checkpoint are split into the joint-qk and v rows
    (they were reported missing/unexpected: a raw RuntimeError)."""
    torch.manual_seed(0)
    plain = TinyGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(1)
    other = TinyGPT(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    sigma_reparam(other, include=["blocks.**"], qk_joint="**.qkv")
    result = other.load_state_dict(plain.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randint(0, 32, (3, 8))
    plain.train(mode == "train")
    other.train(mode == "train")
    assert torch.allclose(other(x), plain(x), atol=1e-5, rtol=1e-5)
    joint = other.blocks[0].attn.qkv
    w = plain.blocks[0].attn.qkv.weight.detach().double()
    assert float(joint.qk.gamma) == pytest.approx(float(torch.linalg.matrix_norm(w[:32], ord=2)), rel=1e-6)
    assert float(joint.v.gamma) == pytest.approx(float(torch.linalg.matrix_norm(w[32:], ord=2)), rel=1e-6)
    again = copy.deepcopy(other)  # its own (converted) state still round-trips
    assert again.load_state_dict(other.state_dict(), strict=True).missing_keys == []


def test_hf_conv1d_plain_fused_qkv_loads_into_a_qk_joint_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config).eval()
    other = transformers.GPT2LMHeadModel(config).eval()
    sigma_reparam(other, include=["transformer.h.**"], qk_joint="**.attn.c_attn")
    assert other.load_state_dict(plain.state_dict(), strict=True).missing_keys == []
    x = torch.randint(0, 32, (2, 8))
    assert torch.allclose(other(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)
