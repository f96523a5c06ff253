"""EntropyCollapseGuard: thresholds, drops, patience, episodes, and each action."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.errors import EntrotrainError
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader


class Scripted(TinyLM):
    """Logs a scripted value of ``watched`` at each step (as a monitor would)."""

    def __init__(self, values, scheduler: bool = False):
        super().__init__()
        self.values = list(values)
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("watched", self.values[min(self.global_step, len(self.values) - 1)])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run(values, guard, max_steps=None, log_every_n_steps=1, **model_kwargs):
    """A ``self.log``-ed key is judged once per Lightning logging step: log every step to judge every value."""
    L.seed_everything(0)
    model = Scripted(values, **model_kwargs)
    trainer = quiet_trainer(callbacks=[guard], max_steps=max_steps or len(values), log_every_n_steps=log_every_n_steps)
    trainer.fit(model, token_loader(n=256))
    return trainer


def test_warns_once_per_episode_and_rearms():
    guard = EntropyCollapseGuard("watched", threshold=0.5)
    with pytest.warns(UserWarning, match="watched = 0.4 fell below 0.5") as record:
        run([0.9, 0.4, 0.3, 0.8, 0.2], guard)
    assert guard.times_fired == 2  # 0.4 (episode 1; 0.3 is the same episode), 0.2 (after recovering at 0.8)
    assert sum("EntropyCollapseGuard" in str(w.message) for w in record) == 2


def test_patience_counts_logging_steps_not_changes_of_value():
    # A value stuck at a bad level is one bad observation per logging step (it used to count once: the bug).
    guard = EntropyCollapseGuard("watched", threshold=0.5, patience=2)
    with pytest.warns(UserWarning, match="watched = 0.4 fell below"):
        run([0.9, 0.4, 0.4, 0.4, 0.9], guard)
    assert guard.times_fired == 1
    # Logged every step but judged every 2nd (log_every_n_steps=2): the bad steps 1 and 2 give one logging step.
    guard = EntropyCollapseGuard("watched", threshold=0.5, patience=2)
    run([0.9, 0.4, 0.4, 0.9, 0.9, 0.9], guard, log_every_n_steps=2)
    assert guard.times_fired == 0
    guard = EntropyCollapseGuard("watched", threshold=0.5, patience=2)
    with pytest.warns(UserWarning):
        run([0.9, 0.4, 0.3, 0.9], guard)
    assert guard.times_fired == 1


def test_max_drop_fires_on_fast_fall():
    guard = EntropyCollapseGuard("watched", threshold=None, max_drop=0.5, drop_window=2)
    with pytest.warns(UserWarning, match="fell by 6[0-9]%"):
        run([1.0, 0.9, 0.35, 0.34], guard)  # 1.0 -> 0.35 over two observations
    assert guard.times_fired == 1


def test_stop_action_stops_training():
    guard = EntropyCollapseGuard("watched", threshold=0.5, action="stop")
    with pytest.warns(UserWarning, match="Stopping training"):
        trainer = run([0.9, 0.9, 0.1] + [0.9] * 20, guard)
    assert trainer.global_step == 3


@pytest.mark.parametrize("scheduler", [False, True])
def test_reduce_lr_scales_optimizer_and_scheduler(scheduler):
    guard = EntropyCollapseGuard("watched", threshold=0.5, action="reduce_lr", lr_factor=0.25)
    with pytest.warns(UserWarning, match="multiplied by 0.25"):
        trainer = run([0.9, 0.1, 0.1, 0.1, 0.1], guard, scheduler=scheduler)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25)  # stays lowered despite the scheduler
    assert guard.lr_reductions == 1


def test_max_mode_watches_collapse_fraction_from_the_monitor():
    # threshold -1: every value is "above"; arm_on_good=False judges from the first observation
    guard = EntropyCollapseGuard("entropy/attn/collapse_frac", threshold=-1.0, mode="max", arm_on_good=False)
    with pytest.warns(UserWarning, match="rose above -1.0"):
        _fit_with_monitor(guard)
    assert guard.times_fired == 1


def _fit_with_monitor(guard):
    L.seed_everything(0)
    trainer = quiet_trainer(callbacks=[guard, AttentionEntropyMonitor(every_n_steps=2)], max_steps=3)
    trainer.fit(TinyLM(), token_loader())


def test_state_dict_round_trip():
    guard = EntropyCollapseGuard("watched", threshold=0.5, max_drop=0.3, drop_window=2)
    with pytest.warns(UserWarning):
        run([0.9, 0.2, 0.1], guard)
    state = guard.state_dict()
    fresh = EntropyCollapseGuard("watched", threshold=0.5, max_drop=0.3, drop_window=2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert list(fresh.history) == pytest.approx([0.9, 0.2, 0.1])


def test_missing_key_raises_when_asked():
    guard = EntropyCollapseGuard("entropy/nope", threshold=0.1, missing_ok=False, missing_after=2)
    with pytest.raises(EntrotrainError, match="never logged.*watched"):
        run([0.9] * 5, guard)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": None},
        {"mode": "up"},
        {"max_drop": 1.5},
        {"max_drop": 0.5, "mode": "max"},
        {"action": "explode"},
        {"lr_factor": 1.0},
        {"patience": 0},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(EntrotrainError):
        EntropyCollapseGuard("x", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"monitor": ""}, "monitor"),
        ({"monitor": 3}, "monitor"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"threshold": "0.1"}, "threshold"),
        ({"max_drop": float("nan")}, "max_drop"),
        ({"max_drop": 0.0}, "max_drop"),
        ({"drop_window": 0}, "drop_window"),
        ({"drop_window": 1.5}, "drop_window"),
        ({"patience": True}, "patience"),
        ({"patience": 2.0}, "patience"),
        ({"lr_factor": 0.0}, "lr_factor"),
        ({"lr_factor": float("nan")}, "lr_factor"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"min_lr": float("inf")}, "min_lr"),
        ({"missing_ok": "no"}, "missing_ok"),
        ({"missing_after": -1}, "missing_after"),
        ({"on_nonfinite": 1}, "on_nonfinite"),
        ({"stale_after": 0}, "stale_after"),
        ({"stale_after": 2.5}, "stale_after"),
        ({"mode": "up"}, "mode"),
        ({"action": "explode"}, "action"),
        ({"arm_on_good": "yes"}, "arm_on_good"),
        ({"arm_on_good": 1}, "arm_on_good"),
    ],
)
def test_every_argument_is_validated_and_named(kwargs, named):
    args = {"monitor": "x", **kwargs}
    with pytest.raises(EntrotrainError, match=rf"EntropyCollapseGuard\({named}\).*got") as err:
        EntropyCollapseGuard(**args)
    assert repr(kwargs[named]) in str(err.value)  # what was received


def test_valid_edge_arguments():
    guard = EntropyCollapseGuard("x", threshold=0, min_lr=0, missing_after=0, stale_after=1, on_nonfinite=False)
    assert guard.on_nonfinite is False and guard.stale_after == 1
    assert EntropyCollapseGuard("x", action="stop").on_nonfinite is True
    assert EntropyCollapseGuard("x", action="reduce_lr").on_nonfinite is False


# ---------------------------------------------------------------- arm_on_good: a collapse is a fall, not a start


def test_value_bad_from_the_start_is_warned_once_then_fires_only_after_being_good():
    guard = EntropyCollapseGuard("watched", threshold=0.05)
    with pytest.warns(UserWarning) as record:
        run([0.02, 0.03, 0.01, 0.9, 0.04, 0.04], guard)
    messages = [str(w.message) for w in record if "EntropyCollapseGuard" in str(w.message)]
    assert sum("already below the threshold 0.05 at step 0" in m for m in messages) == 1  # warned once, not fired
    fired = [m for m in messages if "fell below" in m]
    assert len(fired) == 1 and "at step 4: watched = 0.04 fell below 0.05" in fired[0]  # armed by 0.9 at step 3
    assert guard.times_fired == 1 and guard.armed


def test_arm_on_good_false_fires_at_the_first_observation():
    guard = EntropyCollapseGuard("watched", threshold=0.05, arm_on_good=False)
    with pytest.warns(UserWarning, match="at step 0: watched = 0.02 fell below 0.05"):
        run([0.02, 0.02, 0.02], guard)
    assert guard.times_fired == 1


def test_max_mode_bad_from_the_start_is_not_fired():
    guard = EntropyCollapseGuard("watched", threshold=0.5, mode="max")
    with pytest.warns(UserWarning, match="already above the threshold 0.5"):
        run([0.6, 0.7, 0.4, 0.8], guard)
    assert guard.times_fired == 1 and "rose above" in guard.last_reason  # 0.8 after the good 0.4


def test_max_drop_is_judged_from_the_start_while_the_threshold_is_unarmed():
    guard = EntropyCollapseGuard("watched", threshold=0.05, max_drop=0.5)
    with pytest.warns(UserWarning, match="fell by 75%"):
        run([0.04, 0.01, 0.01], guard)
    assert guard.times_fired == 1 and not guard.armed


def test_armed_survives_a_resume_and_old_checkpoints_count_as_armed():
    guard = EntropyCollapseGuard("watched", threshold=0.5)
    run([0.9, 0.9], guard)
    state = guard.state_dict()
    assert state["armed"] is True
    resumed = EntropyCollapseGuard("watched", threshold=0.5)
    resumed.load_state_dict(state)
    assert resumed.observe(0.1, step=5) is not None  # armed before the resume: fires at once
    old = {k: v for k, v in state.items() if k != "armed"}  # a checkpoint written before arm_on_good existed
    legacy = EntropyCollapseGuard("watched", threshold=0.5)
    legacy.load_state_dict(old)
    assert legacy.armed and legacy.observe(0.1, step=5) is not None
    fresh = EntropyCollapseGuard("watched", threshold=0.5)
    fresh.load_state_dict({})
    assert not fresh.armed and fresh.observe(0.1, step=0) is None
    with pytest.raises(EntrotrainError, match="armed"):
        fresh.load_state_dict({**state, "armed": "yes"})


def test_readme_example_does_not_fire_at_initialisation():
    """Lightning's demo Transformer scales its embeddings by sqrt(d): some heads start near normalised entropy 0.02
    and stay there. The README example's guard must not call that a collapse (it used to fire at step 0)."""
    from lightning.pytorch.demos import Transformer

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Transformer(vocab_size=100, ninp=64, nhead=4, nhid=128)

        def training_step(self, batch):
            x, y = batch
            return torch.nn.functional.nll_loss(self.model(x, y), y.flatten())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def fit(guard):
        L.seed_everything(0)
        tokens = torch.randint(0, 100, (32, 17))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
        trainer = quiet_trainer(callbacks=[AttentionEntropyMonitor(every_n_steps=2), guard], max_steps=6)
        trainer.fit(LM(), data)
        return trainer

    guard = EntropyCollapseGuard(threshold=0.05)
    with pytest.warns(UserWarning, match="already below the threshold 0.05 at step 0"):
        trainer = fit(guard)
    assert float(trainer.callback_metrics["entropy/attn_norm/min"]) < 0.05  # the heads are sharp...
    assert guard.times_fired == 0  # ...and it is not called a collapse
    judged_from_start = EntropyCollapseGuard(threshold=0.05, arm_on_good=False)
    with pytest.warns(UserWarning, match="at step 0: entropy/attn_norm/min"):
        fit(judged_from_start)
    assert judged_from_start.times_fired == 1
