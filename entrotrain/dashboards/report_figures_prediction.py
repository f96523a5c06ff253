r"""The prediction-entropy section of ``entrotrain report``: figures and findings from ``PredictionEntropyMonitor``'s
keys (the hyperfitting signal of Carlsson et al. 2025, "The Hyperfitting Phenomenon", arXiv 2412.04318).

Keys read (all optional; a figure whose keys no run logged is not drawn), ``{s}`` = ``train`` or ``probe``:

- ``entropy/pred/{s}/mean|p10|p90``: mean next-token (or class) entropy in nats with the 10th–90th percentile band;
- ``entropy/pred/{s}/below_floor_frac``, ``.../top1_prob``, ``.../nll``: share of positions below the entropy floor,
  mean top-1 probability, mean NLL (the held-out loss on the probe);
- ``entropy/pred/probe/pos/{i}``: the probe's mean entropy at sequence position ``i`` → the position × logging-step
  map. When the run record also holds the whole profile (media ``entropy/pred/probe/pos_profile``, kind
  ``"values"``, one ``(T,)`` array per logging step: what the wandb image ``entropy/pred/probe/pos_heatmap`` shows)
  the map draws every position from it; otherwise only the logged positions, from the scalars;
- ``entropy/pred/gen/distinct_{n}``, ``.../ttr``, ``.../repetition``: greedy-generation diversity.

Non-finite values are gaps in curves and grey cells in maps, and never enter a colour scale, a limit or a finding
(findings use the first and last *finite* value of a key). With two runs, curves are overlaid (first run solid,
second dashed) and maps are set side by side on one colour scale.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from entrotrain.dashboards.report_figures import (
    RUN_STYLES,
    Figure,
    _finite,
    _plt,
    _run_handles,
    _runs_note,
    _save,
    _step_axis,
)
from entrotrain.dashboards.report_template import fmt
from entrotrain.dashboards.run_reader import RunData

__all__ = [
    "COLLAPSE_RATIO",
    "PREFIX",
    "finite_first_last",
    "generation_diversity",
    "position_matrix",
    "position_profile_over_time",
    "prediction_curves",
    "prediction_findings",
    "prediction_keys_drawn",
    "reference_step",
]

PREFIX = "entropy/pred"
#: The held-out entropy "collapsed" (the finding says so) when its last value is below this share of its first.
COLLAPSE_RATIO = 0.25
_POS = re.compile(rf"^{re.escape(PREFIX)}/probe/pos/(\d+)$")
_DISTINCT = re.compile(rf"^{re.escape(PREFIX)}/gen/distinct_(\d+)$")
_PROFILE_MEDIA = f"{PREFIX}/probe/pos_profile"
_SPLIT_COLORS = {"train": "#1f77b4", "probe": "#ff7f0e"}
_CURVE_PANELS = (  # (stat, panel title, scale)
    ("mean", "prediction entropy (nats): mean, p10–p90 band", 1.0),
    ("below_floor_frac", "positions below the entropy floor (%)", 100.0),
    ("nll", "NLL of the labels (nats)", 1.0),
    ("top1_prob", "mean top-1 probability", 1.0),
)


def finite_first_last(run: RunData, key: str) -> tuple[int, float, int, float] | None:
    """``(first step, first value, last step, last value)`` over the finite values of ``key``; ``None`` when it has
    none."""
    series = run.scalars.get(key)
    if series is None:
        return None
    steps, values = series
    ok = np.flatnonzero(np.isfinite(values))
    if not ok.size:
        return None
    return int(steps[ok[0]]), float(values[ok[0]]), int(steps[ok[-1]]), float(values[ok[-1]])


def prediction_keys_drawn(key: str) -> bool:
    """Whether ``key`` is drawn by this module's figures (the section's generic grid leaves it out)."""
    if _POS.match(key) or _DISTINCT.match(key):
        return True
    parts = key[len(PREFIX) + 1 :].split("/") if key.startswith(PREFIX + "/") else []
    if len(parts) == 2 and parts[0] in ("train", "probe"):
        return parts[1] in ("mean", "p10", "p90", "below_floor_frac", "nll", "top1_prob")
    return key in (f"{PREFIX}/gen/repetition", f"{PREFIX}/gen/ttr")


def prediction_curves(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Train (blue) and probe (orange) prediction entropy with p10–p90 bands, the share below the floor, the NLL and
    the top-1 probability over steps; one panel per statistic some run logged; runs solid / dashed."""
    panels = [
        (stat, title, scale)
        for stat, title, scale in _CURVE_PANELS
        if any(f"{PREFIX}/{s}/{stat}" in r.scalars for r in runs for s in ("train", "probe"))
    ]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.3), squeeze=False, layout="constrained")
    refs = sorted({ref for r in runs if (ref := reference_step(r)) is not None})
    for ax, (stat, title, scale) in zip(axes.flat, panels):
        for ref in refs:
            ax.axvline(ref, color="grey", lw=1.0, ls=":", alpha=0.9)
        for i, run in enumerate(runs):
            for split, colour in _SPLIT_COLORS.items():
                key = f"{PREFIX}/{split}/{stat}"
                if key not in run.scalars:
                    continue
                steps, values = run.scalars[key]
                label = f"{split}" if len(runs) == 1 else f"{run.label} {split}"
                ax.plot(steps, scale * _finite(values), color=colour, ls=RUN_STYLES[i % 2], lw=1.5, label=label,
                        marker="o" if len(steps) <= 30 else None, ms=2.5)
                if stat == "mean":
                    lo, hi = run.scalars.get(f"{PREFIX}/{split}/p10"), run.scalars.get(f"{PREFIX}/{split}/p90")
                    if lo is not None and hi is not None:
                        common, il, ih = np.intersect1d(lo[0], hi[0], return_indices=True)
                        if len(common):
                            ax.fill_between(common, _finite(lo[1][il]), _finite(hi[1][ih]), color=colour,
                                            alpha=0.15 if i == 0 else 0.08, lw=0)
        if stat == "below_floor_frac":
            ax.set_ylim(-3, 103)
        _step_axis(ax, title)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=6.5, loc="best", framealpha=0.7)
    file = _save(fig, out_dir, "prediction_entropy")
    runs_note = _runs_note(runs)
    return Figure(
        file,
        "Prediction entropy: training batches vs held-out probe",
        "Entropy of the model's predictive distribution (nats, full vocabulary, temperature 1) on logging training "
        "batches (blue) and on the fixed held-out probe set (orange), shaded from the 10th to the 90th percentile of the "
        f"positions; the share of positions below the entropy floor; the NLL of the labels; the mean top-1 probability{runs_note}"
        + (f"; dotted: the monitor's reference_step ({', '.join(map(str, refs))})" if refs else "") + ". "
        "Hyperfitting: the probe entropy collapses towards 0 while the probe NLL rises.",
    )


