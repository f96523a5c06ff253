"""``entrotrain report RUN_DIR [RUN_DIR2] [-o OUT]``: a self-contained HTML report of a run record.

Reads only the run record (:mod:`entrotrain.dashboards.run_record`), so it works for any logger and offline. Writes
``index.html`` (inline CSS, no scripts, no network) and its PNG figures into ``OUT`` (default ``RUN_DIR/report``, or
``RUN_DIR/compare-<name of RUN_DIR2>`` for two runs). Sections follow the metric key prefixes, so a new monitor's keys
appear without code changes; attention, policy (with its token-shaping statistics), prediction-entropy, representation,
routing and information-plane monitors also get dedicated figures. With two runs
(a failure and its cure) every figure overlays or sets them side by side.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from entrotrain.dashboards import report_figures as figs
from entrotrain.dashboards import report_figures_information as info_figs
from entrotrain.dashboards import report_figures_policy_shaping as shaping_figs
from entrotrain.dashboards import report_figures_prediction as pred_figs
from entrotrain.dashboards import report_figures_routing as router_figs
from entrotrain.dashboards.remedies import diagnose
from entrotrain.dashboards.report_template import details, esc, fmt, page, table
from entrotrain.dashboards.run_reader import RunData, load_run
from entrotrain.errors import EntrotrainError

__all__ = [
    "HEADLINES", "Section", "build_report", "findings", "headline_keys", "report_main", "sections_of", "value_format",
    "write_report",
]

#: Headline figures shown as cards at the top (when logged): key → label.
HEADLINES: dict[str, str] = {
    "entropy/attn_norm/min": "least head entropy (normalised)",
    "entropy/attn_norm/mean": "mean head entropy (normalised)",
    "entropy/attn/collapse_frac": "share of heads collapsed",
    "entropy/policy/mean": "policy entropy (nats)",
    "entropy/policy/reward_mean": "reward",
    "entropy/policy/fit_ceiling": "fitted reward ceiling b − a",
    "entropy/pred/probe/mean": "held-out prediction entropy (nats)",
    "entropy/pred/gen/distinct_2": "greedy distinct-2",
    "entropy/router/load_entropy_norm_min": "least expert-load entropy (normalised)",
    "entropy/router/dead_frac_max": "largest share of dead experts",
    "sigma_reparam/qk_norm/max": "max ‖W_Qᵀ W_K‖₂",
    "grpo/reward": "reward (task)",
    "val/loss": "validation loss",
    "val/acc": "validation accuracy",
    "train/loss": "training loss",
    "reward": "reward (transformers / TRL)",
    "eval_loss": "validation loss (transformers)",
    "loss": "training loss (transformers)",
}
#: Representation keys whose measure is one of these become headline cards too (first two found).
_REPR_HEADLINE_MEASURES = ("rankme", "effective_rank", "erank", "matrix_entropy", "vendi")

_KNOWN = (  # (prefix, section id, title), in report order
    (("entropy/attn/", "entropy/attn_norm/"), "attention", "Attention entropy"),
    (("entropy/policy/",), "policy", "Policy entropy"),
    (("entropy/pred/",), "prediction", "Prediction entropy"),
    (("entropy/repr/",), "repr", "Representation entropy"),
    (("entropy/router/",), "router", "MoE routing"),
    (("info/",), "information", "Information plane"),
    (("sigma_reparam/",), "sigma_reparam", "σReparam"),
)
_TASK = ("train/", "val/", "test/", "reg/")  # regulariser terms are drawn with the training loss
#: What ``transformers.Trainer`` / TRL log (run records written by ``EntropyTrainerCallback(record=...)``): task too.
_HF_TASK = ("loss", "grad_norm", "learning_rate", "reward", "reward_std")


def _is_share(key: str) -> bool:
    """Whether ``key`` is a fraction shown in percent (``…_frac``, ``…_frac_max``)."""
    name = key.rsplit("/", 1)[-1]
    return name.endswith("_frac") or "_frac_" in name


def value_format(key: str) -> Callable[[float], str]:
    """The formatter of ``key``'s values on cards, in sentences and in ``entrotrain status`` (shares in percent;
    ``None`` and non-finite values as :func:`fmt` shows them)."""
    if not _is_share(key):
        return fmt
    return lambda v: f"{100 * v:.0f} %" if v is not None and math.isfinite(v) else fmt(v)


@dataclass
class Section:
    """Keys of one monitor (or of the task), in report order."""

    id: str
    title: str
    keys: list[str] = field(default_factory=list)


def _section_id(key: str) -> tuple[int, str, str]:
    for order, (prefixes, sid, title) in enumerate(_KNOWN):
        if key.startswith(prefixes):
            return order, sid, title
    parts = key.split("/")
    if key.startswith("entropy/") and len(parts) > 2:
        return 10, f"entropy/{parts[1]}", f"Entropy: {parts[1]}"
    if key.startswith(_TASK) or key in _HF_TASK or key.startswith("eval_"):
        return 20, "task", "Task metrics (train / val)"
    if key.startswith("lr-"):
        return 40, "lr", "Learning rate"
    return 30, parts[0], f"{parts[0]}/ metrics" if len(parts) > 1 else "Other metrics"


def sections_of(keys: list[str]) -> list[Section]:
    """Group metric keys into report sections by prefix (known monitors first, then the task, then the rest)."""
    found: dict[str, tuple[int, Section]] = {}
    for key in sorted(keys):
        order, sid, title = _section_id(key)
        found.setdefault(sid, (order, Section(sid, title)))[1].keys.append(key)
    return [s for _, s in sorted(found.values(), key=lambda t: (t[0], t[1].id))]


# ---------------------------------------------------------------------- findings (plain sentences)
def _attention_findings(run: RunData) -> list[str]:
    out: list[str] = []
    first_last = run.first_last("entropy/attn_norm/min")
    threshold = figs.collapse_threshold([run])
    mat = figs.heads_matrix(run, "entropy/attn_norm")
    if mat is not None:
        labels, steps, grid = mat
        last = grid[:, -1]
        n = int(np.isfinite(last).sum())
        collapsed = [labels[i] for i in np.flatnonzero(np.nan_to_num(last, nan=1.0) < threshold)]
        ever = np.nan_to_num(grid, nan=1.0) < threshold
        first_step = int(steps[np.flatnonzero(ever.any(axis=0))[0]]) if ever.any() else None
        if collapsed:
            out.append(
                f"{len(collapsed)} of {n} attention heads are collapsed (normalised entropy < {threshold:g}) at step "
                f"{int(steps[-1])}: {', '.join(collapsed[:12])}{' …' if len(collapsed) > 12 else ''}; the first head "
                f"collapsed by step {first_step}."
            )
        else:
            out.append(f"No attention head is below the collapse threshold {threshold:g} at step {int(steps[-1])} ({n} heads).")
        recovered = [i for i in np.flatnonzero(ever.any(axis=1)) if labels[i] not in collapsed]
        if recovered:  # a collapse that lasted a few logging steps of a long run: say it, the maps are small
            listed = ", ".join(f"{labels[i]} ({int(ever[i].sum())} logged step(s), first at step "
                               f"{int(steps[ever[i].argmax()])})" for i in recovered[:6])
            out.append(f"{len(recovered)} head(s) fell below {threshold:g} during the run and recovered: {listed}"
                       f"{' …' if len(recovered) > 6 else ''}.")
    if first_last:
        out.append(f"Least head entropy (normalised) went from {fmt(first_last[0])} to {fmt(first_last[1])}.")
    mean = run.first_last("entropy/attn_norm/mean")
    if mean:
        out.append(f"Mean head entropy (normalised) went from {fmt(mean[0])} to {fmt(mean[1])}.")
    return out


def _policy_findings(run: RunData) -> list[str]:
    out: list[str] = []
    h = run.first_last("entropy/policy/mean")
    if h:
        change = (h[1] - h[0]) / h[0] * 100 if h[0] else float("nan")
        out.append(f"Policy entropy went from {fmt(h[0])} to {fmt(h[1])} nats ({change:+.0f} %).")
    r = run.first_last("entropy/policy/reward_mean")
    if r:
        out.append(f"Reward went from {fmt(r[0])} to {fmt(r[1])}.")
    judged = figs.fit_verdict(run)
    if judged is not None:
        a, b, verdict = judged
        r2 = run.first_last("entropy/policy/fit_r2")
        fitted = f"Fitted R = −{fmt(a)}·exp(H) {'+' if b >= 0 else '−'} {fmt(abs(b))}" if a > 0 else None
        r2_text = f" (R² {fmt(r2[1], 3)})" if r2 else ""
        if fitted is None:
            out.append(f"The fit R = −a·exp(H) + b gives a = {fmt(a)} ≤ 0{r2_text}: the reward did not rise as "
                       "the entropy fell, so it predicts no ceiling.")
        elif verdict.shown:
            out.append(f"{fitted}{r2_text}: predicted reward ceiling when the entropy is spent b − a = {fmt(b - a)}.")
        else:
            out.append(f"{fitted}{r2_text}: its b − a = {fmt(b - a)} is not a predicted reward ceiling: "
                       + "; ".join(verdict.reasons) + ".")
    return out


#: What RepresentationEntropyMonitor publishes beside each measure: sample sizes, parameters, audits and counters. A
#: change in them (``n`` follows the padded batch shape) is not a finding about the representation.
_REPR_CONTEXT = ("/n", "/d", "/n_streamed", "/dse_sigma", "/dse_t", "/vendi_q", "/rankme_eps", "/median_dist",
                 "/nonfinite")


def _change_findings(run: RunData, keys: list[str], limit: int = 4) -> list[str]:
    """The ``limit`` keys that changed most (relative), as "key: first → last (×ratio)"."""
    scored = []
    for key in keys:
        fl = run.first_last(key)
        if fl is None or figs.is_per_head(key) or key.endswith("/alert"):
            continue
        a, b = fl
        ratio = b / a if a not in (0.0,) and math.isfinite(a) and math.isfinite(b) else float("nan")
        score = abs(math.log(abs(ratio))) if math.isfinite(ratio) and ratio != 0 else 0.0
        scored.append((score, key, a, b, ratio))
    scored.sort(reverse=True)
    return [
        f"{key}: {fmt(a)} → {fmt(b)}" + (f" (×{ratio:.2g})" if math.isfinite(ratio) else "")
        for _, key, a, b, ratio in scored[:limit]
    ]


def findings(run: RunData, sections: list[Section]) -> list[str]:
    """The report's "What happened" sentences for ``run`` (also printed by ``entrotrain status``)."""
    out: list[str] = []
    ids = {s.id: s for s in sections}
    if "attention" in ids:
        out += _attention_findings(run)
    if "policy" in ids:
        out += _policy_findings(run)
        out += shaping_figs.shaping_findings(run)
    if "prediction" in ids:
        out += pred_figs.prediction_findings(run)
    if "repr" in ids:
        measures = [k for k in ids["repr"].keys if not k.endswith(_REPR_CONTEXT)]
        out += ["Representation: " + line for line in _change_findings(run, measures)]
    if "router" in ids:
        out += router_figs.router_findings(run)
        for key in ("entropy/router/load_entropy_norm_min", "entropy/router/dead_frac_max"):
            fl = run.first_last(key)
            if fl:
                show = value_format(key)
                out.append(f"{HEADLINES[key].capitalize()} ({key}) went from {show(fl[0])} to {show(fl[1])}.")
    if "information" in ids:
        out += info_figs.information_findings(run)
    task = ids.get("task")
    if task:
        for key in ("val/loss", "val/acc", "train/loss", "eval_loss", "loss"):
            fl = run.first_last(key)
            if fl:
                out.append(f"{key}: {fmt(fl[0])} → {fmt(fl[1])}.")
                break
    fired = run.guard_firings
    if fired:
        e = fired[0]
        out.append(f"EntropyCollapseGuard fired {len(fired)} time(s); first at step {e.get('step')}: {e.get('message')}")
    return out


