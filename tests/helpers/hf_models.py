"""Tiny models users really train, from configs with random weights (no download): the HF attention test matrix.

Each :class:`Family` builds one model (2 layers, hidden 32, 4 heads, vocab 100) in a given attention implementation,
its inputs (unpadded, right-padded, left-padded) and states, per attention site in forward order, the module name
(exactly what ``named_modules()`` gives), which mask the site applies and which of its queries are real tokens. The
brute force in :mod:`tests.helpers.hf_brute` reads these descriptions; nothing here calls ``entrotrain``.

Site names per model (``{i}`` = layer 0, 1):

==============================  ==============================================================================
model                           attention sites
==============================  ==============================================================================
Llama / Qwen2 / Mistral         ``model.layers.{i}.self_attn``
GPT-2 (``GPT2LMHeadModel``)     ``transformer.h.{i}.attn``
BERT (``BertModel``)            ``encoder.layer.{i}.attention.self``
T5 (``T5Model``)                ``encoder.block.{i}.layer.0.SelfAttention``, then per decoder block
                                ``decoder.block.{i}.layer.0.SelfAttention``, ``decoder.block.{i}.layer.1.EncDecAttention``
BART (``BartModel``)            ``encoder.layers.{i}.self_attn``, then per decoder layer
                                ``decoder.layers.{i}.self_attn``, ``decoder.layers.{i}.encoder_attn``
ViT (``ViTModel``)              ``layers.{i}.attention`` (transformers 5.x; ``encoder.layer.{i}.attention.attention`` in 4.x)
``nn.TransformerEncoder``       ``layers.{i}.self_attn``
``nn.Transformer`` (as         ``transformer.encoder.layers.{i}.self_attn``, then per decoder layer
``transformer``)                ``transformer.decoder.layers.{i}.self_attn``, ``….multihead_attn``
==============================  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 2, 32, 4, 2, 100
BATCH, SEQ, DEC_SEQ = 3, 12, 8
WINDOW = 4  # Mistral's sliding window: well inside SEQ, so it changes most rows
IMAGE, PATCH = 16, 4  # ViT: 16 patches + CLS = 17 tokens
INIT = 0.3  # peaked, head-distinct attention: a head or mask mistake cannot hide in the tolerance
PADDINGS = ("none", "right", "left")
#: real tokens per row for padded batches: one full row, one half, one with two tokens
REAL = (SEQ, 7, 2)
DEC_REAL = (DEC_SEQ, 5, 3)


@dataclass(frozen=True)
class Site:
    """One attention call: its module name and what the model masks there.

    ``kind``: ``"self"`` (queries and keys are the same tokens) or ``"cross"`` (decoder queries, encoder keys).
    ``causal``: keys after the query are masked. ``window``: keys with ``i - j >= window`` are masked.
    ``queries`` / ``keys``: the input field whose 1/0 mask marks real tokens (``None``: all real).
    ``attentions``: the ``output_attentions`` field and index holding this site's weights.
    """

    name: str
    attentions: tuple[str, int]
    causal: bool = False
    window: int | None = None
    queries: str | None = "attention_mask"
    keys: str | None = "attention_mask"


@dataclass(frozen=True)
class Family:
    """A model family of the matrix: how to build it, feed it and where it attends."""

    name: str
    build: Callable[[str], nn.Module]
    impls: tuple[str, ...]
    paddings: tuple[str, ...]
    sites: tuple[Site, ...]
    inputs: Callable[[str], dict[str, Tensor]]

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.sites]


# ------------------------------------------------------------------------------------------------------- inputs
def _token_mask(padding: str, real: tuple[int, ...], n: int) -> Tensor:
    mask = torch.zeros(len(real), n, dtype=torch.long)
    for row, count in enumerate(real):
        if padding == "none":
            mask[row] = 1
        elif padding == "right":
            mask[row, :count] = 1
        else:
            mask[row, n - count :] = 1
    return mask


def _ids(n: int, seed: int) -> Tensor:
    return torch.randint(1, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(seed))


def text_inputs(padding: str) -> dict[str, Tensor]:
    """``input_ids`` ``(3, 12)`` and ``attention_mask`` (1 = real token): rows with 12, 7 and 2 real tokens."""
    mask = _token_mask(padding, REAL, SEQ)
    return {"input_ids": _ids(SEQ, 1).masked_fill(mask == 0, 0), "attention_mask": mask}


def seq2seq_inputs(padding: str) -> dict[str, Tensor]:
    """Encoder inputs as :func:`text_inputs` plus ``decoder_input_ids`` ``(3, 8)`` with the same padding side."""
    batch = text_inputs(padding)
    mask = _token_mask(padding, DEC_REAL, DEC_SEQ)
    batch["decoder_input_ids"] = _ids(DEC_SEQ, 2).masked_fill(mask == 0, 0)
    batch["decoder_attention_mask"] = mask
    return batch


def repadded(batch: dict[str, Tensor], side: str, real: tuple[int, ...]) -> dict[str, Tensor]:
    """``batch`` with every 1/0 mask field (and its ids) re-padded on ``side`` to ``real`` tokens per row (capped at
    the field's length): for property tests over padding patterns, all-padding rows included."""
    out = dict(batch)
    for field, ids in (("attention_mask", "input_ids"), ("decoder_attention_mask", "decoder_input_ids")):
        if field in batch:
            n = batch[field].shape[1]
            mask = _token_mask(side, tuple(min(r, n) for r in real), n)
            out[field], out[ids] = mask, batch[ids].masked_fill(mask == 0, 0)
    return out


def image_inputs(padding: str) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}


