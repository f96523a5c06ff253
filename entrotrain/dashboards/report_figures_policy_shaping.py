r"""Token-shaping statistics in the policy section of ``entrotrain report``: ``PolicyEntropyMonitor``'s phase, window
(HWE) and entropy–length keys.

Keys read (all optional; a figure whose keys no run logged is not drawn):

- ``entropy/policy/phase{k}/mean`` and ``.../phase{k}/length``: token-mean entropy of phase ``k`` (nats) and its mean
  tokens per response (PEAR, "Phase Entropy Aware Reward"). Phase names: with exactly phases 0 and 1 (PEAR's
  convention, :class:`~entrotrain.regularizers.token_shaping.PEARShaping`: 0 = thinking / scratch, before the first
  delimiter; 1 = answer) they are called "thinking" and "answer"; otherwise "phase k";
- ``entropy/policy/window_mean|window_p50|window_p90``: window entropy (ARES / AEPO: token entropies averaged over a
  sliding window of valid tokens), drawn beside the token-level ``entropy/policy/mean``;
- ``entropy/policy/hwe_frac``: the share of positions whose window entropy reaches the monitor's ``hwe_threshold``
  (high-window-entropy, "HWE" tokens);
- ``entropy/policy/entropy_length_corr``: Pearson correlation over responses of response entropy and length.

Non-finite values are gaps in curves and never enter a limit or a finding (findings use the first and last finite
value of a key). Two runs: one colour per phase / statistic, first run solid, second dashed.
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
from entrotrain.dashboards.report_figures_prediction import finite_first_last
from entrotrain.dashboards.report_template import fmt
from entrotrain.dashboards.run_reader import RunData

__all__ = [
    "PREFIX",
    "phase_curves",
    "phase_ids",
    "phase_name",
    "shaping_comparison",
    "shaping_drawn",
    "shaping_findings",
    "window_curves",
]

PREFIX = "entropy/policy"
_PHASE = re.compile(rf"^{re.escape(PREFIX)}/phase(\d+)/(mean|length)$")
_WINDOW = ("window_mean", "window_p50", "window_p90")
_SHAPING = set(_WINDOW) | {"hwe_frac", "entropy_length_corr"}


def phase_ids(runs: list[RunData]) -> list[int]:
    """The phase ids any run logged a ``phase{k}/mean`` or ``phase{k}/length`` for, sorted."""
    return sorted({int(m[1]) for r in runs for k in r.scalars if (m := _PHASE.match(k))})


def phase_name(k: int, ids: list[int]) -> str:
    """``"thinking"`` / ``"answer"`` for PEAR's two phases (ids exactly 0 and 1), else ``"phase k"``."""
    if ids == [0, 1]:
        return ("thinking (phase 0)", "answer (phase 1)")[k]
    return f"phase {k}"


def shaping_drawn(key: str) -> bool:
    """Whether ``key`` is drawn by this module's figures (the policy section's generic grid leaves it out)."""
    return bool(_PHASE.match(key)) or (key.startswith(PREFIX + "/") and key[len(PREFIX) + 1 :] in _SHAPING)


