"""Digits MIL: bag construction, padding, the attention-pooling model and a short Trainer run with/without AEM."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from entrotrain.models.attention_mil import AttentionMIL
from entrotrain.regularizers.attention_entropy import AttentionEntropyMaximization
from entrotrain.tasks.multiple_instance import DigitsMILDataModule, DigitsMILTask, collate_bags


def _dm(seed: int = 0, **kw) -> DigitsMILDataModule:
    cfg = dict(n_train_bags=16, n_val_bags=16, n_train_images=300, batch_size=4, seed=seed)
    cfg.update(kw)
    dm = DigitsMILDataModule(**cfg)
    dm.setup("fit")
    return dm


def test_bags_deterministic_and_labels_correct():
    a, b, c = _dm(0), _dm(0), _dm(1)
    for x, y in zip(a.train_data.bags + a.val_data.bags, b.train_data.bags + b.val_data.bags):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(a.train_data.bags, c.train_data.bags))
    for data in (a.train_data, a.val_data):
        for inst, label in zip(data.instance_labels, data.labels):
            assert float(label) == float(bool((inst == 9).any()))
            assert 8 <= len(inst) <= 24
        assert 0 < float(data.labels.sum()) < len(data)  # both classes present
    dm = _dm(0, target_digit=7)
    assert all(float(l) == float(bool((i == 7).any())) for i, l in zip(dm.train_data.instance_labels, dm.train_data.labels))


def test_padding_mask():
    dm = _dm()
    items = [dm.train_data[i] for i in range(4)]
    x, mask, y = collate_bags(items)
    n = max(len(bag) for bag, _ in items)
    assert x.shape == (4, n, 64) and mask.shape == (4, n) and mask.dtype == torch.bool and y.shape == (4,)
    for i, (bag, label) in enumerate(items):
        assert int(mask[i].sum()) == len(bag) and bool(mask[i, : len(bag)].all())
        assert torch.equal(x[i, : len(bag)], bag) and not x[i, len(bag) :].any()
        assert float(y[i]) == float(label)


def test_model_shape_and_padding_gets_no_attention():
    torch.manual_seed(0)
    model = AttentionMIL(dim=32, n_heads=8, hidden=32).eval()
    assert "pool" in dict(model.named_children())
    x = torch.randn(3, 10, 64)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    out = model(x, mask)
    assert out.shape == (3, 1)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 64) * 100.0
    torch.testing.assert_close(model(x2, mask), out)
    # a padded bag equals the unpadded bag alone
    torch.testing.assert_close(model(x[:1, :6]), out[:1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(x), out)  # without the mask the padding would leak in


@pytest.mark.parametrize("aem", [False, True])
def test_three_step_fit(aem, tmp_path):
    L.seed_everything(0)
    regs = [AttentionEntropyMaximization(weight=0.1)] if aem else None
    task = DigitsMILTask(dim=32, hidden=32, regularizers=regs)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
        val_check_interval=3, check_val_every_n_epoch=None,
    )
    trainer.fit(task, _dm())
    m = trainer.callback_metrics
    assert trainer.global_step == 3
    assert torch.isfinite(m["train/loss"]) and torch.isfinite(m["val/loss"]) and "val/acc" in m
    if aem:
        assert "reg/aem" in m and torch.isfinite(m["reg/aem"]) and float(m["reg/aem"]) < 0
    else:
        assert "reg/aem" not in m