def _comparison(runs: list[RunData]) -> list[str]:
    """One sentence per monitor headline both runs logged: where each ended."""
    a, b = runs
    out = []
    for key in headline_keys(runs):
        if not key.startswith(("entropy/", "sigma_reparam/")):
            continue
        fa, fb = a.first_last(key), b.first_last(key)
        if fa and fb:
            show = value_format(key)
            out.append(f"At the end, {key} is {show(fa[1])} in {a.label} and {show(fb[1])} in {b.label}.")
    out += shaping_figs.shaping_comparison(runs)
    ca, cb = info_figs.compressing_layers(a), info_figs.compressing_layers(b)
    for estimator in [e for e in ca if e in cb]:
        out.append(
            f"Compression of I(X;T) ({estimator}): {', '.join(ca[estimator]) or 'no layer'} in {a.label}; "
            f"{', '.join(cb[estimator]) or 'no layer'} in {b.label}."
        )
    return out


# ---------------------------------------------------------------------- page parts
def _header(runs: list[RunData]) -> str:
    title = runs[0].label if len(runs) == 1 else f"{runs[0].label} vs {runs[1].label}"
    parts = [f"<h1>entrotrain report — {esc(title)}</h1>"]
    parts.append(f'<p class="sub">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} from {", ".join(esc(r.path) for r in runs)}</p>')
    for run in runs:
        for warning in run.warnings:
            parts.append(f'<div class="warn"><b>{esc(run.label)}:</b> {esc(warning)}</div>')
        for note in run.notes:  # e.g. what a resume from an older checkpoint superseded
            parts.append(f'<div class="desc"><b>{esc(run.label)}:</b> {esc(note)}</div>')
    rows = []
    for run in runs:
        meta = run.meta
        start, end = meta.get("start_time"), meta.get("end_time")
        duration = f"{(end - start) / 60:.1f} min" if isinstance(start, (int, float)) and isinstance(end, (int, float)) else "–"
        status = run.decided_status
        rows.append(
            [
                esc(run.label),
                esc(meta.get("recipe") or "–"),
                f'<span class="status-{esc(status.state)}">{esc(status.label)}</span>',
                esc(time.strftime("%Y-%m-%d %H:%M", time.localtime(start)) if isinstance(start, (int, float)) else "–"),
                esc(duration),
                esc(run.last_step if run.last_step is not None else "–"),
                esc(meta.get("entrotrain_version") or "–"),
            ]
        )
    parts.append(table(["run", "recipe", "status", "started", "duration", "last step", "entrotrain"], rows, raw=True))
    for run in runs:
        description = _description(run.meta.get("description"))
        if description:
            parts.append(f'<div class="desc"><b>{esc(run.label)}</b> — {esc(description)}</div>')
        if run.forked_from:
            parts.append(f'<div class="desc"><b>{esc(run.label)}</b> — {esc(run.forked_from)}</div>')
    return "".join(parts)


