"""Turning reduced statistics into wandb panels (scalars, heatmaps, histograms), the local run record every run
writes, the offline HTML report built from it (``entrotrain report``), where runs stand in the terminal
(``entrotrain status``) and what to try when a run shows a collapse (:func:`diagnose`).

Every public name here, and every submodule (``entrotrain.dashboards.run_record``), is loaded on first access
(PEP 562, as :mod:`entrotrain`): ``import entrotrain.dashboards`` imports nothing heavy, and ``entrotrain report``
(which reads a run record with :mod:`~entrotrain.dashboards.run_reader`) never imports lightning or torch. The run
record's writer (:class:`RunRecordLogger`) and the wandb media import lightning when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from entrotrain._lazy_package import lazy_attributes

if TYPE_CHECKING:
    from entrotrain.dashboards.remedies import Remedy, diagnose
    from entrotrain.dashboards.report import build_report
    from entrotrain.dashboards.run_reader import load_run
    from entrotrain.dashboards.run_record import RunRecordLogger, record_event, record_media, record_threshold
    from entrotrain.dashboards.wandb_media import (
        colorize,
        expert_load_image,
        expert_load_over_time_image,
        heads_over_time_image,
        heatmap_image,
        histogram,
        load_vmax,
        setup_wandb_dashboard,
        wandb_loggers,
    )

_LAZY = {
    "build_report": "entrotrain.dashboards.report",  # matplotlib is imported only when a report is drawn
    "load_run": "entrotrain.dashboards.run_reader",
    **dict.fromkeys(("Remedy", "diagnose"), "entrotrain.dashboards.remedies"),
    **dict.fromkeys(
        ("RunRecordLogger", "record_event", "record_media", "record_threshold"), "entrotrain.dashboards.run_record"
    ),
    **dict.fromkeys(
        (
            "colorize",
            "expert_load_image",
            "expert_load_over_time_image",
            "heads_over_time_image",
            "heatmap_image",
            "histogram",
            "load_vmax",
            "setup_wandb_dashboard",
            "wandb_loggers",
        ),
        "entrotrain.dashboards.wandb_media",
    ),
}

__all__ = [
    "Remedy",
    "RunRecordLogger",
    "build_report",
    "colorize",
    "diagnose",
    "expert_load_image",
    "expert_load_over_time_image",
    "heads_over_time_image",
    "heatmap_image",
    "histogram",
    "load_run",
    "load_vmax",
    "record_event",
    "record_media",
    "record_threshold",
    "setup_wandb_dashboard",
    "wandb_loggers",
]


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
