""""The monitor never lies, the guard never sleeps": a real Lightning Trainer on entrotrain's tiny GPT turns NaN at
step ``K`` (its training_step multiplies every weight by NaN) and each monitor + ``EntropyCollapseGuard`` must

(a) put NaN, not the last healthy value, in ``trainer.callback_metrics`` for the watched key from step ``K`` on;
(b) never send a NaN/Inf value to any logger, for any key;
(c) log its ``…/nonfinite`` count > 0;
(d) stop training at exactly the step derived from the code (below) and record the firing;
(e) warn about the non-finite data once, not at every step.

Expected stop step, from ``_publish.publish_scalars`` and ``collapse_guard``: a monitor publishes at
``on_train_batch_end`` under the step ``_batches_that_stepped`` = the batch index ``i`` (Lightning increments it after
the hook). The guard, listed *after* the monitor, observes that publication at the same batch end; NaN observations
at steps ``K, K+1, ...`` are bad (``on_nonfinite`` is on for ``action="stop"``), so the ``patience``-th one, at step
``K + patience - 1``, fires: ``trainer.should_stop`` is set at that batch end, the epoch loop ends, and
``trainer.global_step == K + patience`` (batches ``0..K+patience-1`` each made one optimizer step). The firing is
logged as ``{monitor}/alert = 1`` at step ``K + patience - 1`` and recorded through ``record_event``.

The σReparam monitor publishes at the batch end *after* the optimizer step (``global_step - 1`` divisible by
``every_n_steps``), also under the batch index, so the same derivation holds for it.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch

from entrotrain.callbacks import (
    AttentionEntropyMonitor,
    EntropyCollapseGuard,
    RepresentationEntropyMonitor,
    SigmaReparamMonitor,
)
from entrotrain.callbacks import collapse_guard
from tests.helpers.gpt_module import SEQ, VOCAB, GPTModule
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import Snapshot
from tests.helpers.spy_logger import SpyLogger

K = 2  # the step whose training_step turns the model NaN
PATIENCE = 2
ATTN_KEY = "entropy/attn_norm/min"
SIGMA_KEY = "sigma_reparam/qk_norm/max"
REPR_LAYER = "model.blocks.1"
REPR_KEY = f"entropy/repr/{REPR_LAYER}/rankme"


class NaNGPT(GPTModule):
    """The tiny (σReparam) GPT whose ``training_step`` multiplies every weight by NaN at step ``nan_at``."""

    def __init__(self, nan_at: int | None = K) -> None:
        super().__init__(convert=True)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        if self.nan_at is not None and self.global_step == self.nan_at:
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(float("nan"))
        return super().training_step(batch, batch_idx)


def gpt_loader(n: int = 48, batch_size: int = 4) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch_size, shuffle=False)


def attention_monitor() -> AttentionEntropyMonitor:
    return AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)


def sigma_monitor() -> SigmaReparamMonitor:
    return SigmaReparamMonitor(every_n_steps=1)


def repr_monitor() -> RepresentationEntropyMonitor:
    return RepresentationEntropyMonitor(
        include=[REPR_LAYER], measures=["rankme"], every_n_steps=1, log_spectrum=False, print_summary=False
    )


def run_scenario(monitor: L.Callback, key: str, monkeypatch, max_steps: int = 8):
    """Fit NaNGPT with ``monitor``, a stopping guard on ``key`` and a spy logger; returns what the test checks."""
    events: list[tuple[str, str, str, int | None]] = []
    monkeypatch.setattr(
        collapse_guard, "record_event",  # where the guard looks it up
        lambda trainer, k, message, level="alert", step=None: events.append((k, message, level, step)),
    )
    L.seed_everything(0)
    spy, snap = SpyLogger(), Snapshot()
    guard = EntropyCollapseGuard(key, threshold=0.05, action="stop", patience=PATIENCE)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = quiet_trainer(callbacks=[monitor, guard, snap], max_steps=max_steps, logger=spy)
        trainer.fit(NaNGPT(), gpt_loader())
    return monitor, trainer, guard, spy, snap, events, [str(w.message) for w in record]


def assert_trust(monitor, trainer, guard, spy, snap, events, messages, *, key: str, nonfinite_key: str) -> None:
    stop_step = K + PATIENCE - 1
    # (d) stopped after exactly the batch of step K + patience - 1
    assert trainer.global_step == stop_step + 1
    assert len(snap.rows) == stop_step + 1
    # (a) healthy and finite before K, NaN (never the stale healthy value) from K on
    for step, row in enumerate(snap.rows):
        if step < K:
            assert math.isfinite(row[key]), (step, row[key])
        else:
            assert math.isnan(row[key]), (step, row[key])
    # (b) no logger ever got a NaN or Inf, for any key
    assert spy.rows and all(math.isfinite(v) for _, row in spy.rows for v in row.values())
    # the watched key reached the logger at the healthy steps only
    assert sorted(step for step, row in spy.rows if key in row) == list(range(K))
    # (c) the non-finite count was logged, > 0, from step K on (0 before)
    counts = {step: row[nonfinite_key] for step, row in spy.rows if nonfinite_key in row}
    assert all(counts[s] == 0 for s in range(K)) and all(counts[s] > 0 for s in range(K, stop_step + 1))
    # (d) the firing: one episode, logged as an alert at the step of the watched value, recorded as an event
    assert guard.times_fired == 1 and "non-finite" in guard.last_reason
    alerts = [step for step, row in spy.rows if row.get(f"{key}/alert") == 1.0]
    assert alerts == [stop_step]
    assert [(k, level, step) for k, _, level, step in events] == [(key, "stop", stop_step)]
    # (e) the monitor's non-finite warning came once, though PATIENCE steps were non-finite
    owner = type(monitor).__name__
    assert sum(m.startswith(f"{owner}:") and "shown once per fit" in m for m in messages) == 1, messages
    assert sum("EntropyCollapseGuard at step" in m for m in messages) == 1


def test_attention_monitor_and_guard_on_a_model_that_turns_nan(monkeypatch):
    result = run_scenario(attention_monitor(), ATTN_KEY, monkeypatch)
    assert_trust(*result, key=ATTN_KEY, nonfinite_key="entropy/attn/nonfinite")
    # every attention statistic goes NaN together (none stands stale)
    snap = result[4]
    for key in ("entropy/attn/mean", "entropy/attn/L0/H0", "entropy/attn_norm/L1/mean"):
        assert math.isfinite(snap.rows[K - 1][key]) and all(math.isnan(r[key]) for r in snap.rows[K:]), key


def test_sigma_reparam_monitor_and_guard_on_a_model_that_turns_nan(monkeypatch):
    result = run_scenario(sigma_monitor(), SIGMA_KEY, monkeypatch)
    assert_trust(*result, key=SIGMA_KEY, nonfinite_key="sigma_reparam/nonfinite")
    snap = result[4]
    for key in (
        "sigma_reparam/model.blocks.0.attn/qk_norm/H0",
        "sigma_reparam/model.blocks.1.attn.qkv/gamma",
        # the layer's σ buffer keeps its last finite estimate (so it can recover); the monitor must not publish
        # that stale number as the current σ of a NaN weight
        "sigma_reparam/model.blocks.0.attn.qkv/sigma",
        "sigma_reparam/model.blocks.1.mlp.fc/sigma",
    ):
        assert math.isfinite(snap.rows[K - 1][key]) and all(math.isnan(r[key]) for r in snap.rows[K:]), key


def test_representation_monitor_and_guard_on_a_model_that_turns_nan(monkeypatch):
    result = run_scenario(repr_monitor(), REPR_KEY, monkeypatch)
    assert_trust(*result, key=REPR_KEY, nonfinite_key=f"entropy/repr/{REPR_LAYER}/nonfinite")


def test_guard_listed_first_fires_one_step_later_at_the_same_observation(monkeypatch):
    """A guard listed before its monitor judges a publication at the next batch start, under the step it was
    published at: the event is still at step K + patience - 1, the stop comes one batch later."""
    events: list[tuple] = []
    monkeypatch.setattr(collapse_guard, "record_event", lambda trainer, k, m, level="alert", step=None: events.append(step))
    L.seed_everything(0)
    spy = SpyLogger()
    guard = EntropyCollapseGuard(ATTN_KEY, threshold=0.05, action="stop", patience=PATIENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(callbacks=[guard, attention_monitor()], max_steps=8, logger=spy)
        trainer.fit(NaNGPT(), gpt_loader())
    assert events == [K + PATIENCE - 1]
    assert trainer.global_step == K + PATIENCE + 1
    assert all(math.isfinite(v) for _, row in spy.rows for v in row.values())


# ------------------------------------------------------------------------------------------ bit-identical training


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _nan_aware_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


class Recorder(L.Callback):
    """Every parameter and buffer after each batch (read-only: it must not change training)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(_state(pl_module))