def _description(text: str | None) -> str:
    """A recipe's comment block without its how-to-run lines (the command is in the Configuration section)."""
    lines = []
    for line in (text or "").splitlines():
        if line.startswith(("WANDB_MODE", "OMP_NUM_THREADS", "entrotrain ", "Scale up")):
            break
        lines.append(line)
    return " ".join(lines).strip()


def headline_keys(runs: list[RunData]) -> list[str]:
    """Monitor headlines first (entropy, then σReparam), the representation keys that changed most, then the task."""
    present = {k for r in runs for k in r.scalars}
    if "entropy/policy/fit_ceiling" in present and not any(figs.shown_ceiling(r) for r in runs):
        present.discard("entropy/policy/fit_ceiling")  # not a prediction: "What happened" says why
    keys = [k for k in HEADLINES if k in present]
    monitors = [k for k in keys if k.startswith(("entropy/", "sigma_reparam/"))]
    repr_keys = [k for k in present if k.startswith("entropy/repr/") and k.rsplit("/", 1)[-1] in _REPR_HEADLINE_MEASURES]

    def change(key: str) -> float:
        fl = runs[0].first_last(key) or (runs[-1].first_last(key) or (1.0, 1.0))
        return abs(math.log(abs(fl[1] / fl[0]))) if fl[0] and fl[1] and math.isfinite(fl[1] / fl[0]) else 0.0

    repr_keys.sort(key=lambda k: (-change(k), k))
    return monitors + repr_keys[:2] + [k for k in keys if k not in monitors]