def position_matrix(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray, str] | None:
    """``(positions, steps, grid, source)`` with ``grid[r, j]`` the probe's mean entropy at ``positions[r]`` and
    ``steps[j]`` (NaN where not logged or non-finite). ``source`` is ``"profile"`` when built from the whole-profile
    media (every position), ``"scalars"`` when from the ``entropy/pred/probe/pos/{i}`` keys; ``None`` for neither."""
    items = [m for m in run.media.get(_PROFILE_MEDIA, []) if m.step is not None]
    arrays = []
    for item in items:
        try:
            arrays.append((int(item.step), np.asarray(item.load(), dtype=float).ravel()))
        except Exception:  # a torn item: the scalars still draw the logged positions
            continue
    arrays = [(s, a) for s, a in arrays if a.size]
    if arrays:
        steps = np.array(sorted({s for s, _ in arrays}))
        index = {int(s): j for j, s in enumerate(steps)}
        length = max(a.size for _, a in arrays)
        grid = np.full((length, len(steps)), np.nan)
        for s, a in arrays:  # the last item of a step wins (as the reader's scalars)
            grid[:, index[s]] = np.nan
            grid[: a.size, index[s]] = a
        return np.arange(length), steps, _finite(grid), "profile"
    keys = {int(m[1]): key for key in run.scalars if (m := _POS.match(key))}
    if not keys:
        return None
    positions = np.array(sorted(keys))
    steps = np.unique(np.concatenate([run.scalars[keys[p]][0] for p in positions]))
    grid = np.full((len(positions), len(steps)), np.nan)
    for r, p in enumerate(positions):
        key_steps, values = run.scalars[keys[p]]
        grid[r, np.searchsorted(steps, key_steps)] = values  # (one numpy call per key, not one per point)
    return positions, steps, _finite(grid), "scalars"