def _fit(callbacks: list[L.Callback], max_steps: int) -> list[dict[str, torch.Tensor]]:
    L.seed_everything(0)
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[*callbacks, recorder], max_steps=max_steps).fit(NaNGPT(), gpt_loader())
    return recorder.states


def test_all_monitors_and_a_warning_guard_leave_training_bit_identical_on_the_nan_path():
    max_steps = K + 3
    bare = _fit([], max_steps)
    watched = _fit(
        [
            attention_monitor(), sigma_monitor(), repr_monitor(),
            EntropyCollapseGuard(ATTN_KEY, threshold=0.05, action="warn", patience=PATIENCE),
            EntropyCollapseGuard(SIGMA_KEY, threshold=0.05, action="warn", patience=1),
        ],
        max_steps,
    )
    assert len(bare) == len(watched) == max_steps  # "warn" never stops training
    for step, (a, b) in enumerate(zip(bare, watched)):
        assert a.keys() == b.keys()
        for name in a:
            assert _nan_aware_equal(a[name], b[name]), (step, name)
    # the path really went NaN, and the σReparam power-iteration buffers kept their last finite values
    last = bare[-1]
    assert torch.isnan(last["model.blocks.0.attn.qkv.weight"]).all()
    assert all(bool(torch.isfinite(v).all()) for k, v in last.items() if k.endswith((".u", ".sigma")))
    assert all(bool(torch.isfinite(v).all()) for v in bare[K - 1].values())