def _cards(runs: list[RunData]) -> str:
    cards = []
    for key in headline_keys(runs):
        label = HEADLINES.get(key, key.split("/", 2)[-1])
        values = []
        for run in runs:
            fl = run.first_last(key)
            if fl is None or (key == "entropy/policy/fit_ceiling" and not figs.shown_ceiling(run)):
                continue
            show = value_format(key)
            who = f'<div class="run">{esc(run.label)}</div>' if len(runs) > 1 else ""
            values.append(
                f'{who}<div class="value" data-key="{esc(key)}" data-run="{esc(run.label)}" data-first="{fl[0]!r}" '
                f'data-last="{fl[1]!r}">{show(fl[0])} → {show(fl[1])}</div>'
            )
        cards.append(f'<div class="card"><div class="label">{esc(label)}</div><div class="key">{esc(key)}</div>{"".join(values)}</div>')
    return f'<div class="cards" id="key-numbers">{"".join(cards)}</div>' if cards else ""


def _metrics_table(runs: list[RunData], keys: list[str]) -> str:
    header = ["metric"]
    for run in runs:
        prefix = f"{run.label} " if len(runs) > 1 else ""
        header += [f"{prefix}first", f"{prefix}last", f"{prefix}min", f"{prefix}max"]
    rows = []
    for key in keys:
        if figs.is_per_head(key):
            continue
        row = [key]
        for run in runs:
            series = run.scalars.get(key)
            if series is None or not len(series[1]):
                row += ["–"] * 4
                continue
            v = series[1]
            ok = v[np.isfinite(v)]  # min / max of the finite values (first / last show a NaN as logged)
            row += [fmt(float(v[0])), fmt(float(v[-1]))] + ([fmt(float(ok.min())), fmt(float(ok.max()))] if ok.size else ["–"] * 2)
        rows.append(row)
    return table(header, rows) if rows else ""


