"""MoEDigitsTask: the training_step contract (loss + detached router logits, regulariser parts), the validation
load statistics against a brute force, the printed summary, and that RouterEntropyMonitor changes nothing."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from entrotrain.callbacks.router_monitor import RouterEntropyMonitor  # noqa: E402
from entrotrain.regularizers.router_loss import LoadBalancingLoss, TsallisRouterLoss  # noqa: E402
from entrotrain.tasks.image_classification import DigitsDataModule  # noqa: E402
from entrotrain.tasks.moe_classification import MoEDigitsTask, expert_load_stats  # noqa: E402

SMALL = dict(n_experts=4, top_k=1, n_layer=2, d_model=8, d_hidden=8, n_tokens=4)


def test_expert_load_stats():
    assert expert_load_stats(torch.tensor([5.0, 5.0, 5.0, 5.0])) == (pytest.approx(1.0), 0)
    assert expert_load_stats(torch.tensor([0.0, 9.0, 0.0, 0.0])) == (pytest.approx(0.0), 3)
    ent, dead = expert_load_stats(torch.tensor([1.0, 97.0, 1.0, 1.0]), dead_threshold=0.05)
    p = [0.01, 0.97, 0.01, 0.01]
    assert ent == pytest.approx(-sum(v * math.log(v) for v in p) / math.log(4)) and dead == 3
    assert expert_load_stats(torch.zeros(3)) == (0.0, 3)


def test_training_step_returns_loss_and_detached_router_logits():
    torch.manual_seed(0)
    reg = TsallisRouterLoss(aux_weight=0.1, keep_top_k=1, top_p=0.0) + LoadBalancingLoss(0.01, top_k=1)
    task = MoEDigitsTask(regularizers=[reg], **SMALL)
    logged = {}
    task.log = lambda k, v, **kw: logged.__setitem__(k, v)  # noqa: E731
    task.log_dict = lambda d, **kw: logged.update(d)  # noqa: E731
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    out = task.training_step((x, y), 0)
    logits, router = task.model(x)
    ce = F.cross_entropy(logits, y)
    expected = ce + reg(router).total
    assert torch.allclose(out["loss"], expected)
    assert len(out["router_logits"]) == 2 and all(not z.requires_grad for z in out["router_logits"])
    assert all(torch.equal(a, b.detach()) for a, b in zip(out["router_logits"], router))
    assert {"reg/tsallis_router/entropy", "reg/tsallis_router/balance", "reg/load_balancing"} <= set(logged)
    assert torch.allclose(logged["train/loss"], ce)


def _fit(monitor: bool, steps: int = 6):
    L.seed_everything(0)
    task = MoEDigitsTask(regularizers=[TsallisRouterLoss(aux_weight=0.1)], print_summary=False, **SMALL)
    dm = DigitsDataModule(batch_size=32, val_size=360, steps_per_epoch=steps)
    callbacks = [RouterEntropyMonitor(every_n_steps=2, top_k=1, log_media=False, print_summary=False)] if monitor else []
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=1, val_check_interval=3,
        num_sanity_val_steps=1,
    )
    trainer.fit(task, dm)
    return task, trainer


@pytest.fixture(scope="module")
def plain_fit():
    return _fit(False)


def test_monitor_reads_the_task_and_changes_nothing(plain_fit):
    plain, _ = plain_fit
    watched, trainer = _fit(True)
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    metrics = trainer.callback_metrics
    assert "entropy/router/L1/load_entropy_norm" in metrics and "val/router/L0/load_entropy_norm" in metrics


def test_validation_history_and_summary(plain_fit):
    task, trainer = plain_fit
    assert [r["step"] for r in task.history] == [0, 3, 6] and task.history[0]["sanity"]
    # the last record equals a brute force over the validation batch the trainer saw (limit_val_batches=1)
    x, y = next(iter(trainer.datamodule.val_dataloader()))
    with torch.no_grad():
        logits, router = task.model(x)
    assert task.history[-1]["acc"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    for layer, z in enumerate(router):
        counts = torch.bincount(z.argmax(-1), minlength=4).double()
        load = counts / counts.sum()
        ent = float(-(load[load > 0] * load[load > 0].log()).sum() / math.log(4))
        assert task.history[-1]["entropy"][layer] == pytest.approx(ent)
        assert task.history[-1]["dead"][layer] == int((counts == 0).sum())
    text = task.summary()
    assert "first step     0" in text and "last  step     6" in text and "L1" in text and "val acc" in text


def test_history_survives_a_checkpoint(plain_fit):
    task, _ = plain_fit
    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    fresh = MoEDigitsTask(**SMALL)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.history == task.history and fresh.summary() == task.summary()
