"""Shared test setup: wandb never touches the network or a login, and never leaks a run between tests."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _wandb_isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    import sys

    if "wandb" in sys.modules:  # WandbLogger never finishes its run; do it so the next test gets a fresh one
        import wandb

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wandb.finish()