def _figure_html(figure: figs.Figure | None) -> str:
    if figure is None:
        return ""
    return (
        f'<figure><img src="{esc(figure.file)}" alt="{esc(figure.title)}" loading="eager">'
        f"<figcaption><b>{esc(figure.title)}.</b> {esc(figure.caption)}</figcaption></figure>"
    )


_SHOWN_IN_SUMMARY = {
    "entropy/attn_norm/min",
    "entropy/attn_norm/mean",
    "entropy/attn_norm/p05",
    "entropy/attn/collapse_frac",
    "entropy/attn/overload_frac",
}


def _section_html(runs: list[RunData], section: Section, out_dir: Path) -> str:
    parts = [f'<h2 id="{esc(section.id)}">{esc(section.title)}</h2>']
    rest = list(section.keys)
    name = "section_" + "".join(c if c.isalnum() else "_" for c in section.id)
    if section.id == "attention":
        parts.append(_figure_html(figs.attention_summary(runs, out_dir)))
        parts.append(_figure_html(figs.attention_heads_over_time(runs, out_dir)))
        parts.append(_figure_html(figs.attention_snapshots(runs, out_dir)))
        rest = [k for k in rest if k not in _SHOWN_IN_SUMMARY and not k.startswith("entropy/attn/L")]
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, "Attention: raw entropy (nats) and per-layer means")))
    elif section.id == "policy":
        parts.append(_figure_html(figs.policy_entropy_reward(runs, out_dir)))
        parts.append(_figure_html(shaping_figs.phase_curves(runs, out_dir)))
        parts.append(_figure_html(shaping_figs.window_curves(runs, out_dir)))
        rest = [k for k in rest if not shaping_figs.shaping_drawn(k)]
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, "Policy entropy monitor: all statistics")))
    elif section.id == "prediction":
        parts.append(_figure_html(pred_figs.prediction_curves(runs, out_dir)))
        parts.append(_figure_html(pred_figs.position_profile_over_time(runs, out_dir)))
        parts.append(_figure_html(pred_figs.generation_diversity(runs, out_dir)))
        rest = [k for k in rest if not pred_figs.prediction_keys_drawn(k)]
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, "Prediction entropy monitor: other statistics")))
    elif section.id == "router":
        parts.append(_figure_html(router_figs.router_load_over_time(runs, out_dir)))
        parts.append(_figure_html(router_figs.router_curves(runs, out_dir)))
        stats = "|".join(stat for stat, _, _ in router_figs.ROUTER_CURVES)
        drawn = re.compile(rf"^entropy/router/L\d+/(?:load/E\d+|{stats})$")
        rest = [k for k in rest if not drawn.match(k)]
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, "MoE routing: other statistics")))
    elif section.id == "information":
        parts.append(_figure_html(info_figs.information_plane(runs, out_dir)))
        parts.append(_information_table(runs))
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, "Information-plane estimates over training")))
    elif section.id == "task" and any(k.startswith("reg/") for k in rest):
        parts.append(_figure_html(figs.loss_and_regularizers(runs, out_dir)))
        rest = [k for k in rest if not k.startswith("reg/") and k != "train/loss"]
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, section.title)))
    elif section.id == "repr":
        parts.append(_figure_html(figs.spectra(runs, out_dir)))
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, "Representation entropy per layer and measure")))
    else:
        parts.append(_figure_html(figs.scalar_section(runs, rest, out_dir, name, section.title)))
    if section.id != "attention":  # attention's per-head keys have their own maps above
        per_head = figs.per_head_over_time(runs, rest, out_dir, name + "_per_head", f"{section.title}: per head")
        parts.append(_figure_html(per_head))
    parts.append(details(f"{section.title}: first / last / min / max of every key", _metrics_table(runs, section.keys)))
    return "".join(parts)


