"""RepresentationEntropyMonitor: values vs the functional measures on brute-force captures, bit-identical training,
hook lifecycle, validation probe set, DDP union, errors, media."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from entrotrain.callbacks import RepresentationEntropyMonitor
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.representation import (
    diffusion_spectral_entropy,
    diffusion_spectral_mutual_information,
    effective_rank,
    matrix_entropy,
    median_pairwise_distance,
    rankme,
    vendi_score,
)
from tests.callbacks.repr_ddp_run import SEQ, ReprNet, data, loader
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import LossRecorder
from tests.helpers.scripts import run_script
from tests.helpers.spy_logger import SpyLogger
from tests.helpers.reference import one_thread  # noqa: F401,E402  (autouse fixture)

SCRIPT = Path(__file__).with_name("repr_ddp_run.py")
ALL = ["rankme", "effective_rank", "vendi", "matrix_entropy", "dse", "dsmi"]


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def fit(model, callbacks, val=False, **trainer_kwargs):
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, loader(), loader(n=24, seed=1) if val else None)
    return trainer


def captured(model: ReprNet, x: torch.Tensor, max_tokens: int | None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """What the tap should see, recomputed by hand batch by batch: token rows (evenly spaced tokens), encoder rows."""
    toks, encs = [], []
    with torch.no_grad():
        for xb in x.split(batch_size):
            tok = model.tokens(xb)
            encs.append(model.encoder(tok.mean(1)))
            if max_tokens is not None and max_tokens < SEQ:
                tok = tok[:, torch.linspace(0, SEQ - 1, max_tokens).round().long()]
            toks.append(tok.reshape(-1, tok.shape[-1]))
    return {"tokens": torch.cat(toks), "encoder": torch.cat(encs)}


@pytest.mark.parametrize("dropout, on", [(0.0, "train"), (0.3, "train"), (0.3, "validation")])
def test_training_is_bit_identical_with_monitor(dropout, on):
    runs = []
    for with_monitor in (False, True):
        L.seed_everything(0)
        model = ReprNet(dropout=dropout)
        recorder = LossRecorder()
        monitor = RepresentationEntropyMonitor(
            include=["tokens", "encoder.**"], measures=ALL, every_n_steps=1, max_samples=16, stage=on
        )
        fit(model, [recorder] + ([monitor] if with_monitor else []), val=True, max_steps=4, val_check_interval=2)
        runs.append((model, recorder.losses))
        if with_monitor:
            steps = [step for step, _ in monitor.history]
            assert steps == ([0, 1, 2, 3] if on == "train" else [2, 4]), steps
    (m0, l0), (m1, l1) = runs
    assert len(l0) == len(l1) == 4
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_values_equal_functional_measures_on_brute_force_captures(accumulate):
    L.seed_everything(1)
    model = ReprNet()
    batches = list(loader())[:accumulate]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    expected = captured(model, x, max_tokens=3)
    monitor = RepresentationEntropyMonitor(
        include=["tokens", "encoder"], measures=ALL, every_n_steps=100, max_tokens=3, max_samples=1000,
        dse_sigma=2.0, dse_t=2, vendi_q=2.0,
    )
    fit(model, [monitor], max_steps=1, accumulate_grad_batches=accumulate)
    logged = monitor.last_logged
    labels = {"tokens": y.repeat_interleave(3), "encoder": y}
    for name, rows in expected.items():
        key = f"entropy/repr/{name}"
        assert logged[f"{key}/rankme"] == pytest.approx(float(rankme(rows)), rel=1e-6)
        assert logged[f"{key}/effective_rank"] == pytest.approx(float(effective_rank(rows)), rel=1e-6)
        assert logged[f"{key}/vendi"] == pytest.approx(float(vendi_score(rows, q=2.0)), rel=1e-6)
        assert logged[f"{key}/matrix_entropy"] == pytest.approx(float(matrix_entropy(rows)), rel=1e-6)
        assert logged[f"{key}/dse"] == pytest.approx(float(diffusion_spectral_entropy(rows, 2.0, 2)), rel=1e-6)
        dsmi = diffusion_spectral_mutual_information(rows, labels[name], 2.0, 2)
        assert logged[f"{key}/dsmi"] == pytest.approx(float(dsmi), rel=1e-6, abs=1e-9)
        assert logged[f"{key}/n"] == logged[f"{key}/n_streamed"] == len(rows)
        assert logged[f"{key}/d"] == rows.shape[1]
        assert logged[f"{key}/dse_sigma"] == 2.0 and logged[f"{key}/dse_t"] == 2.0
        assert logged[f"{key}/vendi_q"] == 2.0 and logged[f"{key}/rankme_eps"] == 1e-7
        assert logged[f"{key}/median_dist"] == pytest.approx(float(median_pairwise_distance(rows)), rel=1e-6)
    assert logged["entropy/repr/tokens/n"] == 8 * accumulate * 3


def test_sampled_measures_use_a_fixed_size_reservoir():
    L.seed_everything(0)
    monitor = RepresentationEntropyMonitor(include=["tokens"], measures=["rankme", "matrix_entropy"], every_n_steps=2,
                                           max_tokens=None, max_samples=12)
    fit(ReprNet(), [monitor], max_steps=5)
    for _, row in monitor.history:
        assert row["entropy/repr/tokens/n"] == 12  # sampled measures: fixed n
        assert row["entropy/repr/tokens/n_streamed"] == 8 * SEQ  # streamed: every captured row


def test_logs_only_on_logging_steps_and_nothing_is_hooked_in_between():
    L.seed_everything(0)
    spy = SpyLogger()
    model = ReprNet()
    monitor = RepresentationEntropyMonitor(include=["encoder"], every_n_steps=3)
    trainer = fit(model, [monitor], max_steps=7, logger=spy)
    steps = [step for step, row in spy.rows if "entropy/repr/encoder/rankme" in row]
    assert steps == [0, 3, 6]
    assert [s for s, hooked in model.hooked_steps if hooked] == [0, 3, 6]
    assert no_hooks_left(model)
    assert "entropy/repr/encoder/rankme" in trainer.callback_metrics


def test_hooks_removed_after_an_exception():
    L.seed_everything(0)
    model = ReprNet()
    model.fail_at = 2
    monitor = RepresentationEntropyMonitor(include=["encoder"], every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [monitor], max_steps=5)
    assert no_hooks_left(model) and not monitor.tap.armed


def test_validation_probe_set_with_step_zero_from_the_sanity_check():
    L.seed_everything(0)
    spy = SpyLogger()
    model = ReprNet()
    monitor = RepresentationEntropyMonitor(
        include=["encoder"], measures=["rankme", "dse"], stage="validation", probe_batches=2, max_samples=100,
    )
    initial = copy.deepcopy(model)
    trainer = fit(model, [monitor], val=True, max_steps=6, val_check_interval=3, logger=spy, num_sanity_val_steps=2)
    assert [step for step, _ in monitor.history] == [0, 3, 6]
    logged_steps = [step for step, row in spy.rows if "entropy/repr/encoder/rankme" in row]
    val_steps = [step for step, row in spy.rows if "val/loss" in row]  # Lightning's own validation logging step
    assert len(val_steps) == 2 and logged_steps == [0, *val_steps]
    assert "entropy/repr/encoder/rankme" in trainer.callback_metrics
    # step 0: the first 2 validation batches (16 rows) at the initial weights, eval mode
    probe = torch.cat([b[0] for b in list(loader(n=24, seed=1))[:2]])
    rows = captured(initial.eval(), probe, None)["encoder"]
    first = monitor.history[0][1]
    assert first["entropy/repr/encoder/n"] == 16
    assert first["entropy/repr/encoder/rankme"] == pytest.approx(float(rankme(rows)), rel=1e-6)
    assert first["entropy/repr/encoder/dse"] == pytest.approx(float(diffusion_spectral_entropy(rows)), rel=1e-6)
    assert [s for s, hooked in model.hooked_steps if hooked] == []  # never armed during training steps
    assert no_hooks_left(model)


def test_sanity_check_that_misses_part_of_the_probe_logs_nothing():
    L.seed_everything(0)
    monitor = RepresentationEntropyMonitor(include=["encoder"], stage="validation", probe_batches=3)
    fit(ReprNet(), [monitor], val=True, max_steps=2, val_check_interval=2, num_sanity_val_steps=1)
    assert [(step, row["entropy/repr/encoder/n"]) for step, row in monitor.history] == [(2, 24)]


def test_summary_printed_at_fit_end(capsys):
    L.seed_everything(0)
    monitor = RepresentationEntropyMonitor(include=["encoder"], measures=["rankme"], every_n_steps=2)
    fit(ReprNet(), [monitor], max_steps=5)
    out = capsys.readouterr().out
    assert "representation entropy (train, step 0 -> step 4)" in out
    first, last = monitor.history[0][1], monitor.history[-1][1]
    a, b = first["entropy/repr/encoder/rankme"], last["entropy/repr/encoder/rankme"]
    assert f"{a:10.4f} {b:10.4f}" in out


def test_media_logged_to_wandb(monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    L.seed_everything(0)
    logger = WandbLogger(mode="disabled")
    calls: list[dict] = []
    monkeypatch.setattr(logger.experiment, "log", lambda row, *a, **k: calls.append(row))
    monitor = RepresentationEntropyMonitor(include=["tokens", "encoder"], every_n_steps=2, spectrum_every=1)
    fit(ReprNet(), [monitor], max_steps=3, logger=logger)
    media = [row for row in calls if "entropy/repr/encoder/spectrum" in row]
    assert [row["trainer/global_step"] for row in media] == [0, 2]
    assert "entropy/repr/tokens/spectrum" in media[0]
    spectrum = monitor.spectra["encoder"]
    assert spectrum.shape == (8,) and bool((spectrum[:-1] >= spectrum[1:]).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"stage": "test"}, "stage must be"),
        ({"measures": ["rank"]}, "unknown representation measure"),
        ({"measures": ["rankme", "rankme"]}, "twice"),
        ({"max_samples": 1}, "max_samples"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"dse_sigma": 0.0}, "dse_sigma"),
        ({"dse_t": 0}, "dse_t"),
        ({"vendi_kernel": "poly"}, "vendi_kernel"),
        ({"measures": ["dsmi"], "label_index": None}, "label_index"),
        ({"layout": "nhwc"}, "layout"),
    ],
)
def test_bad_arguments_raise_early(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        RepresentationEntropyMonitor(**kwargs)


def test_layout_reaches_the_tap_so_a_channels_last_block_is_read_by_its_channels():
    """A block returning (B, H, W, C) is read (B, C, H, W) under 'auto' (it is no Linear / LayerNorm); layout=
    'channels_last' makes the rows its C channels. The monitor had no way to say so."""

    class Grid(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 2, 2, -1)  # (B, H=2, W=2, C)

    model = torch.nn.Sequential(torch.nn.Linear(4, 12), Grid())
    for layout, width in (("auto", 2), ("channels_last", 3)):
        monitor = RepresentationEntropyMonitor(include=["1"], layout=layout, every_n_steps=1)
        monitor.bind(model)
        with monitor.tap:
            model(torch.randn(5, 4))
        assert monitor.layers["1"].dim == width
        monitor._release()


def test_no_matching_module_and_modules_that_never_run():
    with pytest.raises(EntrotrainError, match="Fix the glob"):
        fit(ReprNet(), [RepresentationEntropyMonitor(include=["backbone.*"])], max_steps=1)

    class Unused(ReprNet):
        def __init__(self):
            super().__init__()
            self.spare = torch.nn.Linear(2, 2)

    with pytest.raises(TapError, match="captured nothing"):
        fit(Unused(), [RepresentationEntropyMonitor(include=["spare"])], max_steps=1)


def test_dsmi_needs_labels_in_the_batch():
    class NoLabels(ReprNet):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0], batch[1]), batch_idx)

    monitor = RepresentationEntropyMonitor(include=["encoder"], measures=["dsmi"], label_index=5)
    with pytest.raises(EntrotrainError, match="label_index"):
        fit(NoLabels(), [monitor], max_steps=1)

    class TwoViews(ReprNet):  # the module sees 2B rows (stacked views) for B labels
        def training_step(self, batch, batch_idx):
            x, y = batch
            return super().training_step((torch.cat([x, x]), torch.cat([y, y])), batch_idx)

    monitor = RepresentationEntropyMonitor(include=["encoder"], measures=["dsmi"])
    with pytest.raises(TapError, match="labels"):
        fit(TwoViews(), [monitor], max_steps=1)


@pytest.mark.parametrize("accumulate", [2])  # micro-batches and ranks at once (one DDP run costs ~20 s)
def test_two_rank_ddp_equals_single_process_on_union(tmp_path, accumulate):
    out = tmp_path / "logged.json"
    run_script(SCRIPT, tmp_path, str(out), str(accumulate))
    result = json.loads(out.read_text())
    logged = result["logged"]
    # the layers each rank saw (a rank with none joins too), then one all-reduce of all layers and measures
    assert result["collectives"] == ["all_gather_object", "all_reduce"]
    L.seed_everything(3)
    model = ReprNet()
    x = data().tensors[0][: 16 * accumulate]  # rank r takes samples r, r+2, ...: together the first 16·accumulate
    for name, rows in captured(model, x, None).items():
        key = f"entropy/repr/{name}"
        assert logged[f"{key}/n_streamed"] == len(rows)
        assert logged[f"{key}/rankme"] == pytest.approx(float(rankme(rows)), rel=1e-6)
        assert logged[f"{key}/effective_rank"] == pytest.approx(float(effective_rank(rows)), rel=1e-6)
        assert logged[f"{key}/vendi"] == pytest.approx(float(vendi_score(rows)), rel=1e-6)
    # the encoder's union (16·accumulate rows) fits in the reservoirs: the sampled measure matches too
    enc = captured(model, x, None)["encoder"]
    assert logged["entropy/repr/encoder/matrix_entropy"] == pytest.approx(float(matrix_entropy(enc)), rel=1e-6)
