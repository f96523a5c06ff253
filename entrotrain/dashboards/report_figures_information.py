r"""The information-plane section of ``entrotrain report``: figures, table and findings from
``InformationPlaneMonitor``'s keys ``info/{layer}/{estimator}/I_XT`` and ``.../I_TY`` (Shwartz-Ziv & Tishby 2017).

One panel per estimator (the picture depends on it: Saxe et al. 2018; Chelombiev et al. 2019), one trajectory per
layer from (I(X;T), I(T;Y)) at each logged step, points coloured by training step. Units come from the logged
hyperparameter ``info/{estimator}/params`` (``base``: 2 → bits, e or absent → nats, as the estimators' default).

**Compression** (a finding, per layer and estimator): I(X;T)'s last finite value is below its peak by more than
:data:`COMPRESSION_MARGIN` (5 %) of the peak's magnitude. Otherwise the layer *kept rising* (last above first by more
than that margin) or stayed *flat*. Non-finite points are skipped everywhere.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entrotrain.dashboards.report_figures import Figure, _plt, _save
from entrotrain.dashboards.report_template import fmt
from entrotrain.dashboards.run_reader import RunData, natural_order

__all__ = [
    "COMPRESSION_MARGIN",
    "Trajectory",
    "compressing_layers",
    "XTPhase",
    "information_findings",
    "information_plane",
    "information_rows",
    "step_norm",
    "trajectories",
    "unit_of",
    "xt_phase",
]

_INFO = re.compile(r"^info/(?P<layer>.+)/(?P<estimator>[^/]+)/I_(?P<which>XT|TY)$")
#: Relative drop of I(X;T) below its peak (as a share of |peak|) that counts as compression.
COMPRESSION_MARGIN = 0.05
_ORDER = ("binning", "adaptive_binning", "kde", "ksg", "pca_ksg")


@dataclass
class Trajectory:
    """One layer under one estimator: ``steps`` with finite ``i_xt`` and ``i_ty`` (points where either is
    non-finite or missing are dropped)."""

    layer: str
    estimator: str
    steps: np.ndarray
    i_xt: np.ndarray
    i_ty: np.ndarray


def _keys(run: RunData) -> dict[tuple[str, str], dict[str, str]]:
    found: dict[tuple[str, str], dict[str, str]] = {}
    for key in run.scalars:
        m = _INFO.match(key)
        if m:
            found.setdefault((m["estimator"], m["layer"]), {})[m["which"]] = key
    return found


def _estimator_order(name: str) -> tuple[int, str]:
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def trajectories(run: RunData) -> dict[str, list[Trajectory]]:
    """estimator → the layers' trajectories (natural layer order), estimators in the order binning, adaptive
    binning, KDE, KSG, PCA-KSG, then any other name."""
    out: dict[str, list[Trajectory]] = {}
    for (estimator, layer), pair in sorted(_keys(run).items(), key=lambda t: (_estimator_order(t[0][0]), natural_order(t[0][1]))):
        if "XT" not in pair or "TY" not in pair:
            continue
        (sx, vx), (sy, vy) = run.scalars[pair["XT"]], run.scalars[pair["TY"]]
        steps, ix, iy = np.intersect1d(sx, sy, return_indices=True)
        x, y = vx[ix], vy[iy]
        keep = np.isfinite(x) & np.isfinite(y)
        out.setdefault(estimator, []).append(Trajectory(layer, estimator, steps[keep], x[keep], y[keep]))
    return out


def unit_of(runs: list[RunData], estimator: str) -> str:
    """``"bits"`` or ``"nats"`` from the logged ``info/{estimator}/params`` (its ``base``; else ``info/probe``'s) of
    the first run that logged a base, ``"log base b"`` for another base; ``"nats"`` when none did."""
    for run in runs:
        params = run.hparams.get(f"info/{estimator}/params")
        base = params.get("base") if isinstance(params, dict) else None
        probe = run.hparams.get("info/probe")
        if base is None and isinstance(probe, dict):
            base = probe.get("base")
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            if math.isclose(base, 2.0):
                return "bits"
            return "nats" if math.isclose(base, math.e) else f"log base {base:g}"
    return "nats"


def _params_text(runs: list[RunData], estimator: str) -> str:
    for run in runs:
        params = run.hparams.get(f"info/{estimator}/params")
        if isinstance(params, dict) and params:
            text = ", ".join(f"{k}={_short(v)}" for k, v in params.items() if k not in ("base", "estimator"))
            return "\n".join(textwrap.wrap(text, 48))
    return ""


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def step_norm(steps: np.ndarray) -> tuple[Any, bool]:
    """The colour normalisation of training steps, and whether it is stretched: a power scale (``gamma`` 0.4, giving
    early steps more of the colour range) when the evaluations thin out over training (the median gap of the last
    third of the distinct steps is more than twice that of the first third, e.g. IDNNs' log-spaced epochs), else
    linear."""
    from matplotlib.colors import Normalize, PowerNorm

    distinct = np.unique(steps)
    lo, hi = float(distinct[0]), float(max(distinct[-1], distinct[0] + 1))
    gaps = np.diff(distinct)
    third = len(gaps) // 3
    if third >= 1 and np.median(gaps[-third:]) > 2 * np.median(gaps[:third]):
        return PowerNorm(gamma=0.4, vmin=lo, vmax=hi), True
    return Normalize(lo, hi), False


def information_plane(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Rows = runs (side by side for two), columns = estimators; in each panel one trajectory per layer in the
    (I(X;T), I(T;Y)) plane, points coloured by training step (one colour bar for all panels), the first point a
    hollow circle and the last a square labelled with the layer. Axes are shared within an estimator's column."""
    per_run = [trajectories(run) for run in runs]
    estimators = sorted({e for t in per_run for e, layers in t.items() if any(len(tr.steps) for tr in layers)},
                        key=_estimator_order)
    if not estimators:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    all_steps = np.concatenate([tr.steps for t in per_run for layers in t.values() for tr in layers])
    norm, stretched = step_norm(all_steps)
    fig, axes = plt.subplots(len(runs), len(estimators), figsize=(4.3 * len(estimators), 3.7 * len(runs) + 0.3),
                             squeeze=False, sharex="col", sharey="col", layout="constrained")
    layer_names = sorted({tr.layer for t in per_run for layers in t.values() for tr in layers}, key=natural_order)
    palette = plt.get_cmap("tab10")
    colour = {name: palette(i % 10) for i, name in enumerate(layer_names)}
    points = None
    for r, (run, traj) in enumerate(zip(runs, per_run)):
        for c, estimator in enumerate(estimators):
            ax = axes[r, c]
            unit = unit_of([run], estimator)  # each run's own base: two runs may log in different units
            for tr in traj.get(estimator, []):
                if not len(tr.steps):
                    continue
                ax.plot(tr.i_xt, tr.i_ty, color=colour[tr.layer], lw=1.0, alpha=0.6, zorder=1)
                points = ax.scatter(tr.i_xt, tr.i_ty, c=tr.steps, cmap="viridis", norm=norm, s=12, zorder=2,
                                    edgecolors="none")
                ax.scatter(tr.i_xt[:1], tr.i_ty[:1], s=46, facecolors="none", edgecolors=colour[tr.layer], lw=1.3, zorder=3)
                ax.scatter(tr.i_xt[-1:], tr.i_ty[-1:], s=40, marker="s", color=colour[tr.layer], edgecolors="black",
                           lw=0.8, zorder=4)
                ax.annotate(tr.layer, (tr.i_xt[-1], tr.i_ty[-1]), xytext=(4, 3), textcoords="offset points", fontsize=6.5,
                            color=colour[tr.layer])
            params = _params_text([run], estimator)  # each run's own parameters (the ReLU recipe's grid differs)
            ax.set_title(f"{run.label} · {estimator}" + (f"\n({params})" if params else ""), fontsize=8.5)
            ax.set_xlabel(f"I(X;T) ({unit})", fontsize=8)
            ax.set_ylabel(f"I(T;Y) ({unit})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if points is not None:
        fig.colorbar(points, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01, shrink=0.9, label="training step" + (" (power scale)" if stretched else ""))
    handles = [Line2D([], [], color=colour[n], lw=1.4, label=n) for n in layer_names[:10]]
    handles += [Line2D([], [], ls="none", marker="o", mfc="none", mec="black", label="first"),
                Line2D([], [], ls="none", marker="s", color="black", label="last")]
    axes[0, 0].legend(handles=handles, fontsize=6, loc="best", framealpha=0.7)
    file = _save(fig, out_dir, "information_plane")
    side = f"; rows: {runs[0].label} (top), {runs[1].label} (bottom)" if len(runs) > 1 else ""
    return Figure(
        file,
        "Information plane",
        "I(X;T) against I(T;Y) for every layer (one colour and label each) under each estimator (one column each, "
        f"with its parameters){side}; points coloured by training step (power scale when the evaluations thin out), hollow circle = first, square = last. A "
        "trajectory that turns left after moving right is a layer compressing.",
    )


@dataclass
class XTPhase:
    """What I(X;T) of one layer did: ``verdict`` (``"compression"``, ``"rising"``, ``"flat"`` or ``"too few
    points"``), its ``first``, ``peak`` (at ``peak_step``) and ``last`` finite values."""

    verdict: str
    first: float
    peak: float
    peak_step: int
    last: float


def xt_phase(steps: np.ndarray, values: np.ndarray, margin: float = COMPRESSION_MARGIN) -> XTPhase:
    """Classify an I(X;T) curve (non-finite points skipped): ``compression`` when ``peak − last > margin·|peak|``,
    ``rising`` when ``last − first > margin·|peak|``, else ``flat``; fewer than two points: ``too few points``."""
    keep = np.isfinite(values)
    steps, values = np.asarray(steps)[keep], np.asarray(values, dtype=float)[keep]
    if len(values) < 2:
        v = float(values[0]) if len(values) else float("nan")
        s = int(steps[0]) if len(steps) else -1
        return XTPhase("too few points", v, v, s, v)
    i = int(np.argmax(values))
    first, peak, last = float(values[0]), float(values[i]), float(values[-1])
    tol = margin * abs(peak)
    if peak - last > tol:
        verdict = "compression"
    elif last - first > tol:
        verdict = "rising"
    else:
        verdict = "flat"
    return XTPhase(verdict, first, peak, int(steps[i]), last)


def _xt_series(run: RunData) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(estimator, layer, steps, I_XT) of every logged I_XT key, in estimator then natural layer order."""
    rows = [(e, layer, pair["XT"]) for (e, layer), pair in _keys(run).items() if "XT" in pair]
    rows.sort(key=lambda t: (_estimator_order(t[0]), natural_order(t[1])))
    return [(e, layer, *run.scalars[key]) for e, layer, key in rows]


def information_rows(runs: list[RunData]) -> list[list[str]]:
    """Table rows: run, estimator, unit, layer, I(X;T) first / peak (step) / last, last I(T;Y), verdict (finite values
    only; ``–`` where a layer has none)."""
    def show(v: float) -> str:
        return fmt(v) if math.isfinite(v) else "–"

    rows = []
    for run in runs:
        for estimator, layer, steps, values in _xt_series(run):
            phase = xt_phase(steps, values)
            ty = run.scalars.get(f"info/{layer}/{estimator}/I_TY")
            ty_last = ty[1][np.isfinite(ty[1])][-1:] if ty is not None else []
            peak = f"{fmt(phase.peak)} (step {phase.peak_step})" if math.isfinite(phase.peak) else "–"
            rows.append([run.label, estimator, unit_of([run], estimator), layer, show(phase.first), peak, show(phase.last),
                         show(float(ty_last[0])) if len(ty_last) else "–", phase.verdict])
    return rows


def information_findings(run: RunData) -> list[str]:
    """One sentence per estimator: which layers compressed (I(X;T) ended more than 5 % below its peak), which kept
    rising, which stayed flat."""
    by_estimator: dict[str, dict[str, list[str]]] = {}
    for estimator, layer, steps, values in _xt_series(run):
        by_estimator.setdefault(estimator, {}).setdefault(xt_phase(steps, values).verdict, []).append(layer)
    out = []
    words = (("compression", "compressed (ended > {m} % below its peak) in"), ("rising", "kept rising in"),
             ("flat", "stayed flat in"), ("too few points", "too few finite points in"))
    for estimator, verdicts in by_estimator.items():
        parts = [f"{text.format(m=round(100 * COMPRESSION_MARGIN))} {', '.join(verdicts[v])}" for v, text in words if v in verdicts]
        out.append(f"Information plane ({estimator}): I(X;T) " + "; ".join(parts) + ".")
    return out


def compressing_layers(run: RunData) -> dict[str, list[str]]:
    """estimator → the layers whose I(X;T) compressed (see :func:`xt_phase`), for every estimator logged."""
    out: dict[str, list[str]] = {}
    for estimator, layer, steps, values in _xt_series(run):
        layers = out.setdefault(estimator, [])
        if xt_phase(steps, values).verdict == "compression":
            layers.append(layer)
    return out