def _information_table(runs: list[RunData]) -> str:
    """Per run, estimator and layer: I(X;T) first / peak / last, the last I(T;Y), and the verdict; then the estimator
    parameters and layers the monitor logged."""
    rows = info_figs.information_rows(runs)
    if not rows:
        return ""
    margin = round(100 * info_figs.COMPRESSION_MARGIN)
    html = (
        f"<p>Compression: I(X;T) ends more than {margin} % below its peak; rising: it ends more than {margin} % (of the "
        "peak) above its first value; flat otherwise.</p>"
        + table(["run", "estimator", "unit", "layer", "I(X;T) first", "I(X;T) peak", "I(X;T) last", "I(T;Y) last", "verdict"], rows)
    )
    params = [
        f"<b>{esc(run.label)}</b> {esc(key)}: <code>{esc(value)}</code>"
        for run in runs
        for key, value in sorted(run.hparams.items())
        if key.startswith("info/")
    ]
    return html + ("<p>" + "<br>".join(params) + "</p>" if params else "")


def _with_code(text: str) -> str:
    """``text`` escaped, with each `backticked` span as ``<code>``."""
    parts = esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _remedies_html(runs: list[RunData]) -> str:
    """"What to try": each run's diagnosed failures with their evidence and cures
    (:func:`~entrotrain.dashboards.remedies.diagnose`)."""
    items = []
    for run in runs:
        who = f"<b>{esc(run.label)}</b>: " if len(runs) > 1 else ""
        for remedy in diagnose(run):
            cures = "".join(f"<li>{_with_code(cure)}</li>" for cure in remedy.cures)
            items.append(f"<li>{who}<b>{esc(remedy.failure)}</b>: {_with_code(remedy.evidence)}<ul>{cures}</ul></li>")
    return f'<h2 id="remedies">What to try</h2><ul class="findings">{"".join(items)}</ul>' if items else ""


def _events_html(runs: list[RunData]) -> str:
    rows = [[run.label, str(e.get("step")), str(e.get("level")), str(e.get("key")), str(e.get("message"))] for run in runs for e in run.events]
    if not rows:
        return ""
    return '<h2 id="events">Alerts and events</h2>' + table(["run", "step", "level", "key", "message"], rows)


def _config_html(runs: list[RunData]) -> str:
    parts = ['<h2 id="config">Configuration</h2>']
    for run in runs:
        if run.config_text:
            parts.append(details(f"{run.label}: config.yaml (as run)", f"<pre>{esc(run.config_text)}</pre>"))
        if run.hparams:
            import json

            parts.append(details(f"{run.label}: hyperparameters", f"<pre>{esc(json.dumps(run.hparams, indent=1))}</pre>"))
        argv = run.meta.get("argv")
        if argv:
            parts.append(f"<p><b>{esc(run.label)}</b> command: <code>{esc(' '.join(map(str, argv)))}</code></p>")
    return "".join(parts)


