"""wandb side of the dashboards: metric summaries and the heads-over-time image of the attention monitor."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch

from entrotrain.callbacks import AttentionEntropyMonitor
from entrotrain.dashboards.wandb_media import heads_over_time_image, setup_wandb_dashboard
from tests.helpers.lightning_models import HEADS, TinyLM, quiet_trainer, token_loader


def _wandb_logger(monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(mode="disabled")
    logged: list[dict] = []
    defined: list[tuple[str, dict]] = []
    monkeypatch.setattr(logger.experiment, "log", lambda row, *a, **k: logged.append(row))
    monkeypatch.setattr(logger.experiment, "define_metric", lambda name, **k: defined.append((name, k)))
    return logger, logged, defined


def test_entropy_summaries_are_minima(monkeypatch):
    logger, _, defined = _wandb_logger(monkeypatch)
    setup_wandb_dashboard([logger])
    options = dict(defined)
    assert options["entropy/*"]["summary"] == "min,last"
    assert options["entropy/attn/collapse_frac"]["summary"] == "max,last"
    assert all(k.get("step_metric") == "trainer/global_step" for name, k in defined if name != "trainer/global_step")


def test_monitor_logs_heads_over_time(monkeypatch):
    pytest.importorskip("PIL")
    import wandb

    logger, logged, defined = _wandb_logger(monkeypatch)
    L.seed_everything(0)
    monitor = AttentionEntropyMonitor(every_n_steps=2, print_summary=False, over_time_every=1)
    trainer = quiet_trainer(max_steps=5, logger=logger, callbacks=[monitor])
    trainer.fit(TinyLM(), token_loader())
    assert ("entropy/*", {"step_metric": "trainer/global_step", "step_sync": True, "summary": "min,last"}) in defined
    images = [row for row in logged if "entropy/attn_norm/heads_over_time" in row]
    assert [row["trainer/global_step"] for row in images] == [0, 2, 4]
    last = images[-1]["entropy/attn_norm/heads_over_time"]
    assert isinstance(last, wandb.Image) and "rows L0H0..L1H3" in last._caption


def test_heads_over_time_grid_layout():
    pytest.importorskip("PIL")
    history = [torch.full((2, HEADS), 0.9), torch.tensor([[0.9, 0.0, 0.9, 0.9], [0.9, 0.9, 0.9, float("nan")]])]
    image = heads_over_time_image(history, [0, 10])
    pixels = np.array(image.image)  # (rows·cell_h, cols·cell_w, 3)
    cell_h, cell_w = pixels.shape[0] // (2 * HEADS), pixels.shape[1] // 2
    cell = lambda r, c: pixels[r * cell_h, c * cell_w].tolist()  # noqa: E731
    assert cell(1, 0) == cell(0, 0)  # L0H1 was healthy at step 0 ...
    assert cell(1, 1) == [68, 1, 84]  # ... and collapsed (viridis 0) at step 10
    assert cell(7, 1) == [128, 128, 128]  # no data: grey
    assert heads_over_time_image([], []) is None


@pytest.mark.parametrize("mode, expected", [(None, "offline"), ("online", "offline"), ("disabled", "disabled")])
def test_cli_never_prompts_for_a_login(monkeypatch, tmp_path, capsys, mode, expected):
    from entrotrain.cli import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert os.environ["WANDB_MODE"] == expected
    # the line saying so is printed when a run with a wandb logger starts, never for --help (tests/test_cli_help.py)
    assert "logging offline" not in capsys.readouterr().out
