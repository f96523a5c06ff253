"""EntropyCollapseGuard scenarios with a real Lightning Trainer: a small callback publishes a scripted sequence
through ``publish_scalars`` (as every entrotrain monitor does) and the guard must fire at exactly the right logging
step, once per episode, on NaN, on silence, across a resume, and never change training."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks._publish import ledger, publish_scalars
from entrotrain.callbacks.collapse_guard import saved_at
from entrotrain.errors import EntrotrainError
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader
from tests.helpers.spy_logger import SpyLogger

KEY = "entropy/attn_norm/min"
NAN = math.nan


class Script(L.Callback):
    """Publishes ``values[i]`` for ``key`` at the i-th logging step (steps 0, every, 2·every, ...), like a monitor
    with ``every_n_steps=every``; past the end of ``values`` it publishes nothing (its monitor stopped). A value
    may be a dict of several keys (a key missing from one publication is marked NaN by ``publish_scalars``)."""

    def __init__(self, values, every: int = 1, key: str = KEY, hook: str = "train") -> None:
        self.values = list(values)
        self.every = every
        self.key = key
        self.hook = hook

    def _publish(self, trainer, pl_module) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step % self.every or step // self.every >= len(self.values):
            return
        value = self.values[step // self.every]
        metrics = value if isinstance(value, dict) else {self.key: value}
        publish_scalars(trainer, pl_module, metrics, source="script")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hook == "train":
            self._publish(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # the i-th validation run publishes values[i] (from a batch hook, as RepresentationEntropyMonitor does)
        if self.hook == "validation" and not trainer.sanity_checking and self.values and batch_idx == 0:
            publish_scalars(trainer, pl_module, {self.key: self.values.pop(0)}, source="script")


class Lin(L.LightningModule):
    """The smallest trainable module (the guard never looks at the model): fast fits."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LinVal(Lin):
    def validation_step(self, batch, batch_idx):
        pass


def loader(n: int = 64) -> torch.utils.data.DataLoader:
    data = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)


def fit(guard, script, max_steps, *, guard_first=False, trainer_kwargs=None, model=None, ckpt_path=None):
    L.seed_everything(0)
    spy = SpyLogger()
    callbacks = [guard, script] if guard_first else [script, guard]
    kwargs = dict(callbacks=callbacks, max_steps=max_steps, logger=spy, log_every_n_steps=1)
    kwargs.update(trainer_kwargs or {})
    trainer = quiet_trainer(**kwargs)
    val = loader(4) if "val_check_interval" in kwargs else None
    trainer.fit(model or (Lin() if val is None else LinVal()), loader(), val, ckpt_path=ckpt_path)
    return trainer, spy


def alert_steps(spy: SpyLogger, key: str = KEY) -> list[int]:
    return [step for step, row in spy.rows if f"{key}/alert" in row]


def guard_messages(record) -> list[str]:
    return [str(w.message) for w in record if "EntropyCollapseGuard" in str(w.message)]


# ---------------------------------------------------------------- a value that stays bad
@pytest.mark.parametrize("guard_first", [False, True])
def test_stuck_value_fires_at_the_patience_th_publication_once(guard_first):
    # 0.0 published ten times (steps 0, 2, ..., 18): the 3rd publication (step 4) completes patience=3.
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=3, arm_on_good=False)
    with pytest.warns(UserWarning, match="at step 4: entropy/attn_norm/min = 0 fell below 0.05") as record:
        _, spy = fit(guard, Script([0.0] * 10, every=2), max_steps=20, guard_first=guard_first)
    assert guard.times_fired == 1  # once per episode
    assert alert_steps(spy) == [4]  # at the step of the watched value, whichever order the callbacks run in
    assert len(guard_messages(record)) == 1
    assert guard.bad_streak == 10


def test_publication_at_the_last_step_is_judged_when_the_guard_runs_first():
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    with pytest.warns(UserWarning, match="at step 2"):
        _, spy = fit(guard, Script([0.9, 0.9, 0.0]), max_steps=3, guard_first=True)
    assert alert_steps(spy) == [2]


