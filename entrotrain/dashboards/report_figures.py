r"""The figures of ``entrotrain report``: matplotlib (Agg) PNGs from one run or two overlaid runs.

Every function takes the runs (:class:`~entrotrain.dashboards.run_reader.RunData`, one or two), draws one figure,
saves it under ``out_dir`` and returns a :class:`Figure` (file name, title, caption), or ``None`` when the runs hold
nothing for it. In overlay mode each run has one colour (the first solid, the second dashed); with one run, lines of
a family (one per layer) get a colour each.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from entrotrain.dashboards.run_reader import RunData, natural_order
from entrotrain.errors import EntrotrainError

if TYPE_CHECKING:
    from entrotrain._entropy_reward_rules import CeilingVerdict

__all__ = [
    "Figure",
    "attention_heads_over_time",
    "attention_snapshots",
    "attention_summary",
    "bucket_columns",
    "collapse_threshold",
    "curve_families",
    "family_of",
    "fit_curve",
    "heads_matrix",
    "heatmap_media",
    "histogram_media",
    "is_per_head",
    "loss_and_regularizers",
    "per_head_over_time",
    "policy_entropy_reward",
    "scalar_section",
    "spectra",
    "thin_line",
    "thresholds_for",
]

RUN_COLORS = ("#1f77b4", "#d62728")
RUN_STYLES = ("-", "--")
_PER_HEAD = re.compile(r"^(?P<family>.+?)/(?:L(?P<layer>\d+)/)?H(?P<head>\d+)$")
_INDEX = re.compile(r"(?<=[./])\d+(?=[./]|$)|(?<=[./])(?<=\b)([LH])\d+(?=[./]|$)")


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise EntrotrainError(
            "entrotrain report draws its figures with matplotlib, which is not installed: "
            "`pip install 'entrotrain[report]'` (or `pip install matplotlib`)."
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Figure:
    """A saved PNG: ``file`` (relative to the report folder), ``title`` and ``caption`` for the HTML."""

    file: str
    title: str
    caption: str


def _runs_note(runs: list[RunData]) -> str:
    """The caption's note on the line styles of a comparison (:data:`RUN_STYLES`: the first run solid, the second
    dashed), ``"; A solid, B dashed"``; ``""`` for one run."""
    return f"; {runs[0].label} solid, {runs[1].label} dashed" if len(runs) > 1 else ""


def _run_handles(runs: list[RunData]) -> list[Any]:
    """Legend entries for the line style of each run of a comparison (black, :data:`RUN_STYLES`); none for one run."""
    if len(runs) < 2:
        return []
    from matplotlib.lines import Line2D

    return [Line2D([], [], color="black", ls=RUN_STYLES[i % 2], lw=1.4, label=run.label) for i, run in enumerate(runs)]


def _step_axis(ax: Any, title: str) -> None:
    """The look of a panel over training steps: title, ``step`` on x, small ticks, a light grid."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _save(fig: Any, out_dir: Path, name: str) -> str:
    file = f"{name}.png"
    fig.savefig(out_dir / file, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return file



#: A curve longer than this many points is drawn thinned by :func:`thin_line` (a figure panel is ~500 pixels wide).
MAX_LINE_POINTS = 2000
#: A heads-over-time map with more logging steps than this is drawn with this many columns (:func:`bucket_columns`).
MAX_MAP_COLUMNS = 500


def thin_line(
    steps: np.ndarray, values: np.ndarray, max_points: int = MAX_LINE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` with at most ``max_points`` points, for drawing: the series cut into ``max_points // 2``
    consecutive stretches of equal length, each kept as its least and its greatest value (in step order), plus the
    first and last points. Extremes survive: a collapse lasting one logged step of 50 000 is still drawn; a series
    of ``max_points`` or fewer is returned as it is. NaN (a gap) is kept only where a stretch holds nothing else."""
    n = len(values)
    if n <= max_points:
        return steps, values
    width = -(-n // max(1, max_points // 2))
    rows = -(-n // width)
    grid = np.concatenate([np.asarray(values, dtype=float), np.full(rows * width - n, np.nan)]).reshape(rows, width)
    missing = np.isnan(grid)
    low = np.where(missing, np.inf, grid).argmin(axis=1)
    high = np.where(missing, -np.inf, grid).argmax(axis=1)
    base = np.arange(rows) * width
    keep = np.unique(np.concatenate([base + low, base + high, [0, n - 1]]))
    keep = keep[keep < n]
    return steps[keep], values[keep]


def bucket_columns(steps: np.ndarray, grid: np.ndarray, max_columns: int = MAX_MAP_COLUMNS,
                   extreme: str = "min") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, grid)`` of a rows × steps map with at most ``max_columns`` columns, for drawing: consecutive
    stretches of equal length become one column holding, per row, the stretch's least value (``extreme="min"``:
    entropy, where a collapse is the low value) or its value furthest from the row's median (``"far"``: any
    statistic); the column is labelled with the stretch's first step. A short excursion still shows; NaN only
    where a stretch holds nothing else. A map of ``max_columns`` or fewer columns is returned as it is."""
    n = grid.shape[1]
    if n <= max_columns:
        return steps, grid
    width = -(-n // max_columns)
    cols = -(-n // width)
    padded = np.concatenate([grid, np.full((grid.shape[0], cols * width - n), np.nan)], axis=1)
    cube = padded.reshape(grid.shape[0], cols, width)
    missing = np.isnan(cube)
    if extreme == "min":
        pick = np.where(missing, np.inf, cube).argmin(axis=2)
    else:
        center = np.array([np.median(r[np.isfinite(r)]) if np.isfinite(r).any() else 0.0 for r in grid])
        pick = np.where(missing, -1.0, np.abs(cube - center[:, None, None])).argmax(axis=2)
    picked = np.take_along_axis(cube, pick[:, :, None], axis=2)[:, :, 0]
    return steps[::width], picked


def family_of(key: str) -> str:
    """The curve family of a key: layer / head indices replaced by ``#`` (``entropy/attn_norm/L3/mean`` →
    ``.../L#/mean``, ``sigma_reparam/blocks.2.qkv/sigma`` → ``.../blocks.#.qkv/sigma``; ``p10`` stays ``p10``)."""
    return _INDEX.sub(lambda m: (m.group(1) or "") + "#", key)


def is_per_head(key: str) -> bool:
    """Whether ``key`` is one head's value (``.../H3`` or ``.../L1/H3``): drawn as a heads-over-time map, not a curve."""
    return bool(_PER_HEAD.match(key))


def curve_families(keys: list[str]) -> dict[str, list[str]]:
    """Group plottable keys (not per-head, not ``*/alert``) into families, in natural order."""
    families: dict[str, list[str]] = {}
    for key in sorted(keys, key=natural_order):
        if key.endswith("/alert") or is_per_head(key):
            continue
        families.setdefault(family_of(key), []).append(key)
    return families


def thresholds_for(runs: list[RunData], keys: list[str]) -> list[tuple[float, str]]:
    """Declared reference lines that match any of ``keys`` (``fnmatch`` patterns allowed), deduplicated."""
    found: dict[tuple[float, str], None] = {}
    for run in runs:
        for row in run.thresholds:
            if any(fnmatch.fnmatchcase(k, str(row.get("key", ""))) for k in keys):
                found[(float(row["value"]), str(row.get("label", "threshold")))] = None
    return list(found)


def _panel_grid(n: int, panel_height: float, extra_height: float = 0.0, **subplots: Any) -> tuple[Any, Any]:
    """``(fig, axes)``: ``n`` panels, three to a row, 4.3 wide and ``panel_height`` high (plus ``extra_height`` for the
    whole figure); spare panels blanked."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    figsize = (4.3 * cols, panel_height * rows + extra_height)
    fig, axes = _plt().subplots(rows, cols, figsize=figsize, squeeze=False, **subplots)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _media_keys(runs: list[RunData], kind: str) -> list[str]:
    """The media keys stored with ``kind`` in any run, in natural order."""
    return sorted({k for r in runs for k, items in r.media.items() if items and items[0].kind == kind}, key=natural_order)


def _events_for(run: RunData, keys: list[str]) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("key") in keys and e.get("step") is not None]


def _mark(ax: Any, runs: list[RunData], keys: list[str]) -> None:
    """Threshold lines and event markers for ``keys`` on ``ax``."""
    for value, label in thresholds_for(runs, keys):
        color = "#d62728" if "collapse" in label or "guard" in label else "#ff7f0e"
        ax.axhline(value, color=color, lw=1, ls=":", alpha=0.9)
        ax.annotate(f"{label} {value:g}", (0.995, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7, color=color)
    for i, run in enumerate(runs):
        back_to = dict(run.rollbacks)
        for event in _events_for(run, keys):
            step = int(event["step"])
            label = f"rollback → {back_to[step]}" if step in back_to else str(event.get("level") or "alert")
            ax.axvline(step, color=RUN_COLORS[i % 2], lw=1, ls="-.", alpha=0.6)
            ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=7, va="top", ha="right", color=RUN_COLORS[i % 2])


def _plot_family(ax: Any, runs: list[RunData], keys: list[str], family: str) -> None:
    overlay = len(runs) > 1
    cmap = _plt().get_cmap("viridis")
    present = [k for k in keys if any(k in r.scalars for r in runs)]
    for i, run in enumerate(runs):
        for j, key in enumerate(present):
            if key not in run.scalars:
                continue
            steps, values = thin_line(*run.scalars[key])
            if overlay:
                label = run.label if j == 0 else None
                color, alpha = RUN_COLORS[i % 2], 1.0 if len(present) == 1 else 0.55
            else:
                label = _distinct_part(key, present) if len(present) > 1 else None
                color = cmap(j / max(1, len(present) - 1) * 0.9) if len(present) > 1 else RUN_COLORS[0]
                alpha = 1.0
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, ls=RUN_STYLES[i % 2], color=color, alpha=alpha, lw=1.4, label=label,
                    marker=marker, ms=2.5)
    _mark(ax, runs, present)
    _step_axis(ax, family.replace("#", "*"))
    handles, labels = ax.get_legend_handles_labels()
    if labels and len(labels) <= 12:
        ax.legend(fontsize=6.5, loc="best", framealpha=0.7)


def _distinct_part(key: str, keys: list[str]) -> str:
    """The path components where ``key`` differs from the other keys of its family."""
    parts = key.split("/")
    others = [k.split("/") for k in keys if k != key]
    distinct = [p for n, p in enumerate(parts) if any(n >= len(o) or o[n] != p for o in others)]
    return "/".join(distinct) or key


def _constant(runs: list[RunData], keys: list[str]) -> bool:
    """Whether every key holds one value throughout every run (a parameter such as ``n`` or ``vendi_q``)."""
    series = [r.scalars[k][1] for r in runs for k in keys if k in r.scalars]
    return all(len(v) > 1 and np.ptp(v) == 0 for v in series) and bool(series)


def scalar_section(runs: list[RunData], keys: list[str], out_dir: Path, name: str, title: str) -> Figure | None:
    """A grid of small line plots, one per key family of a section (thresholds and alerts marked); families that
    never change (parameters logged beside a measure) are left to the section's table."""
    families = {f: ks for f, ks in curve_families(keys).items() if not _constant(runs, ks)}
    if not families:
        return None
    n = len(families)
    fig, axes = _panel_grid(n, 2.9, 0.3, layout="constrained")
    for ax, (family, members) in zip(axes.flat, families.items()):
        _plot_family(ax, runs, members, family)
    fig.suptitle(title, fontsize=11)
    file = _save(fig, out_dir, name)
    caption = f"{n} metric famil{'y' if n == 1 else 'ies'} over training steps (constant keys: see the table)"
    caption += _runs_note(runs)
    return Figure(file, title, caption + "; dotted lines: declared thresholds; dash-dot: alerts.")


# ---------------------------------------------------------------------- loss and regulariser terms
#: Regulariser terms whose typical magnitudes differ by more than this factor get a symmetric-log right axis.
SYMLOG_SPREAD = 100.0


def _finite(values: np.ndarray) -> np.ndarray:
    """``values`` as float with ±inf replaced by NaN (matplotlib draws NaN as a gap)."""
    values = np.asarray(values, dtype=float)
    return np.where(np.isfinite(values), values, np.nan)


def loss_and_regularizers(runs: list[RunData], out_dir: Path, loss_key: str = "train/loss") -> Figure | None:
    """``train/loss`` (left axis, black) with every ``reg/{name}`` term (right axis, one colour per term, zero line
    dotted), one panel per run side by side with the same axis limits.

    The terms are the *weighted* contributions a regulariser adds to the loss (``parts`` of
    :class:`~entrotrain.regularizers.composition.RegularizerOutput`); they may be negative (e.g. −H for an entropy
    bonus), hence their own axis. When their typical magnitudes (median of |value|) differ by more than
    :data:`SYMLOG_SPREAD`, the right axis is symmetric-log with its linear zone at the smallest median. Non-finite
    points are gaps. ``None`` when no run logged a ``reg/`` key.
    """
    terms = sorted({k for r in runs for k in r.scalars if k.startswith("reg/")}, key=natural_order)
    if not terms:
        return None
    have = [r for r in runs if any(k in r.scalars for k in terms)]
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(5.6 * len(have), 3.5), squeeze=False, layout="constrained")
    palette = plt.get_cmap("tab10")
    colour = {k: palette((i + 1) % 10) for i, k in enumerate(terms)}
    medians = []
    for run in have:
        for key in terms:
            if key in run.scalars:
                v = np.abs(run.scalars[key][1])
                v = v[np.isfinite(v) & (v > 0)]
                if v.size:
                    medians.append(float(np.median(v)))
    symlog = len(medians) > 1 and max(medians) / min(medians) > SYMLOG_SPREAD
    twins = []
    for ax, run in zip(axes.flat, have):
        twin = ax.twinx()
        twins.append(twin)
        if loss_key in run.scalars:
            steps, values = thin_line(*run.scalars[loss_key])
            ax.plot(steps, _finite(values), color="black", lw=1.5, label=loss_key)
        for key in terms:
            if key in run.scalars:
                steps, values = thin_line(*run.scalars[key])
                twin.plot(steps, _finite(values), color=colour[key], lw=1.2, alpha=0.9, label=key)
        twin.axhline(0.0, color="grey", lw=0.8, ls=":")
        if symlog:
            twin.set_yscale("symlog", linthresh=min(medians))
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(loss_key, fontsize=8)
        twin.set_ylabel("regulariser terms (weighted)" + (", symlog" if symlog else ""), fontsize=8)
        ax.set_title(f"{run.label}: loss and regulariser terms", fontsize=9)
        ax.grid(alpha=0.3)
        for a in (ax, twin):
            a.tick_params(labelsize=7)
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = twin.get_legend_handles_labels()
        if len(labels) + len(labels2) <= 12:
            ax.legend(lines + lines2, labels + labels2, fontsize=6.5, loc="best", framealpha=0.7)
    for group, drawn in ((list(axes.flat), 0), (twins, 1)):  # same limits side by side (twins: beyond the zero line)
        group = [a for a in group if len(a.lines) > drawn]
        if len(group) > 1:
            lows, highs = zip(*(a.get_ylim() for a in group))
            for a in group:
                a.set_ylim(min(lows), max(highs))
    file = _save(fig, out_dir, "loss_and_regularizers")
    return Figure(
        file,
        "Loss and regulariser terms",
        f"{loss_key} (black, left axis) and each weighted regulariser term reg/* (colours, right axis; dotted: zero). "
        "In entrotrain's tasks the optimised objective is the loss plus the sum of the terms; a negative term (an entropy bonus −H) lowers "
        "it." + (" Right axis symmetric-log: the terms differ by orders of magnitude." if symlog else ""),
    )


# ---------------------------------------------------------------------- attention
def heads_matrix(run: RunData, family: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """``(row labels L·H, steps, values (rows, steps))`` from the per-head keys of ``family`` (NaN where missing)."""
    keys = [k for k in run.scalars if (m := _PER_HEAD.match(k)) and m.group("family") == family]
    if not keys:
        return None
    keys.sort(key=natural_order)
    steps, grid = _keys_grid(run, keys)
    labels = [k[len(family) + 1 :].replace("/", "") for k in keys]
    return labels, steps, grid


def _keys_grid(run: RunData, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values (keys, steps))``: the union of the keys' logged steps, NaN where a key has no value."""
    shared = [run.scalars[k][0] for k in keys]
    if shared and all(s is shared[0] for s in shared) and bool(np.all(shared[0][1:] > shared[0][:-1])):
        # one key set (the reader gives its keys one steps array): the union is that array, no sort of them all
        return shared[0], np.array([run.scalars[k][1] for k in keys], dtype=float).reshape(len(keys), -1)
    steps = np.unique(np.concatenate(shared))
    grid = np.full((len(keys), len(steps)), np.nan)
    for i, key in enumerate(keys):
        key_steps, values = run.scalars[key]
        grid[i, np.searchsorted(steps, key_steps)] = values
    return steps, grid


def collapse_threshold(runs: list[RunData], default: float = 0.1) -> float:
    for value, label in thresholds_for(runs, ["entropy/attn_norm/L0/H0", "entropy/attn_norm/min"]):
        if label == "collapse":
            return value
    return default


#: A heads map with more cells than this marks collapsed cells with a red overlay instead of one red box per cell.
MAX_OUTLINED_CELLS = 2000
#: Row labels of a heads map: at most this many (every k-th head) are written.
MAX_ROW_LABELS = 64


def attention_heads_over_time(runs: list[RunData], out_dir: Path, family: str = "entropy/attn_norm") -> Figure | None:
    """Rows = layer·head, columns = logging steps, colour = normalised entropy; collapsed cells outlined in red.

    A run with more than :data:`MAX_MAP_COLUMNS` logging steps is drawn with that many columns, each the least value
    of its stretch of steps (:func:`bucket_columns`), so a head that collapsed for one logged step still shows."""
    mats = [(run, heads_matrix(run, family)) for run in runs]
    mats = [(r, m) for r, m in mats if m is not None]
    if not mats:
        return None
    plt = _plt()
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    threshold = collapse_threshold(runs)
    rows = max(len(m[0]) for _, m in mats)
    shown = [bucket_columns(m[1], m[2]) for _, m in mats]
    width = max(6.5, min(13.0, 2.5 + 0.28 * max(len(steps) for steps, _ in shown)))
    height = min(0.9 + 0.17 * rows, 16.0)  # 32 layers x 32 heads: 1024 rows in 16 inches, not 175
    fig, axes = plt.subplots(len(mats), 1, figsize=(width, height * len(mats) + 0.3), squeeze=False, layout="constrained")
    image = None
    bucketed = False
    for ax, (run, (labels, all_steps, full)), (steps, grid) in zip(axes.flat, mats, shown):
        bucketed = bucketed or len(steps) < len(all_steps)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        low = np.where(np.isfinite(grid), grid < threshold, False)
        cells = np.argwhere(low)
        if len(cells) > MAX_OUTLINED_CELLS:
            ax.imshow(np.where(low, 1.0, np.nan), aspect="auto", cmap=ListedColormap(["#ff3030"]), alpha=0.55,
                      interpolation="nearest")
        elif len(cells):
            boxes = [Rectangle((j - 0.5, i - 0.5), 1, 1) for i, j in cells]
            ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#ff3030", linewidth=0.9))
        every = -(-len(labels) // MAX_ROW_LABELS)
        ax.set_yticks(range(0, len(labels), every), labels[::every],
                      fontsize=max(4, min(7, 400 // max(1, len(labels) // every))))
        tick = max(1, len(steps) // 12)
        ax.set_xticks(range(0, len(steps), tick), [str(int(s)) for s in steps[::tick]], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        n_heads, n_collapsed = len(labels), int(np.sum(np.nan_to_num(full[:, -1], nan=1.0) < threshold))
        ax.set_title(f"{run.label}: {n_collapsed}/{n_heads} heads < {threshold:g} at step {int(all_steps[-1])}",
                     fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01, shrink=0.9, label="normalised entropy")
    file = _save(fig, out_dir, "attention_heads_over_time")
    columns = (f" (more than {MAX_MAP_COLUMNS} steps: each column is the least value over its stretch of steps, so "
               "a short collapse still shows)") if bucketed else ""
    return Figure(
        file,
        "Heads over time",
        f"Normalised attention entropy of every head (rows, layer-major) at every logging step (columns){columns}; "
        f"red: below the collapse threshold {threshold:g}. A row turning dark is a head collapsing, from that step on.",
    )


def _snapshot_grids(run: RunData) -> list[tuple[int, np.ndarray]]:
    """Layer × head normalised entropy at the first, middle and last logged step: from the stored heatmaps (only
    those three are read), else from per-head scalars."""
    items = run.media.get("entropy/attn_norm/heatmap", [])
    if items:
        chosen = sorted({0, len(items) // 2, len(items) - 1})
        return [(int(items[i].step or 0), items[i].load()) for i in chosen]
    mat = heads_matrix(run, "entropy/attn_norm")
    if mat is None:
        return []
    labels, steps, grid = mat
    layers = sorted({int(lbl.split("H")[0][1:]) for lbl in labels if lbl.startswith("L")})
    heads = sorted({int(lbl.split("H")[1]) for lbl in labels if "H" in lbl})
    if not layers or not heads:
        return []
    chosen = sorted({0, len(steps) // 2, len(steps) - 1})
    out = []
    for j in chosen:
        g = np.full((max(layers) + 1, max(heads) + 1), np.nan)
        for i, lbl in enumerate(labels):
            layer, head = lbl[1:].split("H")
            g[int(layer), int(head)] = grid[i, j]
        out.append((int(steps[j]), g))
    return out


def attention_snapshots(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Layer × head heatmaps (values written in the cells) at the first, middle and last logging step of each run."""
    per_run = [(run, _snapshot_grids(run)) for run in runs]
    per_run = [(r, g) for r, g in per_run if g]
    if not per_run:
        return None
    plt = _plt()
    threshold = collapse_threshold(runs)
    cols = 3
    fig, axes = plt.subplots(len(per_run), cols, figsize=(3.4 * cols, 2.8 * len(per_run)), squeeze=False, layout="constrained")
    image = None
    for r, (run, grids) in enumerate(per_run):
        picks = [grids[0], grids[len(grids) // 2], grids[-1]] if len(grids) >= 3 else grids + [grids[-1]] * (3 - len(grids))
        for c, (step, grid) in enumerate(picks):
            ax = axes[r, c]
            image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            if grid.size <= 64:
                for (y, x), v in np.ndenumerate(grid):
                    if np.isfinite(v):
                        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                                color="white" if v < 0.5 else "black", fontweight="bold" if v < threshold else None)
            ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(grid.shape[1])], fontsize=6.5)
            ax.set_yticks(range(grid.shape[0]), [f"L{i}" for i in range(grid.shape[0])], fontsize=6.5)
            ax.set_title(f"{run.label} · step {step}", fontsize=8.5)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="normalised entropy")
    file = _save(fig, out_dir, "attention_layer_head")
    return Figure(
        file,
        "Layer × head entropy",
        "Normalised attention entropy per layer (rows) and head (columns) at the first, middle and last logging step; "
        f"bold values are below the collapse threshold {threshold:g}.",
    )


def attention_summary(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Min / mean / p05 normalised entropy with the collapse band, and the collapsed / near-uniform fraction of heads."""
    keys = ["entropy/attn_norm/min", "entropy/attn_norm/p05", "entropy/attn_norm/mean"]
    if not any(k in r.scalars for r in runs for k in keys):
        return None
    plt = _plt()
    threshold = collapse_threshold(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    shades = {"min": 1.0, "p05": 0.7, "mean": 0.45}
    for i, run in enumerate(runs):
        for key in keys:
            if key in run.scalars:
                stat = key.rsplit("/", 1)[-1]
                color = RUN_COLORS[i % 2] if len(runs) > 1 else {"min": "#d62728", "p05": "#ff7f0e", "mean": "#1f77b4"}[stat]
                label = f"{run.label} {stat}" if len(runs) > 1 else stat
                steps, values = thin_line(*run.scalars[key])
                left.plot(steps, values, ls=RUN_STYLES[i % 2], color=color, alpha=shades[stat] if len(runs) > 1 else 1,
                          lw=1.6, label=label, marker="o" if len(steps) <= 200 else None, ms=2.5)
        for key, stat in (("entropy/attn/collapse_frac", "collapsed"), ("entropy/attn/overload_frac", "near-uniform")):
            if key in run.scalars:
                steps, values = thin_line(*run.scalars[key])
                color = RUN_COLORS[i % 2] if len(runs) > 1 else ("#d62728" if stat == "collapsed" else "#ff7f0e")
                right.plot(steps, 100 * values, ls=RUN_STYLES[i % 2] if stat == "collapsed" else ":", color=color, lw=1.6,
                           label=f"{run.label} {stat}" if len(runs) > 1 else stat,
                           marker="o" if len(steps) <= 200 else None, ms=2.5)
    left.axhspan(0, threshold, color="#d62728", alpha=0.08)
    _mark(left, runs, keys)
    left.set_ylim(-0.02, 1.02)
    left.set_title("normalised attention entropy over heads", fontsize=9)
    right.set_title(f"% of heads collapsed (< {threshold:g}) / near-uniform", fontsize=9)
    right.set_ylim(-2, 102)
    for ax in (left, right):
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run that logged only some of the summary keys
            ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    file = _save(fig, out_dir, "attention_summary")
    return Figure(
        file,
        "Attention entropy",
        f"Left: least / 5th-percentile / mean normalised entropy over all heads; shaded: collapse zone (< {threshold:g}); "
        "dotted: declared thresholds; dash-dot: guard alerts. Right: share of heads collapsed and near-uniform "
        "(near-uniform is expected at initialisation; late in training it is entropy overload).",
    )


# ---------------------------------------------------------------------- policy
#: ``PolicyEntropyMonitor(fit_min_points=5)``'s default: a run without ``fit_*`` keys is fitted here only from as many
#: logged steps as the monitor would have needed (with 3 nearly equal entropies a short TRL run's "What happened"
#: read "predicted reward ceiling b − a = 110" for rewards in [0, 1]).
_FIT_MIN_POINTS = 5


def fit_curve(run: RunData) -> tuple[float, float] | None:
    a, b = run.scalars.get("entropy/policy/fit_a"), run.scalars.get("entropy/policy/fit_b")
    if a is not None and b is not None and len(a[1]) and len(b[1]):
        return float(a[1][-1]), float(b[1][-1])
    h, r = run.scalars.get("entropy/policy/mean"), run.scalars.get("entropy/policy/reward_mean")
    if h is None or r is None:
        return None
    common, ih, ir = np.intersect1d(h[0], r[0], return_indices=True)
    if len(common) < _FIT_MIN_POINTS:  # the monitor published no fit: it had too few points for one
        return None
    from entrotrain.functional.entropy_reward_fit import fit_entropy_reward

    try:
        fit = fit_entropy_reward(list(h[1][ih]), list(r[1][ir]))
    except EntrotrainError:
        return None
    return float(fit.a), float(fit.b)


def fit_verdict(run: RunData) -> tuple[float, float, CeilingVerdict] | None:
    """The run's fit ``(a, b)`` (:func:`fit_curve`) and whether its ceiling ``b − a`` is shown as a prediction.

    The verdict is :func:`~entrotrain.functional.entropy_reward_fit.ceiling_verdict` (the monitor's ``fit_shown``) on
    the logged (entropy, reward) points up to the step of the last published fit (all of them for the report's own
    fit); R² is the published ``fit_r2`` (else that of a fit to those points).
    """
    from entrotrain._entropy_reward_rules import EntropyRewardFit, ceiling_verdict  # (no torch: status reads it)

    fit = fit_curve(run)
    h, r = run.scalars.get("entropy/policy/mean"), run.scalars.get("entropy/policy/reward_mean")
    if fit is None or h is None or r is None:
        return None
    a, b = fit
    common, ih, ir = np.intersect1d(h[0], r[0], return_indices=True)
    published = run.scalars.get("entropy/policy/fit_a")
    if published is not None and len(published[0]):
        keep = common <= published[0][-1]
        ih, ir = ih[keep], ir[keep]
    hs, rs = [float(v) for v in h[1][ih]], [float(v) for v in r[1][ir]]
    r2 = run.scalars.get("entropy/policy/fit_r2")
    if r2 is not None and len(r2[1]):
        r2_value = float(r2[1][-1])
    else:
        from entrotrain.functional.entropy_reward_fit import fit_entropy_reward

        try:
            r2_value = fit_entropy_reward(hs, rs).r2
        except EntrotrainError:
            r2_value = float("nan")
    verdict = ceiling_verdict(EntropyRewardFit(a, b, b - a, r2_value, len(hs)), hs, rs)
    return a, b, verdict


def shown_ceiling(run: RunData) -> bool:
    """Whether the run logged a fitted ceiling ``b − a`` that :func:`fit_verdict` shows as a prediction (else it is no
    headline card, no ``entrotrain status`` column and no "at the ceiling" evidence; "What happened" says why)."""
    judged = fit_verdict(run) if "entropy/policy/fit_ceiling" in run.scalars else None
    return judged is not None and judged[2].shown


def policy_entropy_reward(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Policy entropy and reward over steps, and reward against entropy with the fitted ``R = -a·exp(H) + b``."""
    have = [r for r in runs if "entropy/policy/mean" in r.scalars]
    if not have:
        return None
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    twin = left.twinx()
    for i, run in enumerate(runs):
        if run not in have:
            continue
        color = RUN_COLORS[i % 2]
        steps, h = run.scalars["entropy/policy/mean"]
        left.plot(*thin_line(steps, h), color=color, ls=RUN_STYLES[i % 2], lw=1.6, label=f"{run.label} entropy")
        reward = run.scalars.get("entropy/policy/reward_mean")
        if reward is None:
            continue
        twin.plot(*thin_line(*reward), color=color, ls=":", lw=1.4, label=f"{run.label} reward")
        common, ih, ir = np.intersect1d(steps, reward[0], return_indices=True)
        right.scatter(h[ih], reward[1][ir], c=common, cmap="Blues" if i == 0 else "Reds", s=16,
                           edgecolors=color, linewidths=0.4, label=f"{run.label} (colour = step)")
        judged = fit_verdict(run)
        if judged is not None and len(ih):
            a, b, verdict = judged
            grid = np.linspace(float(np.min(h[ih])) * 0.95, float(np.max(h[ih])) * 1.05 + 1e-9, 100)
            right.plot(grid, -a * np.exp(grid) + b, color=color, lw=1.6, ls=RUN_STYLES[i % 2],
                       label=f"{run.label}: R = −{a:.3g}·exp(H) + {b:.3g}")
            right.axhline(b - a, color=color, lw=1, ls=":", alpha=0.8)
            note = "" if verdict.shown else " (not a prediction: see What happened)"
            right.annotate(f"ceiling b − a = {b - a:.3g}{note}", (0.01, b - a), xycoords=("axes fraction", "data"),
                           fontsize=7, color=color, va="bottom")
    left.set_xlabel("step", fontsize=8)
    left.set_ylabel("policy entropy (nats)", fontsize=8)
    twin.set_ylabel("reward", fontsize=8)
    _mark(left, runs, ["entropy/policy/mean"])
    lines = left.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    left.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="best")
    left.set_title("policy entropy and reward over training", fontsize=9)
    right.set_xlabel("policy entropy H (nats)", fontsize=8)
    right.set_ylabel("reward R", fontsize=8)
    right.set_title("reward against entropy, fitted R = −a·exp(H) + b", fontsize=9)
    right.legend(fontsize=7, loc="best")
    for ax in (left, right, twin):
        ax.tick_params(labelsize=7)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    fig.tight_layout()
    file = _save(fig, out_dir, "policy_entropy_reward")
    return Figure(
        file,
        "Policy entropy vs reward",
        "Left: mean policy entropy (solid/dashed) and reward (dotted) per logged step. Right: each logged step as a "
        "point (darker = later), with the least-squares fit R = −a·exp(H) + b of Cui et al. (2025) and its predicted "
        "ceiling b − a (reward when the entropy is exhausted), marked 'not a prediction' when the fit has fewer than "
        "8 points, R² < 0.5, reads H = 0 more than one span of exp(H) outside the data, or lies far outside the "
        "observed rewards.",
    )


# ---------------------------------------------------------------------- media
def spectra(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Eigenvalue spectra (normalised to sum 1, sorted, log scale) per key: a few steps per run, darker = later."""
    keys = _media_keys(runs, "spectrum")
    if not keys:
        return None
    fig, axes = _panel_grid(len(keys), 3.0)
    cmaps = ("Blues", "Reds")
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            items = run.media.get(key, [])
            if not items:
                continue
            picks = items if len(items) <= 5 else [items[round(j * (len(items) - 1) / 4)] for j in range(5)]
            cmap = _plt().get_cmap(cmaps[i % 2] if len(runs) > 1 else "viridis")
            for j, item in enumerate(picks):
                ev = np.sort(np.abs(np.asarray(item.load(), dtype=float).ravel()))[::-1]
                total = ev.sum()
                if total <= 0 or not np.isfinite(total):
                    continue
                ev = ev / total
                frac = 0.35 + 0.65 * j / max(1, len(picks) - 1) if len(runs) > 1 else 0.9 * (1 - j / max(1, len(picks) - 1))
                ax.semilogy(np.arange(1, len(ev) + 1), np.clip(ev, 1e-12, None), color=cmap(frac), lw=1.3,
                            ls=RUN_STYLES[i % 2], label=f"{run.label} step {item.step}" if len(runs) > 1 else f"step {item.step}")
        ax.set_title(key, fontsize=8.5)
        ax.set_xlabel("eigenvalue index", fontsize=8)
        ax.set_ylabel("share of total", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    file = _save(fig, out_dir, "spectra")
    return Figure(
        file,
        "Eigenvalue spectra",
        "Eigenvalues of each logged spectrum, sorted and divided by their sum (log scale), at up to five steps from "
        "first to last. A spectrum whose tail drops by orders of magnitude is a representation collapsing onto few "
        "directions (low rank).",
    )


def histogram_media(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Distributions stored with ``kind="histogram"``: first and last step per key and run."""
    keys = _media_keys(runs, "histogram")
    if not keys:
        return None
    fig, axes = _panel_grid(len(keys), 2.9)
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            items = run.media.get(key, [])
            for item, alpha in ((items[0], 0.35), (items[-1], 0.75)) if items else ():
                x = np.asarray(item.load(), dtype=float).ravel()
                x = x[np.isfinite(x)]
                if x.size:
                    ax.hist(x, bins=30, alpha=alpha, color=RUN_COLORS[i % 2], histtype="stepfilled" if alpha > 0.5 else "step",
                            label=f"{run.label} step {item.step}", lw=1.2)
        ax.set_title(key, fontsize=8.5)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    file = _save(fig, out_dir, "histograms")
    return Figure(file, "Distributions", "Stored value distributions at the first (outline) and last (filled) logged step.")


def heatmap_media(runs: list[RunData], out_dir: Path, skip: tuple[str, ...] = ("entropy/attn_norm/heatmap",)) -> Figure | None:
    """Heatmaps stored with ``kind="heatmap"`` (other than attention's, drawn elsewhere): last step per run."""
    keys = sorted({k for r in runs for k, items in r.media.items() if items and items[0].kind == "heatmap" and k not in skip})
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(keys), len(runs), figsize=(4.2 * len(runs), 3.2 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        for c, run in enumerate(runs):
            ax = axes[r, c]
            items = run.media.get(key, [])
            if not items:
                ax.axis("off")
                continue
            item = items[-1]
            image = ax.imshow(np.asarray(item.load(), dtype=float), aspect="auto", cmap="viridis",
                              vmin=item.meta.get("vmin"), vmax=item.meta.get("vmax"), interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.04)
            ax.set_title(f"{run.label} · {key} · step {item.step}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    file = _save(fig, out_dir, "heatmaps")
    return Figure(file, "Heatmaps", "Other stored heatmaps at their last logged step.")


def per_head_over_time(runs: list[RunData], keys: list[str], out_dir: Path, name: str, title: str) -> Figure | None:
    """Per-head keys of any monitor (``.../H{h}``) as one heatmap per run: rows = keys, columns = steps, colour
    scaled to the values of both runs (e.g. σReparam's per-head ‖W_Qᵀ W_K‖₂)."""
    keys = sorted((k for k in keys if is_per_head(k)), key=natural_order)
    mats = []
    for run in runs:
        have = [k for k in keys if k in run.scalars]
        if not have:
            continue
        steps, grid = bucket_columns(*_keys_grid(run, have), extreme="far")
        mats.append((run, have, steps, grid))
    if not mats:
        return None
    plt = _plt()
    values = np.concatenate([g[np.isfinite(g)] for *_, g in mats])
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    rows = max(len(h) for _, h, _, _ in mats)
    width = max(6.5, min(13.0, 3.5 + 0.28 * max(len(s) for _, _, s, _ in mats)))
    fig, axes = plt.subplots(len(mats), 1, figsize=(width, (1.0 + 0.17 * rows) * len(mats) + 0.3), squeeze=False,
                             layout="constrained")
    image = None
    for ax, (run, have, steps, grid) in zip(axes.flat, mats):
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        prefix = _common_prefix(have)
        ax.set_yticks(range(len(have)), [k[len(prefix):] for k in have], fontsize=max(4, min(7, 400 // max(1, len(have)))))
        tick = max(1, len(steps) // 12)
        ax.set_xticks(range(0, len(steps), tick), [str(int(s)) for s in steps[::tick]], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(f"{run.label}: {prefix}…", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01)
    file = _save(fig, out_dir, name)
    return Figure(file, title, "Every per-head key (rows) at every logged step (columns); one colour scale for all runs.")


def _common_prefix(keys: list[str]) -> str:
    """The longest common prefix of ``keys`` ending at a ``/`` (what the row labels can leave out)."""
    if not keys:
        return ""
    first, last = min(keys), max(keys)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[: first[:n].rfind("/") + 1]
