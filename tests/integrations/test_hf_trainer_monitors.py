"""RouterEntropyMonitor and PredictionEntropyMonitor under transformers.Trainer (EntropyTrainerCallback): the same
keys and values as in Lightning on the same model and tensors, padding excluded through the forward's
attention_mask, training unchanged, hooks released at train end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lightning.pytorch as pl  # noqa: E402
from transformers import MixtralForCausalLM, Trainer, TrainingArguments  # noqa: E402

from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor  # noqa: E402
from entrotrain.callbacks.router_monitor import RouterEntropyMonitor  # noqa: E402
from entrotrain.errors import EntrotrainError, TapError  # noqa: E402
from entrotrain.functional.routing import router_statistics, router_values  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.helpers.tiny_hf_lms import padded_rows, stack_rows, tiny_mixtral_lm  # noqa: E402

VOCAB, T, EXPERTS, TOP_K = 40, 10, 4, 2


def _model(seed: int = 0) -> MixtralForCausalLM:
    """A tiny Mixtral from a config (random weights, no download)."""
    return tiny_mixtral_lm(VOCAB, seed, experts=EXPERTS, top_k=TOP_K)


def _data(rows: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows: row r keeps its first T - r % 4 tokens; padded labels are -100."""
    return padded_rows(rows, VOCAB, T, seed)


def _trainer(tmp_path: Path, model, data, **overrides) -> Trainer:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=len(data), logging_steps=1,
        learning_rate=0.0, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
    )
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=data)


def _leftovers(model: torch.nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


class _LitWrapper(pl.LightningModule):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _lightning(model, data, monitors) -> None:
    pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=monitors, accelerator="cpu",
    ).fit(_LitWrapper(model), train_dataloaders=torch.utils.data.DataLoader([stack_rows(data)], batch_size=None))


def _hf(tmp_path: Path, model, data, monitors) -> dict[str, float]:
    trainer = _trainer(tmp_path, model, data)
    EntropyTrainerCallback(monitors).attach(trainer)
    trainer.train()
    assert not _leftovers(model)  # hooks released at train end
    return {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("entropy/")}


def _assert_same(hf: dict[str, float], lit: dict[str, float]) -> None:
    assert set(hf) == set(lit)
    for key, value in lit.items():
        assert hf[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ------------------------------------------------------------------ router
def _router(**kw) -> RouterEntropyMonitor:
    return RouterEntropyMonitor(**{"every_n_steps": 1, "log_media": False, "print_summary": False, **kw})


def test_router_same_as_lightning_and_padding_excluded(tmp_path: Path) -> None:
    data = _data()
    lit_monitor = _router()
    _lightning(copy.deepcopy(_model()), data, [lit_monitor])
    model = _model()
    hf = _hf(tmp_path, model, data, [_router()])
    assert f"entropy/router/L1/load/E{EXPERTS - 1}" in hf and "entropy/router/dead_frac_max" in hf
    _assert_same(hf, lit_monitor.last_logged)
    # brute force: HF's own router logits, padding rows dropped by the batch's attention_mask
    batch = stack_rows(data)
    with torch.no_grad():
        logits = model(**batch, output_router_logits=True).router_logits
    keep = batch["attention_mask"].reshape(-1).bool()
    for i, layer in enumerate(logits):
        rows = layer.double()[keep]
        p = rows.softmax(-1)
        assert hf[f"entropy/router/L{i}/entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-6)
        unmasked = router_values(router_statistics(layer, TOP_K))
        assert hf[f"entropy/router/L{i}/entropy"] != pytest.approx(float(unmasked.entropy), rel=1e-9)
        masked = router_values(router_statistics(layer, TOP_K, mask=batch["attention_mask"].reshape(-1)))
        assert hf[f"entropy/router/L{i}/load_entropy"] == pytest.approx(float(masked.load_entropy), rel=1e-6)


def test_router_refuses_a_model_without_routers(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=8, n_layer=1, n_head=2))
    trainer = _trainer(tmp_path, model, [{"input_ids": r, "labels": r} for r in torch.randint(0, VOCAB, (4, T))])
    EntropyTrainerCallback([_router()]).attach(trainer)
    with pytest.raises(TapError, match="RouterEntropyMonitor under transformers.Trainer"):
        trainer.train()
    assert not _leftovers(model)


# ------------------------------------------------------------------ prediction entropy
def _prediction(source: str = "head", probe=None, **kw) -> PredictionEntropyMonitor:
    kw = {"every_n_steps": 1, "positions": 3, "log_media": False, "print_summary": False, **kw}
    return PredictionEntropyMonitor(source=source, shift_labels=True, probe=probe, **kw)


def _history(monitor: PredictionEntropyMonitor) -> dict[str, float]:
    return dict(monitor.history[-1][1])


def test_prediction_same_as_lightning_with_probe_and_generation(tmp_path: Path) -> None:
    data, held_out = _data(), stack_rows(_data(rows=4, seed=7))
    kw = dict(generation_prompts=2, prompt_length=3, max_new_tokens=4)
    lit_monitor = _prediction(probe=held_out, **kw)
    _lightning(copy.deepcopy(_model()), data, [lit_monitor])
    hf_monitor = _prediction(probe=held_out, **kw)
    trainer = _trainer(tmp_path, _model(), data)
    EntropyTrainerCallback([hf_monitor]).attach(trainer)
    trainer.train()
    assert not _leftovers(trainer.model)
    hf = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("entropy/")}
    lit = _history(lit_monitor)
    for key in ("train/mean", "train/nll", "train/p50", "probe/mean", "probe/nll", "probe/pos/0", "gen/distinct_1"):
        assert f"entropy/pred/{key}" in hf, key
    _assert_same(hf, lit)
    # padding and the shifted-away last position are not scored: tokens = the labelled next tokens
    labels = stack_rows(data)["labels"]
    assert hf["entropy/pred/train/tokens"] == float((labels[:, 1:] != -100).sum())
    assert hf["entropy/pred/train/nll"] == pytest.approx(trainer.state.log_history[0]["loss"], abs=1e-3)