def test_collapse_fraction_stuck_high_fires_in_max_mode():
    key = "entropy/attn/collapse_frac"
    guard = EntropyCollapseGuard(key, threshold=0.5, mode="max", patience=3, arm_on_good=False)
    with pytest.warns(UserWarning, match="collapse_frac = 0.9375 rose above 0.5"):
        _, spy = fit(guard, Script([0.9375] * 10, key=key), max_steps=10)
    assert alert_steps(spy, key) == [2]


def test_rearms_after_a_good_observation():
    values = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.9, 0.0]
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=3, arm_on_good=False)
    with pytest.warns(UserWarning):
        _, spy = fit(guard, Script(values), max_steps=len(values))
    assert alert_steps(spy) == [2, 7]
    assert guard.times_fired == 2 and guard.fired is False and guard.bad_streak == 1


def test_a_firing_names_the_last_good_observation_which_survives_a_resume():
    """The reason ends with the last value judged good and its step (where to roll back to); none before one."""
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    assert guard.observe(0.5, 0) is None and guard.observe(0.4, 3) is None
    assert guard.observe(0.01, 6) == f"{KEY} = 0.01 fell below 0.05 (last good: 0.4 at step 3)"
    resumed = EntropyCollapseGuard(KEY, threshold=0.05)
    resumed.load_state_dict(guard.state_dict())
    assert (resumed.last_good_step, resumed.last_good_value) == (3, 0.4)
    fresh = EntropyCollapseGuard(KEY, threshold=0.05, arm_on_good=False)
    assert fresh.observe(0.01, 0) == f"{KEY} = 0.01 fell below 0.05"  # nothing good seen yet
    with pytest.raises(EntrotrainError, match="last_good_value"):
        EntropyCollapseGuard(KEY).load_state_dict({"last_good_value": "0.4"})


def test_rollback_hint_names_the_newest_checkpoint_from_before_the_last_good_step(tmp_path) -> None:
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    names = ["epoch=0-step=40.ckpt", "epoch=1-step=60.ckpt", "last.ckpt", "checkpoint-50", "notes.txt"]
    assert guard.rollback_hint(names) == ""  # no good observation yet: nothing to roll back to
    guard.observe(0.5, 50)
    assert guard.rollback_hint(names) == " Newest checkpoint at or before step 50: checkpoint-50."
    guard.observe(0.5, 45)  # an earlier step: the last good is now 45
    assert guard.rollback_hint(names) == " Newest checkpoint at or before step 45: epoch=0-step=40.ckpt."
    assert guard.rollback_hint(["epoch=1-step=60.ckpt"]) == ""
    for name, step in (("global_step30", 30), ("ckpt_35.pt", 35), ("step-44.pt", 44), ("run3_step_41", 41)):
        assert guard.rollback_hint([name, "epoch=1-step=60.ckpt"]) == f" Newest checkpoint at or before step 45: {name}."
        assert saved_at(name) == step


