"""Padded queries are not scored: query masks from the call, the HF model, or a ``query_padding`` block.

Statistics are checked against a float64 brute force (``tests.helpers.reference.attention_entropy64``) over the real
queries only; property tests cover shapes with 0-sized dims, bf16, all-masked and NaN rows.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from entrotrain.errors import EntrotrainError
from entrotrain.taps import AttentionTap, record_attention
from entrotrain.taps.attention_stats import ENTROPY_SUM, NONFINITE, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS
from entrotrain.taps.query_padding import query_padding
from entrotrain.taps.sampling import evenly_spaced
from tests.helpers.reference import attention_entropy64, no_tap_leaks, one_thread  # noqa: F401  (autouse fixtures)


def _reference_sums(q, k, real, *, causal=False):
    """(5, H) sums of a float64 brute force over the real queries (``real`` (B, Nq) bool)."""
    n_q, n_k = q.shape[2], k.shape[2]
    if q.shape[0] == 0 or q.shape[1] == 0 or n_q == 0:
        return torch.zeros(5, q.shape[1], dtype=torch.float64)  # nothing to score (the brute force cannot split 0 heads)
    valid = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        valid = valid.tril()
    entropy, normalized, n_keys = attention_entropy64(q, k, valid=valid)
    keep = real[:, None, :].expand_as(entropy)
    has_keys, has_norm = keep & (n_keys >= 1), keep & (n_keys >= 2)
    return torch.stack(
        [
            torch.where(has_keys, entropy, 0.0).sum((0, 2)),
            torch.where(has_norm, normalized, 0.0).sum((0, 2)),
            has_keys.sum((0, 2)).double(),
            has_norm.sum((0, 2)).double(),
            torch.zeros(q.shape[1], dtype=torch.float64),
        ]
    )


@st.composite
def _case(draw):
    b, h, n_q, n_k, d = (draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 6)),
                         draw(st.integers(1, 6)), draw(st.integers(1, 4)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, n_q, d, generator=g), torch.randn(b, h, n_k, d, generator=g)
    kind = draw(st.sampled_from(["random", "all-padded", "all-real"]))
    real = torch.rand(b, n_q, generator=g) > 0.4
    if kind == "all-padded":
        real[:] = False
    elif kind == "all-real":
        real[:] = True
    as_int = draw(st.booleans())
    return q, k, real, as_int, draw(st.booleans())


@settings(max_examples=30)
@given(_case())
def test_query_mask_leaves_padded_queries_out(case):
    q, k, real, as_int, causal = case
    tap = AttentionTap(nn.Identity())
    mask = real.long() if as_int else real  # HF's 0/1 convention is accepted
    tap.record(q, k, name="site", query_mask=mask, is_causal=causal)
    got = tap.stats["site"]
    assert torch.isfinite(got).all()  # no NaN, also when every query is padded or a dim is 0
    torch.testing.assert_close(got, _reference_sums(q, k, real, causal=causal), rtol=0, atol=1e-5)
    if not real.any():
        assert torch.all(got == 0)


@settings(max_examples=15)
@given(_case())
def test_bf16_query_mask(case):
    q, k, real, _, causal = case
    tap = AttentionTap(nn.Identity())
    tap.record(q.bfloat16(), k.bfloat16(), name="site", query_mask=real, is_causal=causal)
    want = _reference_sums(q.bfloat16().float(), k.bfloat16().float(), real, causal=causal)
    got = tap.stats["site"]
    torch.testing.assert_close(got[ROWS], want[ROWS], rtol=0, atol=0)
    torch.testing.assert_close(got[NORMALIZED_ROWS], want[NORMALIZED_ROWS], rtol=0, atol=0)
    # the same bf16-rounded values, computed in float32 (half precision is upcast) against float64
    torch.testing.assert_close(got[ENTROPY_SUM], want[ENTROPY_SUM], rtol=0, atol=1e-5 * max(1.0, float(want[ROWS].sum())))


def test_nonfinite_padded_queries_are_not_counted():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    q[0, :, 4] = float("nan")  # a padded query holding NaN (e.g. garbage embeddings at padding)
    q[1, :, 0] = float("nan")  # a real query holding NaN: counted, never averaged
    real = torch.ones(2, 5, dtype=torch.bool)
    real[0, 4] = False
    tap = AttentionTap(nn.Identity())
    tap.record(q, k, name="site", query_mask=real)
    stats = tap.stats["site"]
    assert stats[NONFINITE].tolist() == [1.0, 1.0]
    assert stats[ROWS].tolist() == [8.0, 8.0]
    assert torch.isfinite(stats).all()


@pytest.mark.parametrize("max_rows, max_queries", [(None, 4), (2, None), (2, 3)])
def test_budget_samples_positions_then_drops_padded_ones(max_rows, max_queries):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 9, 4, generator=g), torch.randn(3, 2, 9, 4, generator=g)
    real = torch.rand(3, 9, generator=g) > 0.5
    tap = AttentionTap(nn.Identity(), max_rows=max_rows, max_queries=max_queries)
    tap.record(q, k, name="site", query_mask=real, is_causal=True)
    rows = evenly_spaced(3, max_rows)
    queries = evenly_spaced(9, max_queries)
    rows = torch.arange(3) if rows is None else rows
    queries = torch.arange(9) if queries is None else queries
    sub_real = real[rows][:, queries]
    valid = torch.ones(9, 9, dtype=torch.bool).tril()[queries]
    entropy, normalized, n_keys = attention_entropy64(q[rows][:, :, queries], k[rows], valid=valid)
    keep = sub_real[:, None, :].expand_as(entropy)
    assert tap.stats["site"][ROWS].tolist() == [float(sub_real.sum())] * 2
    torch.testing.assert_close(
        tap.stats["site"][ENTROPY_SUM], torch.where(keep, entropy, 0.0).sum((0, 2)), rtol=0, atol=1e-5
    )


def test_bad_query_masks_are_refused_with_the_fix():
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    tap = AttentionTap(nn.Identity())
    with pytest.raises(EntrotrainError, match=r"query_mask must be \(batch, queries\) = \(2, 5\)"):
        tap.record(q, k, name="s", query_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match="query_mask.bool"):
        tap.record(q, k, name="s", query_mask=torch.ones(2, 5))
    with pytest.raises(EntrotrainError, match="values other than 0 and 1"):
        tap.record(q, k, name="s", query_mask=torch.full((2, 5), 2))
    with pytest.raises(EntrotrainError, match="mask"):
        with query_padding(torch.ones(2, 5, 1, dtype=torch.bool)):
            pass
    with pytest.raises(EntrotrainError, match=r"mask.bool\(\)"):  # a float mask: refused at once
        with query_padding(torch.ones(2, 5)):
            pass
    with query_padding(torch.full((2, 5), 2)):  # values are read only when a tap uses the mask
        with pytest.raises(EntrotrainError, match="values other than 0 and 1"):
            tap.record(q, k, name="s")
    assert tap.stats == {}


def test_differentiable_records_mark_padded_queries_with_no_keys():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 5, 4, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, generator=g)
    real = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    tap = AttentionTap(nn.Identity(), differentiable=True)
    tap.record(q, k, name="site", query_mask=real)
    (_, result), = tap.records
    assert torch.all(result.n_keys[~real[:, None, :].expand_as(result.n_keys)] == 0)
    assert torch.all(result.entropy[~real[:, None, :].expand_as(result.entropy)] == 0)
    from entrotrain.regularizers.attention_entropy import AttentionEntropyMaximization

    AttentionEntropyMaximization(weight=1.0)(tap).total.backward()
    assert torch.isfinite(q.grad).all()
    assert torch.all(q.grad[0, :, 3:] == 0) and torch.all(q.grad[1, :, 0] == 0)  # padded queries: no gradient
    assert q.grad[0, :, :3].abs().sum() > 0


# ------------------------------------------------------------------ record_attention / query_padding blocks
class SDPAModel(nn.Module):
    """Attention through F.scaled_dot_product_attention (generic interception) plus a pooling query."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        self.attn = nn.Identity()
        self.pool = pool

    def forward(self, q, k):
        out = F.scaled_dot_product_attention(q, k, k, is_causal=True)
        if self.pool:  # one learned query over all tokens: its query mask cannot come from the tokens' mask
            F.scaled_dot_product_attention(q[:, :, :1], k, k)
        return out


