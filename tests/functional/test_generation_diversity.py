"""distinct-n, TTR and seq-rep-n against a pure-Python brute force; n-grams never cross padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.generation_diversity import distinct_n, ngram_counts, repetition_rate, type_token_ratio


def brute_grams(tokens, mask, n):
    """Per row: the list of n-grams whose n positions are all kept (plain Python)."""
    out = []
    for row, keep in zip(tokens.tolist(), mask.tolist()):
        out.append([tuple(row[i : i + n]) for i in range(len(row) - n + 1) if all(keep[i : i + n])])
    return out


def brute(tokens, mask, n):
    grams = brute_grams(tokens, mask, n)
    total = sum(len(g) for g in grams)
    corpus = len({g for row in grams for g in row}) / total if total else 0.0
    ratios = [len(set(g)) / len(g) for g in grams if g]
    mean = sum(ratios) / len(ratios) if ratios else 0.0
    rep = sum(1 - r for r in ratios) / len(ratios) if ratios else 0.0
    return corpus, mean, rep


def test_hand_computed():
    tokens = torch.tensor([[0, 1, 0, 1], [5, 5, 5, 5]])
    # row 0 bigrams (0,1),(1,0),(0,1): 2 distinct of 3; row 1 (5,5) x3: 1 of 3; corpus: 3 distinct of 6
    assert distinct_n(tokens, 2).item() == pytest.approx(3 / 6)
    assert distinct_n(tokens, 2, reduction="mean").item() == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert repetition_rate(tokens, 2).item() == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert type_token_ratio(tokens).item() == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert distinct_n(tokens, 1).item() == pytest.approx(3 / 8)


def test_ngrams_do_not_cross_padding():
    tokens = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[True, True, False, True]])
    counts = ngram_counts(tokens, 2, mask)
    assert counts.total.tolist() == [1] and counts.distinct.tolist() == [1]
    # integer 0/1 masks (HF attention_mask) are accepted with 1 = keep
    assert ngram_counts(tokens, 2, mask.long()).total.tolist() == [1]
    # a repeated bigram only through the padded slot does not count as a repetition
    tokens = torch.tensor([[7, 8, 0, 7, 8]])
    assert repetition_rate(tokens, 2, torch.tensor([[1, 1, 0, 1, 1]])).item() == pytest.approx(0.5)


def test_degenerate_inputs_give_zero():
    assert distinct_n(torch.zeros(0, 5, dtype=torch.long), 2).item() == 0.0
    assert distinct_n(torch.tensor([[1, 2]]), 3).item() == 0.0  # T < n
    assert repetition_rate(torch.tensor([[1, 2, 3]]), 2, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0
    assert type_token_ratio(torch.zeros(2, 0, dtype=torch.long)).item() == 0.0
    assert distinct_n(torch.tensor([4, 4, 5]), 1).item() == pytest.approx(2 / 3)  # one 1-D sequence


def test_errors_name_the_argument():
    with pytest.raises(EntrotrainError, match="tokens"):
        distinct_n(torch.rand(2, 3), 2)
    with pytest.raises(EntrotrainError, match="n"):
        distinct_n(torch.ones(2, 3, dtype=torch.long), 0)
    with pytest.raises(EntrotrainError, match="mask"):
        distinct_n(torch.ones(2, 3, dtype=torch.long), 1, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match="mask"):
        distinct_n(torch.ones(2, 3, dtype=torch.long), 1, torch.ones(2, 3))
    with pytest.raises(EntrotrainError, match="reduction"):
        distinct_n(torch.ones(2, 3, dtype=torch.long), 1, reduction="sum")
    with pytest.raises(EntrotrainError, match="tokens"):
        repetition_rate(torch.ones(2, 3, 4, dtype=torch.long))


@settings(max_examples=60)
@given(
    b=st.integers(0, 4),
    t=st.integers(0, 9),
    n=st.integers(1, 4),
    vocab=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    masked=st.booleans(),
)
def test_matches_brute_force(b, t, n, vocab, seed, masked):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3 if masked else torch.ones(b, t, dtype=torch.bool)
    corpus, mean, rep = brute(tokens, mask, n)
    arg = mask if masked else None
    assert distinct_n(tokens, n, arg).item() == pytest.approx(corpus, abs=1e-12)
    assert distinct_n(tokens, n, arg, reduction="mean").item() == pytest.approx(mean, abs=1e-12)
    assert repetition_rate(tokens, n, arg).item() == pytest.approx(rep, abs=1e-12)
    counts = ngram_counts(tokens, n, arg)
    grams = brute_grams(tokens, mask, n)
    assert counts.total.tolist() == [len(x) for x in grams]
    assert counts.distinct.tolist() == [len(set(x)) for x in grams]
    assert 0.0 <= rep < 1.0 or rep == 0.0