def test_prediction_output_source_equals_head_source(tmp_path: Path) -> None:
    data = _data(rows=4)
    head = _hf(tmp_path / "head", _model(), data, [_prediction("head", probe_batches=0)])
    output = _hf(tmp_path / "output", _model(), data, [_prediction("output", probe_batches=0)])
    assert "entropy/pred/train/mean" in head
    assert set(head) == set(output)
    for key, value in head.items():
        assert output[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_prediction_bad_head_is_refused(tmp_path: Path) -> None:
    model = _model()
    trainer = _trainer(tmp_path, model, _data(rows=2))
    EntropyTrainerCallback([_prediction(head="*nothing_here", probe_batches=0)]).attach(trainer)
    with pytest.raises(EntrotrainError, match="must match exactly one module"):
        trainer.train()
    assert not _leftovers(model)


# ------------------------------------------------------------------ monitoring never changes training
def test_training_bit_identical_and_captures_only_logging_steps(tmp_path: Path, capsys) -> None:
    held_out = stack_rows(_data(rows=2, seed=9))

    def monitors(print_summary: bool = True):
        return [_router(print_summary=print_summary, log_media=True), _prediction(
            probe=held_out, generation_prompts=1, prompt_length=2, max_new_tokens=3, print_summary=print_summary,
            log_media=True,
        )]

    def run(with_callback: bool):
        model = _model()
        trainer = _trainer(
            tmp_path / str(with_callback), model, _data(rows=16), max_steps=4, logging_steps=2,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        )
        if with_callback:
            cb = EntropyTrainerCallback(monitors()).attach(trainer)
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        if with_callback:
            rows = {r["step"]: r for r in trainer.state.log_history if "entropy/router/entropy_norm_mean" in r}
            assert set(rows) == {2, 4}
            for row in rows.values():  # both micro-batches: one holds at most 2 (T - 1) scored tokens, two at least
                assert row["entropy/pred/train/tokens"] >= 4 * (T - 1 - 3)  # 4 (T - 1 - 3) (the Trainer shuffles rows)
                assert "entropy/pred/probe/mean" in row and "entropy/pred/gen/ttr" in row
            assert not _leftovers(model)
            printed = capsys.readouterr().out  # the first / last summaries at train end
            assert "router entropy (2 MoE layers)" in printed and "prediction entropy" in printed
            resumed = EntropyTrainerCallback(monitors(False))  # what a checkpoint restores
            resumed.load_state_dict(cb.state_dict())
            assert resumed.monitors[0].layer_names == cb.monitors[0].layer_names
            assert list(resumed.monitors[1].history) == list(cb.monitors[1].history)
            media = {k for driver in cb.drivers for k in driver.media()}  # what goes to an active wandb run
            assert media == {"entropy/router/load_heatmap", "entropy/pred/probe/pos_heatmap"}
        return losses, {k: v.clone() for k, v in model.state_dict().items()}

    loss_a, weights_a = run(False)
    loss_b, weights_b = run(True)
    assert loss_a == loss_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

