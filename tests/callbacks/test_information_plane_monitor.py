"""InformationPlaneMonitor: values equal recomputation on the probe set, schedules, probe sources, layer names,
non-finite layers, bit-identical training, state, summary, wandb table and argument checks."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

from hypothesis import given
from hypothesis import strategies as st

from entrotrain.callbacks.information_plane_monitor import (
    InformationPlaneMonitor,
    activation_output_names,
    chunk_layout,
    log_spaced_epochs,
)
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.information import estimator_parameters, information_plane_point
from entrotrain.taps.activation_tap import ActivationTap
from entrotrain.tasks.information_plane import InformationPlaneDataModule, InformationPlaneTask, icosahedron_dataset
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture: tiny matmuls run faster on one thread)
from tests.helpers.spy_logger import SpyLogger

FAST = ["binning", "adaptive_binning"]


def fit(model, callbacks, dm=None, **kw):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=3, num_sanity_val_steps=0, deterministic=True, limit_val_batches=0,
    )
    defaults.update(kw)
    trainer = L.Trainer(callbacks=callbacks, **defaults)
    trainer.fit(model, datamodule=dm if dm is not None else InformationPlaneDataModule(batch_size=512))
    return trainer


class Snapshots(Callback):
    """Copies the weights at every training batch start (what the monitor sees before the update)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()})


def manual_layers(state: dict[str, torch.Tensor], x: torch.Tensor, act=torch.tanh) -> list[torch.Tensor]:
    """The IBMLP's post-activation layers and softmax output, by hand from a state dict."""
    out, h = [], x
    for i in range(5):
        h = act(F.linear(h, state[f"model.layers.{i}.0.weight"], state[f"model.layers.{i}.0.bias"]))
        out.append(h)
    out.append(F.linear(h, state["model.output.0.weight"], state["model.output.0.bias"]).softmax(-1))
    return out


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_values_equal_recomputation_on_the_probe_set(activation):
    L.seed_everything(0)
    snaps = Snapshots()
    spy = SpyLogger()
    params = {"binning": {"n_bins": 20}, "kde": {"noise_variance": 1e-2}}
    monitor = InformationPlaneMonitor(
        estimators=["binning", "adaptive_binning", "kde"], estimator_params=params, every_n_steps=2, max_probe=600,
        print_summary=False,
    )
    fit(InformationPlaneTask(activation=activation, lr=1e-2), [snaps, monitor], max_steps=5, logger=spy)
    # the probe: train then val dataset rows, seeded subsample of 600 sorted indices (own generator)
    x, y, _ = icosahedron_dataset()
    index = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:600].sort().values
    x, y = x[index], y[index]
    logged = {step: row for step, row in spy.rows if any(k.startswith("info/") for k in row)}
    assert sorted(logged) == [0, 2, 4]
    act = torch.tanh if activation == "tanh" else torch.relu
    for step, row in logged.items():
        layers = manual_layers(snaps.states[step], x, act)
        for i, t in enumerate(layers):
            for est in ["binning", "adaptive_binning", "kde"]:
                ixt, ity = information_plane_point(t, y, est, x=x, base=2.0, **params.get(est, {}))
                assert row[f"info/L{i + 1}/{est}/I_XT"] == float(ixt), (step, i, est)
                assert row[f"info/L{i + 1}/{est}/I_TY"] == float(ity), (step, i, est)
        assert row["info/nonfinite"] == 0.0
    assert logged[4]["info/epoch"] == 0.0  # 7 batches of 512 per epoch
    hp = {k: v for h in spy.hparams for k, v in h.items()}
    assert hp["info/layers"] == {f"L{i + 1}": f"model.layers.{i}.1" for i in range(5)} | {"L6": "model.output.1"}
    assert hp["info/binning/params"] == estimator_parameters("binning", base=2.0, n_bins=20)
    assert hp["info/probe"] == {"source": "all", "rows": 600, "base": 2.0}


