"""SimSiamTask and its digit augmentations: exact shifts, ranges, seeded draws, a short fit, RNG-neutral validation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

pytest.importorskip("sklearn")

from entrotrain.tasks import DigitsDataModule, SimSiamTask, augment_digits  # noqa: E402
from entrotrain.tasks.image_classification import load_digits_tensors  # noqa: E402
from tests.helpers.reference import one_thread  # noqa: F401,E402  (autouse fixture)


def test_augmentation_shift_is_exact_without_other_effects():
    x, _ = load_digits_tensors()
    x = x[:32]
    out = augment_digits(x, max_shift=1, noise=0.0, erase=0, contrast=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    shifts = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])]
        assert matches, i
        shifts.update(matches)
    assert len(shifts) >= 5  # several different shifts were drawn


def test_augmentation_range_erase_and_seeding():
    x = torch.ones(16, 1, 8, 8)
    out = augment_digits(x, max_shift=0, noise=0.0, erase=3, contrast=(1.0, 1.0), generator=torch.Generator().manual_seed(1))
    assert ((out == 0).flatten(1).sum(1) == 9).all()  # exactly one 3×3 square erased per image
    state = torch.get_rng_state()
    a = augment_digits(x * 0.5, generator=torch.Generator().manual_seed(2))
    b = augment_digits(x * 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)  # own generator: global RNG untouched
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and a.shape == x.shape
    with pytest.raises(ValueError, match="B, C, S, S"):
        augment_digits(torch.ones(2, 8, 8))


def test_short_fit_logs_and_validation_leaves_the_rng_alone():
    L.seed_everything(0)
    task = SimSiamTask(hidden_dim=32, feature_dim=16, pred_dim=4)
    dm = DigitsDataModule(batch_size=32, seed=0, steps_per_epoch=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(task, dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/z_std"} <= set(metrics)
    assert -1.0 <= float(metrics["val/loss"]) <= 1.0 and float(metrics["val/z_std"]) >= 0.0
    x, y = next(iter(dm.val_dataloader()))
    task.eval()
    task.log = lambda *a, **k: None  # outside a Trainer loop
    state = torch.get_rng_state()
    with torch.no_grad():
        first = task.validation_step((x, y), 0)
        second = task.validation_step((x, y), 0)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(first, second)
    assert task(x).shape == (len(x), 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        SimSiamTask(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        SimSiamTask(lr=0.0)
