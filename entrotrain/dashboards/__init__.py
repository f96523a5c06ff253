"""Turning reduced statistics into wandb panels (scalars, heatmaps, histograms)."""

from entrotrain.dashboards.wandb_media import colorize, heatmap_image, histogram, wandb_loggers

__all__ = ["colorize", "heatmap_image", "histogram", "wandb_loggers"]