def test_query_padding_block_for_sdpa_models_and_record_attention():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    model = SDPAModel()
    with AttentionTap(model) as tap:
        with query_padding(mask):
            model(q, k)
            record_attention(q, k, name="manual", is_causal=True)
            record_attention(q, k, name="own", is_causal=True, query_mask=torch.ones(2, 6, dtype=torch.bool))
        model(q, k)  # outside the block: all queries
    want = _reference_sums(q, k, mask.bool(), causal=True)
    torch.testing.assert_close(tap.stats["manual"], want, rtol=0, atol=1e-5)
    assert tap.stats["own"][ROWS].tolist() == [12.0, 12.0]  # the call's own mask wins over the block
    both = tap.stats[""] if "" in tap.stats else tap.stats["SDPAModel"]
    torch.testing.assert_close(both, want + _reference_sums(q, k, torch.ones(2, 6, dtype=torch.bool), causal=True),
                               rtol=0, atol=1e-5)


def test_a_mask_that_does_not_fit_scores_all_queries_and_warns_once_per_site():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    model = SDPAModel(pool=True)
    with AttentionTap(model) as tap:
        with pytest.warns(UserWarning, match=r"does not fit the attention call at '.*\[1\]' \(batch 2, 1 queries\)"):
            with query_padding(mask):
                model(q, k)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per site and tap
            with query_padding(mask):
                model(q, k)
    pooled = [site for site in tap.stats if site.endswith("[1]")]
    assert len(pooled) == 1 and tap.stats[pooled[0]][ROWS].tolist() == [2.0 * 2, 2.0 * 2]  # all scored, 2 forwards