# ------------------------------------------------------------------------------------------------------- builders
def _common(impl: str) -> dict:
    return dict(
        vocab_size=VOCAB,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        initializer_range=INIT,
        attn_implementation=impl,
    )


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


def llama(impl: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        **_common(impl),
    )
    return _seeded(lambda: LlamaForCausalLM(config))


def qwen2(impl: str) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=64, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        **_common(impl),
    )
    return _seeded(lambda: Qwen2ForCausalLM(config))


def mistral(impl: str) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        sliding_window=WINDOW, **_common(impl),
    )
    return _seeded(lambda: MistralForCausalLM(config))


def gpt2(impl: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, initializer_range=INIT,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=impl,
    )
    return _seeded(lambda: GPT2LMHeadModel(config))


def bert(impl: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=HIDDEN, intermediate_size=64, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0, **_common(impl),
    )
    return _seeded(lambda: BertModel(config, add_pooling_layer=False))


def t5(impl: str) -> nn.Module:
    from transformers import T5Config, T5Model

    config = T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
        num_heads=HEADS, relative_attention_num_buckets=8, dropout_rate=0.0, initializer_factor=2.0,
        decoder_start_token_id=0, attn_implementation=impl,
    )
    return _seeded(lambda: T5Model(config))


def bart(impl: str) -> nn.Module:
    from transformers import BartConfig, BartModel

    config = BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, init_std=INIT, attn_implementation=impl,
    )
    return _seeded(lambda: BartModel(config))


def vit(impl: str) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
        image_size=IMAGE, patch_size=PATCH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=INIT, attn_implementation=impl,
    )
    return _seeded(lambda: ViTModel(config, add_pooling_layer=False))


