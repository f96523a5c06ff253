"""AttentionEntropyMonitor: exact values, bit-identical training, accumulation, lifecycle, errors, media."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from entrotrain.callbacks import AttentionEntropyMonitor
from entrotrain.errors import EntrotrainError, TapError
from tests.helpers.brute import causal_head_means
from tests.helpers.lightning_models import HEADS, SEQ, HandAttention, TinyLM, quiet_trainer, token_loader
from tests.helpers.recorders import LossRecorder
from tests.helpers.spy_logger import SpyLogger

# One intra-op thread: small models run several times faster than on the suite's two threads on a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def fit(model, callbacks, **trainer_kwargs):
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, token_loader())
    return trainer


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_is_bit_identical_with_monitor(dropout):
    runs = []
    for with_monitor in (False, True):
        L.seed_everything(0)
        model = TinyLM(dropout=dropout)
        recorder = LossRecorder()
        callbacks = [recorder] + ([AttentionEntropyMonitor(every_n_steps=1, max_rows=None)] if with_monitor else [])
        fit(model, callbacks, max_steps=5)
        runs.append((model, recorder.losses))
    (m0, l0), (m1, l1) = runs
    assert len(l0) == len(l1) == 5
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))


def _expected_means(model: TinyLM, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = copy.deepcopy(model).double()
    model.eval()
    with torch.no_grad():
        model(idx[:, :-1])
    return [causal_head_means(*block.last_qk) for block in model.blocks]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_values_equal_brute_force(accumulate):
    L.seed_everything(1)
    model = TinyLM()
    batches = [b[0] for b in token_loader()]
    idx = torch.cat(batches[:accumulate])  # all micro-batches of the first optimizer step, seen at initial weights
    expected = _expected_means(model, idx)
    monitor = AttentionEntropyMonitor(every_n_steps=100, max_rows=None, max_queries=None)
    fit(model, [monitor], max_steps=1, accumulate_grad_batches=accumulate)
    logged = monitor.last_logged
    for layer, (ent, norm) in enumerate(expected):
        for head in range(HEADS):
            assert logged[f"entropy/attn/L{layer}/H{head}"] == pytest.approx(float(ent[head]), abs=2e-6)
            assert logged[f"entropy/attn_norm/L{layer}/H{head}"] == pytest.approx(float(norm[head]), abs=2e-6)
    all_norm = torch.stack([n for _, n in expected]).flatten()
    assert logged["entropy/attn_norm/min"] == pytest.approx(float(all_norm.min()), abs=2e-6)
    assert logged["entropy/attn_norm/mean"] == pytest.approx(float(all_norm.mean()), abs=2e-6)
    assert logged["entropy/attn/collapse_frac"] == float((all_norm < 0.1).double().mean())
    assert logged["entropy/attn/nonfinite"] == 0.0


def test_logs_only_on_logging_steps_and_to_every_logger():
    L.seed_everything(0)
    spy = SpyLogger()
    monitor = AttentionEntropyMonitor(every_n_steps=3)
    trainer = fit(TinyLM(), [monitor], max_steps=7, logger=spy)
    steps = [step for step, row in spy.rows if "entropy/attn_norm/mean" in row]
    assert steps == [0, 3, 6]
    assert any("entropy/attn/layers" in h for h in spy.hparams)
    assert spy.hparams[0]["entropy/attn/layers"] == {"L0": "blocks.0", "L1": "blocks.1"}
    assert "entropy/attn_norm/min" in trainer.callback_metrics
    keys = set(monitor.last_logged)
    for name in ("min", "mean", "p05"):
        assert f"entropy/attn/{name}" in keys and f"entropy/attn_norm/{name}" in keys
    assert {"entropy/attn/collapse_frac", "entropy/attn/overload_frac", "entropy/attn_norm/L1/mean"} <= keys
    assert all(math.isfinite(v) for v in monitor.last_logged.values())


def test_arms_nothing_on_steps_that_do_not_log():
    armed_at: list[int] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            pass

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if not no_hooks_left(pl_module) or torch._C._len_torch_function_stack():
                armed_at.append(trainer.global_step)

    L.seed_everything(0)
    fit(TinyLM(), [AttentionEntropyMonitor(every_n_steps=4), Probe()], max_steps=9)
    assert armed_at == [0, 4, 8]


def test_hooks_removed_after_fit_and_after_exception():
    L.seed_everything(0)
    model = TinyLM()
    fit(model, [AttentionEntropyMonitor(every_n_steps=1)], max_steps=2)
    assert no_hooks_left(model) and torch._C._len_torch_function_stack() == 0

    class FailInForward(TinyLM):
        def forward(self, idx):
            x = self.emb(idx)
            x = x + self.blocks[0](x)
            if self.global_step >= 1:
                raise RuntimeError("boom inside forward")
            return self.head(x)

    L.seed_everything(0)
    failing = FailInForward()
    with pytest.raises(RuntimeError, match="boom inside forward"):
        fit(failing, [AttentionEntropyMonitor(every_n_steps=1)], max_steps=4)
    assert no_hooks_left(failing) and torch._C._len_torch_function_stack() == 0


def test_untappable_attention_raises_naming_the_module():
    L.seed_everything(0)
    with pytest.raises(TapError, match=r"blocks\.0 \(HandAttention\).*record_attention"):
        fit(TinyLM(attention=HandAttention), [AttentionEntropyMonitor(every_n_steps=1)], max_steps=1)
    L.seed_everything(0)
    with pytest.warns(UserWarning, match="captured no attention"):
        fit(TinyLM(attention=HandAttention), [AttentionEntropyMonitor(every_n_steps=1, strict=False)], max_steps=1)


def test_partially_tappable_model_warns_about_the_missing_module():
    class Mixed(TinyLM):
        def __init__(self):
            super().__init__()
            self.blocks[1] = HandAttention()

    L.seed_everything(0)
    with pytest.warns(UserWarning, match=r"no attention call inside \['blocks\.1'\]"):
        fit(Mixed(), [AttentionEntropyMonitor(every_n_steps=1)], max_steps=1)


def test_nonfinite_attention_is_counted_not_logged_as_nan():
    L.seed_everything(0)
    model = TinyLM()
    with torch.no_grad():
        model.blocks[0].qkv.weight[0, 0] = float("nan")  # head 0's queries become NaN in layer 0
    monitor = AttentionEntropyMonitor(every_n_steps=1, max_rows=None, max_queries=None)
    with pytest.warns(UserWarning, match="non-finite entropy"):
        fit(model, [monitor], max_steps=1)
    logged = monitor.last_logged
    # Layer 1 reads layer 0's output, which SDPA of torch 2.3 makes NaN everywhere (head 0's NaN queries, mixed by
    # proj): there every query of layer 1 counts too. Newer SDPA (2.13, 2.15) returns finite rows for them.
    q1, k1 = model.blocks[1].last_qk
    layer1 = 0 if bool(q1.isfinite().all() and k1.isfinite().all()) else 8 * SEQ * HEADS
    assert logged["entropy/attn/nonfinite"] == 8 * SEQ + layer1  # every query of head 0, layer 0, in the batch
    assert "entropy/attn/L0/H0" not in logged and "entropy/attn/L0/H1" in logged
    assert all(math.isfinite(v) for v in logged.values())


def test_budgets_limit_rows_and_queries():
    L.seed_everything(0)
    model = TinyLM()
    monitor = AttentionEntropyMonitor(every_n_steps=1, max_rows=2, max_queries=5)
    fit(model, [monitor], max_steps=1)
    stats = monitor.tap.stats["blocks.0"]
    assert stats[2].tolist() == [2 * 5] * HEADS  # rows scored per head


def test_media_logged_to_wandb(monkeypatch):
    pytest.importorskip("PIL")
    from lightning.pytorch.loggers import WandbLogger

    L.seed_everything(0)
    logger = WandbLogger(mode="disabled")
    calls: list[dict] = []
    monkeypatch.setattr(logger.experiment, "log", lambda row, *a, **k: calls.append(row))
    fit(TinyLM(), [AttentionEntropyMonitor(every_n_steps=2)], max_steps=3, logger=logger)
    media = [row for row in calls if "entropy/attn_norm/heatmap" in row]
    assert [row["trainer/global_step"] for row in media] == [0, 2]
    assert "entropy/attn_norm/hist" in media[0]
    import wandb

    assert isinstance(media[0]["entropy/attn_norm/heatmap"], wandb.Image)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"collapse_threshold": 0.95}, "collapse_threshold"),
        ({"max_queries": 0}, "max_queries"),
        ({"path": "fast"}, "path"),
    ],
)
def test_bad_arguments_raise_early(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        AttentionEntropyMonitor(**kwargs)


def test_no_capture_error_names_the_hf_implementation_and_the_fix() -> None:
    """An HF model on an implementation the tap cannot see: the error says which, and the one-line fix."""
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    from entrotrain.errors import TapError

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "flash_attention_2"

    class Wrapper(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    monitor = AttentionEntropyMonitor(every_n_steps=1, strict=True, log_media=False)
    with pytest.raises(TapError, match=r"model: 'flash_attention_2'.*set_attn_implementation\('sdpa'\)"):
        monitor._no_capture(Wrapper())