def position_profile_over_time(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Per run (side by side): the probe's per-position entropy as a map, positions (rows, 0 at the top) × logging
    steps (columns), one colour scale from 0 to the largest finite value of all runs; grey: not logged or
    non-finite."""
    mats = [(run, position_matrix(run)) for run in runs]
    mats = [(r, m) for r, m in mats if m is not None]
    if not mats:
        return None
    plt = _plt()
    finite = [g[np.isfinite(g)] for _, (_, _, g, _) in mats]
    vmax = max((float(v.max()) for v in finite if v.size), default=1.0)
    vmax = max(vmax, 1e-6)
    n_steps = max(len(s) for _, (_, s, _, _) in mats)
    n_pos = max(len(p) for _, (p, _, _, _) in mats)
    width = max(5.0, min(9.0, 2.4 + 0.12 * n_steps))
    height = max(2.4, min(6.0, 1.2 + 0.09 * n_pos))
    fig, axes = plt.subplots(1, len(mats), figsize=(width * len(mats), height), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bdbdbd")
    image = None
    for ax, (run, (positions, steps, grid, source)) in zip(axes.flat, mats):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        every = max(1, len(positions) // 12)
        ax.set_yticks(range(0, len(positions), every), [str(int(p)) for p in positions[::every]], fontsize=6.5)
        tick = max(1, len(steps) // 10)
        ax.set_xticks(range(0, len(steps), tick), [str(int(s)) for s in steps[::tick]], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("position", fontsize=8)
        ref = reference_step(run)
        before = np.flatnonzero(steps <= ref) if ref is not None else np.array([], dtype=int)
        if before.size and before[-1] < len(steps) - 1:  # the boundary after the reference step's column
            ax.axvline(before[-1] + 0.5, color="white", lw=1.2, ls="--")
        what = "every position" if source == "profile" else f"{len(positions)} logged positions"
        ax.set_title(f"{run.label}: probe entropy per position ({what})", fontsize=8.5)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01, label="entropy (nats)")
    file = _save(fig, out_dir, "prediction_positions_over_time")
    side = f" ({mats[0][0].label} left, {mats[1][0].label} right)" if len(mats) > 1 else ""
    return Figure(
        file,
        "Per-position prediction entropy over time",
        f"Mean held-out (probe) prediction entropy at each sequence position (rows) and logging step (columns){side}; "
        f"one colour scale, 0 to {vmax:.3g} nats; grey: not logged or non-finite. Rows come from the stored whole "
        "profile (entropy/pred/probe/pos_profile, as the wandb image entropy/pred/probe/pos_heatmap) when the record "
        "holds it, else from the entropy/pred/probe/pos/{i} scalars; white dashes: after the monitor's reference_step. "
        "Hyperfitting turns the whole map dark from the "
        "step fine-tuning starts; early positions (little context) normally stay brightest.",
    )


def generation_diversity(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Greedy-generation distinct-n (one colour per n) and the repetition rate / type-token ratio over steps; runs
    solid / dashed."""
    orders = sorted({int(m[1]) for r in runs for k in r.scalars if (m := _DISTINCT.match(k))})
    other = [k for k in (f"{PREFIX}/gen/repetition", f"{PREFIX}/gen/ttr") if any(k in r.scalars for r in runs)]
    panels = (["distinct"] if orders else []) + (["repetition"] if other else [])
    if not panels:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.3), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab10")
    for ax, panel in zip(axes.flat, panels):
        series = [(f"{PREFIX}/gen/distinct_{n}", f"distinct-{n}", cmap(j % 10)) for j, n in enumerate(orders)]
        if panel == "repetition":
            series = [(k, "repetition (seq-rep)" if k.endswith("repetition") else "type-token ratio",
                       "#d62728" if k.endswith("repetition") else "#2ca02c") for k in other]
        handles = []
        for key, label, colour in series:
            drawn = False
            for i, run in enumerate(runs):
                if key in run.scalars:
                    steps, values = run.scalars[key]
                    ax.plot(steps, _finite(values), color=colour, ls=RUN_STYLES[i % 2], lw=1.5,
                            marker="o" if len(steps) <= 30 else None, ms=2.5)
                    drawn = True
            if drawn:
                handles.append(Line2D([], [], color=colour, lw=1.6, label=label))
        handles += _run_handles(runs)
        ax.set_ylim(-0.03, 1.03)
        _step_axis(ax, "greedy distinct-n" if panel == "distinct" else "greedy repetition and type-token ratio")
        ax.legend(handles=handles, fontsize=6.5, loc="best", framealpha=0.7)
    file = _save(fig, out_dir, "prediction_generation_diversity")
    runs_note = _runs_note(runs)
    return Figure(
        file,
        "Greedy-generation diversity",
        "Greedy continuations of the fixed prompts: distinct-n (unique n-grams / all n-grams, pooled over "
        "continuations), the seq-rep repetition rate and the mean type-token ratio" + runs_note + ". Hyperfitting "
        "makes greedy text less repetitive (distinct-n up, repetition down) as the entropy collapses.",
    )