@pytest.mark.parametrize("keep", [True, False])
def test_a_lightning_firing_names_the_checkpoint_to_roll_back_to(tmp_path, keep) -> None:
    """``ModelCheckpoint`` every 2 steps: the firing at step 5 (last good at step 4) names ``step=4``'s file; with
    ``keep_last_good`` (default) its pin, a hard link of it that no rotation deletes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    guard = EntropyCollapseGuard(KEY, threshold=0.05, keep_last_good=keep)
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 5") as record:
        script = Script([0.5] * 5 + [0.01])
        fit(guard, script, 6, trainer_kwargs={"callbacks": [script, guard, saver], "enable_checkpointing": True})
    (message,) = [str(w.message) for w in record if "EntropyCollapseGuard at" in str(w.message)]
    assert "(last good: 0.5 at step 4)" in message
    original = tmp_path / "epoch=0-step=4.ckpt"
    named = tmp_path / "entrotrain-last-good" / original.name if keep else original
    where = " (kept by the guard where checkpoint rotation cannot delete it)" if keep else ""
    assert message.endswith(f"Newest checkpoint at or before step 4: {named}{where}.")
    assert guard.rollback_checkpoint == named  # for `entrotrain fit`'s closing lines
    guard.keeper.wait()
    assert named.read_bytes() == original.read_bytes()  # the kept one: its own copy, whatever a save in place does
    kept = tmp_path / "entrotrain-last-good"
    assert (sorted(p.name for p in kept.iterdir()) if kept.exists() else []) == ([original.name] if keep else [])


# ---------------------------------------------------------------- non-finite data
def test_nan_stops_training_by_default_with_stop():
    guard = EntropyCollapseGuard(KEY, threshold=0.05, action="stop")
    assert guard.on_nonfinite is True
    said = r"is nan: the model or its inputs went non-finite \(last good: 0.5 at step 1\). Stopping training"
    with pytest.warns(UserWarning, match=said):
        trainer, spy = fit(guard, Script([0.5, 0.5, NAN] + [0.5] * 10), max_steps=13)
    assert trainer.global_step == 3
    assert alert_steps(spy) == [2]


def test_nan_is_skipped_when_on_nonfinite_is_off():
    # reduce_lr: off by default; a NaN neither extends nor breaks the streak, and is warned about once.
    guard = EntropyCollapseGuard(KEY, threshold=0.05, action="reduce_lr", patience=2)
    assert guard.on_nonfinite is False
    with pytest.warns(UserWarning) as record:
        _, spy = fit(guard, Script([0.5, 0.0, NAN, NAN, 0.0]), max_steps=5)
    messages = guard_messages(record)
    assert sum("skipped because on_nonfinite=False" in m for m in messages) == 1
    assert alert_steps(spy) == [4]  # 0.0 at steps 1 and 4 are consecutive observations


def test_key_dropped_by_its_publisher_counts_as_nonfinite():
    other = "entropy/attn/mean"
    values = [{KEY: 0.5, other: 1.0}, {KEY: 0.5, other: 1.0}, {other: 1.0}, {other: 1.0}]
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=2)
    with pytest.warns(UserWarning, match="is nan"):
        _, spy = fit(guard, Script(values), max_steps=4)
    assert alert_steps(spy) == [3]


# ---------------------------------------------------------------- stale keys
def test_silent_key_is_stale_after_three_intervals():
    # Published at steps 0, 2, 4, then never again: stale after 3 × 2 = 6 silent steps (at step 11), then one
    # bad observation per further 6 steps (step 18): patience=2 fires there.
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=2)
    with pytest.warns(UserWarning) as record:
        _, spy = fit(guard, Script([0.9, 0.9, 0.9], every=2), max_steps=20)
    messages = guard_messages(record)
    assert sum("not treated as current" in m for m in messages) == 1  # warned once per silence
    assert any("was not published for 7 steps (last at step 4, stale after 6)" in m for m in messages)
    assert alert_steps(spy) == [18]


def test_explicit_stale_after_and_no_counting_without_on_nonfinite():
    guard = EntropyCollapseGuard(KEY, threshold=0.05, stale_after=3)
    with pytest.warns(UserWarning, match="at step 5: .*not published for 4 steps"):
        _, spy = fit(guard, Script([0.9, 0.9]), max_steps=8)
    assert alert_steps(spy) == [5]
    guard = EntropyCollapseGuard(KEY, threshold=0.05, stale_after=3, on_nonfinite=False)
    with pytest.warns(UserWarning, match="not treated as current"):
        _, spy = fit(guard, Script([0.9, 0.9]), max_steps=8)
    assert alert_steps(spy) == [] and guard.times_fired == 0


def test_value_published_again_ends_the_silence():
    values = [0.9, None, None, None, None, 0.9, 0.9, 0.9]

    class Gappy(Script):
        def _publish(self, trainer, pl_module):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            if step < len(self.values) and self.values[step] is not None:
                publish_scalars(trainer, pl_module, {KEY: self.values[step]}, source="script")

    guard = EntropyCollapseGuard(KEY, threshold=0.05, stale_after=2, patience=2)
    with pytest.warns(UserWarning, match="not treated as current"):
        _, spy = fit(guard, Gappy(values), max_steps=len(values))
    assert guard.times_fired == 0 and guard.bad_streak == 0  # one stale observation (step 3), then good again
    assert guard.stale_warned is False


# ---------------------------------------------------------------- lifecycle
def test_resume_from_checkpoint_continues_the_streak(tmp_path):
    values = [0.0] * 10
    patience = 5
    # Uninterrupted: fires at step 4.
    with pytest.warns(UserWarning):
        guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=patience, arm_on_good=False)
        _, spy = fit(guard, Script(values), max_steps=10)
    assert alert_steps(spy) == [4]
    # Interrupted after 3 steps (streak 3), resumed from the checkpoint: continues, fires at step 4 again.
    first = EntropyCollapseGuard(KEY, threshold=0.05, patience=patience, arm_on_good=False)
    trainer, _ = fit(first, Script(values), max_steps=3)
    assert first.bad_streak == 3 and first.times_fired == 0
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = EntropyCollapseGuard(KEY, threshold=0.05, patience=patience, arm_on_good=False)
    with pytest.warns(UserWarning, match="at step 4"):
        _, spy = fit(resumed, Script(values), max_steps=10, ckpt_path=ckpt)
    assert alert_steps(spy) == [4]
    assert resumed.times_fired == 1 and resumed.bad_streak == 10 and resumed.last_seen_step == 9


def test_reused_guard_starts_fresh_in_a_second_fit():
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=2, arm_on_good=False)
    with pytest.warns(UserWarning):
        fit(guard, Script([0.0] * 4), max_steps=4)
    assert guard.times_fired == 1 and guard.fired
    with pytest.warns(UserWarning, match="at step 1"):  # the episode of fit 1 does not carry over
        _, spy = fit(guard, Script([0.0] * 4), max_steps=4)
    assert guard.times_fired == 1 and alert_steps(spy) == [1]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, spy = fit(guard, Script([0.9] * 3), max_steps=3)  # fresh: no stale streak
    assert guard_messages(record) == []
    assert guard.times_fired == 0 and guard.bad_streak == 0 and list(guard.history) == [0.9, 0.9]


def test_second_fit_with_the_same_trainer_does_not_see_the_first_fits_ledger():
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    model = Lin()
    with pytest.warns(UserWarning):
        trainer, _ = fit(guard, Script([0.0, 0.0]), max_steps=2, model=model)
    assert ledger(trainer).get(KEY) is not None
    trainer.fit_loop.epoch_loop.max_steps = 4  # fit again, the script publishing nothing
    trainer.callbacks[0].values = []
    trainer.fit(model, loader())
    assert trainer.global_step == 4
    assert ledger(trainer).get(KEY) is None
    assert guard.times_fired == 0 and guard.last_seen_step is None


def test_old_checkpoint_state_loads_with_defaults():
    guard = EntropyCollapseGuard(KEY, threshold=0.05, max_drop=0.5, drop_window=2)
    old = {"history": [0.9, 0.2, 0.1, 0.05], "bad_streak": 2, "fired": True, "times_fired": 1, "lr_reductions": 0}
    guard.load_state_dict(old)
    state = guard.state_dict()
    assert state["history"] == [0.2, 0.1, 0.05] and state["bad_streak"] == 2 and state["fired"] is True
    assert state["last_seen_step"] is None and state["stale_warned"] is False and state["last_reason"] == ""
    fresh = EntropyCollapseGuard(KEY, threshold=0.05, max_drop=0.5, drop_window=2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


# ---------------------------------------------------------------- self.log-ed keys
class Logged(LinVal):
    """Logs ``values[global_step]`` as ``watched`` in training, and ``val_watched`` in validation."""

    def __init__(self, values, val_values=()):
        super().__init__()
        self.values = list(values)
        self.val_values = list(val_values)
        self.val_runs = 0

    def training_step(self, batch, batch_idx):
        self.log("watched", self.values[min(self.global_step, len(self.values) - 1)])
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking and self.val_values:
            self.log("val_watched", self.val_values[min(self.val_runs, len(self.val_values) - 1)])

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_runs += 1


def test_logged_key_is_judged_once_per_lightning_logging_step():
    guard = EntropyCollapseGuard("watched", threshold=0.05, patience=3, arm_on_good=False)
    L.seed_everything(0)
    spy = SpyLogger()
    trainer = quiet_trainer(callbacks=[guard], max_steps=12, logger=spy, log_every_n_steps=4)
    with pytest.warns(UserWarning, match="at step 11"):
        trainer.fit(Logged([0.0] * 12), loader())
    # Logging steps: batches 3, 7, 11 (Lightning logs them at steps 3, 7, 11): the 3rd completes patience=3.
    assert alert_steps(spy, "watched") == [11]
    assert [step for step, row in spy.rows if "watched" in row] == [3, 7, 11]


def test_key_logged_in_validation_is_judged_once_per_validation_run():
    guard = EntropyCollapseGuard("val_watched", threshold=0.05, patience=2, arm_on_good=False)
    L.seed_everything(0)
    spy = SpyLogger()
    trainer = quiet_trainer(
        callbacks=[guard], max_steps=9, logger=spy, log_every_n_steps=1, val_check_interval=3, limit_val_batches=2
    )
    # Validation runs after batches 2, 5, 8 (logged at steps 2, 5, 8; the weights of optimizer steps 3, 6, 9, the step
    # it is judged at): 0.0, 0.0 -> fires at step 6; 0.9 re-arms.
    with pytest.warns(UserWarning, match="at step 6: val_watched = 0 fell below"):
        trainer.fit(Logged([0.9] * 9, val_values=[0.0, 0.0, 0.9]), loader(), loader(4))
    assert guard.times_fired == 1 and guard.bad_streak == 0 and len(guard.history) == 2


def test_ledger_key_published_at_validation_end():
    guard = EntropyCollapseGuard(KEY, threshold=0.05, patience=2, arm_on_good=False)
    with pytest.warns(UserWarning, match="at step 6"):  # judged at the weights' step, logged at Lightning's (5)
        _, spy = fit(
            guard,
            Script([0.0] * 3, hook="validation"),
            max_steps=9,
            trainer_kwargs=dict(val_check_interval=3, limit_val_batches=1),
        )
    assert alert_steps(spy) == [5]


# ---------------------------------------------------------------- actions
def test_reduce_lr_respects_min_lr_once_per_episode():
    guard = EntropyCollapseGuard(KEY, threshold=0.05, action="reduce_lr", lr_factor=0.5, min_lr=0.75, arm_on_good=False)
    with pytest.warns(UserWarning) as record:
        trainer, _ = fit(guard, Script([0.0, 0.0, 0.9, 0.0, 0.0]), max_steps=5, model=Lin(lr=1.0))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.75
    assert guard.lr_reductions == 1 and guard.times_fired == 2
    messages = guard_messages(record)
    assert "multiplied by 0.5" in messages[0] and "already at min_lr=0.75" in messages[1]


def test_refused_wandb_alert_warns_once(monkeypatch):
    calls = []

    def refuse(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("offline runs cannot send alerts")

    fake = SimpleNamespace(experiment=SimpleNamespace(alert=refuse))
    monkeypatch.setattr("entrotrain.dashboards.wandb_media.wandb_loggers", lambda loggers: [fake])
    guard = EntropyCollapseGuard(KEY, threshold=0.05, action="alert", arm_on_good=False)
    with pytest.warns(UserWarning) as record:
        fit(guard, Script([0.0, 0.9, 0.0, 0.9, 0.0]), max_steps=5)
    assert len(calls) == 3 and guard.times_fired == 3
    assert sum("wandb alert failed" in m for m in guard_messages(record)) == 1


def test_warn_mode_leaves_training_bit_identical():
    def weights(callbacks):
        L.seed_everything(0)
        model = TinyLM()
        quiet_trainer(callbacks=callbacks, max_steps=6, log_every_n_steps=1).fit(model, token_loader(n=512))
        return [p.detach().clone() for p in model.parameters()]

    values = [0.0, NAN, 0.0, 0.9, 0.0]
    plain = weights([Script(values)])
    guard = EntropyCollapseGuard(KEY, threshold=0.05, stale_after=1)
    with pytest.warns(UserWarning):
        guarded = weights([Script(values), guard])
    assert guard.times_fired >= 2
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True))


# ---------------------------------------------------------------- property: the decision against a brute-force spec
def _reference(values, threshold, patience, on_nonfinite, max_drop, drop_window):
    """Indices of the observations at which the guard must fire, straight from its documented contract."""
    fires, streak, fired, finite = [], 0, False, []
    for i, v in enumerate(values):
        if math.isnan(v):
            if not on_nonfinite:
                continue
            bad = True
        else:
            bad = v < threshold
            if max_drop is not None and len(finite) >= drop_window:
                before = finite[-drop_window]
                bad = bad or (before > 0 and (before - v) / before > max_drop)
            finite.append(v)
        if not bad:
            streak, fired = 0, False
            continue
        streak += 1
        if streak >= patience and not fired:
            fired = True
            fires.append(i)
    return fires


def _stub_trainer():
    loop = SimpleNamespace(_batches_that_stepped=0, _should_accumulate=lambda: False)
    return SimpleNamespace(
        fit_loop=SimpleNamespace(epoch_loop=loop),
        loggers=[SpyLogger()],
        should_stop=False,
        callback_metrics={},
        global_step=0,
        optimizers=[],
        lr_scheduler_configs=[],
        is_global_zero=True,
        _results=None,
        _logger_connector=SimpleNamespace(should_update_logs=True),
    )


@settings(max_examples=40)
@given(
    values=st.lists(st.sampled_from([0.0, 0.01, 0.04, 0.05, 0.3, 0.6, 1.0, NAN]), max_size=25),
    patience=st.integers(1, 4),
    on_nonfinite=st.booleans(),
    max_drop=st.sampled_from([None, 0.5]),
    drop_window=st.integers(1, 3),
)
def test_decision_matches_the_contract(values, patience, on_nonfinite, max_drop, drop_window):
    guard = EntropyCollapseGuard(
        KEY, threshold=0.05, patience=patience, on_nonfinite=on_nonfinite, max_drop=max_drop, drop_window=drop_window,
        arm_on_good=False,  # the reference judges from the first observation
    )
    trainer = _stub_trainer()
    module = SimpleNamespace(log=lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, value in enumerate(values):
            trainer.fit_loop.epoch_loop._batches_that_stepped = step
            publish_scalars(trainer, module, {KEY: value})
            guard.on_train_batch_end(trainer, module, None, None, step)
            guard.on_train_batch_end(trainer, module, None, None, step)  # a second look never counts twice
    expected = _reference(values, 0.05, patience, on_nonfinite, max_drop, drop_window)
    assert alert_steps(trainer.loggers[0]) == expected
    assert guard.times_fired == len(expected)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"bad_streak": -1}, "bad_streak"),
        ({"fired": "yes"}, "fired"),
        ({"last_seen_step": 2.5}, "last_seen_step"),
        ({"history": 0.3}, "history"),
    ],
)
def test_corrupted_state_is_refused(state, match):
    with pytest.raises(EntrotrainError, match=f"load_state_dict: {match}"):
        EntropyCollapseGuard(KEY).load_state_dict(state)


def test_old_nan_history_is_dropped():
    guard = EntropyCollapseGuard(KEY, threshold=None, max_drop=0.5)
    guard.load_state_dict({"history": [0.9, NAN]})
    assert list(guard.history) == [0.9]


def test_a_firing_on_a_validation_key_names_the_checkpoint_saved_at_the_last_good_validation(tmp_path) -> None:
    """Validation after batches 2, 5, 8 sees the weights of optimizer steps 3, 6, 9 (``ModelCheckpoint`` names its
    files ``step=3``, ``step=6``); Lightning logs it at its batch's step (2, 5, 8). The guard judged at the logger
    step, so the firing after a good validation at step=6 said 'last good at step 5' and named ``step=3``'s file,
    skipping the one saved at that validation (failed before). It now judges at the weights' step, as the monitors'
    history (RepresentationEntropyMonitor(stage="validation")); the alert row stays beside the key's point."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    guard = EntropyCollapseGuard(KEY, threshold=0.05, keep_last_good=False)
    script = Script([0.5, 0.5, 0.01], hook="validation")
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 9") as record:
        _, spy = fit(guard, script, 9, trainer_kwargs={
            "callbacks": [script, guard, saver], "enable_checkpointing": True, "val_check_interval": 3,
            "limit_val_batches": 1})
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [f"epoch=0-step={s}.ckpt" for s in (3, 6, 9)]
    (message,) = [str(w.message) for w in record if "EntropyCollapseGuard at" in str(w.message)]
    assert "(last good: 0.5 at step 6)" in message
    assert message.endswith(f"Newest checkpoint at or before step 6: {tmp_path / 'epoch=0-step=6.ckpt'}.")
    assert alert_steps(spy) == [step for step, row in spy.rows if KEY in row][-1:] == [8]