def phase_curves(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Per-phase token-mean entropy (left) and per-phase mean length in tokens (right) over steps: one colour per
    phase, one line style per run."""
    ids = phase_ids(runs)
    if not ids:
        return None
    stats = [s for s in ("mean", "length") if any(f"{PREFIX}/phase{k}/{s}" in r.scalars for r in runs for k in ids)]
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(stats), figsize=(5.0 * len(stats), 3.4), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab10")
    colour = {k: cmap(j % 10) for j, k in enumerate(ids)}
    for ax, stat in zip(axes.flat, stats):
        handles = []
        for k in ids:
            key = f"{PREFIX}/phase{k}/{stat}"
            drawn = False
            for i, run in enumerate(runs):
                if key in run.scalars:
                    steps, values = run.scalars[key]
                    ax.plot(steps, _finite(values), color=colour[k], ls=RUN_STYLES[i % 2], lw=1.5,
                            marker="o" if len(steps) <= 30 else None, ms=2.5)
                    drawn = True
            if drawn:
                handles.append(Line2D([], [], color=colour[k], lw=1.6, label=phase_name(k, ids)))
        handles += _run_handles(runs)
        _step_axis(ax, "entropy per phase (token mean, nats)" if stat == "mean"
                   else "phase length (mean tokens per response)")
        ax.legend(handles=handles, fontsize=6.5, loc="best", framealpha=0.7)
    file = _save(fig, out_dir, "policy_phases")
    runs_note = _runs_note(runs)
    return Figure(
        file,
        "Policy entropy and length per phase",
        "Token-mean entropy of each response phase (phase_ids; PEAR: 0 = thinking before the delimiter, 1 = answer) "
        f"and its mean length in tokens per response{runs_note}. PEAR penalises the thinking-phase entropy, which "
        "should shorten the thinking phase at equal reward; a phase absent from a batch leaves a gap.",
    )


def window_curves(runs: list[RunData], out_dir: Path) -> Figure | None:
    """Window entropy (mean, p50, p90) beside the token-level mean, the HWE-token share and the entropy–length
    correlation over steps; one panel for each that some run logged."""
    def has(stat: str) -> bool:
        return any(f"{PREFIX}/{stat}" in r.scalars for r in runs)

    panels = [p for p, ok in (("window", any(has(s) for s in _WINDOW)), ("hwe_frac", has("hwe_frac")),
                              ("entropy_length_corr", has("entropy_length_corr"))) if ok]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.3), squeeze=False, layout="constrained")
    colours = {"mean": "black", "window_mean": "#1f77b4", "window_p50": "#2ca02c", "window_p90": "#d62728",
               "hwe_frac": "#9467bd", "entropy_length_corr": "#8c564b"}
    for ax, panel in zip(axes.flat, panels):
        stats = ["mean", *_WINDOW] if panel == "window" else [panel]
        scale = 100.0 if panel == "hwe_frac" else 1.0
        for i, run in enumerate(runs):
            for stat in stats:
                key = f"{PREFIX}/{stat}"
                if key not in run.scalars:
                    continue
                steps, values = run.scalars[key]
                label = ("token mean" if stat == "mean" else stat.replace("_", " ")) if panel == "window" else None
                if len(runs) > 1:
                    label = f"{run.label} {label}" if label else run.label
                ax.plot(steps, scale * _finite(values), color=colours[stat], ls=RUN_STYLES[i % 2],
                        lw=1.0 if stat == "mean" else 1.5, alpha=0.6 if stat == "mean" else 1.0, label=label,
                        marker="o" if len(steps) <= 30 else None, ms=2.0)
        if panel == "hwe_frac":
            ax.set_ylim(-3, 103)
        if panel == "entropy_length_corr":
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        _step_axis(ax, {"window": "window entropy (nats) vs token mean", "hwe_frac": "HWE tokens (% of positions)",
                        "entropy_length_corr": "corr(response entropy, length)"}[panel])
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=6.5, loc="best", framealpha=0.7)
    file = _save(fig, out_dir, "policy_window_entropy")
    runs_note = _runs_note(runs)
    return Figure(
        file,
        "Window entropy, HWE tokens and entropy–length correlation",
        "Window entropy (ARES / AEPO: the mean token entropy over a sliding window of valid tokens that never crosses "
        "a sequence or padding) with its median and 90th percentile, beside the token-level mean; the share of "
        "high-window-entropy (HWE) positions, at or above the monitor's hwe_threshold; and the Pearson correlation "
        f"over responses of mean response entropy and response length (PEAR's observation: positive){runs_note}.",
    )


def shaping_findings(run: RunData) -> list[str]:
    """Plain sentences: per-phase entropy at the end and each phase's length first → last; the HWE share and window
    entropy first → last; the entropy–length correlation at the end."""
    out: list[str] = []
    ids = phase_ids([run])
    ends = []
    for k in ids:
        fl = finite_first_last(run, f"{PREFIX}/phase{k}/mean")
        if fl:
            ends.append((k, fl))
    if ends:
        same = len({fl[2] for _, fl in ends}) == 1
        at = f" (step {ends[0][1][2]})" if same else ""
        out.append(
            f"entropy at the end{at}: "
            + " vs ".join(f"{phase_name(k, ids)} {fmt(fl[3])} nats" + ("" if same else f" (step {fl[2]})") for k, fl in ends)
            + "; at the start: " + ", ".join(f"{fmt(fl[1])}" for _, fl in ends) + " nats."
        )
    lengths = [f"{phase_name(k, ids)} length {fmt(fl[1])} → {fmt(fl[3])} tokens"
               for k in ids if (fl := finite_first_last(run, f"{PREFIX}/phase{k}/length"))]
    if lengths:
        out.append("; ".join(lengths) + ".")
    hwe = finite_first_last(run, f"{PREFIX}/hwe_frac")
    window = finite_first_last(run, f"{PREFIX}/window_mean")
    parts = []
    if window:
        parts.append(f"window entropy {fmt(window[1])} → {fmt(window[3])} nats")
    if hwe:
        parts.append(f"HWE tokens {100 * hwe[1]:.0f} % → {100 * hwe[3]:.0f} %")
    if parts:
        out.append(", ".join(parts) + ".")
    corr = run.scalars.get(f"{PREFIX}/entropy_length_corr")
    if corr is not None:
        ok = np.isfinite(corr[1])
        if ok.any():
            values = corr[1][ok]
            out.append(f"entropy–length correlation {fmt(float(values[-1]), 2)} at step {int(corr[0][ok][-1])} "
                       f"(mean {fmt(float(values.mean()), 2)} over {int(ok.sum())} logging steps).")
    return ["Policy shaping: " + line for line in out]


def shaping_comparison(runs: list[RunData]) -> list[str]:
    """Two runs: where each phase's entropy and length, and the HWE share, ended in each (last finite values), for the
    keys both logged (PEAR against its baseline: a shorter thinking phase at the end)."""
    a, b = runs
    ids = [k for k in phase_ids([a]) if k in phase_ids([b])]
    out = []
    for stat, unit in (("length", " tokens"), ("mean", " nats")):
        for k in ids:
            fa, fb = (finite_first_last(r, f"{PREFIX}/phase{k}/{stat}") for r in runs)
            if fa and fb:
                what = f"{phase_name(k, ids)} {'length' if stat == 'length' else 'entropy'}"
                out.append(f"At the end, the {what} is {fmt(fa[3])}{unit} in {a.label} and {fmt(fb[3])}{unit} in {b.label}.")
    fa, fb = (finite_first_last(r, f"{PREFIX}/hwe_frac") for r in runs)
    if fa and fb:
        out.append(f"At the end, HWE tokens are {100 * fa[3]:.0f} % in {a.label} and {100 * fb[3]:.0f} % in {b.label}.")
    return out
