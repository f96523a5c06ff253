"""PolicyEntropyMonitor publishes fit_extrapolation and fit_shown beside the unchanged fit_a|fit_b|fit_ceiling|fit_r2,
and its end-of-run table says why a ceiling is not a prediction (ceiling_verdict)."""

from __future__ import annotations

import math

import pytest
import torch

from entrotrain.callbacks import PolicyEntropyMonitor
from tests.helpers.policy_batches import fit_batches as _fit
from tests.helpers.policy_batches import rl_batch
from tests.helpers.spy_logger import SpyLogger


def _batches(entropies: list[float], rewards: list[float]) -> list[dict]:
    out = []
    for s, (h, r) in enumerate(zip(entropies, rewards)):
        batch = rl_batch(10 + s)
        m = batch["response_mask"]
        batch["token_entropy"] = torch.where(m, torch.full_like(batch["token_entropy"], h), 0.0)
        batch["rewards"] = torch.full((m.shape[0],), r)
        out.append(batch)
    return out


def _last(entropies: list[float], rewards: list[float]) -> tuple[dict[str, float], PolicyEntropyMonitor]:
    spy, monitor = SpyLogger(), PolicyEntropyMonitor(print_summary=False)
    _fit(_batches(entropies, rewards), monitor, logger=spy)
    return [row for _, row in spy.rows if "entropy/policy/mean" in row][-1], monitor


def test_six_flat_entropy_steps_publish_the_fit_but_not_as_a_prediction():
    h = [2.6332, 2.6337, 2.6327, 2.6330, 2.6335, 2.6331]
    last, monitor = _last(h, [0.0, 0.0, 0.125, 0.0625, 0.0, 0.125])
    assert last["entropy/policy/fit_shown"] == 0.0
    assert last["entropy/policy/fit_extrapolation"] > 100
    assert last["entropy/policy/fit_ceiling"] > 10  # the fitted number is published as it is, never clamped
    table = monitor.summary_table()
    assert "the ceiling is not a prediction: only 6 fitted steps" in table and "extrapolated" in table


def test_a_good_law_is_shown_with_its_keys_unchanged():
    a, b = 0.2, 1.0
    h = [1.5 - 0.12 * i for i in range(10)]
    last, monitor = _last(h, [-a * math.exp(v) + b for v in h])
    assert last["entropy/policy/fit_shown"] == 1.0 and last["entropy/policy/fit_extrapolation"] < 0.5
    assert last["entropy/policy/fit_a"] == pytest.approx(a, rel=1e-6)
    assert last["entropy/policy/fit_b"] == pytest.approx(b, rel=1e-6)
    assert last["entropy/policy/fit_ceiling"] == pytest.approx(b - a, rel=1e-6)
    assert "not a prediction" not in monitor.summary_table()