class PoisonAfter(nn.Module):
    """Identity in training; in eval mode (the monitor's probe pass) row 0 turns NaN when ``active``."""

    active = False

    def forward(self, h):
        if self.training or not self.active:
            return h
        h = h.clone()
        h[0] = float("nan")
        return h


class SmallNet(L.LightningModule):
    """12 → 6 (tanh, dropout) → 2 logits (no activation after the head: its Linear output is the layer); ``side``
    sees the hidden layer on a branch whose output is not used (it can turn NaN without touching the head)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Dropout(dropout))
        self.side = PoisonAfter()
        self.head = nn.Sequential(nn.Linear(6, 2))

    def forward(self, x):
        h = self.body(x)
        self.side(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_default_layers_are_activation_outputs():
    assert activation_output_names(SmallNet()) == ["body.2", "head.0"]
    assert activation_output_names(InformationPlaneTask()) == [f"model.layers.{i}.1" for i in range(5)] + [
        "model.output.1"
    ]
    assert activation_output_names(nn.Linear(3, 2)) == []


def test_training_is_bit_identical_with_and_without_the_monitor():
    def run(with_monitor: bool):
        L.seed_everything(7)
        model = SmallNet(dropout=0.3)  # dropout: the RNG stream and the train/eval flags must be left alone
        callbacks = [InformationPlaneMonitor(estimators=FAST, every_n_steps=1, print_summary=False)] if with_monitor else []
        fit(model, callbacks, dm=InformationPlaneDataModule(batch_size=256), max_steps=20)
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), model.training

    a, rng_a, mode_a = run(False)
    b, rng_b, mode_b = run(True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(rng_a, rng_b) and mode_a == mode_b


def test_nonfinite_layer_is_skipped_counted_and_never_logged(recwarn):
    L.seed_everything(0)
    spy = SpyLogger()
    model = SmallNet()

    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            PoisonAfter.active = trainer.global_step >= 2  # before the monitor's pass (callback order)

    monitor = InformationPlaneMonitor(
        include=["side", "head.0"], estimators=FAST, every_n_steps=1, max_probe=300, print_summary=False
    )
    try:
        trainer = fit(model, [Poison(), monitor], max_steps=4, logger=spy)
    finally:
        PoisonAfter.active = False
    rows = {step: row for step, row in spy.rows if "info/nonfinite" in row}
    assert [rows[s]["info/nonfinite"] for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    for step in (2, 3):
        assert not any(k.startswith("info/L1/") for k in rows[step])  # the poisoned layer: nothing to loggers
        assert all(math.isfinite(v) for v in rows[step].values())
        assert "info/L2/binning/I_XT" in rows[step]
    assert math.isnan(float(trainer.callback_metrics["info/L1/binning/I_XT"]))  # stale value not kept
    assert sum("NaN/Inf" in str(w.message) for w in recwarn) == 1  # warned once
    assert all("L1/" not in key for _, _, row in monitor.history[2:] for key in row)


@pytest.mark.parametrize(
    "kw, epochs",
    [({"every_n_epochs": 2}, [0, 2, 4]), ({"log_spaced": 4}, log_spaced_epochs(6, 4)), ({}, [0, 1, 2, 3, 4, 5])],
)
def test_epoch_schedules_evaluate_at_the_first_batch(kw, epochs):
    L.seed_everything(0)
    monitor = InformationPlaneMonitor(estimators=["binning"], max_probe=200, print_summary=False, **kw)
    fit(SmallNet(), [monitor], dm=InformationPlaneDataModule(batch_size=1024), max_steps=-1, max_epochs=6)
    assert [e for _, e, _ in monitor.history] == epochs
    assert [s for s, _, _ in monitor.history] == [4 * e for e in epochs]  # 4 batches per epoch, first one


def test_log_spaced_matches_idnns_and_steps_schedule_with_accumulation():
    sched = log_spaced_epochs(8000, 400)
    assert len(sched) == 274 and sched[:30] == list(range(30)) and sched[-1] == 7999
    L.seed_everything(0)
    monitor = InformationPlaneMonitor(estimators=["binning"], every_n_steps=2, max_probe=200, print_summary=False)
    fit(SmallNet(), [monitor], dm=InformationPlaneDataModule(batch_size=256), max_steps=5, accumulate_grad_batches=2)
    assert [s for s, _, _ in monitor.history] == [0, 2, 4]  # once per optimizer step, not per micro-batch
    L.seed_everything(0)
    by_steps = InformationPlaneMonitor(estimators=["binning"], log_spaced=3, max_probe=200, print_summary=False)
    fit(SmallNet(), [by_steps], dm=InformationPlaneDataModule(batch_size=1024), max_steps=16)  # 4 epochs of 4
    assert [e for _, e, _ in by_steps.history] == log_spaced_epochs(4, 3)


def test_log_spaced_spans_the_fit_when_max_steps_ends_it_before_max_epochs():
    # max_steps=16 ends the fit after 4 epochs of 4 batches: the schedule spans those 4 epochs, not max_epochs=1000
    # (whose log-spaced epochs 0, 30, 999 would evaluate once)
    by_steps = InformationPlaneMonitor(estimators=["binning"], log_spaced=3, max_probe=200, print_summary=False)
    fit(SmallNet(), [by_steps], dm=InformationPlaneDataModule(batch_size=1024), max_steps=16, max_epochs=1000)
    assert [e for _, e, _ in by_steps.history] == log_spaced_epochs(4, 3) == [0, 1, 3]
    # 4 batches per epoch accumulated by 3: 2 optimizer steps per epoch (the last, partial group steps too), so
    # max_steps=8 is 4 epochs (counting floor(4 / 3) = 1 step per epoch gave 8: epochs 0, 1, 7, the last never run)
    accumulated = InformationPlaneMonitor(estimators=["binning"], log_spaced=3, max_probe=200, print_summary=False)
    trainer = fit(SmallNet(), [accumulated], dm=InformationPlaneDataModule(batch_size=1024), max_steps=8,
                  accumulate_grad_batches=3)
    assert trainer.current_epoch == 4 and [e for _, e, _ in accumulated.history] == [0, 1, 3]


def first_two_columns(rows):
    return rows[:, :2]


def test_logged_parameters_name_a_compress_callable_not_its_address():
    # pca_ksg's compress callable is logged by name (loggable_parameters), not as "<function ... at 0x7f...>", which
    # json loggers and the report printed and which differs from run to run
    spy = SpyLogger()
    monitor = InformationPlaneMonitor(
        estimators=["pca_ksg"], estimator_params={"pca_ksg": {"compress": first_two_columns}}, every_n_steps=100,
        max_probe=64, print_summary=False,
    )
    fit(SmallNet(), [monitor], logger=spy, max_steps=1)
    hp = {k: v for h in spy.hparams for k, v in h.items()}
    logged = hp["info/pca_ksg/params"]
    assert logged["compress"] == "first_two_columns" and logged["compress_x"] is None and logged["k"] == 3
    assert math.isfinite(monitor.last_logged["info/L1/pca_ksg/I_XT"])


@given(st.integers(0, 50), st.integers(1, 7), st.integers(1, 5))
def test_chunk_layout_rebuilds_the_probe_for_any_world(n, batch, world):
    """Simulated ranks: each forwards chunks r, r + W, ...; padding, gather and layout give back the probe."""
    probe = torch.arange(n, dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64)
    chunks = list(probe.split(batch))
    where, per = chunk_layout([len(c) for c in chunks], world)
    buffers = torch.full((world, per, 3), -1.0, dtype=torch.float64)
    for r in range(world):
        mine = chunks[r::world]
        local = torch.cat(mine) if mine else probe[:0]
        buffers[r, : len(local)] = local
    rebuilt = torch.cat([buffers[r, o : o + len(c)] for (r, o), c in zip(where, chunks)]) if chunks else probe[:0]
    assert torch.equal(rebuilt, probe)
    assert per == max([sum(len(c) for c in chunks[r::world]) for r in range(world)] + [0])


@given(st.integers(1, 3000), st.integers(2, 500))
def test_log_spaced_epochs_properties(total, points):
    assert log_spaced_epochs(total, 1) == [0]  # logspace of one point is its start
    epochs = log_spaced_epochs(total, points)
    # int() truncation of 2**log2(total) may give total - 1 (IDNNs' own rounding, kept): last epoch total-1 or -2
    assert epochs[0] == 0 and epochs[-1] in (total - 1, total - 2) and len(epochs) <= min(points, total)
    assert all(a < b for a, b in zip(epochs, epochs[1:]))
    gaps = [b - a for a, b in zip(epochs, epochs[1:])]
    assert all(g1 <= g2 + 1 for g1, g2 in zip(gaps, gaps[1:]))  # dense early, sparse late (± integer rounding)


class ProbeDM(InformationPlaneDataModule):
    def information_probe(self):
        return self.x[:100], self.y[:100]


@pytest.mark.parametrize(
    "probe, rows", [("train", 3277), ("val", 819), ("all", 4096), ("datamodule", 100)],
)
def test_probe_sources(probe, rows):
    L.seed_everything(0)
    monitor = InformationPlaneMonitor(estimators=["binning"], every_n_steps=10, probe=probe, print_summary=False)
    fit(SmallNet(), [monitor], dm=ProbeDM(batch_size=1024), max_steps=1)
    x, y = monitor._probe_data
    assert len(x) == rows
    expected = {"train": slice(0, 3277), "val": slice(3277, 4096), "all": slice(0, 4096), "datamodule": slice(0, 100)}
    full_x, full_y, _ = icosahedron_dataset()
    assert torch.equal(x, full_x[expected[probe]]) and torch.equal(y, full_y[expected[probe]])


class BoolProbeDM(InformationPlaneDataModule):
    def information_probe(self):
        return self.x[:100], self.y[:100].bool()


def test_bool_probe_labels_are_the_classes_0_and_1():
    # the estimators take bool labels as 0/1 classes; the monitor refused them ("1-D integer tensor")
    points = []
    for dm in (BoolProbeDM(batch_size=1024), ProbeDM(batch_size=1024)):
        L.seed_everything(0)
        monitor = InformationPlaneMonitor(estimators=FAST, every_n_steps=10, probe="datamodule", print_summary=False)
        fit(SmallNet(), [monitor], dm=dm, max_steps=1)
        assert torch.equal(monitor._probe_data[1], icosahedron_dataset()[1][:100])  # long 0/1, as the int probe
        points.append(monitor.history)
    assert points[0] == points[1] and points[0][0][2]


class ItemDataset(torch.utils.data.Dataset):
    """Not a TensorDataset: items are dicts read one by one."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_probe_subsample_is_seeded_and_read_by_index_from_any_dataset():
    x, y, _ = icosahedron_dataset()
    dm = L.LightningDataModule.from_datasets(ItemDataset(x, y), batch_size=512)
    monitor = InformationPlaneMonitor(estimators=["binning"], every_n_steps=10, probe="train", max_probe=50, seed=4,
                                      input_index="x", label_index="y", print_summary=False)

    class DictNet(SmallNet):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    L.seed_everything(0)
    fit(DictNet(), [monitor], dm=dm, max_steps=1)
    index = torch.randperm(4096, generator=torch.Generator().manual_seed(4))[:50].sort().values
    px, py = monitor._probe_data
    assert torch.equal(px, x[index]) and torch.equal(py, y[index])