def _moved(a: float, b: float) -> str:
    return "rose" if b > a else "fell" if b < a else "stayed at"


def reference_step(run: RunData) -> int | None:
    """The ``reference_step`` of the run's ``PredictionEntropyMonitor`` (from the run's ``config.yaml``: the recipe's
    LightningCLI config), e.g. the end of pre-training before a hyperfitting phase; ``None`` when not set or not
    readable."""
    if not run.config_text:
        return None
    try:
        import yaml

        config = yaml.safe_load(run.config_text)
    except Exception:  # a config the report cannot parse only loses this finding
        return None
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if str(node.get("class_path", "")).endswith("PredictionEntropyMonitor"):
                step = (node.get("init_args") or {}).get("reference_step")
                if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                    return step
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _at_or_before(run: RunData, key: str, step: int) -> tuple[int, float] | None:
    """The last finite value of ``key`` logged at or before ``step``, with its step."""
    series = run.scalars.get(key)
    if series is None:
        return None
    ok = np.flatnonzero(np.isfinite(series[1]) & (series[0] <= step))
    return (int(series[0][ok[-1]]), float(series[1][ok[-1]])) if ok.size else None


def _probe_change(run: RunData, start: int | None) -> str:
    """"fell from a to b nats (step s → t)" for the probe entropy, from its first finite value (``start=None``) or
    its last finite value at or before ``start``, with the held-out NLL over the same steps and the verdict:
    hyperfitting when the entropy ends below :data:`COLLAPSE_RATIO` of where it started while the NLL rose."""
    fl, nll_fl = finite_first_last(run, f"{PREFIX}/probe/mean"), finite_first_last(run, f"{PREFIX}/probe/nll")
    if fl is None:
        return ""
    s0, a, s1, b = fl
    nll = None if nll_fl is None else (nll_fl[1], nll_fl[3])
    if start is not None:
        at = _at_or_before(run, f"{PREFIX}/probe/mean", start)
        if at is None:
            return ""
        s0, a = at
        nll_at = _at_or_before(run, f"{PREFIX}/probe/nll", start)
        nll = None if nll_at is None or nll_fl is None else (nll_at[1], nll_fl[3])
    line = f"{_moved(a, b)} from {fmt(a)} to {fmt(b)} nats (step {s0} → {s1})"
    collapsed = a > 0 and b < COLLAPSE_RATIO * a
    if collapsed and nll and nll[1] > nll[0]:
        line += f" while the held-out NLL rose from {fmt(nll[0])} to {fmt(nll[1])}: hyperfitting"
    elif collapsed:
        line += f": collapsed (below {COLLAPSE_RATIO:g}× where it started)"
    elif nll:
        line += f"; held-out NLL {fmt(nll[0])} → {fmt(nll[1])}"
    return line


