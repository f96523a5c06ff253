"""PredictionEntropyMonitor: values against a float64 brute force (train, probe, per position, generation),
padding, non-finite data, gradient accumulation, both sources, bit-identical training, lifecycle, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor, prediction_entropy_summary
from entrotrain.dashboards.prediction_media import position_profile_grid, position_profile_over_time_image
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.generation_diversity import distinct_n, repetition_rate, type_token_ratio
from tests.callbacks.pred_ddp_run import MONITOR, SEQ, PredLM, data, probe
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.scripts import run_script
from tests.helpers.spy_logger import SpyLogger

SCRIPT = Path(__file__).with_name("pred_ddp_run.py")
P = "entropy/pred"


def brute(logits: torch.Tensor, labels: torch.Tensor, floor: float) -> dict[str, float]:
    """Plain float64 statistics over positions with label != -100 (and finite logits)."""
    z = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    keep = (y != -100) & torch.isfinite(z).all(-1)
    z, y = z[keep], y[keep]
    logp = z.log_softmax(-1)
    h = -(logp.exp() * logp).sum(-1)
    s = h.sort().values
    def q(p):
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return {
        "mean": float(h.mean()), "p10": q(0.1), "p50": q(0.5), "p90": q(0.9),
        "top1_prob": float(logp.exp().amax(-1).mean()), "below_floor_frac": float((h < floor).double().mean()),
        "nll": float(-logp.gather(1, y[:, None]).mean()), "tokens": float(keep.sum()),
    }


class Recorder(L.Callback):
    """Keeps each training batch's returned logits and labels."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((outputs["logits"].clone(), batch[1].clone()))


