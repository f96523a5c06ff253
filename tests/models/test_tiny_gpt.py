import pytest
import torch

from entrotrain.models import TinyGPT


def _model(**kw) -> TinyGPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return TinyGPT(**cfg).eval()


def test_forward_shape():
    model = _model()
    idx = torch.randint(0, 50, (3, 16))
    assert model(idx).shape == (3, 16, 50)
    assert model(idx[:, :5]).shape == (3, 5, 50)


def test_module_names():
    names = dict(_model().named_modules())
    assert "blocks.0.attn" in names and "blocks.1.attn" in names
    assert hasattr(names["blocks.0.attn"], "qkv") and hasattr(names["blocks.0.attn"], "proj")


def test_causal():
    model = _model(dropout=0.1)  # eval mode -> dropout off
    idx = torch.randint(0, 50, (2, 16))
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 50
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_uses_sdpa(monkeypatch):
    import torch.nn.functional as F

    calls = []
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, kw.get("is_causal")))
        return orig(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    _model()(torch.randint(0, 50, (2, 7)))
    assert calls == [(torch.Size([2, 2, 7, 16]), True)] * 2


def test_too_long_raises():
    with pytest.raises(ValueError, match="block_size"):
        _model()(torch.zeros(1, 17, dtype=torch.long))


def test_bias_false():
    model = _model(bias=False)
    assert model.blocks[0].attn.qkv.bias is None
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)
