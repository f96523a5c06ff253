"""One token-mask rule for every policy reader (DESIGN.md §8): bool, or integer / floating 0/1 (verl's and TRL's
masks) read alike; any other value refused with an EntrotrainError naming the values found and the fix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain._validation import token_mask
from entrotrain.callbacks import PolicyEntropyMonitor, policy_entropy_summary
from entrotrain.errors import EntrotrainError
from entrotrain.functional import token_entropy
from entrotrain.functional.token_shaping import window_entropy
from entrotrain.integrations.policy_stats import PolicyStatsRecorder
from entrotrain.regularizers import ClipCovLoss, EntropyBonus, KLCovLoss

B, T = 3, 5


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"h": torch.rand(B, T, generator=g) * 2, "lp": -torch.rand(B, T, generator=g) * 3,
            "adv": torch.randn(B, T, generator=g), "logits": torch.randn(B, T, 7, generator=g)}


def _readers(x: dict[str, torch.Tensor]):
    """Every policy reader of a token mask, each returning something that depends on which tokens are valid."""
    yield "token_entropy", lambda m: token_entropy(x["logits"], m)
    yield "policy_entropy_summary", lambda m: policy_entropy_summary(x["h"], x["lp"], x["adv"], m)
    yield "PolicyEntropyMonitor.summarise", lambda m: PolicyEntropyMonitor(print_summary=False).summarise(
        {"entropy": x["h"], "logprobs": x["lp"], "advantages": x["adv"], "mask": m}, 0)
    yield "window_entropy", lambda m: window_entropy(x["h"], m, 2)
    old = x["lp"] - 0.1
    yield "ClipCovLoss", lambda m: ClipCovLoss(0.5, cov_lb=-9, cov_ub=9, seed=0)(x["lp"], old, x["adv"], m).loss
    yield "KLCovLoss", lambda m: KLCovLoss(0.5)(x["lp"], old, x["adv"], m).loss
    yield "KLCovLoss(micro_batch)", lambda m: KLCovLoss(0.5, mode="micro_batch")(x["lp"], old, x["adv"], m).loss
    yield "EntropyBonus(adaptive)", lambda m: EntropyBonus(0.1, target=0.5)(entropy=x["h"], mask=m).loss
    yield "PolicyStatsRecorder.add", lambda m: PolicyStatsRecorder().add(x["h"], x["lp"], x["adv"], m)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@settings(max_examples=6, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=B * T, max_size=B * T), seed=st.integers(0, 3))
def test_bool_integer_and_float_0_1_masks_read_alike_everywhere(bits, seed):
    mask = torch.tensor(bits).reshape(B, T)
    x = _batch(seed)
    for name, read in _readers(x):
        want = read(mask)
        for dtype in (torch.int64, torch.float32):
            got = read(mask.to(dtype))
            assert _same(got, want), (name, dtype)


@pytest.mark.parametrize("value,dtype", [(2, torch.int64), (0.5, torch.float32), (-1.0, torch.float64)])
def test_other_values_are_refused_by_every_reader_naming_them_and_the_fix(value, dtype):
    """Before: the monitor read ``mask.bool()`` (2 and 0.5 counted as valid tokens) and the losses ``mask > 0``
    (0.5 counted, -1 dropped) without a word."""
    x = _batch(0)
    mask = torch.ones(B, T, dtype=dtype)
    mask[1, 2] = value
    for name, read in _readers(x):
        found = rf"values other than 0 and 1 \(found \[{float(value)}\]\).*\.bool\(\)"
        with pytest.raises(EntrotrainError, match=found):
            read(mask)
            pytest.fail(name)


def test_token_mask_contract():
    m = torch.tensor([[1.0, 0.0, 1.0]])
    assert token_mask(m, (1, 3)).dtype == torch.bool and token_mask(m, (1, 3)).tolist() == [[True, False, True]]
    b = torch.tensor([[True, False]])
    assert token_mask(b, (1, 2)) is b  # bool as is: nothing read
    assert token_mask(torch.zeros(0, 4), (0, 4)).shape == (0, 4)
    with pytest.raises(EntrotrainError, match="shape"):
        token_mask(m, (1, 4))
    with pytest.raises(EntrotrainError, match="found \\[nan\\]"):
        token_mask(torch.tensor([[1.0, float("nan")]]), (1, 2))
    # check_floats=False (a loss call that never syncs): a float mask's values are not read, integer ones still are
    assert token_mask(torch.tensor([[0.5, 0.0]]), (1, 2), check_floats=False).tolist() == [[True, False]]
    with pytest.raises(EntrotrainError, match="found \\[2.0\\]"):
        token_mask(torch.tensor([[2, 0]]), (1, 2), check_floats=False)
