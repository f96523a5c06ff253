"""Turning reduced statistics into wandb panels (scalars, heatmaps, histograms), the local run record every run
writes, and the offline HTML report built from it (``entrotrain report``)."""

from entrotrain.dashboards.report import build_report  # matplotlib is imported only when a report is drawn
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

__all__ = [
    "RunRecordLogger",
    "build_report",
    "colorize",
    "expert_load_image",
    "expert_load_over_time_image",
    "heads_over_time_image",
    "heatmap_image",
    "histogram",
    "load_vmax",
    "record_event",
    "record_media",
    "record_threshold",
    "setup_wandb_dashboard",
    "wandb_loggers",
]

