import math

import lightning as L
import pytest
import torch

from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask


def _dm(seed=0, **kw) -> CharCorpusDataModule:
    cfg = dict(block_size=16, batch_size=4, max_chars=50_000, seed=seed, steps_per_epoch=5, val_windows=8)
    cfg.update(kw)
    dm = CharCorpusDataModule(**cfg)
    dm.setup("fit")
    return dm


def test_vocab_size_known_before_setup():
    assert CharCorpusDataModule().vocab_size == 128


def test_datamodule_shapes_and_range(no_network):
    dm = _dm()
    assert len(dm.train_data) + len(dm.val_data) == 50_000
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < dm.vocab_size
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape == (4, 16) and len(dm.val_dataloader()) == 2


def test_datamodule_deterministic(no_network):
    a = [x for x, _ in _dm(seed=3).train_dataloader()]
    b = [x for x, _ in _dm(seed=3).train_dataloader()]
    c = [x for x, _ in _dm(seed=4).train_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    # consecutive epochs draw fresh windows
    dl = _dm(seed=3).train_dataloader()
    e1, e2 = [x for x, _ in dl], [x for x, _ in dl]
    assert not all(torch.equal(p, q) for p, q in zip(e1, e2))


def test_task_module_names_and_warmup():
    task = LanguageModelingTask(block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=10)
    assert "model.blocks.1.attn" in dict(task.named_modules())
    cfg = task.configure_optimizers()
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert cfg["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("warmup_steps", [0, 2])
def test_task_trains(no_network, warmup_steps):
    L.seed_everything(0, verbose=False)
    dm = _dm(batch_size=8)
    task = LanguageModelingTask(block_size=16, n_layer=2, n_head=2, n_embd=32, lr=3e-3, warmup_steps=warmup_steps)
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=[Rec()],
    )
    trainer.fit(task, datamodule=dm)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(128), abs=0.5)
    assert "train/loss" in trainer.callback_metrics