def prediction_findings(run: RunData) -> list[str]:
    """Plain sentences on the held-out and training prediction entropy, the share below the floor, the held-out NLL,
    greedy diversity and the per-position profile at the end (first / last *finite* values)."""
    out: list[str] = []
    probe = finite_first_last(run, f"{PREFIX}/probe/mean")
    if probe:
        out.append("held-out prediction entropy " + _probe_change(run, None) + ".")
        ref = reference_step(run)
        if ref is not None and probe[0] < ref < probe[2]:
            line = _probe_change(run, ref)
            if line:
                d2 = _at_or_before(run, f"{PREFIX}/gen/distinct_2", ref)
                d2_end = finite_first_last(run, f"{PREFIX}/gen/distinct_2")
                if d2 is not None and d2_end is not None and d2_end[2] > d2[0]:
                    line += f"; greedy distinct-2 {fmt(d2[1])} → {fmt(d2_end[3])}"
                out.append(f"from the monitor's reference_step {ref} (e.g. the end of pre-training) to the end: "
                           f"held-out prediction entropy {line}.")
    train = finite_first_last(run, f"{PREFIX}/train/mean")
    if train:
        out.append(f"training-batch prediction entropy {_moved(train[1], train[3])} from {fmt(train[1])} to {fmt(train[3])} nats.")
    for split in ("probe", "train"):
        floor = finite_first_last(run, f"{PREFIX}/{split}/below_floor_frac")
        if floor:
            out.append(f"{split} positions below the entropy floor: {100 * floor[1]:.0f} % → {100 * floor[3]:.0f} %.")
            break
    orders = sorted({int(m[1]) for m in map(_DISTINCT.match, run.scalars) if m})
    gen = [f"distinct-{n} {fmt(fl[1])} → {fmt(fl[3])}"
           for n in orders if (fl := finite_first_last(run, f"{PREFIX}/gen/distinct_{n}"))]
    rep = finite_first_last(run, f"{PREFIX}/gen/repetition")
    if rep:
        gen.append(f"repetition {fmt(rep[1])} → {fmt(rep[3])}")
    if gen:
        out.append("greedy generation: " + ", ".join(gen) + ".")
    mat = position_matrix(run)
    if mat is not None:
        positions, steps, grid, _ = mat
        have = np.flatnonzero(np.isfinite(grid).any(axis=0))
        if have.size:
            j = have[-1]
            column = grid[:, j]
            hi, lo = int(np.nanargmax(column)), int(np.nanargmin(column))
            out.append(
                f"at step {int(steps[j])} the probe entropy is highest at position {int(positions[hi])} "
                f"({fmt(column[hi])} nats) and lowest at position {int(positions[lo])} ({fmt(column[lo])} nats)."
            )
    bad = run.scalars.get(f"{PREFIX}/nonfinite")
    if bad is not None:  # a per-step count: the total is the sum over logging steps
        counts = np.nan_to_num(_finite(bad[1]), nan=0.0)
        hit = np.flatnonzero(counts > 0)
        if hit.size:
            out.append(
                f"{int(counts.sum())} predicted positions held NaN/Inf at {hit.size} logging step(s), first at step "
                f"{int(bad[0][hit[0]])}; they were left out of every statistic ({PREFIX}/nonfinite)."
            )
    return ["Prediction entropy: " + line for line in out]
