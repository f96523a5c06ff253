"""SigmaReparamMonitor: exact σ / γ / per-head qk norms, logging steps, plain models, bit-identical training."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.helpers.spy_logger import SpyLogger

from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor, qk_spectral_norms
from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear, sigma_reparam_names
from tests.helpers.gpt_module import HEADS, SEQ, VOCAB, GPTModule
from tests.helpers.recorders import LossRecorder
from tests.helpers.lightning_models import quiet_trainer

def loader(n: int = 48, batch_size: int = 4) -> torch.utils.data.DataLoader:
    data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size)


def fit(module, callbacks, **kwargs):
    trainer = quiet_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, loader())
    return trainer


def reference_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    w = weight.detach().double()
    c = w.shape[0] // 3
    d = c // n_head
    return torch.stack(
        [
            torch.linalg.matrix_norm(w[h * d : (h + 1) * d].T @ w[c + h * d : c + (h + 1) * d], 2)
            for h in range(n_head)
        ]
    )


def reference_effective(layer: SigmaReparamLinear) -> torch.Tensor:
    w = layer.weight.detach().double()
    return layer.gamma.detach().double() / torch.linalg.vector_norm(w @ layer.u.double()) * w


@pytest.mark.parametrize("shape", [(3 * 32, 32, 4), (3 * 32, 32, 2), (3 * 24, 4, 2)])
def test_qk_spectral_norms_equals_direct(shape):
    rows, cols, heads = shape
    w = torch.randn(rows, cols, dtype=torch.float64)
    assert torch.allclose(qk_spectral_norms(w, heads), reference_qk(w, heads), rtol=1e-10)
    with pytest.raises(EntrotrainError, match="multiple of 3"):
        qk_spectral_norms(w[:-1], heads)


def test_values_keys_and_logging_steps():
    L.seed_everything(0)
    module = GPTModule()
    spy = SpyLogger()
    monitor = SigmaReparamMonitor(every_n_steps=2)
    trainer = fit(module, [monitor], max_steps=5, logger=spy)
    rows = [(step, m) for step, m in spy.rows if any(k.startswith("sigma_reparam/") for k in m)]
    assert [step for step, _ in rows] == [0, 2, 4]
    logged = rows[-1][1]
    assert logged == monitor.last_logged
    names = sigma_reparam_names(module)
    expected = {f"sigma_reparam/{n}/{s}" for n in names for s in ("sigma", "gamma")}
    expected |= {f"sigma_reparam/model.blocks.{i}.attn/qk_norm/H{h}" for i in range(2) for h in range(HEADS)}
    expected |= {"sigma_reparam/qk_norm/max", "sigma_reparam/nonfinite"}  # nonfinite: 0 when clean, always published
    assert set(logged) == expected
    for name in names:  # the last logging step is the last step: compare with the final model
        layer = module.get_submodule(name)
        assert logged[f"sigma_reparam/{name}/sigma"] == pytest.approx(layer.sigma.item(), rel=1e-6)
        assert logged[f"sigma_reparam/{name}/gamma"] == pytest.approx(layer.gamma.item(), rel=1e-6)
    qk = []
    for i in range(2):
        ref = reference_qk(reference_effective(module.model.blocks[i].attn.qkv), HEADS)
        qk.append(ref)
        for h in range(HEADS):
            assert logged[f"sigma_reparam/model.blocks.{i}.attn/qk_norm/H{h}"] == pytest.approx(ref[h].item(), rel=1e-4)
    assert logged["sigma_reparam/qk_norm/max"] == pytest.approx(torch.cat(qk).max().item(), rel=1e-4)
    assert "sigma_reparam/qk_norm/max" in trainer.callback_metrics


def test_plain_model_logs_qk_norms_only():
    L.seed_everything(0)
    module = GPTModule(convert=False)
    monitor = SigmaReparamMonitor(every_n_steps=1)
    fit(module, [monitor], max_steps=2)
    stats = {k for k in monitor.last_logged if k != "sigma_reparam/nonfinite"}  # the count is always there
    assert stats and all("/qk_norm" in k for k in stats)
    ref = reference_qk(module.model.blocks[1].attn.qkv.weight, HEADS)
    assert monitor.last_logged["sigma_reparam/model.blocks.1.attn/qk_norm/H1"] == pytest.approx(ref[1].item(), rel=1e-4)


def test_gradient_accumulation_logs_once_per_optimizer_step():
    L.seed_everything(0)
    spy = SpyLogger()
    fit(GPTModule(), [SigmaReparamMonitor(every_n_steps=1)], max_steps=3, accumulate_grad_batches=2, logger=spy)
    rows = [step for step, m in spy.rows if "sigma_reparam/qk_norm/max" in m]
    assert rows == [0, 1, 2]


@pytest.mark.parametrize("convert", [True, False])
def test_training_is_bit_identical_with_monitor(convert):
    runs = []
    for with_monitor in (False, True):
        L.seed_everything(0)
        module = GPTModule(convert=convert, dropout=0.1)
        recorder = LossRecorder()
        fit(module, [recorder] + ([SigmaReparamMonitor(every_n_steps=1)] if with_monitor else []), max_steps=4)
        runs.append((module, recorder.losses))
    (m0, l0), (m1, l1) = runs
    assert len(l0) == len(l1) == 4
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_nothing_to_log_warns_once():
    class NoAttention(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(SEQ + 1, 1)

        def training_step(self, batch, batch_idx):
            return self.fc(batch[0].float()).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = SigmaReparamMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match="found no SigmaReparamLinear"):
        fit(NoAttention(), [monitor], max_steps=2)
    assert monitor.last_logged == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"every_n_steps": 0}, "every_n_steps"), ({"every_n_steps": True}, "every_n_steps"), ({"log_qk_norm": 1}, "log_qk_norm"), ({"prefix": 3}, "prefix")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        SigmaReparamMonitor(**kwargs)


def test_monitor_reads_qk_joint_layers():
    """With joint q-k σReparam the monitor logs both parts and the per-head norms from the effective fused weight."""
    import lightning as L

    from entrotrain.callbacks import SigmaReparamMonitor
    from entrotrain.callbacks.sigma_reparam_monitor import qk_spectral_norms
    from entrotrain.tasks import LanguageModelingTask
    from entrotrain.regularizers import sigma_reparam

    L.seed_everything(0)
    task = LanguageModelingTask(block_size=16, n_layer=1, n_head=2, n_embd=32)
    sigma_reparam(task.model, include=["blocks.**"], qk_joint="**.attn.qkv")
    monitor = SigmaReparamMonitor(every_n_steps=1)
    idx = torch.randint(0, 128, (8, 17))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(idx[:, :-1], idx[:, 1:]), batch_size=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=[monitor])
    trainer.fit(task, data)
    keys = set(monitor.last_logged)
    assert {"sigma_reparam/model.blocks.0.attn.qkv.qk/sigma", "sigma_reparam/model.blocks.0.attn.qkv.v/gamma"} <= keys
    expected = qk_spectral_norms(task.model.blocks[0].attn.qkv.effective_weight().detach(), 2)
    got = [monitor.last_logged[f"sigma_reparam/model.blocks.0.attn/qk_norm/H{h}"] for h in range(2)]
    assert got == pytest.approx(expected.tolist(), rel=1e-5)