def test_nothing_armed_costs_nothing():
    """With no tap armed, record_attention returns before reading anything (even a q that an armed tap would
    refuse), a tap that exists but is not armed records nothing, and the query_padding block leaves no mask behind."""
    from entrotrain.taps.query_padding import _USER

    idle = AttentionTap(nn.Linear(2, 2))  # constructed, never armed
    with query_padding(torch.ones(1, 3, dtype=torch.bool)):
        assert len(_USER) == 1
        record_attention(torch.randn(1, 3, 2), torch.randn(1, 1, 3, 2))  # 3-D q: an armed tap raises on it
    assert idle.stats == {} and idle.calls == 0 and _USER == []
    with AttentionTap(nn.Linear(2, 2)), pytest.raises(EntrotrainError):
        record_attention(torch.randn(1, 3, 2), torch.randn(1, 1, 3, 2), name="site")  # the same call, armed


# ------------------------------------------------------------------ nn.MultiheadAttention
def test_mha_self_attention_key_padding_excludes_queries_but_cross_attention_does_not():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = []
    for key in (x, memory):  # self-attention (query is key), then cross-attention: queries are other tokens
        with AttentionTap(mha) as tap:
            mha(x, key, key, key_padding_mask=pad)
        rows.append(tap.stats["MultiheadAttention"][ROWS].tolist())
    assert rows == [[8.0, 8.0], [10.0, 10.0]]


