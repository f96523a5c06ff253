"""window_entropy, high_window_entropy_mask, phase ids / phase_entropy, pear_reward, sequence_entropy and
canon_advantage: hand-computed cases, float64 brute force (tests/helpers/token_shaping_reference.py, CANON's code
transcribed), hypothesis properties over shapes (incl. 0-sized), dtypes, masks and NaN/Inf, and the error contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.token_shaping import (
    WINDOW_ALIGNS,
    canon_advantage,
    high_window_entropy_mask,
    pear_reward,
    phase_entropy,
    phase_ids_from_delimiter,
    sequence_entropy,
    window_entropy,
)
from tests.helpers.contracts import DTYPES, INF, NAN, call
from tests.helpers.token_shaping_reference import (
    canon_reference,
    phase_ids_reference,
    phase_reference,
    window_reference,
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


# ------------------------------------------------------------------ window entropy: hand-computed


def test_window_forward_hand_computed():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    m = torch.tensor([[True, True, True, True, False]])
    mean, count = window_entropy(h, m, 2, return_counts=True)
    # forward, anchor excluded: t=0 -> (2+3)/2, t=1 -> (3+4)/2, t=2 -> 4 (5 is padding), t=3 -> empty, t=4 padding
    assert mean.tolist() == [[2.5, 3.5, 4.0, 0.0, 0.0]]
    assert count.tolist() == [[2, 2, 1, 0, 0]]


def test_window_trailing_and_centred_hand_computed():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    assert window_entropy(h, m, 2, align="trailing").tolist() == [[1.0, 1.5, 2.5, 3.5]]
    # centred w=3: {t-1, t, t+1}; w=2: {t, t+1} (one more after the anchor)
    assert window_entropy(h, m, 3, align="centred").tolist() == [[1.5, 2.0, 3.0, 3.5]]
    assert window_entropy(h, m, 2, align="centred").tolist() == [[1.5, 2.5, 3.5, 4.0]]


def test_window_longer_than_sequence_one_token_and_all_padding_rows():
    h = torch.tensor([[1.0, 3.0, 0.0], [7.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    mean, count = window_entropy(h, m, 50, align="trailing", return_counts=True)
    assert mean.tolist() == [[1.0, 2.0, 0.0], [7.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert count.tolist() == [[1, 2, 0], [1, 0, 0], [0, 0, 0]]
    fwd = window_entropy(h, m, 50)
    assert fwd.tolist() == [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # one-token row: empty window


def test_window_never_crosses_rows_and_padding_values_never_leak():
    h = torch.tensor([[1.0, 2.0, INF], [NAN, 5.0, 6.0]])
    m = torch.tensor([[True, True, False], [False, True, True]])
    out = window_entropy(h, m, 3, align="centred")
    assert out.tolist() == [[1.5, 1.5, 0.0], [0.0, 5.5, 5.5]]


def test_window_nan_only_in_the_windows_that_hold_it():
    h = torch.tensor([[1.0, NAN, 3.0, 4.0, 5.0, 6.0]])
    m = torch.ones(1, 6, dtype=torch.bool)
    out = window_entropy(h, m, 2)
    assert math.isnan(out[0, 0]) and not math.isnan(out[0, 1])  # t=0 averages {1, 2}; t=1 averages {2, 3}
    assert out[0, 1:].tolist() == [3.5, 4.5, 5.5, 6.0, 0.0]


def test_window_empty_inputs():
    for shape in [(0, 5), (3, 0), (0, 0)]:
        h = torch.zeros(shape)
        out = window_entropy(h, torch.ones(shape, dtype=torch.bool), 3)
        assert out.shape == shape and out.dtype == torch.float32


def test_window_errors_name_the_argument():
    h = torch.rand(2, 3)
    for kwargs, word in [
        ({"window": 0}, "window"),
        ({"window": 2.0}, "window"),
        ({"window": 2, "align": "left"}, "align"),
    ]:
        with pytest.raises(EntrotrainError, match=word):
            window_entropy(h, torch.ones(2, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(EntrotrainError, match="mask"):
        window_entropy(h, torch.ones(2, 4, dtype=torch.bool), 2)
    with pytest.raises(EntrotrainError, match="mask"):
        window_entropy(h, torch.full((2, 3), 0.5), 2)
    with pytest.raises(EntrotrainError, match="entropy"):
        window_entropy(torch.rand(6), torch.ones(6, dtype=torch.bool), 2)


@settings(max_examples=30)
@given(
    b=st.integers(0, 4),
    t=st.integers(0, 9),
    window=st.integers(1, 12),
    align=st.sampled_from(WINDOW_ALIGNS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    poison=st.booleans(),
)
def test_window_matches_brute_force(b, t, window, align, dtype, seed, poison):
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(b, t, generator=g, dtype=torch.float64) * 3).to(dtype)
    m = torch.rand(b, t, generator=g) < 0.7
    if poison and b * t:
        h[torch.randint(0, b, (1,), generator=g), torch.randint(0, t, (1,), generator=g)] = NAN
    mean, count = window_entropy(h, m, window, align=align, return_counts=True)
    ref_mean, ref_count = window_reference(h.double(), m, window, align)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(count, ref_count)
    assert torch.allclose(mean.double(), ref_mean, atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
    assert torch.isnan(mean).sum() <= torch.isnan(ref_mean).sum()


# ------------------------------------------------------------------ HWE mask


def test_hwe_threshold_and_quantile_hand_computed():
    w = torch.tensor([[0.5, 1.5, 2.0, 9.0], [1.0, 1.5, 3.0, NAN]])
    m = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert high_window_entropy_mask(w, m, threshold=1.5).tolist() == [
        [False, True, True, False], [False, True, True, False]
    ]
    # valid finite values 0.5, 1.0, 1.5, 1.5, 2.0, 3.0: the 0.5 quantile (linear) = 1.5 -> ties included
    assert high_window_entropy_mask(w, m, quantile=0.5).tolist() == [
        [False, True, True, False], [False, True, True, False]
    ]
    # the padded 9.0 does not move tau: q=1 -> 3.0
    assert high_window_entropy_mask(w, m, quantile=1.0).tolist() == [[False] * 4, [False, False, True, False]]


@pytest.mark.parametrize("dtype,below", [(torch.bfloat16, 1.5078125), (torch.float32, 1.5)])
def test_hwe_threshold_is_not_rounded_to_the_window_entropy_dtype(dtype, below):
    # 1.51 rounds to 1.5078125 in bf16 and 1.5 + 1e-9 to 1.5 in float32: the value just below tau was selected
    tau = 1.51 if dtype == torch.bfloat16 else 1.5 + 1e-9
    w = torch.tensor([[below, 2.0]], dtype=dtype)
    assert high_window_entropy_mask(w, torch.ones(1, 2, dtype=torch.bool), threshold=tau).tolist() == [[False, True]]


def test_hwe_empty_and_errors():
    w = torch.rand(2, 3)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert not high_window_entropy_mask(w, none, quantile=0.9).any()
    assert high_window_entropy_mask(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), quantile=0.9).shape == (
        0, 4
    )
    for kwargs in [{}, {"quantile": 0.5, "threshold": 1.0}, {"quantile": 1.5}, {"threshold": NAN}]:
        with pytest.raises(EntrotrainError, match="quantile|threshold"):
            high_window_entropy_mask(w, torch.ones(2, 3, dtype=torch.bool), **kwargs)


@settings(max_examples=25)
@given(b=st.integers(0, 4), t=st.integers(0, 8), q=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_hwe_quantile_matches_numpy_percentile(b, t, q, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, t, generator=g, dtype=torch.float64)
    m = torch.rand(b, t, generator=g) < 0.6
    out = high_window_entropy_mask(w, m, quantile=q)
    vals = w[m]
    if vals.numel() == 0:
        assert not out.any()
        return
    import numpy as np

    tau = np.percentile(vals.numpy(), 100 * q)  # linear, as ARES
    expect = (w.numpy() >= tau) & m.numpy()
    near = np.abs(w.numpy() - tau) < 1e-9  # interpolation rounding at the threshold itself
    assert ((out.numpy() == expect) | near).all()


# ------------------------------------------------------------------ phases


def test_phase_ids_single_and_multi_token_delimiters():
    ids = torch.tensor([[5, 6, 9, 7, 8, 0], [5, 9, 5, 9, 5, 0], [1, 2, 3, 0, 0, 0]])
    m = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]).bool()
    # single id 9: the delimiter opens phase 1; no delimiter -> all phase 0; padding -1
    assert phase_ids_from_delimiter(ids, m, 9).tolist() == [
        [0, 0, 1, 1, 1, -1], [0, 1, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1]
    ]
    # the two-token delimiter (9, 7): only row 0 holds it; a split tag is still found (PEAR's string-match quirk)
    assert phase_ids_from_delimiter(ids, m, [9, 7]).tolist() == [
        [0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, -1], [0, 0, 0, -1, -1, -1]
    ]
    # three phases: each occurrence opens the next one
    assert phase_ids_from_delimiter(ids, m, [5, 9], n_phases=3)[1].tolist() == [1, 1, 2, 2, 2, -1]


def test_phase_delimiter_in_padding_is_not_matched():
    ids = torch.tensor([[1, 2, 9, 9]])
    m = torch.tensor([[True, True, False, False]])
    assert phase_ids_from_delimiter(ids, m, 9).tolist() == [[0, 0, -1, -1]]
    assert phase_ids_from_delimiter(ids, torch.ones(1, 4, dtype=torch.bool), [1, 2, 9, 9, 9]).tolist() == [[0] * 4]


def test_phase_entropy_hand_computed_with_empty_phases():
    h = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    ph = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]])
    out = phase_entropy(h, m, ph)
    assert out.mean.tolist() == [[2.0, 2.0], [4.0, 0.0], [0.0, 0.0]]  # empty phase / all-padding row: 0
    assert out.count.tolist() == [[2, 1], [1, 0], [0, 0]]


def test_phase_entropy_from_delimiter_and_negative_ids():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ids = torch.tensor([[7, 7, 9, 8]])
    m = torch.ones(1, 4, dtype=torch.bool)
    out = phase_entropy(h, m, token_ids=ids, delimiter_ids=[9])
    assert out.mean.tolist() == [[1.5, 3.5]] and out.count.tolist() == [[2, 2]]
    out = phase_entropy(h, m, torch.tensor([[0, -1, 1, -100]]))
    assert out.mean.tolist() == [[1.0, 3.0]] and out.count.tolist() == [[1, 1]]


def test_phase_entropy_nan_only_in_its_phase_and_row():
    h = torch.tensor([[1.0, NAN, 3.0], [1.0, 2.0, 3.0]])
    ph = torch.tensor([[0, 0, 1], [0, 0, 1]])
    out = phase_entropy(h, torch.ones(2, 3), ph)
    assert math.isnan(out.mean[0, 0]) and out.mean[0, 1] == 3.0 and out.mean[1].tolist() == [1.5, 3.0]
    assert out.count.tolist() == [[2, 1], [2, 1]]


def test_phase_entropy_errors():
    h = torch.rand(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(EntrotrainError, match="needs phase_ids.*or token_ids"):
        phase_entropy(h, m)
    with pytest.raises(EntrotrainError, match="n_phases"):
        phase_entropy(h, m, torch.tensor([[0, 1, 2], [0, 0, 0]]))
    with pytest.raises(EntrotrainError, match="phase_ids"):
        phase_entropy(h, m, torch.zeros(2, 3))
    for bad in ([], 1.5, [1, "a"], True, torch.tensor([[1, 2]])):
        with pytest.raises(EntrotrainError, match="delimiter_ids"):
            phase_entropy(h, m, token_ids=torch.zeros(2, 3, dtype=torch.long), delimiter_ids=bad)
    with pytest.raises(EntrotrainError, match="token_ids"):
        phase_ids_from_delimiter(torch.zeros(2, 3), m, 1)


@settings(max_examples=30)
@given(
    b=st.integers(0, 4),
    t=st.integers(0, 9),
    delim=st.lists(st.integers(0, 2), min_size=1, max_size=3),
    n_phases=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    poison=st.sampled_from([None, NAN, INF]),
)
def test_phases_match_brute_force(b, t, delim, n_phases, dtype, seed, poison):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (b, t), generator=g)
    m = torch.rand(b, t, generator=g) < 0.8
    h = (torch.rand(b, t, generator=g, dtype=torch.float64) * 2).to(dtype)
    if poison is not None and b * t:
        h[0, t // 2] = poison
    ph = phase_ids_from_delimiter(ids, m, delim, n_phases=n_phases)
    assert torch.equal(ph, phase_ids_reference(ids, m, delim, n_phases))
    out = phase_entropy(h, m, token_ids=ids, delimiter_ids=delim, n_phases=n_phases)
    ref_mean, ref_count = phase_reference(h.double(), m, ph, n_phases)
    assert torch.equal(out.count, ref_count)
    assert torch.allclose(out.mean.double(), ref_mean, atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
    bad = torch.isnan(out.mean)
    if poison is None or b * t == 0 or not m[0, t // 2]:
        assert not bad.any()
    else:  # only the poisoned token's phase of its row
        assert bad.sum() == 1 and bad[0, ph[0, t // 2]]
    pear = pear_reward(h, m, token_ids=ids, delimiter_ids=delim, think_coef=0.5, answer_coef=0.5)
    two = torch.isnan(phase_entropy(h, m, token_ids=ids, delimiter_ids=delim).mean)
    assert torch.isnan(pear).tolist() == [bool(two[i].any()) for i in range(b)]


# ------------------------------------------------------------------ PEAR


def test_pear_reward_hand_computed():
    h = torch.tensor([[2.0, 4.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    ids = torch.tensor([[3, 3, 9, 3], [3, 9, 3, 3], [3, 3, 3, 3]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    out = pear_reward(h, m, token_ids=ids, delimiter_ids=9, think_coef=0.5, answer_coef=0.25)
    # row 0: think mean 3, answer mean 1 -> -(1.5 + 0.25); row 1: think 1, answer 1 -> -(0.5 + 0.25); padding row: 0
    assert out.tolist() == [-1.75, -0.75, 0.0]
    capped = pear_reward(h, m, token_ids=ids, delimiter_ids=9, think_coef=0.5, answer_coef=0.25, max_penalty=1.0)
    assert capped.tolist() == [-1.0, -0.75, 0.0]
    bonus = pear_reward(h, m, token_ids=ids, delimiter_ids=9, think_coef=0.0, answer_coef=-1.0)
    assert bonus.tolist() == [0.0, 0.0, 0.0]  # clipped at 0: always a penalty


def test_pear_reward_no_delimiter_is_all_thinking_and_errors():
    h = torch.tensor([[1.0, 3.0]])
    out = pear_reward(h, torch.ones(1, 2), token_ids=torch.tensor([[1, 2]]), delimiter_ids=[9])
    assert out.tolist() == [pytest.approx(-0.2)]
    for kwargs in [{"think_coef": -1.0}, {"answer_coef": INF}, {"max_penalty": 0.0}]:
        with pytest.raises(EntrotrainError, match=list(kwargs)[0]):
            pear_reward(h, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long), **kwargs)


@settings(max_examples=25)
@given(b=st.integers(0, 5), t=st.integers(0, 7), c0=st.floats(0, 2), c1=st.floats(-1, 1), seed=st.integers(0, 999))
def test_pear_reward_matches_phase_means(b, t, c0, c1, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    ph = torch.randint(0, 2, (b, t), generator=g)
    m = torch.rand(b, t, generator=g) < 0.8
    out = pear_reward(h, m, ph, think_coef=c0, answer_coef=c1)
    ref_mean, _ = phase_reference(h, m, ph, 2)
    expect = -(c0 * ref_mean[:, 0] + c1 * ref_mean[:, 1]).clamp_min(0)
    assert torch.allclose(out, expect, atol=1e-12)
    assert (out <= 0).all()


# ------------------------------------------------------------------ CANON


def test_sequence_entropy_is_verl_masked_mean():
    h = torch.tensor([[1.0, 3.0, NAN], [2.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    out = sequence_entropy(h, m)
    assert out.tolist() == [pytest.approx(4 / (2 + 1e-8)), pytest.approx(6 / (3 + 1e-8)), 0.0]


def test_canon_hand_computed_odd_group_median_to_high():
    r = torch.tensor([1.0, 0.0, 1.0])
    metric = torch.tensor([0.3, 0.1, 0.2])  # sorted: (0.1, r=0) low | (0.2, r=1), (0.3, r=1) high
    # mu- = 0, mu+ = 1; lam = 1: high A = r - mu-, low A = r - mu+
    assert canon_advantage(r, metric, 3).tolist() == [1.0, -1.0, 1.0]
    # lam = 0.5, alpha = 2, beta = 0.5
    a = canon_advantage(r, metric, 3, lam=0.5, alpha=2.0, beta=0.5)
    hi = 0.5 * (1 - 2 * 0 + 0.5) + 0.5 * (1 - 1)
    lo = 0.5 * (2 * 0 - 1 - 0.5) + 0.5 * (0 - 0)
    assert a.tolist() == [hi, lo, hi]


def test_canon_ties_keep_batch_order_and_group_of_one():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0])
    metric = torch.zeros(4)  # all tied: batch order -> rows 0, 1 low; 2, 3 high
    assert canon_advantage(r, metric, 4).tolist() == [0.0 - 0.5, 1.0 - 0.5, 1.0 - 0.5, 0.0 - 0.5]
    assert canon_advantage(torch.tensor([0.7, 0.2]), torch.zeros(2), 1, beta=0.5, lam=0.5).tolist() == [
        pytest.approx(0.95), pytest.approx(0.45)
    ]  # G = 1: (r + lam * beta) / L, not 0


def test_canon_equals_dr_grpo_at_half_lambda():
    g = torch.Generator().manual_seed(3)
    r = torch.rand(32, generator=g, dtype=torch.float64)
    metric = torch.rand(32, generator=g, dtype=torch.float64)
    a = canon_advantage(r, metric, 8, lam=0.5)
    assert torch.allclose(a, r - r.view(-1, 8).mean(1).repeat_interleave(8), atol=1e-12)


def test_canon_nan_reward_stays_in_its_group_and_errors():
    r = torch.tensor([1.0, NAN, 0.0, 1.0])
    a = canon_advantage(r, torch.tensor([0.1, 0.2, 0.1, 0.2]), 2)
    assert torch.isnan(a[:2]).all() and torch.isfinite(a[2:]).all()
    assert canon_advantage(torch.zeros(0), torch.zeros(0), 4).shape == (0,)
    for args, kwargs, word in [
        ((torch.zeros(6), torch.zeros(6), 4), {}, "group_size"),
        ((torch.zeros(4), torch.zeros(3), 2), {}, "metric"),
        ((torch.zeros(4), torch.zeros(4), 0), {}, "group_size"),
        ((torch.zeros(4), torch.zeros(4), 2), {"variant": "sum"}, "variant"),
        ((torch.zeros(4), torch.zeros(4), 2), {"lam": NAN}, "lam"),
        ((torch.zeros(4), torch.zeros(4), 2), {"length_norm": 0.0}, "length_norm"),
        ((torch.zeros(2, 2), torch.zeros(4), 2), {}, "rewards"),
    ]:
        with pytest.raises(EntrotrainError, match=word):
            canon_advantage(*args, **kwargs)


@settings(max_examples=40)
@given(
    groups=st.integers(0, 4),
    g=st.integers(1, 7),
    lam=st.floats(-1, 2),
    alpha=st.floats(-2, 2),
    beta=st.floats(-1, 1),
    norm=st.sampled_from([1.0, 8192.0, 3.5]),
    variant=st.sampled_from(["entropy", "length"]),
    ties=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_canon_matches_the_reference_code(groups, g, lam, alpha, beta, norm, variant, ties, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n = groups * g
    r = torch.randint(0, 2, (n,), generator=gen).to(dtype)
    metric = (torch.randint(0, 3, (n,), generator=gen) if ties else torch.rand(n, generator=gen)).to(dtype)
    status, a = call(canon_advantage, r, metric, g, lam=lam, alpha=alpha, beta=beta, variant=variant, length_norm=norm)
    assert status == "ok"
    ref = canon_reference(r.double(), metric.double(), [i // g for i in range(n)], alpha, beta, lam, norm, variant)
    assert torch.allclose(a.double(), ref, atol=1e-6 / norm + 1e-12, rtol=1e-6)
    assert torch.isfinite(a).all()


def test_canon_from_token_entropies_matches_reference_pipeline():
    g = torch.Generator().manual_seed(7)
    h = torch.rand(12, 5, generator=g, dtype=torch.float64)
    m = torch.rand(12, 5, generator=g) < 0.7
    r = torch.randint(0, 2, (12,), generator=g).double()
    metric = sequence_entropy(h, m)
    ref_metric = [(h[i][m[i]].sum() / (m[i].sum() + 1e-8)).item() for i in range(12)]
    ref = canon_reference(r, ref_metric, [i // 4 for i in range(12)], 1.0, 0.0, 1.0, 8192.0)
    assert torch.allclose(canon_advantage(r, metric, 4, length_norm=8192.0), ref, atol=1e-15)


def test_hwe_quantile_is_global_under_two_rank_ddp(tmp_path):
    from pathlib import Path

    from tests.functional import hwe_ddp_run as script
    from tests.helpers.scripts import run_script

    run_script(Path(script.__file__), Path(__file__).resolve().parents[2], str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    h, mask = script.make_batch()
    union = script.hwe(h, mask)
    assert torch.equal(torch.cat(parts), union)
    per_rank = torch.cat([script.hwe(h[:3], mask[:3]), script.hwe(h[3:], mask[3:])])
    assert not torch.equal(per_rank, union)  # a per-rank quantile would differ: the test can fail
