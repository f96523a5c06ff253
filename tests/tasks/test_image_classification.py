import math

import lightning as L
import pytest
import torch

pytest.importorskip("sklearn")

from entrotrain.models.tiny_vit import TinyViT  # noqa: E402
from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear, sigma_reparam_names  # noqa: E402
from entrotrain.tasks.image_classification import DigitsDataModule, DigitsViTTask  # noqa: E402


def _dm(seed=0, **kw) -> DigitsDataModule:
    dm = DigitsDataModule(seed=seed, **{"batch_size": 64, **kw})
    dm.setup("fit")
    return dm


def test_datamodule_shapes_and_range(no_network):
    dm = _dm()
    assert len(dm.train_set) == 1437 and len(dm.val_set) == 360
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.long
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(dm.train_dataloader()) == 1437 // 64
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 360
    assert set(dm.val_set.tensors[1].tolist()) == set(range(10))
    assert len(_dm(steps_per_epoch=7).train_dataloader()) == 7


def test_datamodule_deterministic(no_network):
    a, b, c = _dm(seed=3), _dm(seed=3), _dm(seed=4)
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])
    xa = [x for x, _ in a.train_dataloader()]
    xb = [x for x, _ in b.train_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    # train and val are disjoint halves of the 1797 images
    tr, va = a.train_set.tensors[0].flatten(1), a.val_set.tensors[0].flatten(1)
    assert len(tr) + len(va) == 1797


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_model_forward_shape_and_names(patch_size):
    model = TinyViT(patch_size=patch_size, n_layer=2, n_head=2, n_embd=16)
    assert model.n_patches == (8 // patch_size) ** 2
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    names = dict(model.named_modules())
    for i in range(2):
        attn = names[f"blocks.{i}.attn"]
        assert isinstance(attn.qkv, torch.nn.Linear) and attn.qkv.out_features == 48
        assert attn.n_head == 2 and attn.head_dim == 8
    with pytest.raises(ValueError):
        model(torch.rand(5, 8, 8))


def test_patchify_row_major():
    model = TinyViT(patch_size=2, n_layer=1, n_head=1, n_embd=8)
    x = torch.arange(64.0).view(1, 1, 8, 8)
    p = model.patchify(x)
    assert p.shape == (1, 16, 4)
    assert p[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0] and p[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]


def test_sigma_reparam_conversion():
    task = DigitsViTTask(n_layer=2, n_head=2, n_embd=16, sigma_reparam=True)
    names = sigma_reparam_names(task.model)
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.proj" in names and len(names) == 8
    assert not isinstance(task.model.patch_embed, SigmaReparamLinear)
    task = DigitsViTTask(n_layer=1, n_head=2, n_embd=16, sigma_reparam=True, sigma_reparam_embed=True)
    assert isinstance(task.model.patch_embed, SigmaReparamLinear) and isinstance(task.model.head, SigmaReparamLinear)
    assert "model.blocks.0.attn" in dict(task.named_modules())


def test_optimizers_and_warmup():
    task = DigitsViTTask(n_layer=1, n_head=2, n_embd=16, optimizer="sgd", warmup_steps=10)
    cfg = task.configure_optimizers()
    assert isinstance(cfg["optimizer"], torch.optim.SGD) and cfg["lr_scheduler"]["interval"] == "step"
    assert isinstance(DigitsViTTask(n_layer=1, n_head=2, n_embd=16).configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ValueError):
        DigitsViTTask(optimizer="rmsprop")


@pytest.mark.parametrize("sigma_reparam", [False, True])
def test_three_step_fit_finite(sigma_reparam, tmp_path, no_network):
    L.seed_everything(0)
    task = DigitsViTTask(n_layer=2, n_head=2, n_embd=16, lr=1e-2, sigma_reparam=sigma_reparam)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, val_check_interval=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=16, seed=0))
    assert trainer.global_step == 3
    m = trainer.callback_metrics
    assert math.isfinite(float(m["train/loss"])) and math.isfinite(float(m["val/loss"]))
    assert 0.0 <= float(m["val/acc"]) <= 1.0 and 0.0 <= float(m["train/acc"]) <= 1.0