@pytest.mark.parametrize("kind", ["bool", "float", "none"])
def test_transformer_decoder_cross_attention_queries_are_the_decoder_tokens(kind):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    tgt, memory = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    masks = {"bool": pad, "float": torch.zeros(2, 5).masked_fill(pad, float("-inf")), "none": None}
    with AttentionTap(layer) as tap:
        layer(tgt, memory, tgt_key_padding_mask=masks[kind], memory_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    real = 10.0 if kind == "none" else 7.0
    assert {site: stats[ROWS][0].item() for site, stats in tap.stats.items()} == {
        "self_attn": real, "multihead_attn": real
    }


# ------------------------------------------------------------------ HF: caches, encoder-decoder, user blocks
transformers = pytest.importorskip("transformers") if os.environ.setdefault("HF_HUB_OFFLINE", "1") else None


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_hf_kv_cache_queries_are_the_last_positions():
    model = _llama()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        step_mask = torch.cat([mask, torch.tensor([[1, 1], [0, 1]])], dim=1)  # 2 new tokens, one of them padding
        with warnings.catch_warnings(record=True) as caught, AttentionTap(model) as tap:
            warnings.simplefilter("always")
            model(input_ids=torch.tensor([[3, 4], [5, 6]]), attention_mask=step_mask, cache=cache)
    assert not [w for w in caught if "does not fit" in str(w.message)]  # the longer mask fits: the last 2 positions
    (stats,) = tap.stats.values()
    assert stats[ROWS].tolist() == [3.0, 3.0]


def test_hf_attention_mask_given_positionally():
    model = _llama()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), AttentionTap(model) as tap:
        model(ids, mask)  # LlamaForCausalLM.forward(input_ids, attention_mask, ...)
    (stats,) = tap.stats.values()
    assert stats[ROWS].tolist() == [9.0, 9.0]


def test_hf_model_mask_wins_and_a_block_covers_a_model_called_without_one():
    model = _llama()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    other = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    with torch.no_grad(), AttentionTap(model) as tap:
        with query_padding(other):
            model(input_ids=ids, attention_mask=mask)  # the model's own mask: 10 real queries
            model(input_ids=ids)  # no mask of its own: the block's, 2 real queries
    (stats,) = tap.stats.values()
    assert stats[ROWS].tolist() == [12.0, 12.0]


def test_hf_encoder_decoder_queries_are_the_decoder_tokens():
    from transformers import BartConfig, BartModel

    config = BartConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = BartModel(config).eval()
    g = torch.Generator().manual_seed(2)
    ids, dec = torch.randint(3, 32, (2, 7), generator=g), torch.randint(3, 32, (2, 5), generator=g)
    enc_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    dec_mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3])
    for decoder_mask, dec_rows in ((dec_mask, 7.0), (None, 10.0)):
        with torch.no_grad(), AttentionTap(model) as tap:
            model(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=decoder_mask)
        rows = {site: stats[ROWS][0].item() for site, stats in tap.stats.items()}
        assert rows == {
            "encoder.layers.0.self_attn": 11.0,
            "decoder.layers.0.self_attn": dec_rows,
            "decoder.layers.0.encoder_attn": dec_rows,
        }, rows
        assert math.isfinite(sum(s[NORMALIZED_SUM].sum().item() for s in tap.stats.values()))


# ------------------------------------------------------------------ the monitor, with a block in training_step
def test_monitor_means_are_over_real_queries_with_a_query_padding_block():
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from tests.helpers.lightning_models import SEQ, TinyLM, quiet_trainer, token_loader

    class PaddedLM(TinyLM):
        def training_step(self, batch, batch_idx):
            (idx,) = batch
            real = torch.ones(idx.shape[0], SEQ, dtype=torch.bool)
            real[1::2, SEQ - 5 :] = False  # odd rows: 5 padded positions at the end
            with query_padding(real):
                logits = self(idx[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    torch.manual_seed(0)
    model = PaddedLM(n_layer=1)
    monitor = AttentionEntropyMonitor(every_n_steps=1, max_rows=None, max_queries=None, log_media=False,
                                      print_summary=False)
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor])
    trainer.fit(model, token_loader(n=8, batch_size=8))
    q, k = model.blocks[0].last_qk  # what the logged step's forward computed
    real = torch.ones(8, SEQ, dtype=torch.bool)
    real[1::2, SEQ - 5 :] = False
    entropy, _, _ = attention_entropy64(q, k, valid=torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
    want = (entropy * real[:, None, :]).sum((0, 2)) / real.sum()
    got = torch.tensor([float(trainer.callback_metrics[f"entropy/attn/L0/H{h}"]) for h in range(q.shape[1])])
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    all_queries = entropy.mean((0, 2)).float()
    assert (got - all_queries).abs().max() > 1e-3  # the padded queries would have moved the means