# ------------------------------------------------------------------------------------------------------- torch
def _peaked(model: nn.Module) -> None:
    """Unit-variance embeddings and N(0, INIT) projections (LayerNorms kept): peaked, head-distinct attention."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 1.0 if name.startswith("embed") else INIT)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` over embeddings; ``attention_mask`` (1 = real) becomes ``src_key_padding_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).layers
        _peaked(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=attention_mask == 0)
        return x


class TorchSeq2Seq(nn.Module):
    """``nn.Transformer`` over embeddings: encoder padding, causal decoder, decoder→encoder cross-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.transformer = nn.Transformer(
            HIDDEN, HEADS, LAYERS, LAYERS, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        _peaked(self)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> Tensor:
        n = decoder_input_ids.shape[1]
        return self.transformer(
            self.embed(input_ids),
            self.embed(decoder_input_ids),
            tgt_mask=torch.ones(n, n, dtype=torch.bool).triu(1),  # True = not allowed, as the padding masks
            tgt_is_causal=True,
            src_key_padding_mask=attention_mask == 0,
            tgt_key_padding_mask=decoder_attention_mask == 0,
            memory_key_padding_mask=attention_mask == 0,
        )


def torch_encoder(impl: str) -> nn.Module:
    return _seeded(TorchEncoder)


def torch_seq2seq(impl: str) -> nn.Module:
    return _seeded(TorchSeq2Seq)


# ------------------------------------------------------------------------------------------------------- matrix
def _decoder_sites(prefix: str, window: int | None = None) -> tuple[Site, ...]:
    return tuple(Site(prefix.format(i=i), ("attentions", i), causal=True, window=window) for i in range(LAYERS))


def _encoder_sites(prefix: str, queries: str | None = "attention_mask") -> tuple[Site, ...]:
    return tuple(Site(prefix.format(i=i), ("attentions", i), queries=queries, keys=queries) for i in range(LAYERS))


def _seq2seq_sites(encoder: str, self_attn: str, cross: str) -> tuple[Site, ...]:
    sites = [
        Site(encoder.format(i=i), ("encoder_attentions", i)) for i in range(LAYERS)
    ]
    for i in range(LAYERS):
        sites.append(
            Site(self_attn.format(i=i), ("decoder_attentions", i), causal=True,
                 queries="decoder_attention_mask", keys="decoder_attention_mask")
        )
        sites.append(Site(cross.format(i=i), ("cross_attentions", i), queries="decoder_attention_mask"))
    return tuple(sites)


BOTH = ("sdpa", "eager")
DECODER_PADDINGS = PADDINGS
ENCODER_PADDINGS = ("none", "right")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", llama, BOTH, DECODER_PADDINGS, _decoder_sites("model.layers.{i}.self_attn"), text_inputs),
        Family("qwen2", qwen2, BOTH, DECODER_PADDINGS, _decoder_sites("model.layers.{i}.self_attn"), text_inputs),
        Family(
            "mistral", mistral, BOTH, DECODER_PADDINGS, _decoder_sites("model.layers.{i}.self_attn", WINDOW), text_inputs
        ),
        Family("gpt2", gpt2, BOTH, DECODER_PADDINGS, _decoder_sites("transformer.h.{i}.attn"), text_inputs),
        Family("bert", bert, BOTH, ENCODER_PADDINGS, _encoder_sites("encoder.layer.{i}.attention.self"), text_inputs),
        Family(
            "t5", t5, BOTH, ENCODER_PADDINGS,
            _seq2seq_sites(
                "encoder.block.{i}.layer.0.SelfAttention",
                "decoder.block.{i}.layer.0.SelfAttention",
                "decoder.block.{i}.layer.1.EncDecAttention",
            ),
            seq2seq_inputs,
        ),
        Family(
            "bart", bart, BOTH, ENCODER_PADDINGS,
            _seq2seq_sites("encoder.layers.{i}.self_attn", "decoder.layers.{i}.self_attn", "decoder.layers.{i}.encoder_attn"),
            seq2seq_inputs,
        ),
        Family(
            "vit", vit, BOTH, ("none",), _encoder_sites("layers.{i}.attention", queries=None),
            image_inputs,
        ),
        Family(
            "torch_encoder", torch_encoder, ("native",), ENCODER_PADDINGS, _encoder_sites("layers.{i}.self_attn"),
            text_inputs,
        ),
        Family(
            "torch_transformer", torch_seq2seq, ("native",), ENCODER_PADDINGS,
            _seq2seq_sites("transformer.encoder.layers.{i}.self_attn", "transformer.decoder.layers.{i}.self_attn",
                           "transformer.decoder.layers.{i}.multihead_attn"),
            seq2seq_inputs,
        ),
    )
}


def cases() -> list[tuple[str, str, str]]:
    """Every ``(family, impl, padding)`` of the matrix."""
    return [(f.name, impl, pad) for f in FAMILIES.values() for impl in f.impls for pad in f.paddings]
