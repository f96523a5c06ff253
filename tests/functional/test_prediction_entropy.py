"""Per-row entropy, top-1 probability and label NLL from logits and from hidden x head, against float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy_head import linear_entropy_and_logprobs
from entrotrain.functional.prediction_entropy import prediction_stats_from_hidden, prediction_stats_from_logits


def brute(logits, labels=None):
    """-sum p log p, max p and -log p_y, row by row in float64 plain math."""
    h, top, nll = [], [], []
    for i, row in enumerate(logits.double().tolist()):
        m = max(row)
        e = [math.exp(z - m) for z in row]
        s = sum(e)
        p = [x / s for x in e]
        h.append(-sum(q * math.log(q) for q in p if q > 0))
        top.append(max(p))
        if labels is not None:
            y = int(labels[i])
            nll.append(-math.log(p[y]) if y >= 0 else 0.0)
    f64 = torch.float64
    return torch.tensor(h, dtype=f64), torch.tensor(top, dtype=f64), (torch.tensor(nll, dtype=f64) if labels is not None else None)


@settings(max_examples=40)
@given(n=st.integers(0, 9), v=st.integers(1, 7), chunk=st.integers(1, 5), scale=st.sampled_from([0.1, 1.0, 30.0]),
       seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_logits_match_brute_force(n, v, chunk, scale, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(-1, v, (n,), generator=g)
    h, top, nll = brute(logits, labels)
    stats = prediction_stats_from_logits(logits, labels, chunk_size=chunk)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert stats.entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(stats.entropy.double(), h.double(), atol=tol * max(1.0, scale), rtol=tol)
    torch.testing.assert_close(stats.top1_prob.double(), top.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(stats.nll.double(), nll.double(), atol=tol * max(1.0, scale), rtol=tol)


@settings(max_examples=30)
@given(n=st.integers(0, 9), d=st.integers(1, 6), v=st.integers(1, 9), chunk=st.integers(1, 4), bias=st.booleans(),
       seed=st.integers(0, 10_000))
def test_hidden_path_equals_logits_path(n, d, v, chunk, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    logits = hidden @ weight.T + (b if b is not None else 0)
    fused = prediction_stats_from_hidden(hidden, weight, b, labels, chunk_size=chunk)
    h, top, nll = brute(logits, labels)
    torch.testing.assert_close(fused.entropy, h.double(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fused.top1_prob, top.double(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fused.nll, nll.double(), atol=1e-9, rtol=1e-9)
    # the same entropy as the policy head's fused path (the one the Triton kernel mirrors)
    ref = linear_entropy_and_logprobs(hidden, weight, bias=b)
    torch.testing.assert_close(fused.entropy, ref.entropy, atol=1e-9, rtol=1e-9)


def test_bf16_hidden_is_computed_in_float32():
    hidden = torch.randn(5, 4).bfloat16()
    weight = torch.randn(7, 4).bfloat16()
    stats = prediction_stats_from_hidden(hidden, weight)
    assert stats.entropy.dtype == torch.float32 and stats.nll is None
    h, _, _ = brute(hidden.float() @ weight.float().T)
    torch.testing.assert_close(stats.entropy.double(), h.double(), atol=1e-4, rtol=1e-4)


def test_nonfinite_rows_stay_in_their_row():
    logits = torch.randn(4, 5)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    stats = prediction_stats_from_logits(logits)
    assert torch.isnan(stats.entropy[1]) and torch.isnan(stats.entropy[3])
    assert torch.isfinite(stats.entropy[[0, 2]]).all() and torch.isfinite(stats.top1_prob[[0, 2]]).all()
    hidden = torch.randn(3, 2)
    hidden[0, 0] = float("nan")
    fused = prediction_stats_from_hidden(hidden, torch.randn(6, 2))
    assert torch.isnan(fused.entropy[0]) and torch.isfinite(fused.entropy[1:]).all()


def test_limits_one_class_and_uniform():
    assert prediction_stats_from_logits(torch.zeros(3, 1)).entropy.tolist() == [0.0, 0.0, 0.0]
    stats = prediction_stats_from_logits(torch.zeros(2, 8))
    torch.testing.assert_close(stats.entropy, torch.full((2,), math.log(8)))
    torch.testing.assert_close(stats.top1_prob, torch.full((2,), 1 / 8))


def test_errors_name_the_argument():
    with pytest.raises(EntrotrainError, match="logits"):
        prediction_stats_from_logits(torch.zeros(3, 4, 5))
    with pytest.raises(EntrotrainError, match="V = 0"):
        prediction_stats_from_logits(torch.zeros(3, 0))
    with pytest.raises(EntrotrainError, match="labels"):
        prediction_stats_from_logits(torch.zeros(3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(EntrotrainError, match="labels"):
        prediction_stats_from_logits(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(EntrotrainError, match="same D"):
        prediction_stats_from_hidden(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(EntrotrainError, match="bias"):
        prediction_stats_from_hidden(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(4))
    with pytest.raises(EntrotrainError, match="chunk_size"):
        prediction_stats_from_logits(torch.zeros(3, 4), chunk_size=0)


def test_minus_inf_logits_are_masked_tokens_as_documented():
    """PredictionStats' documented values for −inf logits: a masked token has probability 0 (the row's statistics
    equal those of the finite tokens alone, the nll of a masked label is +inf), a row with no finite logit has
    entropy 0 and NaN top-1 / nll, and +inf gives NaN in its row only."""
    inf = float("inf")
    z = torch.tensor([[0.0, 1.0, -inf, 2.0], [0.0, inf, 1.0, 0.0], [-inf] * 4, [0.5, -inf, -inf, -inf]])
    got = prediction_stats_from_logits(z.double(), torch.tensor([2, 0, 1, 0]))
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), -1)
    assert float(got.entropy[0]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)
    assert float(got.top1_prob[0]) == pytest.approx(float(p.max()), rel=1e-12)
    assert got.nll[0] == inf and torch.isnan(got.entropy[1]) and torch.isnan(got.top1_prob[1])
    assert got.entropy[2] == 0 and torch.isnan(got.top1_prob[2]) and torch.isnan(got.nll[2])
    assert (got.entropy[3], got.top1_prob[3], got.nll[3]) == (0.0, 1.0, 0.0)
