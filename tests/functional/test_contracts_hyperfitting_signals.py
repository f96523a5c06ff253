"""Trust under failure for the hyperfitting signals: generation diversity (generation_diversity.py: distinct-n, TTR,
rep-n) and per-position prediction statistics (prediction_entropy.py): any input gives the documented value (0 when
there is no n-gram; NaN only in a row whose logits hold NaN/+Inf) or an EntrotrainError naming the argument — never a
raw torch / Python error. Values are checked against float64 / Python brute forces.

Scenario tests first (each failed before its fix), then hypothesis properties over shapes (0-sized included), dtypes,
masks (bool, 0/1 integer, float, wrong shape, all-False), labels (ignore_index, out of range) and logits spanning
more than the float32 range.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import row_entropy
from entrotrain.functional.generation_diversity import distinct_n, ngram_counts, repetition_rate, type_token_ratio
from entrotrain.functional.prediction_entropy import prediction_stats_from_hidden, prediction_stats_from_logits
from tests.helpers.contracts import DTYPES, INF, NAN, call

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------ scenarios (each failed before its fix)


def test_a_non_tensor_mask_of_one_sequence_is_refused():
    with pytest.raises(EntrotrainError, match="mask must be a torch.Tensor"):  # AttributeError ('dim') before
        ngram_counts(torch.arange(5), 2, [1, 1, 1, 1, 1])


def test_finite_logits_spanning_more_than_float32_give_a_finite_entropy():
    # before: x - max = -4e38 overflowed to -inf and 0 * -inf gave entropy NaN (and a NaN gradient) for finite logits
    z = torch.tensor([[3e38, -1e38, 1e38, 0.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    out = row_entropy(z)
    assert torch.isfinite(out.entropy).all() and float(out.entropy[0].detach()) == 0.0
    out.entropy.sum().backward()
    assert torch.isfinite(z.grad).all()
    stats = prediction_stats_from_logits(z.detach(), torch.tensor([0, 3]))
    assert stats.entropy.tolist()[0] == 0.0 and stats.top1_prob.tolist()[0] == 1.0 and float(stats.nll[0]) == 0.0


# ------------------------------------------------------------------ property tests


def _grams(seq: list[int], n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def _runs(tokens: torch.Tensor, keep: torch.Tensor) -> list[list[list[int]]]:
    """Per row, the maximal runs of kept tokens (an n-gram never crosses padding)."""
    out = []
    for row, k in zip(tokens.tolist(), keep.tolist()):
        runs, cur = [], []
        for tok, ok in zip(row, k):
            if ok:
                cur.append(tok)
            elif cur:
                runs.append(cur)
                cur = []
        out.append(runs + ([cur] if cur else []))
    return out


@st.composite
def tokens_case(draw):
    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tokens = torch.randint(-2, draw(st.sampled_from([2, 4, 1000])), (b, t), generator=g)
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32]))
    tokens = tokens.clamp_min(0).to(dtype) if dtype in (torch.uint8, torch.bool) else tokens.to(dtype)
    if draw(st.booleans()):
        tokens = tokens.t().contiguous().t()
    keep = torch.rand(b, t, generator=g) < 0.75
    mask_kind = draw(st.sampled_from(["none", "bool", "int", "all_false", "float", "int_other", "wrong_shape"]))
    mask = {
        "none": None,
        "bool": keep,
        "int": keep.long(),
        "all_false": torch.zeros(b, t, dtype=torch.bool),
        "float": keep.float(),
        "int_other": keep.long() * 2,
        "wrong_shape": torch.ones(b, t + 1, dtype=torch.bool),
    }[mask_kind]
    one_row = draw(st.booleans()) and b == 1
    if one_row:  # a (T,) sequence with a (T,) mask
        tokens = tokens[0]
        mask = None if mask is None else mask[0]
    return tokens, mask, mask_kind


@settings(max_examples=80, deadline=None)
@given(tokens_case(), st.sampled_from([1, 2, 3, 0, 2**70, True]), st.sampled_from(["corpus", "mean", "sum"]))
def test_diversity_measures_match_the_python_brute_force(case, n, reduction):
    tokens, mask, mask_kind = case
    status, value = call(distinct_n, tokens, n, mask, reduction=reduction)
    bad_mask = mask_kind in ("float", "wrong_shape") or (mask_kind == "int_other" and bool(mask.any()))
    bad_tokens = tokens.dtype in (torch.bool, torch.float32)
    bad_n = isinstance(n, bool) or n < 1
    if bad_mask or bad_tokens or bad_n or reduction == "sum":
        assert status == "error", f"accepted: {tokens.dtype} mask={mask_kind} n={n!r} reduction={reduction}"
        return
    assert status == "ok", value
    rows = tokens if tokens.dim() == 2 else tokens[None]
    keep = torch.ones(rows.shape, dtype=torch.bool) if mask is None else (mask != 0).reshape(rows.shape)
    grams = [[g for run in runs for g in _grams(run, n)] for runs in _runs(rows, keep)]
    total = sum(len(g) for g in grams)
    with_grams = [g for g in grams if g]
    if reduction == "corpus":
        want = len({g for row in grams for g in row}) / total if total else 0.0
    else:
        want = sum(len(set(g)) / len(g) for g in with_grams) / len(with_grams) if with_grams else 0.0
    assert value.dtype == torch.float64 and value.shape == ()
    assert float(value) == pytest.approx(want, abs=1e-12)
    rep = repetition_rate(tokens, n, mask)
    want_rep = sum(1 - len(set(g)) / len(g) for g in with_grams) / len(with_grams) if with_grams else 0.0
    assert float(rep) == pytest.approx(want_rep, abs=1e-12) and 0.0 <= float(rep) < 1.0
    if n == 1:
        ttr = float(type_token_ratio(tokens, mask))
        assert ttr == pytest.approx(float(distinct_n(tokens, 1, mask, reduction="mean")))


def _stats64(z: torch.Tensor, labels: torch.Tensor | None):
    """Float64 brute force per row: entropy, top-1 probability, NLL (0 for a negative label); NaN for a row holding
    NaN/+Inf; an all -inf row has entropy 0 (no category)."""
    ent, top, nll = [], [], []
    for i, row in enumerate(z.double()):
        vals = [float(v) for v in row]
        ignored = labels is not None and int(labels[i]) < 0  # ignore_index: NLL 0 whatever the row holds
        if any(math.isnan(v) or v == INF for v in vals):
            ent.append(NAN), top.append(NAN), nll.append(0.0 if ignored else NAN)
            continue
        finite = [v for v in vals if v != -INF]
        if not finite:
            ent.append(0.0), top.append(NAN), nll.append(0.0 if ignored else NAN)
            continue
        m = max(finite)
        w = [math.exp(v - m) for v in finite]
        s = math.fsum(w)
        p = [x / s for x in w]
        ent.append(-math.fsum(q * math.log(q) for q in p if q > 0))
        top.append(max(p))
        if labels is not None:
            y = int(labels[i])
            nll.append(0.0 if y < 0 else m + math.log(s) - vals[y])
    return ent, top, (None if labels is None else nll)


@st.composite
def logits_case(draw):
    n, v = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    kind = draw(st.sampled_from(["random", "uniform", "one_hot", "neg_inf_row", "wide", "nonfinite"]))
    if z.numel():
        if kind == "uniform":
            z.zero_()
        elif kind == "one_hot":
            z.fill_(-INF)[:, 0] = 2.0
        elif kind == "neg_inf_row":
            z[0] = -INF
        elif kind == "wide" and v > 1:  # finite logits spanning more than the float32 range
            z[:, 0], z[:, 1] = 3e38, -1e38
        elif kind == "nonfinite":
            z.view(-1)[draw(st.integers(0, z.numel() - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    dtype = draw(st.sampled_from(DTYPES + (torch.int64,)))
    z = z.to(dtype) if dtype.is_floating_point else z.clamp(-5, 5).round().to(dtype)
    label_kind = draw(st.sampled_from(["none", "valid", "ignore", "too_big", "float", "wrong_length"]))
    labels = {
        "none": None,
        "valid": torch.randint(0, max(v, 1), (n,), generator=g),
        "ignore": torch.full((n,), -100),
        "too_big": torch.full((n,), v),
        "float": torch.zeros(n),
        "wrong_length": torch.zeros(n + 1, dtype=torch.long),
    }[label_kind]
    return z, labels, label_kind


@settings(max_examples=80, deadline=None)
@given(logits_case(), st.sampled_from([1, 2, 512, 0]))
def test_prediction_stats_match_the_float64_brute_force(case, chunk_size):
    z, labels, label_kind = case
    status, out = call(prediction_stats_from_logits, z, labels, chunk_size=chunk_size)
    n, v = z.shape
    bad_labels = label_kind in ("float", "wrong_length") or (label_kind == "too_big" and n > 0)
    if not z.dtype.is_floating_point or v == 0 or chunk_size == 0 or bad_labels:
        assert status == "error", f"accepted: {z.dtype} V={v} chunk={chunk_size} labels={label_kind}"
        return
    assert status == "ok", out
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert out.entropy.dtype == out.top1_prob.dtype == acc
    ent, top, nll = _stats64(z.to(acc), labels)
    tol = 1e-9 if acc == torch.float64 else 2e-4
    for got, want in ((out.entropy, ent), (out.top1_prob, top)) + (((out.nll, nll),) if labels is not None else ()):
        want = torch.tensor(want, dtype=torch.float64)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"NaN pattern {got} vs {want}"
        ok = ~torch.isnan(want) & (want.abs() < torch.finfo(acc).max)  # an nll beyond the range is +inf (documented)
        torch.testing.assert_close(got[ok].double(), want[ok], atol=tol, rtol=tol)
    # the hidden × head form gives the same statistics (identity head: the logits are the hidden states)
    if n and v and z.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(z).all()) and z.abs().max() < 1e4:
        eye = torch.eye(v, dtype=z.dtype)
        other = prediction_stats_from_hidden(z, eye, None, labels, chunk_size=chunk_size)
        torch.testing.assert_close(other.entropy, out.entropy, atol=tol, rtol=tol)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.sampled_from([1.0, 1e10, 1e20]),
    st.sampled_from([1.0, 1e20]), st.sampled_from([1, 2, 512]), st.booleans(), st.integers(0, 2**31 - 1),
)
def test_prediction_stats_from_hidden_whose_product_overflows_float32(n, v, d, h_scale, w_scale, chunk, bias, seed):
    """Finite float32 hidden states and head whose product h·Wᵀ leaves float32 (1e20 · 1e20): the statistics are
    those of the exact (float64) logits, finite (before: inf logits, NaN entropy / top-1 / nll). An nll beyond
    float32's range is +inf (documented)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, dtype=torch.float64) * h_scale).float()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) * w_scale).float()
    b = torch.randn(v, generator=g).float() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    out = prediction_stats_from_hidden(hidden, weight, b, labels, chunk_size=chunk)
    z = hidden.double() @ weight.double().t() + (0.0 if b is None else b.double())
    want = prediction_stats_from_logits(z, labels)
    assert out.entropy.dtype == torch.float32
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.top1_prob).all(), out
    torch.testing.assert_close(out.entropy.double(), want.entropy, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.top1_prob.double(), want.top1_prob, atol=2e-4, rtol=2e-4)
    fits = want.nll.abs() < torch.finfo(torch.float32).max
    torch.testing.assert_close(out.nll.double()[fits], want.nll[fits], atol=2e-4, rtol=1e-5)
    assert (out.nll[~fits] == INF).all()
