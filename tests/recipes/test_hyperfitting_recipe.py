"""The hyperfitting recipe runs through the CLI for a few steps and prints its contrast; its two-phase data stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entrotrain.tasks.hyperfitting import HyperfittingDataModule
from tests.helpers.recipes import fit_recipe

# One intra-op thread: small models run several times faster than on the suite's two threads on a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "hyperfitting.yaml"


def test_hyperfitting_recipe_smoke(tmp_path, capsys):
    cli = fit_recipe(
        RECIPE, tmp_path, "--trainer.max_steps=3", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=2",
        "--data.init_args.pretrain_steps=2", "--data.init_args.hyperfit_steps=1", "--data.init_args.max_chars=60000",
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3
    for key in ("train/mean", "train/nll", "probe/mean", "probe/nll", "probe/pos/63", "gen/distinct_2", "gen/repetition"):
        assert f"entropy/pred/{key}" in metrics, sorted(metrics)
    out = capsys.readouterr().out
    assert "held-out entropy" in out and "greedy distinct-2" in out


def test_two_phase_stream_switches_to_the_fixed_sequences():
    dm = HyperfittingDataModule(pretrain_steps=3, hyperfit_steps=2, hyperfit_sequences=5, max_chars=60000, batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    assert [len(x) for x, _ in batches] == [4, 4, 4, 5, 5]
    assert torch.equal(batches[3][0], batches[4][0]) and not torch.equal(batches[0][0], batches[1][0])
    x, y = batches[3]
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-character targets
    offsets = dm.hyperfit_offsets()
    assert len(set(offsets)) == 5 and max(offsets) < len(dm.train_data) - dm.block_size - 1
    for row, start in zip(x, offsets):  # the fixed windows come from the training split (not the held-out one)
        assert torch.equal(row, dm.train_data[start : start + dm.block_size])
    again = HyperfittingDataModule(pretrain_steps=3, hyperfit_steps=2, hyperfit_sequences=5, max_chars=60000, batch_size=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again.train_dataloader()))  # seeded
