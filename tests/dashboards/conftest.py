"""Synthetic run records (written through RunRecordLogger itself, no training) for the report tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from entrotrain.dashboards.run_record import RunRecordLogger

LAYERS, HEADS = 2, 3
STEPS = list(range(0, 101, 20))


def head_entropy(step: int, layer: int, head: int, collapse: bool) -> float:
    """Normalised entropy of one head: in the collapsing run, L0H1 and L1H2 fall to ~0.02 from step 40."""
    if collapse and (layer, head) in ((0, 1), (1, 2)):
        return max(0.02, 0.9 - 0.03 * step)
    return 0.8 - 0.001 * step + 0.01 * head


def write_attention_run(
    root: Path, name: str, collapse: bool = True, finish: bool = True, recipe: str | None = None
) -> Path:
    """A run record shaped like an AttentionEntropyMonitor + EntropyCollapseGuard run."""
    logger = RunRecordLogger(root, name="records", version=name, recipe=recipe, run_name=name)
    logger.log_hyperparams({"config": "trainer:\n  max_steps: 100\n", "entropy/attn/layers": {"L0": "a", "L1": "b"}})
    logger.log_threshold("entropy/attn_norm/*", 0.1, "collapse")
    logger.log_threshold("entropy/attn_norm/min", 0.05, "guard (warn)")
    for step in STEPS:
        grid = np.array([[head_entropy(step, l, h, collapse) for h in range(HEADS)] for l in range(LAYERS)])
        metrics = {f"entropy/attn_norm/L{l}/H{h}": grid[l, h] for l in range(LAYERS) for h in range(HEADS)}
        metrics.update({f"entropy/attn/L{l}/H{h}": grid[l, h] * math.log(12) for l in range(LAYERS) for h in range(HEADS)})
        metrics.update(
            {
                "entropy/attn_norm/min": grid.min(),
                "entropy/attn_norm/mean": grid.mean(),
                "entropy/attn_norm/p05": float(np.quantile(grid, 0.05)),
                "entropy/attn/collapse_frac": float((grid < 0.1).mean()),
                "entropy/attn/overload_frac": float((grid > 0.9).mean()),
                "entropy/attn/nonfinite": 0.0,
            }
        )
        if not collapse:  # the cure: σReparam, with its per-head ‖W_Qᵀ W_K‖₂
            metrics.update({f"sigma_reparam/blocks.{l}.attn/qk_norm/H{h}": 0.1 + 0.001 * step for l in range(LAYERS) for h in range(HEADS)})
        logger.log_metrics(metrics, step=step)
        logger.log_media("entropy/attn_norm/heatmap", grid, step, kind="heatmap", meta={"vmin": 0, "vmax": 1})
        logger.log_metrics({"train/loss": 3.0 - 0.01 * step, "epoch": 0}, step=step)
        if collapse and step == 60:
            logger.log_event("entropy/attn_norm/min", "EntropyCollapseGuard at step 60: fell below 0.05.", 60, "warn")
            logger.log_metrics({"entropy/attn_norm/min/alert": 1.0}, step=60)
    logger.log_metrics({"val/loss": 2.5 if collapse else 2.0}, step=100)
    if finish:
        logger.finalize("success")
    return logger.run_dir


def write_policy_run(root: Path, name: str = "grpo_toy") -> Path:
    """A run record shaped like a PolicyEntropyMonitor run: entropy falls, reward rises along R = -a exp(H) + b."""
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    a, b = 0.2, 1.0
    for step in range(0, 40, 2):
        h = 1.2 * math.exp(-step / 15) + 0.05
        metrics = {"entropy/policy/mean": h, "entropy/policy/reward_mean": -a * math.exp(h) + b, "grpo/loss": 0.1 + 0.01 * step}
        if step >= 8:
            metrics.update({"entropy/policy/fit_a": a, "entropy/policy/fit_b": b, "entropy/policy/fit_ceiling": b - a})
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    return logger.run_dir


def write_repr_run(root: Path, name: str = "ssl_toy") -> Path:
    """A run record with representation keys and eigenvalue spectra whose tail collapses over training."""
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    for step in range(0, 50, 10):
        decay = 0.2 + 0.2 * step
        spectrum = np.exp(-decay * np.arange(16))
        p = spectrum / spectrum.sum()
        rankme = float(np.exp(-(p * np.log(p)).sum()))
        logger.log_metrics({"entropy/repr/encoder/rankme": rankme, "entropy/repr/projector/rankme": rankme / 2}, step=step)
        logger.log_media("entropy/repr/encoder/spectrum", spectrum, step, kind="spectrum")
        logger.log_media("entropy/repr/encoder/values", np.random.default_rng(step).normal(size=200), step, kind="histogram")
    logger.finalize("success")
    return logger.run_dir


@pytest.fixture
def attention_run(tmp_path: Path) -> Path:
    return write_attention_run(tmp_path, "collapse", collapse=True)


@pytest.fixture
def cure_run(tmp_path: Path) -> Path:
    return write_attention_run(tmp_path, "cure", collapse=False)


@pytest.fixture
def make_attention_run():
    """The writer itself, for tests that need a run in a particular folder or state."""
    return write_attention_run


@pytest.fixture
def policy_run(tmp_path: Path) -> Path:
    return write_policy_run(tmp_path)


@pytest.fixture
def repr_run(tmp_path: Path) -> Path:
    return write_repr_run(tmp_path)