def fit(model, callbacks, max_steps=2, batch_size=8, **kwargs):
    trainer = quiet_trainer(callbacks=callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(model, DataLoader(data(), batch_size=batch_size, shuffle=False))
    return trainer


def close(row: dict, prefix: str, expected: dict, rel: float = 1e-5) -> None:
    for key, value in expected.items():
        assert row[f"{prefix}/{key}"] == pytest.approx(value, rel=rel, abs=1e-6), key


def test_train_and_probe_statistics_match_brute_force():
    L.seed_everything(0)
    model = PredLM(lr=0.0)  # parameters stay put: the probe sees the same model as the training batch
    rec = Recorder()
    monitor = PredictionEntropyMonitor(probe=probe(), **MONITOR)
    fit(model, [rec, monitor])
    (step0, row0), (step1, row1) = monitor.history
    assert (step0, step1) == (0, 1)
    for (logits, labels), row in zip(rec.seen, (row0, row1)):
        close(row, f"{P}/train", brute(logits, labels, MONITOR["floor"]))
    px, py = probe()
    with torch.no_grad():
        logits = model(px)
    close(row0, f"{P}/probe", brute(logits, py, MONITOR["floor"]))
    # the per-position profile: mean over the probe rows whose label at that position is not padding
    h = -(logits.double().log_softmax(-1).exp() * logits.double().log_softmax(-1)).sum(-1)
    for i in MONITOR["positions"]:
        valid = py[:, i] != -100
        assert row0[f"{P}/probe/pos/{i}"] == pytest.approx(float(h[valid, i].mean()), rel=1e-5)
    assert monitor.profiles[0][1][0] == pytest.approx(float(h[:, 0].mean()), rel=1e-5)
    assert len(monitor.profiles[0][1]) == SEQ
    assert row0[f"{P}/nonfinite"] == 0.0


def test_padding_is_not_data():
    L.seed_everything(0)
    rec = Recorder()
    monitor = PredictionEntropyMonitor(**{**MONITOR, "generation_prompts": None})
    fit(PredLM(lr=0.0), [rec, monitor], max_steps=1)
    row = monitor.history[0][1]
    assert row[f"{P}/train/tokens"] == 8 * SEQ - 4 * 3  # four odd rows with 3 padded labels each
    logits, labels = rec.seen[0]
    with_padding = brute(logits, torch.zeros_like(labels), MONITOR["floor"])["mean"]
    assert row[f"{P}/train/mean"] != pytest.approx(with_padding, rel=1e-9)


def test_generation_is_greedy_on_the_prompts_and_restores_modes():
    L.seed_everything(0)
    model = PredLM(lr=0.0, dropout=0.2)
    monitor = PredictionEntropyMonitor(**{**MONITOR, "probe": probe()})
    fit(model, [monitor], max_steps=1)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    conts = []
    with torch.no_grad():
        for prompt in MONITOR["generation_prompts"]:
            idx = torch.tensor([prompt])
            for _ in range(MONITOR["max_new_tokens"]):
                idx = torch.cat([idx, model(idx[:, -SEQ:])[:, -1].argmax(-1, keepdim=True)], 1)
            conts.append(idx[0, len(prompt):])
    tokens = torch.stack(conts)
    assert torch.equal(monitor.last_continuations, tokens)
    row = monitor.history[0][1]
    for k in (1, 2, 3):
        assert row[f"{P}/gen/distinct_{k}"] == pytest.approx(float(distinct_n(tokens, k)))
    assert row[f"{P}/gen/ttr"] == pytest.approx(float(type_token_ratio(tokens)))
    assert row[f"{P}/gen/repetition"] == pytest.approx(float(repetition_rate(tokens, 4)))


def test_head_source_equals_output_source_and_removes_its_hook():
    rows = {}
    for source in ("output", "head"):
        L.seed_everything(0)
        model = PredLM(lr=0.05, return_logits=source == "output")
        monitor = PredictionEntropyMonitor(source=source, head="**.lm_head", probe=probe(), **MONITOR)
        fit(model, [monitor], max_steps=3)
        rows[source] = monitor.history
        assert not model.model.lm_head._forward_pre_hooks
    for (s1, a), (s2, b) in zip(rows["output"], rows["head"]):
        assert s1 == s2 and a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_training_is_bit_identical_with_and_without_the_monitor():
    def run(callbacks):
        L.seed_everything(0)
        model = PredLM(lr=0.05, dropout=0.3)  # dropout: the monitor must not consume the training RNG
        fit(model, callbacks, max_steps=4)
        return [p.detach().clone() for p in model.parameters()]

    plain = run([])
    for source in ("output", "head"):
        watched = run([PredictionEntropyMonitor(source=source, probe=probe(), **MONITOR)])
        assert all(torch.equal(a, b) for a, b in zip(plain, watched))


def test_gradient_accumulation_pools_the_micro_batches():
    L.seed_everything(0)
    rec = Recorder()
    monitor = PredictionEntropyMonitor(**{**MONITOR, "generation_prompts": None, "every_n_steps": 2})
    fit(PredLM(lr=0.0), [rec, monitor], max_steps=2, accumulate_grad_batches=2)
    step, row = monitor.history[0]
    assert step == 0 and len(monitor.history) == 1  # step 0 logged (both micro-batches), step 1 not
    logits = torch.cat([rec.seen[0][0], rec.seen[1][0]])
    labels = torch.cat([rec.seen[0][1], rec.seen[1][1]])
    close(row, f"{P}/train", brute(logits, labels, MONITOR["floor"]))


def test_nonfinite_positions_are_counted_and_left_out():
    L.seed_everything(0)
    model = PredLM(lr=0.0)
    model.nan_rows = [0, 2]
    rec = Recorder()
    monitor = PredictionEntropyMonitor(**{**MONITOR, "generation_prompts": None})
    spy = SpyLogger()
    with pytest.warns(UserWarning, match="NaN/Inf"):
        fit(model, [rec, monitor], max_steps=1, logger=spy)
    row = monitor.history[0][1]
    assert row[f"{P}/nonfinite"] == 2.0
    close(row, f"{P}/train", brute(*rec.seen[0], MONITOR["floor"]))
    logged = {k for _, r in spy.rows for k in r}
    assert f"{P}/train/mean" in logged and all(math.isfinite(v) for _, r in spy.rows for v in r.values())


def test_all_positions_nonfinite_publishes_nan_to_callback_metrics_only():
    L.seed_everything(0)
    model = PredLM(lr=0.0)
    monitor = PredictionEntropyMonitor(**{**MONITOR, "generation_prompts": None, "positions": 0})

    def step(self, batch, batch_idx):  # every position of the returned logits is NaN
        out = PredLM.training_step(self, batch, batch_idx)
        out["logits"] = torch.full_like(out["logits"], float("nan"))
        return out

    model.training_step = step.__get__(model)
    spy = SpyLogger()
    with pytest.warns(UserWarning):
        trainer = fit(model, [monitor], max_steps=1, logger=spy)
    assert f"{P}/train/mean" not in monitor.history[0][1]
    assert monitor.history[0][1][f"{P}/nonfinite"] == 8 * SEQ - 12
    assert all(f"{P}/train/mean" not in r for _, r in spy.rows)
    assert f"{P}/train/mean" not in trainer.callback_metrics or math.isnan(float(trainer.callback_metrics[f"{P}/train/mean"]))


def test_datamodule_validation_data_is_the_default_probe():
    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(data(), batch_size=8)

        def val_dataloader(self):
            return DataLoader(torch.utils.data.TensorDataset(*probe()), batch_size=4)

    L.seed_everything(0)
    model = PredLM(lr=0.0)
    monitor = PredictionEntropyMonitor(**{**MONITOR, "probe_batches": 1, "generation_prompts": 2, "prompt_length": 3})
    quiet_trainer(callbacks=[monitor], max_steps=1, limit_val_batches=0).fit(model, datamodule=DM())
    px, py = probe()
    with torch.no_grad():
        logits = model(px[:4])
    close(monitor.history[0][1], f"{P}/probe", brute(logits, py[:4], MONITOR["floor"]))
    assert [p.tolist() for p in monitor._prompts] == [px[0, :3].tolist(), px[1, :3].tolist()]


def test_errors_name_the_argument_and_the_fix():
    with pytest.raises(EntrotrainError, match="every_n_steps"):
        PredictionEntropyMonitor(every_n_steps=0)
    with pytest.raises(EntrotrainError, match="source"):
        PredictionEntropyMonitor(source="logits")
    with pytest.raises(EntrotrainError, match="multiple"):
        PredictionEntropyMonitor(every_n_steps=10, generate_every_n_steps=15)
    with pytest.raises(EntrotrainError, match="generation_prompts"):
        PredictionEntropyMonitor(generation_prompts=[[]])
    with pytest.raises(EntrotrainError, match="n must list"):
        PredictionEntropyMonitor(n=[])
    with pytest.raises(EntrotrainError, match="floor"):
        PredictionEntropyMonitor(floor=-1.0)
    L.seed_everything(0)
    with pytest.raises(EntrotrainError, match="return the logits|'logits'"):
        fit(PredLM(return_logits=False), [PredictionEntropyMonitor(**MONITOR)], max_steps=1)
    with pytest.raises(EntrotrainError, match="exactly one module"):
        fit(PredLM(), [PredictionEntropyMonitor(source="head", head="nothing*", **MONITOR)], max_steps=1)
    with pytest.raises(EntrotrainError, match="probe set"):
        fit(PredLM(), [PredictionEntropyMonitor(**{**MONITOR, "probe": probe(), "generation_prompts": 99})], max_steps=1)


def test_head_running_twice_is_a_clear_error():
    L.seed_everything(0)
    model = PredLM(return_logits=False)

    def step(self, batch, batch_idx):
        self.model(batch[0])
        return PredLM.training_step(self, batch, batch_idx)

    model.training_step = step.__get__(model)
    with pytest.raises(TapError, match="ran 2 times"):
        fit(model, [PredictionEntropyMonitor(source="head", **{**MONITOR, "generation_prompts": None})], max_steps=1)
    assert not model.model.lm_head._forward_pre_hooks


def test_state_dict_round_trip_and_reset_per_fit():
    L.seed_everything(0)
    monitor = PredictionEntropyMonitor(probe=probe(), **MONITOR)
    fit(PredLM(), [monitor], max_steps=2)
    state = monitor.state_dict()
    other = PredictionEntropyMonitor(probe=probe(), **MONITOR)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.state_dict() == state
    fit(PredLM(), [monitor], max_steps=1)  # a new fit starts afresh
    assert [s for s, _ in monitor.history] == [0]
    table = other.summary_table()
    assert "held-out entropy" in table and "greedy distinct-2" in table


def test_summary_reference_step_and_summary_helper():
    monitor = PredictionEntropyMonitor(reference_step=5, **MONITOR)
    monitor.history.extend([(0, {f"{P}/probe/mean": 3.0}), (4, {f"{P}/probe/mean": 2.0}), (8, {f"{P}/probe/mean": 0.5})])
    assert "step 0: 3.0000 -> step 4: 2.0000 -> step 8: 0.5000" in monitor.summary_table()
    sums = {"tokens": 0.0, "entropy": 0.0, "top1": 0.0, "below": 0.0, "nonfinite": 3.0, "nll": 0.0, "nll_tokens": 0.0}
    assert prediction_entropy_summary(sums, torch.zeros(0)) == {"tokens": 0.0, "nonfinite": 3.0}


def test_position_heatmap_grid_and_image():
    grid = position_profile_grid([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25])])
    assert grid.shape == (3, 2) and grid[2, 1].isnan() and grid[1, 1] == 0.25
    image = position_profile_over_time_image([torch.rand(10), torch.rand(10)], [0, 25])
    assert image is not None and "positions 0..9" in image._caption
    assert position_profile_over_time_image([], []) is None


