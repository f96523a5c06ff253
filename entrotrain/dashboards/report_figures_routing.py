r"""The MoE routing section of ``entrotrain report``: figures and findings from ``RouterEntropyMonitor``'s keys.

Keys read (all optional; a run without ``entropy/router/L{l}/load/E{e}`` draws no load map):

- ``entropy/router/L{l}/load/E{e}``: the share of layer ``l``'s routing assignments that went to expert ``e`` (sums to 1
  over ``e``; uniform routing gives :math:`1/E`);
- ``entropy/router/L{l}/entropy_norm``, ``.../load_entropy_norm``, ``.../dead_frac``: per-layer curves;
- ``entropy/router/load_entropy_norm_min``, ``entropy/router/dead_frac_max``: the section's headline cards (report.py).

Non-finite values are drawn as gaps (grey cells in the map) and never enter a colour scale, a limit or a finding.
"""

from __future__ import annotations

import math
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
from entrotrain.dashboards.run_reader import RunData

__all__ = ["CONCENTRATED_SHARE", "MAX_LAYERS_SHOWN", "ROUTER_CURVES", "least_balanced", "load_matrices", "router_curves", "router_findings", "router_load_over_time"]

_LOAD = re.compile(r"^entropy/router/L(?P<layer>\d+)/load/E(?P<expert>\d+)$")
#: A layer is called concentrated when at most half of its experts carry this share of the load at the last step.
CONCENTRATED_SHARE = 0.9
#: Per-layer statistics drawn as curves: (stat suffix, panel title, scale shown (100 = percent)).
ROUTER_CURVES = (
    ("entropy_norm", "router entropy per token (normalised by ln E)", 1.0),
    ("load_entropy_norm", "expert-load entropy (normalised by ln E)", 1.0),
    ("dead_frac", "dead experts (% of the layer's experts)", 100.0),
)
#: At most this many MoE layers are drawn in the load map and named in the findings: the least balanced ones.
MAX_LAYERS_SHOWN = 8


