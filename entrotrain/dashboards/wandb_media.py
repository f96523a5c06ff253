"""Turn reduced statistics into wandb media (a layer × head heatmap, a heads-over-time image, a histogram) and
declare the metrics' summaries (``min`` for entropies) to the wandb run.

wandb and pillow are imported lazily, only when a wandb logger is attached; the colormap is applied in torch so a
heatmap costs ~2 ms (a matplotlib figure costs ~140 ms).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from entrotrain._imports import _PIL_AVAILABLE, _WANDB_AVAILABLE

__all__ = [
    "MAX_TIME_COLUMNS",
    "STEP_METRIC",
    "colorize",
    "define_entropy_summaries",
    "expert_load_image",
    "expert_load_over_time_image",
    "heads_over_time_image",
    "heatmap_image",
    "histogram",
    "is_wandb_log",
    "load_vmax",
    "log_to",
    "setup_wandb_dashboard",
    "wandb_log",
    "wandb_loggers",
]

# viridis at 0, 1/4, 1/2, 3/4, 1; NaN cells are drawn mid-grey.
_VIRIDIS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
)
_MISSING = torch.tensor([128.0, 128.0, 128.0])


def colorize(values: Tensor, vmin: float = 0.0, vmax: float = 1.0, cell: int | None = None) -> np.ndarray:
    """``(rows, cols)`` values → ``(rows·cell, cols·cell, 3)`` uint8 RGB with the viridis colormap.

    ``cell`` (pixels per value) defaults to what makes the longer side about 512 px (8 to 48 px per cell).
    """
    x = values.detach().to(torch.float32).cpu()
    if cell is None:
        cell = max(8, min(48, 512 // max(x.shape)))
    missing = ~torch.isfinite(x)
    t = ((x - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1).nan_to_num(0.0) * (len(_VIRIDIS) - 1)
    lo = t.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (t - lo).unsqueeze(-1)
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    rgb[missing] = _MISSING
    rgb = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return rgb.round().to(torch.uint8).numpy()


def wandb_loggers(loggers: list[Logger]) -> list[Any]:
    """The :class:`~lightning.pytorch.loggers.WandbLogger` instances among ``loggers``."""
    if not _WANDB_AVAILABLE:
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


_warned_no_pil = False


def heatmap_image(values: Tensor, caption: str, vmin: float = 0.0, vmax: float = 1.0) -> Any | None:
    """A ``wandb.Image`` of ``values`` (rows = layers, columns = heads), or ``None`` without pillow (warned once)."""
    global _warned_no_pil
    if not _PIL_AVAILABLE:
        if not _warned_no_pil:
            rank_zero_warn("entrotrain: heatmap images need pillow: `pip install 'entrotrain[media]'`. Logging histograms only.")
            _warned_no_pil = True
        return None
    import wandb

    return wandb.Image(colorize(values, vmin, vmax), caption=caption)


def histogram(values: Tensor, bins: int = 20, range_: tuple[float, float] = (0.0, 1.0)) -> Any:
    """A pre-binned ``wandb.Histogram`` of the finite entries of ``values``."""
    import wandb

    x = values.detach().flatten().double().cpu().numpy()
    x = x[np.isfinite(x)]
    return wandb.Histogram(np_histogram=np.histogram(x, bins=bins, range=range_))


#: Entropy-like keys whose wandb summary is their minimum (and last value); everything else keeps wandb's default.
_SUMMARY_MIN = ("entropy/*",)
#: Keys under ``entropy/`` where high is bad: summarised by their maximum instead.
_SUMMARY_MAX = (
    "entropy/attn/collapse_frac",
    "entropy/attn/overload_frac",
    "entropy/attn/nonfinite",
    "entropy/policy/nonfinite",
    "entropy/router/dead_frac_max",
    "entropy/router/nonfinite",
    "entropy/pred/nonfinite",
    "entropy/pred/train/below_floor_frac",  # prediction-entropy collapse (hyperfitting): how many positions went
    "entropy/pred/probe/below_floor_frac",  # below the floor, how confident the top-1 became, how repetitive the
    "entropy/pred/train/top1_prob",  # greedy text was at worst
    "entropy/pred/probe/top1_prob",
    "entropy/pred/gen/repetition",
)


def setup_wandb_dashboard(loggers: list[Logger]) -> None:
    """Declare entrotrain's metrics to every attached wandb run (idempotent and cheap; call on rank zero).

    Entropy keys (``entropy/*``) get ``summary="min,last"`` so the run table shows how low each entropy went;
    collapse fractions and non-finite counts get ``"max,last"``; all of them are plotted against
    ``trainer/global_step`` like Lightning's own metrics.
    """
    for logger in wandb_loggers(loggers):
        define_entropy_summaries(logger.experiment, step_metric="trainer/global_step")


def define_entropy_summaries(run: Any, prefix: str = "", step_metric: str | None = None) -> None:
    """Declare entrotrain's summaries to a wandb ``run`` (rank zero): ``min,last`` for the entropy keys, ``max,last``
    for collapse fractions and non-finite counts, each key under ``prefix`` (``"train/"`` for ``transformers``'
    ``WandbCallback``); plotted against ``step_metric`` when given. A run without ``define_metric`` is left alone."""
    define = getattr(run, "define_metric", None)
    if not callable(define):
        return
    axis: dict[str, Any] = {}
    if step_metric is not None:
        define(step_metric)
        axis = {"step_metric": step_metric, "step_sync": True}
    for name in _SUMMARY_MIN:
        define(prefix + name, summary="min,last", **axis)
    for name in _SUMMARY_MAX:
        define(prefix + name, summary="max,last", **axis)


#: The x-axis entrotrain's keys are plotted against in wandb: Lightning's ``WandbLogger`` logs it with every row, and
#: :class:`~entrotrain.integrations.loop.EntropyMonitors` does when its ``log`` is wandb's own.
STEP_METRIC = "trainer/global_step"

_warned_behind: set[str] = set()  # wandb run ids already warned about a step behind theirs
_written: dict[str, tuple[int, int, set[str]]] = {}  # run id -> (wandb step, loop step, keys) log_to last wrote


def is_wandb_log(log: Any, run: Any) -> bool:
    """Whether ``log`` is wandb's own ``log`` for ``run``: :func:`wandb_log`'s, the run's bound ``log`` (``run.log``, or
    ``wandb.log`` taken after ``wandb.init``) or ``wandb.log`` taken before ``wandb.init`` (wandb's pre-init stub,
    which raises when called: :func:`log_to` calls the active run's ``log`` instead)."""
    if run is None:
        return False
    if getattr(log, _WANDB_LOG_MARK, False):
        return True
    if getattr(log, "__self__", None) is run:
        return True
    return getattr(log, "__name__", None) == "wandb.log" and str(getattr(log, "__module__", "")).startswith("wandb.")


def log_to(log: Callable[..., Any], payload: dict[str, Any], step: int, run: Any | None) -> None:
    """Hand one logging step to ``log``: ``log(payload, step=step)`` for any callable.

    When ``log`` is wandb's own (:func:`is_wandb_log`: ``wandb.log``, ``run.log`` or :func:`wandb_log`; ``run`` the
    active run), ``run.log`` gets the payload plus ``trainer/global_step = step`` (:data:`STEP_METRIC`, the x-axis
    entrotrain's keys are declared against), with ``step=step`` while ``step`` is past the run's current step, or at
    it without clobbering anything. Otherwise wandb would drop the row (below: it warns "Steps must be monotonically
    increasing, so this data will be ignored", or nothing under ``WANDB_SILENT``) or overwrite the run's pending row
    (equal, when that row already holds keys of this payload from an earlier pass over this step): a loop resumed
    from an older checkpoint into the same wandb run, or ``wandb.log`` calls without ``step=`` that moved wandb's step
    ahead of the loop's. The row is then logged at the step after the run's current one (the pending row is committed
    as it is) and plotted at ``trainer/global_step = step``; warned once per run. Rows of one loop step with disjoint
    keys (the monitors' and your own loss through :func:`wandb_log`) share one wandb row.
    """
    if not is_wandb_log(log, run):
        log(payload, step=step)
        return
    payload = {**payload, STEP_METRIC: step}
    current = getattr(run, "step", None)
    run_id = str(getattr(run, "id", ""))
    keys = set(payload) - {STEP_METRIC}
    written = _written.get(run_id)  # what log_to put in the run's pending row: (wandb step, loop step, keys)
    pending = written if written is not None and written[0] == current else None
    if not isinstance(current, int) or step > current or (step == current and (pending is None or (
            pending[1] == step and not keys & pending[2]))):
        target = step
    elif pending is not None and pending[1] == step and not keys & pending[2]:
        target = current  # this loop step's row, already moved past a lower one: join it
    else:
        target = current + 1
        if run_id not in _warned_behind:
            _warned_behind.add(run_id)
            warnings.warn(
                f"entrotrain: the wandb run is at step {current}, {'past' if step < current else 'at'} the loop's step "
                f"{step} (resumed from an older checkpoint into the same run, or wandb.log calls without step= moved "
                "wandb's step on). wandb drops data logged at a lower step and overwrites the row at an equal one, so "
                f"entrotrain's rows are logged after wandb's current step and plotted against {STEP_METRIC!r}; your "
                f"own wandb.log(..., step=...) below step {current} is dropped by wandb (log through "
                "entrotrain.dashboards.wandb_media.wandb_log() instead). "
                "For a clean history, start a new wandb run, or fork this one (wandb.init(fork_from=...)).",
                UserWarning,
                stacklevel=3,
            )
    run.log(payload, step=target)
    if pending is not None and target == current:
        pending[2].update(keys)
    elif isinstance(target, int):
        _written[run_id] = (target, step, keys)


_WANDB_LOG_MARK = "_entrotrain_wandb_log"
_declared: set[str] = set()  # wandb run ids whose entrotrain keys wandb_log() declared against STEP_METRIC


def wandb_log() -> Callable[..., None]:
    """A ``log(metrics, step=step)`` to the active wandb run that keeps every row: what to pass as
    ``EntropyMonitors(log=...)``, or to call from your own wrapper (several sinks) and for your loop's own numbers.

    ``wandb.log(metrics, step=step)`` drops a row whose step is below the run's current one (a loop resumed from an
    older checkpoint into the same run) and overwrites one at an equal step; this goes through :func:`log_to`
    instead: every row carries ``trainer/global_step = step`` and lands after the run's step when it would be lost.
    At its first row in a run it declares entrotrain's keys against ``trainer/global_step``
    (:func:`define_entropy_summaries`), as ``EntropyMonitors(log=wandb.log)`` does at ``watch``. Needs an active run
    (``wandb.init`` first).
    """

    def log(metrics: dict[str, Any], step: int) -> None:
        import sys

        from entrotrain.errors import EntrotrainError

        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is None:
            raise EntrotrainError("wandb_log(): no active wandb run to log to. Call wandb.init(...) before logging.")
        run_id = str(getattr(run, "id", ""))
        if run_id not in _declared:
            _declared.add(run_id)
            define_entropy_summaries(run, step_metric=STEP_METRIC)
        log_to(run.log, metrics, step, run)

    setattr(log, _WANDB_LOG_MARK, True)
    return log


def stacked_over_time(history: list[Tensor]) -> Tensor:
    """``(rows·cols, steps)`` float32 grid of ``(rows, cols)`` tensors, one per logging step: column ``j`` is
    ``history[j]`` flattened row-major (layer-major); cells a smaller tensor lacks are NaN (drawn grey)."""
    rows = max(h.shape[0] for h in history)
    cols = max(h.shape[1] for h in history)
    grid = torch.full((rows * cols, len(history)), float("nan"))
    for col, h in enumerate(history):
        padded = torch.full((rows, cols), float("nan"))
        padded[: h.shape[0], : h.shape[1]] = h.detach().float().cpu()
        grid[:, col] = padded.reshape(-1)
    return grid


#: The most time columns an over-time image draws (at 2 px each, 768 px wide): a longer history is shown by evenly
#: spaced columns, the first and the last included. Without it a history at its capacity (1 024 logging steps) drew a
#: 2 048 px wide image, ~0.2 MB of PNG per logging step.
MAX_TIME_COLUMNS = 384


def time_columns(count: int, max_columns: int = MAX_TIME_COLUMNS) -> list[int]:
    """The indices of the columns drawn out of ``count``: all of them up to ``max_columns``, else ``max_columns``
    evenly spaced ones, the first and the last included."""
    if count <= max_columns:
        return list(range(count))
    return torch.linspace(0, count - 1, max_columns).round().long().tolist()


def time_grid_image(grid: Tensor, vmin: float, vmax: float, caption: str, min_cell_height: int = 2) -> Any:
    """A ``wandb.Image`` of a ``(rows, steps)`` grid coloured ``vmin → vmax`` (viridis, NaN grey), cells scaled to
    about 512 × 768 pixels (rows at least ``min_cell_height`` pixels tall); at most :data:`MAX_TIME_COLUMNS` columns
    (:func:`time_columns`: a longer grid is drawn from evenly spaced steps, so the image stays at most 768 px wide
    however long the run). Needs pillow and wandb."""
    import wandb

    grid = grid[:, time_columns(grid.shape[1])]
    cell_h = max(min_cell_height, min(24, 512 // grid.shape[0]))
    cell_w = max(2, min(48, 768 // grid.shape[1]))
    rgb = colorize(grid, vmin, vmax, cell=1)
    rgb = np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1)
    return wandb.Image(rgb, caption=caption)


def heads_over_time_image(history: list[Tensor], steps: list[int], vmin: float = 0.0, vmax: float = 1.0) -> Any | None:
    """A ``wandb.Image`` with one row per layer·head and one column per logging step (``None`` without pillow).

    ``history`` holds one ``(layers, heads)`` tensor per logged step (older steps may have fewer layers/heads;
    missing cells are grey). A head that collapses shows as a row turning dark from the step it collapsed on.
    """
    if not history or not _PIL_AVAILABLE:
        return None
    layers = max(h.shape[0] for h in history)
    heads = max(h.shape[1] for h in history)
    caption = (
        f"normalised attention entropy per head over time: rows L0H0..L{layers - 1}H{heads - 1} (layer-major), "
        f"columns = logging steps {steps[0]}..{steps[-1]}; dark = collapsed"
    )
    return time_grid_image(stacked_over_time(history), vmin, vmax, caption, min_cell_height=4)


# ---------------------------------------------------------------------- MoE routing
def load_vmax(experts: int) -> float:
    """Top of the expert-load colour scale: ``2 / E``, twice the balanced share (as ``RouterEntropyMonitor``), so a
    balanced layer is mid-scale and an expert with at least twice its share saturates."""
    return 2.0 / max(int(experts), 1)


def expert_load_image(load: Tensor, caption: str | None = None, vmax: float | None = None) -> Any | None:
    """A ``wandb.Image`` of a ``(layers, experts)`` load-share matrix (rows sum to 1), coloured from 0 to ``vmax``
    (default :func:`load_vmax` = 2/E; NaN cells grey), or ``None`` without pillow (warned once, as
    :func:`heatmap_image`). The default caption names the rows, columns, the scale and the balanced share 1/E.

    Raises:
        EntrotrainError: ``load`` is not 2-D.
    """
    if load.ndim != 2:
        from entrotrain.errors import EntrotrainError

        raise EntrotrainError(
            f"expert_load_image: load must be (layers, experts), got shape {tuple(load.shape)}; stack one row per MoE layer."
        )
    layers, experts = load.shape
    vmax = load_vmax(experts) if vmax is None else vmax
    if caption is None:
        caption = (
            f"expert load share, rows = MoE layers L0..L{layers - 1}, cols = experts E0..E{experts - 1}; colour 0..{vmax:.3g}, "
            f"balanced = 1/{experts} = {1 / max(experts, 1):.3g}; bright = overloaded, dark = starved"
        )
    return heatmap_image(load, caption=caption, vmin=0.0, vmax=vmax)


def expert_load_over_time_image(history: list[Tensor], steps: list[int], vmax: float | None = None) -> Any | None:
    """The layer × expert load heatmap over time as one ``wandb.Image``: one row per layer·expert (layer-major), one
    column per logging step, coloured from 0 to ``vmax`` (default :func:`load_vmax`); ``None`` for an empty history
    or without pillow.

    ``history`` holds one ``(layers, experts)`` tensor per logged step (a smaller one leaves its missing cells grey).
    A router collapsing shows as one row of a layer turning bright while the layer's other rows go dark.
    """
    if not history or not _PIL_AVAILABLE:
        return None
    layers = max(h.shape[0] for h in history)
    experts = max(h.shape[1] for h in history)
    vmax = load_vmax(experts) if vmax is None else vmax
    caption = (
        f"expert load share over time: rows L0E0..L{layers - 1}E{experts - 1} (layer-major), columns = logging steps "
        f"{steps[0]}..{steps[-1]}; colour 0..{vmax:.3g}, balanced = 1/{experts}"
    )
    return time_grid_image(stacked_over_time(history), 0.0, vmax, caption)