def test_probe_errors():
    class BadLabels(InformationPlaneDataModule):
        def information_probe(self):
            return self.x, self.y.float()

    with pytest.raises(EntrotrainError, match="1-D integer"):
        fit(SmallNet(), [InformationPlaneMonitor(estimators=["binning"], probe="datamodule")], dm=BadLabels())
    with pytest.raises(EntrotrainError, match="information_probe"):
        fit(SmallNet(), [InformationPlaneMonitor(estimators=["binning"], probe="datamodule")],
            dm=L.LightningDataModule.from_datasets(InformationPlaneDataModule().train_set, batch_size=512))

    class Twice(SmallNet):
        def forward(self, x):
            return self.head(self.body(self.body[0](x)[:, :0].sum(1, keepdim=True) + x))

    with pytest.raises(TapError, match="exactly once"):
        fit(Twice(), [InformationPlaneMonitor(include=["body.0"], estimators=["binning"])], max_steps=1)


class PerToken(SmallNet):
    """The hidden layer sees each input as 3 positions (batch, 3, 6): one call per forward, 3 rows per input."""

    def forward(self, x):
        return self.head(self.body(torch.stack([x, -x, 2 * x], dim=1)).mean(1))


def test_a_per_token_layer_is_refused_with_the_reason():
    # a (batch, seq, features) output ran once per forward: the error names the token axis and the fix (a pooled
    # module), not "a layer must run exactly once per input", which it did
    with pytest.raises(TapError, match=r"token / position axis .* one representation per input") as err:
        fit(PerToken(), [InformationPlaneMonitor(include=["body.1"], estimators=["binning"], max_probe=64)],
            max_steps=1)
    assert "exactly once" not in str(err.value) and "192 activation rows for 64 probe inputs" in str(err.value)