def load_matrices(run: RunData) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per MoE layer ``l``: ``(steps, grid)`` with ``grid[e, j]`` the load share of expert ``e`` at ``steps[j]`` (NaN
    where not logged or non-finite), from the ``entropy/router/L{l}/load/E{e}`` keys."""
    keys: dict[int, dict[int, str]] = {}
    for key in run.scalars:
        m = _LOAD.match(key)
        if m:
            keys.setdefault(int(m["layer"]), {})[int(m["expert"])] = key
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for layer, experts in sorted(keys.items()):
        steps = np.unique(np.concatenate([run.scalars[k][0] for k in experts.values()]))
        grid = np.full((max(experts) + 1, len(steps)), np.nan)
        for e, key in experts.items():
            key_steps, values = run.scalars[key]
            grid[e, np.searchsorted(steps, key_steps)] = values  # (one numpy call per key, not one per point)
        out[layer] = (steps, _finite(grid))
    return out


def _final_balance(grid: np.ndarray) -> float:
    """Normalised entropy of the last complete load column (1 = balanced; +inf when none is complete)."""
    last = _last_finite_column(grid, complete=True)
    if last is None or grid.shape[0] < 2:
        return math.inf
    p = np.clip(last[1], 0.0, None)
    total = p.sum()
    if total <= 0:
        return math.inf
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(grid.shape[0]))


def least_balanced(mats: list[dict[int, tuple[np.ndarray, np.ndarray]]], limit: int = MAX_LAYERS_SHOWN) -> list[int]:
    """The (at most ``limit``) layers whose final load is least balanced in any run, in layer order; all layers when
    there are no more than ``limit``."""
    layers = sorted({layer for m in mats for layer in m})
    if len(layers) <= limit:
        return layers
    score = {layer: min(_final_balance(m[layer][1]) for m in mats if layer in m) for layer in layers}
    return sorted(sorted(layers, key=lambda layer: (score[layer], layer))[:limit])


def router_load_over_time(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Per MoE layer (rows) and run (columns, side by side): an expert × logging-step map of the load share.

    One colour scale for every panel, from 0 to the larger of the largest finite share and :math:`2/E`, so that the
    uniform share :math:`1/E` (marked on the colour bar) sits at most half-way up; NaN cells are grey.
    """
    mats = [load_matrices(run) for run in runs]
    n_layers = len({layer for m in mats for layer in m})
    layers = least_balanced(mats)
    if not layers:
        return None
    plt = _plt()
    experts = max(grid.shape[0] for m in mats for _, grid in m.values())
    finite = [grid[np.isfinite(grid)] for m in mats for _, grid in m.values()]
    top = max((float(v.max()) for v in finite if v.size), default=1.0)
    vmax = max(top, 2.0 / experts)
    n_steps = max(len(steps) for m in mats for steps, _ in m.values())
    width = max(5.0, min(9.0, 2.2 + 0.12 * n_steps))
    height = max(1.7, min(6.0, 0.9 + 0.16 * experts))
    fig, axes = plt.subplots(len(layers), len(runs), figsize=(width * len(runs), height * len(layers) + 0.4),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bdbdbd")
    image = None
    for r, layer in enumerate(layers):
        for c, (run, m) in enumerate(zip(runs, mats)):
            ax = axes[r, c]
            if layer not in m:
                ax.axis("off")
                ax.set_title(f"{run.label} · L{layer}: not logged", fontsize=8.5)
                continue
            steps, grid = m[layer]
            image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            n_e = grid.shape[0]
            every = max(1, n_e // 16)
            ax.set_yticks(range(0, n_e, every), [f"E{e}" for e in range(0, n_e, every)], fontsize=6.5)
            tick = max(1, len(steps) // 10)
            ax.set_xticks(range(0, len(steps), tick), [str(int(s)) for s in steps[::tick]], fontsize=7)
            ax.set_xlabel("step", fontsize=8)
            last = _last_finite_column(grid)
            if last is None:
                title = f"{run.label} · L{layer}: no finite load"
            else:
                j, column = last
                title = f"{run.label} · L{layer}: top expert {100 * np.nanmax(column):.0f} % at step {int(steps[j])}"
            ax.set_title(title, fontsize=8.5)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01, shrink=0.9, label="load share")
        bar.ax.axhline(1.0 / experts, color="white", lw=1.2)
        bar.ax.annotate(f"1/E = {1 / experts:.3g}", (1.0, 1.0 / experts), xycoords=("axes fraction", "data"),
                        xytext=(2, 0), textcoords="offset points", fontsize=6.5, va="center")
    file = _save(fig, out_dir, "router_load_over_time")
    side = f" ({runs[0].label} left, {runs[1].label} right)" if len(runs) > 1 else ""
    if len(layers) < n_layers:
        side += f"; the {len(layers)} least balanced of {n_layers} MoE layers (lowest final load entropy)"
    return Figure(
        file,
        "Expert load over time",
        f"Share of each MoE layer's routing assignments (rows: experts; columns: logging steps){side}; one colour "
        f"scale, 0 to {vmax:.3g}; the white line on the colour bar is the uniform share 1/E. A single bright row is a "
        "router that collapsed onto one expert; dark rows are experts that receive nothing; grey: not logged.",
    )


def _last_finite_column(grid: np.ndarray, complete: bool = False) -> tuple[int, np.ndarray] | None:
    """The last column of ``grid`` that holds a finite value (``complete``: only finite values), with its index."""
    finite = np.isfinite(grid)
    have = np.flatnonzero(finite.all(axis=0) if complete else finite.any(axis=0))
    return (int(have[-1]), grid[:, have[-1]]) if have.size else None


def _layer_keys(runs: list[RunData], stat: str) -> list[tuple[int, str]]:
    pattern = re.compile(rf"^entropy/router/L(\d+)/{re.escape(stat)}$")
    found = {int(m[1]): key for run in runs for key in run.scalars if (m := pattern.match(key))}
    return sorted(found.items())


def router_curves(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Normalised router entropy, normalised load entropy and the dead-expert share per layer over steps: one colour
    per layer, one line style per run (solid / dashed)."""
    panels = [(stat, title, scale, _layer_keys(runs, stat)) for stat, title, scale in ROUTER_CURVES]
    panels = [p for p in panels if p[3]]
    if not panels:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.3), squeeze=False, layout="constrained")
    layers = sorted({layer for *_, keys in panels for layer, _ in keys})
    cmap = plt.get_cmap("tab10")
    colour = {layer: cmap(i % 10) for i, layer in enumerate(layers)}
    for ax, (stat, title, scale, keys) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            for layer, key in keys:
                if key not in run.scalars:
                    continue
                steps, values = run.scalars[key]
                ax.plot(steps, scale * _finite(values), color=colour[layer], ls=RUN_STYLES[i % 2], lw=1.4,
                        marker="o" if len(steps) <= 30 else None, ms=2.5)
        _step_axis(ax, title)
        ax.set_ylim(-0.03 * scale, 1.03 * scale)
    handles = [Line2D([], [], color=colour[layer], lw=1.6, label=f"L{layer}") for layer in layers[:10]]
    handles += _run_handles(runs)
    axes[0, 0].legend(handles=handles, fontsize=6.5, loc="best", framealpha=0.7)
    file = _save(fig, out_dir, "router_curves")
    runs_note = _runs_note(runs)
    return Figure(
        file,
        "Router entropy, load entropy and dead experts",
        "Per MoE layer (one colour each): the mean per-token router entropy and the entropy of the expert-load "
        f"distribution, both divided by ln E (1 = uniform), and the share of experts the monitor counts as dead{runs_note}.",
    )


def router_findings(run: RunData) -> list[str]:
    """Plain sentences: per layer, where the load went at the last step, and its dead experts.

    At most :data:`MAX_LAYERS_SHOWN` layers are named: the least balanced. A layer is *concentrated* when the fewest experts that together carry :data:`CONCENTRATED_SHARE` (90 %) of the
    load are at most half of its experts: "layer L0 routes 92 % of tokens to 1 of 8 experts at the end (step S)".
    Otherwise: "layer L1 needs 6 of 8 experts for 90 % of its tokens at the end (step S)", with the largest share
    beside the uniform one. "The end" is the last step at which every expert's
    share is finite (a partial column would misstate where the load went). Load shares count routing assignments (with top-k
    routing each token makes k of them). The dead-expert share is the one logged at that same step (omitted when it
    is missing or non-finite there)."""
    out: list[str] = []
    mats = load_matrices(run)
    for layer in least_balanced([mats]):
        steps, grid = mats[layer]
        last = _last_finite_column(grid, complete=True)
        if last is None:
            out.append(f"layer L{layer}: no step logged a finite load for every expert.")
            continue
        j, column = last
        shares = np.sort(column)[::-1]
        n_experts = grid.shape[0]
        total = float(shares.sum())
        cum = np.cumsum(shares) / total if total > 0 else np.zeros_like(shares)
        m = int(np.searchsorted(cum, CONCENTRATED_SHARE - 1e-12)) + 1
        step = int(steps[j])
        if total > 0 and m <= n_experts / 2:
            line = (f"layer L{layer} routes {100 * cum[m - 1]:.0f} % of tokens to {m} of {n_experts} experts at the "
                    f"end (step {step})")
        else:
            line = (f"layer L{layer} needs {m} of {n_experts} experts for {round(100 * CONCENTRATED_SHARE)} % of its "
                    f"tokens at the end (step {step}): largest share {100 * shares[0]:.0f} %, uniform {100 / n_experts:.0f} %")
        dead = run.scalars.get(f"entropy/router/L{layer}/dead_frac")
        at = np.flatnonzero(dead[0] == step) if dead is not None else []
        if len(at) and np.isfinite(dead[1][at[0]]):  # the same step as the loads: never an older value
            frac = float(dead[1][at[0]])
            if frac > 0:
                line += f"; {round(frac * n_experts)} of {n_experts} experts dead ({100 * frac:.0f} %)"
        out.append(line + ".")
    if len(mats) > MAX_LAYERS_SHOWN:
        out.append(f"the other {len(mats) - MAX_LAYERS_SHOWN} MoE layers are more balanced (see the tables).")
    return ["MoE routing: " + line for line in out]
