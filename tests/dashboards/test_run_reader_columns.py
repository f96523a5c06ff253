"""The columnar reading of metrics.jsonl and the thinning of long series for drawing, by property."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.dashboards.report_figures import bucket_columns, thin_line
from entrotrain.dashboards.run_reader import _resume_step, _scalars

KEYS = ["a", "b", "c/d", "epoch"]
values = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-5, 5), st.none(),
                   st.just("text"), st.booleans())
metric_rows = st.fixed_dictionaries({"step": st.one_of(st.none(), st.integers(0, 12)),
                                     "values": st.dictionaries(st.sampled_from(KEYS), values, max_size=4)})
markers = st.builds(lambda s: {"resume": {"step": s}}, st.one_of(st.none(), st.integers(0, 12)))


def _reference(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The rule, one value at a time: a resume marker at S drops what was written before it at steps after S; for
    each (key, step) the last number written wins; null, text and booleans are no value; ``epoch`` is not a metric."""
    series: dict[str, dict[int, float]] = {}
    for i, row in enumerate(rows):
        resume = _resume_step(row)
        if resume is not False:
            for points in series.values():
                for step in [s for s in points if resume is not None and s > resume]:
                    del points[step]
            continue
        step = i if row.get("step") is None else row["step"]
        for key, value in row["values"].items():
            if key != "epoch" and type(value) in (int, float):
                series.setdefault(key, {})[step] = float(value)
    return {k: (sorted(p), [p[s] for s in sorted(p)]) for k, p in series.items() if p}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(metric_rows, markers), max_size=40))
def test_columnar_scalars_follow_the_rule(rows: list[dict]) -> None:
    got = _scalars(iter(rows), [])
    want = _reference(rows)
    assert sorted(got) == sorted(want)
    for key, (steps, vals) in want.items():
        assert list(got[key][0]) == steps and list(got[key][1]) == vals


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.integers(4, 300), st.integers(0, 2**31 - 1))
def test_thin_line_keeps_the_extremes_of_every_stretch(n: int, max_points: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    steps, values = np.arange(n) * 10, rng.standard_normal(n)
    values[rng.integers(n)] = -50.0  # a one-point collapse
    thin_steps, thin_values = thin_line(steps, values, max_points)
    assert len(thin_steps) <= max(n if n <= max_points else max_points + 2, 1)
    assert np.all(np.diff(thin_steps) > 0) and thin_values.min() == values.min() and thin_values.max() == values.max()
    assert thin_steps[0] == steps[0] and thin_steps[-1] == steps[-1]
    assert np.array_equal(values[thin_steps // 10], thin_values)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_bucket_columns_keep_each_rows_least_value(n: int, max_columns: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    grid = rng.random((3, n))
    grid[1, rng.integers(n)] = -1.0
    grid[2, :] = math.nan
    steps, shown = bucket_columns(np.arange(n), grid, max_columns)
    assert shown.shape[1] == len(steps) <= max(max_columns, 1) and steps[0] == 0
    assert np.array_equal(shown[:2].min(axis=1), grid[:2].min(axis=1)) and np.isnan(shown[2]).all()
    far = bucket_columns(np.arange(n), grid, max_columns, extreme="far")[1]
    assert far[1].min() == -1.0


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.integers(0, 50), min_size=0, max_size=20, unique=True), keys=st.integers(1, 4),
       data=st.data())
def test_keys_grid_of_keys_sharing_one_steps_array_equals_the_union(steps: list[int], keys: int, data) -> None:
    """heads_matrix's grid: keys that share the reader's one steps array (one key set) skip the union's sort and give
    the grid the union gives."""
    from pathlib import Path

    from entrotrain.dashboards.report_figures import _keys_grid
    from entrotrain.dashboards.run_reader import RunData

    shared = np.array(sorted(steps), dtype=np.int64)
    values = [np.array(data.draw(st.lists(st.floats(-1, 1), min_size=len(steps), max_size=len(steps))))
              for _ in range(keys)]
    names = [f"k{i}" for i in range(keys)]
    one = RunData(Path("."), {}, {k: (shared, v) for k, v in zip(names, values)})
    apart = RunData(Path("."), {}, {k: (shared.copy(), v) for k, v in zip(names, values)})
    fast, slow = _keys_grid(one, names), _keys_grid(apart, names)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1], equal_nan=True)
    assert fast[1].shape == slow[1].shape