def test_two_rank_ddp_equals_one_process_on_the_union_batch(tmp_path):
    source = "head"  # the reduction is the same code for both sources (head == output is tested above)
    out = tmp_path / "history.json"
    run_script(SCRIPT, tmp_path, str(out), source)
    ddp = json.loads(out.read_text())["history"]
    L.seed_everything(3)
    model = PredLM(lr=0.0, return_logits=source == "output")
    monitor = PredictionEntropyMonitor(source=source, head="model.lm_head", probe=probe(), **MONITOR)
    fit(model, [monitor], max_steps=2, batch_size=16)  # rank r took rows r, r+2, ... of each 16: the same union
    assert [s for s, _ in ddp] == [s for s, _ in monitor.history] == [0, 1]
    for (_, a), (_, b) in zip(ddp, monitor.history):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_probe_and_generation_forwards_are_invisible_to_other_monitors_whatever_the_order():
    """The probe / generation forwards run under taps.exclusive_capture: an AttentionEntropyMonitor listed *after*
    this monitor (its tap still armed when this one runs) reports exactly what it reports when listed before."""
    from entrotrain.callbacks import AttentionEntropyMonitor

    def run(order):
        torch.manual_seed(0)
        pred = PredictionEntropyMonitor(probe=probe(), **MONITOR)
        attn = AttentionEntropyMonitor(every_n_steps=MONITOR["every_n_steps"])
        trainer = fit(PredLM(), [pred, attn] if order == "pred_first" else [attn, pred])
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("entropy/attn")}

    first, last = run("pred_first"), run("pred_last")
    assert first and first == last
