"""Deterministic sampling budgets: ``evenly_spaced`` and ``check_budget``."""

from __future__ import annotations

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.taps.sampling import check_budget, evenly_spaced
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("n,budget", [(0, 3), (1, 1), (5, 5), (5, 9), (7, None), (1, None)])
def test_everything_when_the_budget_covers_it(n, budget):
    assert evenly_spaced(n, budget) is None


@pytest.mark.parametrize(
    "n,budget,expected",
    [
        (10, 1, [9]),
        (10, 2, [0, 9]),
        (10, 4, [0, 3, 6, 9]),
        (5, 3, [0, 2, 4]),
        (5, 2, [0, 4]),
        (7, 3, [0, 3, 6]),
        (101, 5, [0, 25, 50, 75, 100]),
    ],
)
def test_known_indices(n, budget, expected):
    idx = evenly_spaced(n, budget)
    assert idx.dtype == torch.long
    assert idx.tolist() == expected


def test_properties_over_a_grid():
    for n in range(2, 80):
        for budget in range(1, n):
            idx = evenly_spaced(n, budget).tolist()
            assert len(idx) == budget, (n, budget)
            assert len(set(idx)) == budget, (n, budget, idx)  # no duplicates
            assert idx == sorted(idx)
            assert idx[-1] == n - 1
            if budget >= 2:
                assert idx[0] == 0
                step = (n - 1) / (budget - 1)
                assert all(abs(i - j * step) <= 0.5 + 1e-6 for j, i in enumerate(idx)), (n, budget, idx)


def test_deterministic_and_rng_free():
    state = torch.get_rng_state()
    a = evenly_spaced(1000, 17)
    b = evenly_spaced(1000, 17)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_device_is_honoured():
    assert evenly_spaced(10, 3, torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("value", [None, 1, 7])
def test_check_budget_accepts(value):
    assert check_budget(value, "max_rows") == value


@pytest.mark.parametrize("value", [0, -3, 2.0, True, False, "4"])
def test_check_budget_rejects_naming_the_option(value):
    with pytest.raises(EntrotrainError, match="max_queries"):
        check_budget(value, "max_queries")