def test_state_dict_summary_and_resume_history(capsys):
    L.seed_everything(0)
    monitor = InformationPlaneMonitor(estimators=FAST, every_n_steps=1, max_probe=300)
    fit(SmallNet(), [monitor], max_steps=4)
    out = capsys.readouterr().out
    stats = monitor.summary()
    peak = max(row["L1/binning"][0] for _, _, row in monitor.history)
    assert stats["L1/binning"]["peak"] == peak and stats["L1/binning"]["end"] == monitor.history[-1][2]["L1/binning"][0]
    assert "information plane (bits; 4 evaluations kept" in out and "L1=body.2, L2=head.0" in out
    assert f"{peak:9.3f}" in out and "one evaluation (300 probe rows, 2 layers x 2 estimators)" in out
    fresh = InformationPlaneMonitor(estimators=FAST)
    fresh.load_state_dict(monitor.state_dict())
    assert list(fresh.history) == list(monitor.history)
    assert monitor._table_rows()[0][:4] == [0, 0, "L1", "adaptive_binning"]


def test_wandb_table_and_scatter_logged_at_fit_end(monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    L.seed_everything(0)
    logger = WandbLogger(mode="disabled")
    calls: list[dict] = []
    monkeypatch.setattr(logger.experiment, "log", lambda row, *a, **k: calls.append(row))
    monitor = InformationPlaneMonitor(estimators=FAST, every_n_steps=2, max_probe=300, print_summary=False)
    fit(SmallNet(), [monitor], max_steps=3, logger=logger)
    media = [row for row in calls if "info/plane" in row]
    assert len(media) == 1 and media[0]["trainer/global_step"] == 3
    table = media[0]["info/plane"]
    assert table.columns == ["step", "epoch", "layer", "estimator", "I_XT", "I_TY"]
    assert len(table.data) == 2 * 2 * 2  # 2 evaluations x 2 layers x 2 estimators
    assert "info/plane/binning" in media[0] and "info/plane/adaptive_binning" in media[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimators": ["mine"]}, "estimators"),
        ({"estimators": []}, "estimators"),
        ({"estimators": ["binning", "binning"]}, "twice"),
        ({"estimator_params": {"kde": {"noise_variance": 1.0}}, "estimators": ["binning"]}, "estimator_params"),
        ({"estimator_params": {"binning": {"bins": 3}}}, "no parameter"),
        ({"every_n_epochs": None}, "exactly one schedule"),
        ({"log_spaced": 10, "every_n_steps": 5}, "exactly one schedule"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"log_spaced": 0}, "log_spaced"),
        ({"probe": "test"}, "probe"),
        ({"max_probe": 1}, "max_probe"),
        ({"base": 1.0}, "base"),
        ({"base": float("nan")}, "base"),
    ],
)
def test_bad_arguments_raise_early(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        InformationPlaneMonitor(**kwargs)


def test_no_matching_module():
    with pytest.raises(EntrotrainError, match="Fix the glob"):
        fit(SmallNet(), [InformationPlaneMonitor(include=["encoder.*"])], max_steps=1)


class MixedPrecisionNet(nn.Module):
    """A float32 tanh layer, then a float64 head (its Linear output is the second layer): layers of two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 6), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(6, 2).double())

    def forward(self, x):
        return self.head(self.body(x).double())


def test_gather_keeps_every_layer_dtype_bit_for_bit_across_ranks():
    """Two simulated ranks (a stub all_gather stacks their buffers): the gathered probe equals one process's forward
    bit for bit for every layer, also the float64 one after a float32 first layer (the buffer's dtype was the first
    layer's, promoted with float32, so the float64 head came back rounded to float32)."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = MixedPrecisionNet()
    x = torch.randn(10, 12)
    monitor = InformationPlaneMonitor(estimators=["binning"], probe_batch_size=3, print_summary=False)
    monitor.tap = ActivationTap(model, include=activation_output_names(model), on_capture=monitor._consume)
    one = monitor._gather(SimpleNamespace(world_size=1, global_rank=0), model, x)
    sent = {}

    def rank(r, gather):
        return SimpleNamespace(world_size=2, global_rank=r, strategy=SimpleNamespace(all_gather=gather))

    monitor._gather(rank(1, lambda buf: sent.setdefault(1, buf)[None].expand(2, *buf.shape)), model, x)
    two = monitor._gather(rank(0, lambda buf: torch.stack([buf, sent[1]])), model, x)
    assert list(one) == list(two) == ["body.1", "head.0"] and one["head.0"].dtype == torch.float64
    for name in one:
        assert two[name].dtype == one[name].dtype and torch.equal(two[name], one[name]), name


class WideReLU(SmallNet):
    """SmallNet with a ReLU hidden layer scaled ×20: activations well above the default binning range's 1."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 6), nn.ReLU())
        with torch.no_grad():
            self.body[0].weight.mul_(20.0)


def test_binning_warns_once_when_its_grid_clips_a_layer(recwarn):
    # a ReLU layer far above (-1, 1) is clipped into the edge bins: one warning per fit naming the layer, the
    # share clipped and the fix; a range that covers the activations warns nothing
    L.seed_everything(0)
    fit(WideReLU(), [InformationPlaneMonitor(estimators=["binning"], every_n_steps=1, max_probe=256)], max_steps=3)
    clipped = [str(w.message) for w in recwarn if "outside the binning range" in str(w.message)]
    assert len(clipped) == 1 and "of L1 ('body.1')" in clipped[0] and "(-1, 1)" in clipped[0]
    assert "estimator_params={'binning': {'range': (lo, hi)}}" in clipped[0]
    recwarn.clear()
    L.seed_everything(0)
    wide = InformationPlaneMonitor(estimators=["binning"], estimator_params={"binning": {"range": (-1e6, 1e6)}},
                                   every_n_steps=1, max_probe=256)
    fit(WideReLU(), [wide], max_steps=3)
    assert not [w for w in recwarn if "outside the binning range" in str(w.message)]


def test_two_rank_ddp_equals_one_process(tmp_path):
    import json

    from tests.helpers.scripts import run_script

    out = tmp_path / "logged.json"
    run_script(Path(__file__).with_name("info_ddp_run.py"), tmp_path, str(out))
    got = json.loads(out.read_text())
    L.seed_everything(3)
    task = InformationPlaneTask(lr=1e-2)
    x, y, _ = icosahedron_dataset()
    with torch.no_grad():  # one process forwards the probe in chunks of probe_batch_size (1024) rows
        per_chunk = [manual_layers(task.state_dict(), c) for c in x.split(1024)]
        layers = [torch.cat(parts) for parts in zip(*per_chunk)]
    assert got["collectives"] == ["all_gather"]
    for i, t in enumerate(layers):
        for est in ["binning", "adaptive_binning"]:  # discontinuous in t: any bit of difference shows
            ixt, ity = information_plane_point(t, y, est, x=x, base=2.0)
            key = f"info/L{i + 1}/{est}"
            assert got["logged"][f"{key}/I_XT"] == float(ixt), key  # bit-identical
            assert got["logged"][f"{key}/I_TY"] == float(ity), key
    index = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:600].sort().values
    with torch.no_grad():
        layers = manual_layers(task.state_dict(), x[index])
    for i, t in enumerate(layers):
        for est in ["binning", "adaptive_binning"]:
            ixt, ity = information_plane_point(t, y[index], est, x=x[index], base=2.0)
            assert got["small"][f"small/L{i + 1}/{est}/I_XT"] == float(ixt)
            assert got["small"][f"small/L{i + 1}/{est}/I_TY"] == float(ity)


def test_bf16_model_values_equal_recomputation():
    L.seed_everything(0)
    task = InformationPlaneTask().to(torch.bfloat16)
    state = {k: v.clone() for k, v in task.state_dict().items()}
    monitor = InformationPlaneMonitor(estimators=FAST, every_n_steps=10, max_probe=500, print_summary=False)
    fit(task, [monitor], max_steps=1)
    x, y, _ = icosahedron_dataset()
    index = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:500].sort().values
    layers = manual_layers(state, x[index].to(torch.bfloat16))
    assert layers[0].dtype == torch.bfloat16
    for i, t in enumerate(layers):
        for est in FAST:
            ixt, ity = information_plane_point(t, y[index], est, x=x[index], base=2.0)
            assert monitor.last_logged[f"info/L{i + 1}/{est}/I_XT"] == float(ixt)
            assert monitor.last_logged[f"info/L{i + 1}/{est}/I_TY"] == float(ity)


def test_an_estimator_that_refuses_the_data_is_skipped_and_warned_once(monkeypatch, recwarn):
    import entrotrain.callbacks.information_plane_monitor as mod

    real = mod._info.information_plane_point

    def picky(t, labels, estimator, **kw):
        if estimator == "adaptive_binning" and t.shape[1] == 2:
            raise EntrotrainError("refused for the test")
        return real(t, labels, estimator, **kw)

    monkeypatch.setattr(mod._info, "information_plane_point", picky)
    L.seed_everything(0)
    spy = SpyLogger()
    monitor = InformationPlaneMonitor(estimators=FAST, every_n_steps=1, max_probe=300, print_summary=False)
    trainer = fit(SmallNet(), [monitor], max_steps=3, logger=spy)
    rows = [row for _, row in spy.rows if "info/nonfinite" in row]
    assert len(rows) == 3 and all("info/L2/adaptive_binning/I_XT" not in r and "info/L2/binning/I_XT" in r for r in rows)
    assert "info/L2/adaptive_binning/I_XT" not in trainer.callback_metrics or math.isnan(
        float(trainer.callback_metrics["info/L2/adaptive_binning/I_XT"])
    )
    assert sum("refused for the test" in str(w.message) for w in recwarn) == 1


def test_probe_pass_is_invisible_to_other_monitors_whatever_the_order():
    """The probe pass runs under taps.exclusive_capture: a RepresentationEntropyMonitor on the same layer reports the
    same numbers whether it is listed before or after this monitor (its tap is armed for the training step when the
    probe pass runs)."""
    from entrotrain.callbacks import RepresentationEntropyMonitor

    def run(info_first: bool):
        L.seed_everything(7)
        info = InformationPlaneMonitor(estimators=["binning"], every_n_steps=1, max_probe=200, print_summary=False)
        repr_ = RepresentationEntropyMonitor(include=["body.2"], measures=["rankme"], every_n_steps=1)
        trainer = fit(SmallNet(), [info, repr_] if info_first else [repr_, info],
                      dm=InformationPlaneDataModule(batch_size=64), max_steps=2)
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("entropy/repr")}

    first, last = run(True), run(False)
    assert first and first == last