def build_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write the report of one run (or two, overlaid) and return the path of its ``index.html``.

    Raises:
        EntrotrainError: no run or more than two, a folder that is not a run record, a run without monitor output,
            or an output folder that cannot be written.
    """
    if not 1 <= len(run_dirs) <= 2:
        raise EntrotrainError(f"entrotrain report takes one run record folder, or two to compare; got {len(run_dirs)}.")
    return write_report([load_run(p) for p in run_dirs], out_dir)


def write_report(runs: list[RunData], out_dir: str | Path | None = None) -> Path:
    """:func:`build_report` for runs already loaded with :func:`~entrotrain.dashboards.run_reader.load_run`."""
    if not 1 <= len(runs) <= 2:
        raise EntrotrainError(f"entrotrain report takes one run record folder, or two to compare; got {len(runs)}.")
    if len(runs) == 2 and runs[0].label == runs[1].label:  # same recipe twice: tell them apart by folder
        runs[0].meta["name"], runs[1].meta["name"] = runs[0].path.name, runs[1].path.name
    if out_dir is None:
        out_dir = runs[0].path / ("report" if len(runs) == 1 else f"compare-{runs[1].path.name}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EntrotrainError(f"cannot create the report folder {out} ({err}); pass a writable folder with -o.") from err
    for stale in out.glob("*.png"):  # figures of an earlier report that this one may not redraw
        stale.unlink()
    keys = sorted({k for r in runs for k in r.scalars})
    sections = sections_of(keys)
    body = [_header(runs), _cards(runs)]
    items = []
    for run in runs:
        lines = findings(run, sections)
        if lines:
            who = f"<b>{esc(run.label)}</b>: " if len(runs) > 1 else ""
            items.append("".join(f"<li>{who}{esc(line)}</li>" for line in lines))
    if len(runs) == 2:
        items.insert(0, "".join(f"<li>{esc(line)}</li>" for line in _comparison(runs)))
    if items:
        body.append('<h2 id="findings">What happened</h2><ul class="findings">' + "".join(items) + "</ul>")
    body.append(_remedies_html(runs))
    nav = " ".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body.append(f"<nav>{nav} <a href=\"#config\">Configuration</a></nav>")
    body.append(_events_html(runs))
    for section in sections:
        body.append(_section_html(runs, section, out))
    body.append(figs_media_html(runs, out))
    body.append(_config_html(runs))
    title = "entrotrain report — " + (runs[0].label if len(runs) == 1 else f"{runs[0].label} vs {runs[1].label}")
    index = out / "index.html"
    index.write_text(page(title, "".join(body)), encoding="utf-8")
    return index


def figs_media_html(runs: list[RunData], out: Path) -> str:
    """Stored histograms and heatmaps not drawn in a section (other monitors' media)."""
    skip = ["entropy/attn_norm/heatmap"]
    if any(router_figs.load_matrices(run) for run in runs):  # drawn from the per-expert scalars in the router section
        skip.append("entropy/router/load_heatmap")
    html = _figure_html(figs.histogram_media(runs, out)) + _figure_html(figs.heatmap_media(runs, out, tuple(skip)))
    return f'<h2 id="media">Other media</h2>{html}' if html else ""


def report_main(argv: list[str]) -> Path | None:
    """``entrotrain report`` on the command line: prints the report's path; errors go to stderr with exit code 2."""
    parser = argparse.ArgumentParser(
        prog="entrotrain report",
        description="Write an HTML report (with PNG figures) of a run record; two runs are overlaid (failure vs cure).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run record folder(s), printed at the end of `entrotrain fit`")
    parser.add_argument("-o", "--out", default=None, help="output folder (default RUN_DIR/report or RUN_DIR/compare-<RUN_DIR2>)")
    args = parser.parse_args(argv)
    try:
        if not 1 <= len(args.runs) <= 2:
            raise EntrotrainError(f"entrotrain report takes one run record folder, or two to compare; got {len(args.runs)}.")
        runs = [load_run(p) for p in args.runs]
        for run in runs:  # say on the terminal what the page says in its banners
            who = f"{run.label}: " if len(runs) > 1 else ""
            for warning in run.warnings:
                print(f"entrotrain report: warning: {who}{warning}", file=sys.stderr)
        index = write_report(runs, args.out)
    except EntrotrainError as err:
        print(f"entrotrain report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"entrotrain: report written to {index}")
    return index
