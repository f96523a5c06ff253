"""EntropyCollapseGuard(action="rollback") under a real Lightning Trainer: a scripted key (published through
``publish_scalars`` as every monitor does) makes the guard fire at a known step; the weights and optimizer state right
after the rollback must be those captured at the end of the last good step, the learning rates (and the schedulers'
base rates) lowered, the episode re-armed, at most ``max_rollbacks`` rollbacks, the held state freed after fit, and
training unchanged while nothing fires."""

from __future__ import annotations

import copy
import gc
import json
import math
import warnings
from pathlib import Path
import types

import lightning as L
import pytest
import torch

from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_record import RunRecordLogger
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.spy_logger import SpyLogger
from tests.helpers.training_state import model_state, opt_state, same

KEY = "entropy/attn_norm/min"
NAN = math.nan
LR = 0.05


def _step(trainer) -> int:
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class Script(L.Callback):
    """Publishes ``values[i]`` for ``key`` at optimizer step i (at the last micro-batch of an accumulation window),
    or, with ``hook="validation"``, ``values[i]`` at the i-th validation run."""

    def __init__(self, values, key: str = KEY, hook: str = "train") -> None:
        self.values, self.key, self.hook = list(values), key, hook
        self.runs = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = _step(trainer)
        if self.hook != "train" or trainer.fit_loop.epoch_loop._should_accumulate() or step >= len(self.values):
            return
        publish_scalars(trainer, pl_module, {self.key: self.values[step]}, source=f"script:{self.key}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.hook == "validation" and not trainer.sanity_checking and batch_idx == 0 and self.runs < len(self.values):
            publish_scalars(trainer, pl_module, {self.key: self.values[self.runs]}, source=f"script:{self.key}")
            self.runs += 1


class Snap(L.Callback):
    """What the model and its first optimizer hold at each train batch start / end (and validation end), by step."""

    def __init__(self) -> None:
        self.end: dict[int, tuple] = {}
        self.start: dict[int, tuple] = {}
        self.val: list[tuple] = []
        self.lrs: dict[int, float] = {}

    def _take(self, trainer, pl_module) -> tuple:
        opt = trainer.optimizers[0]
        return model_state(pl_module), opt_state(opt), [p.grad is None for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start[_step(trainer)] = self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end[_step(trainer)] = self._take(trainer, pl_module)
        self.lrs[_step(trainer)] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(self._take(trainer, pl_module))


class Net(L.LightningModule):
    """Two layers, Adam (moments to roll back), an optional LambdaLR scheduler stepped every step; ``blow_up_at``:
    the update of that step makes the weights non-finite (an infinite loss), while its forward was fine."""

    def __init__(self, scheduler: bool = False, blow_up_at: int | None = None, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.scheduler, self.blow_up_at = scheduler, blow_up_at
        self.automatic_optimization = not manual
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.net(x).pow(2).mean()
        self.losses.append(loss.item())
        if self.blow_up_at is not None and self.global_step == self.blow_up_at:
            loss = loss * math.inf
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=LR)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 64) -> torch.utils.data.DataLoader:
    data = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)


def fit(callbacks, max_steps, *, model=None, logger=None, ckpt_path=None, val=False, **trainer_kwargs):
    L.seed_everything(0)
    trainer = quiet_trainer(callbacks=callbacks, max_steps=max_steps, logger=logger or SpyLogger(),
                            log_every_n_steps=1, **trainer_kwargs)
    model = model or Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader(), loader(4) if val else None, ckpt_path=ckpt_path)
    messages = [str(w.message) for w in caught if "EntropyCollapseGuard at step" in str(w.message)]
    return trainer, model, messages


def guard(**kwargs) -> EntropyCollapseGuard:
    kwargs.setdefault("threshold", 0.5)
    kwargs.setdefault("lr_factor", 0.5)
    return EntropyCollapseGuard(KEY, action="rollback", **kwargs)


# ---------------------------------------------------------------------------- one rollback
def test_rollback_restores_the_state_of_the_last_good_step_and_lowers_the_rates(tmp_path) -> None:
    before, after, g = Snap(), Snap(), guard()
    record = RunRecordLogger(tmp_path / "runs")
    trainer, model, messages = fit([Script([0.9, 0.9, 0.9, 0.0, 0.9, 0.9]), before, g, after], 6,
                                   model=Net(scheduler=True), logger=record)
    assert len(messages) == 1 and "at step 3" in messages[0] and "to step 2" in messages[0]
    assert g.rollbacks == 1 and g.times_fired == 1 and not trainer.should_stop
    assert not same(before.end[3][0], before.end[2][0])  # step 3 moved the weights ...
    assert same(after.end[3][0], before.end[2][0])  # ... and the rollback brought back those of the end of step 2
    assert same(after.end[3][1], before.end[2][1])  # Adam's moments and steps too
    assert all(after.end[3][2])  # gradients cleared
    # rates: the optimizer's at once, the scheduler's base rate for its next steps (LambdaLR recomputes from it)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [pytest.approx(LR * 0.5)]
    assert after.lrs[3] == pytest.approx(before.lrs[3] * 0.5)
    ref = Snap()
    fit([Script([0.9] * 6), ref], 6, model=Net(scheduler=True))
    assert [after.lrs[s] for s in (4, 5)] == pytest.approx([ref.lrs[s] * 0.5 for s in (4, 5)])  # the clock went on
    assert [after.lrs[s] for s in (1, 2)] == [ref.lrs[s] for s in (1, 2)]
    events = [json.loads(line) for line in (Path(record.log_dir) / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["level"]) for e in events] == [(3, "rollback")]
    assert "Rolled back the model and optimizer state to step 2" in events[0]["message"]


def test_a_second_fall_rolls_back_again_to_the_new_good_step() -> None:
    before, after, g = Snap(), Snap(), guard()
    _, _, messages = fit([Script([0.9, 0.9, 0.0, 0.9, 0.9, 0.0, 0.9]), before, g, after], 7)
    assert g.rollbacks == 2 and g.times_fired == 2 and g.lr_reductions == 2
    assert same(after.end[2][0], before.end[1][0])
    assert same(after.end[5][0], before.end[4][0])  # held anew at the good step 4, after the first rollback
    assert after.lrs[6] == pytest.approx(LR * 0.25)
    assert [m.split(":")[0] for m in messages] == ["EntropyCollapseGuard at step 2", "EntropyCollapseGuard at step 5"]


def test_a_value_that_stays_bad_rolls_back_each_step_until_max_rollbacks_then_stops() -> None:
    before, after, g = Snap(), Snap(), guard(max_rollbacks=2)
    trainer, _, messages = fit([Script([0.9, 0.0, 0.0, 0.0, 0.0, 0.0]), before, g, after], 6)
    assert g.rollbacks == 2 and g.times_fired == 3  # re-armed after each rollback: each bad value a new episode
    assert same(after.end[1][0], before.end[0][0]) and same(after.end[2][0], before.end[0][0])
    assert trainer.should_stop and trainer.global_step == 4  # stopped at the third firing (step 3)
    assert "max_rollbacks=2" in messages[-1] and "stopping training" in messages[-1]
    assert not same(after.end[3][0], before.end[0][0])  # that firing did not roll back


@pytest.mark.parametrize("values", [[NAN, 0.9, 0.9], [0.1, 0.9]], ids=["nan-first", "bad-first"])
def test_a_firing_with_no_good_state_held_stops(values) -> None:
    g = guard(arm_on_good=False)
    trainer, _, messages = fit([Script(values), g], 3)
    assert trainer.should_stop and trainer.global_step == 1 and g.rollbacks == 0
    assert "No good state is held" in messages[0]


def test_a_non_finite_observation_rolls_back() -> None:
    before, after, g = Snap(), Snap(), guard()
    assert g.on_nonfinite
    fit([Script([0.9, 0.9, NAN, 0.9]), before, g, after], 4)
    assert g.rollbacks == 1 and same(after.end[2][0], before.end[1][0])


def test_weights_gone_non_finite_in_the_update_of_a_good_step_roll_back_to_finite_ones() -> None:
    """Step 2's forward is fine (its value is published as good), its update makes the weights non-finite: the
    next observation is NaN and the rollback must go to step 1's finite weights, not step 2's."""
    before, after, g = Snap(), Snap(), guard()
    fit([Script([0.9, 0.9, 0.9, NAN, 0.9]), before, g, after], 5, model=Net(blow_up_at=2))
    assert not all(torch.isfinite(v).all() for v in before.end[2][0].values())
    assert g.rollbacks == 1
    assert same(after.end[3][0], before.end[1][0])
    assert all(torch.isfinite(v).all() for v in after.end[4][0].values())


# ---------------------------------------------------------------------------- orders and hooks
def test_a_guard_that_runs_before_the_publisher_rolls_back_at_the_next_batch_start() -> None:
    before, after, g = Snap(), Snap(), guard()
    fit([before, g, after, Script([0.9, 0.9, 0.0, 0.9, 0.9])], 5)
    assert g.rollbacks == 1
    # judged at step 3's batch start (published at step 2): back to the end of step 1
    assert same(after.start[3][0], before.end[1][0]) and same(after.start[3][1], before.end[1][1])


def test_a_guard_observing_at_validation_end_rolls_back_to_the_last_good_validation() -> None:
    before, after, g = Snap(), Snap(), guard()
    fit([Script([0.9, 0.9, 0.0, 0.9], hook="validation"), before, g, after], 8, val=True, val_check_interval=2,
        limit_val_batches=1)
    assert g.rollbacks == 1
    assert same(after.val[2][0], before.val[1][0]) and same(after.val[2][1], before.val[1][1])


def test_gradient_accumulation_rolls_back_at_the_window_end() -> None:
    before, after, g = Snap(), Snap(), guard()
    fit([Script([0.9, 0.9, 0.0, 0.9]), before, g, after], 4, accumulate_grad_batches=2)
    assert g.rollbacks == 1
    assert same(after.end[2][0], before.end[1][0]) and same(after.end[2][1], before.end[1][1])


def test_manual_optimization_rolls_back() -> None:
    before, after, g = Snap(), Snap(), guard()
    fit([Script([0.9, 0.9, 0.0, 0.9]), before, g, after], 4, model=Net(manual=True))
    assert g.rollbacks == 1
    assert same(after.end[2][0], before.end[1][0]) and same(after.end[2][1], before.end[1][1])


def test_two_rollback_guards_never_go_back_to_a_state_the_other_rolled_back_from() -> None:
    """Guard A (key a) rolls back at step 2 to step 0; guard B (key b, still good at step 2, observed before A)
    held step 2's weights, the state A judged bad. B's next firing must not bring those back."""
    before, after = Snap(), Snap()
    ga = EntropyCollapseGuard("a", threshold=0.5, action="rollback", patience=2)
    gb = EntropyCollapseGuard("b", threshold=0.5, action="rollback")
    fit([Script([0.9, 0.0, 0.0, 0.9, 0.9], key="a"), Script([0.9, 0.9, 0.9, 0.0, 0.9], key="b"), before, gb, ga,
         after], 5)
    assert ga.rollbacks == 1 and gb.rollbacks == 1
    assert same(after.end[2][0], before.end[0][0])  # A: back to step 0
    bad = before.end[2][0]
    assert not same(after.end[3][0], bad)  # B: not back to the state A rolled back from
    assert same(after.end[3][0], before.end[0][0])  # but to the state both held good: A's (step 0's weights)


# ---------------------------------------------------------------------------- resume, lifecycle, no change
def test_rollbacks_survive_a_resume_and_count_towards_max_rollbacks(tmp_path) -> None:
    g = guard(max_rollbacks=1)
    trainer, _, _ = fit([Script([0.9, 0.9, 0.0, 0.9]), g], 4)
    assert g.rollbacks == 1 and g.state_dict()["rollbacks"] == 1
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    g2 = guard(max_rollbacks=1)
    trainer2, _, messages = fit([Script([0.9, 0.9, 0.9, 0.9, 0.9, 0.0, 0.9]), g2], 7, ckpt_path=ckpt)
    assert g2.rollbacks == 1  # restored, and the fall at step 5 stops instead of rolling back a second time
    assert trainer2.should_stop and "max_rollbacks=1" in messages[-1]


def reachable(root, limit: int = 20000) -> set[int]:
    """Ids of the objects reachable from ``root`` (classes and modules not followed)."""
    seen, todo = set(), [root]
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return seen


def test_after_fit_the_held_state_and_the_model_are_let_go() -> None:
    g = guard()
    trainer, model, _ = fit([Script([0.9] * 4), g], 4)
    assert g.held_states.step is None and g.held_states.nbytes == 0 and g._tracked is None
    # (Lightning itself binds the module's log / log_dict onto every callback)
    ids = reachable([v for k, v in vars(g).items() if k not in ("log", "log_dict")])
    assert id(model) not in ids and not any(id(p) in ids for p in model.parameters())
    assert not any(id(o) in ids for o in trainer.optimizers)


def test_a_rollback_guard_that_never_fires_changes_nothing() -> None:
    runs = []
    for callbacks in ([Script([0.9] * 6)], [Script([0.9] * 6), guard()]):
        _, model, _ = fit(callbacks, 6, model=Net(scheduler=True))
        runs.append((model.losses, model_state(model)))
    assert runs[0][0] == runs[1][0] and same(runs[0][1], runs[1][1])


def test_lr_factor_never_goes_below_min_lr() -> None:
    before, after, g = Snap(), Snap(), guard(min_lr=LR * 0.75)
    trainer, _, messages = fit([Script([0.9, 0.0, 0.9, 0.0, 0.9]), before, g, after], 5)
    assert g.rollbacks == 2 and g.lr_reductions == 1
    assert after.lrs[4] == pytest.approx(LR * 0.75)
    assert "already at min_lr" in messages[1]
    assert same(after.end[3][0], before.end[2][0])  # rolled back all the same


def test_reduce_lr_reaches_the_children_of_a_sequential_scheduler() -> None:
    """SequentialLR / ChainedScheduler step their children, which recompute from their own base rates: lowering
    only the wrapper's base_lrs is undone at the next step."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[2])
    g = guard()
    g.reduce_lr([opt], [seq])
    opt.step()
    seq.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warm: 1.0 * lambda, base halved
    opt.step()
    seq.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # decay: its base halved too
    chained = torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)])
    opt.param_groups[0]["lr"] = 1.0
    g.reduce_lr([opt], [chained])
    opt.step()
    chained.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_guard_state_round_trips_through_state_dict() -> None:
    g = guard()
    g.rollbacks = 2
    g2 = guard()
    g2.load_state_dict(copy.deepcopy(g.state_dict()))
    assert g2.rollbacks == 2
    from entrotrain.errors import EntrotrainError

    with pytest.raises(EntrotrainError, match="rollbacks"):
        g2.load_state_dict({**g.state_dict(), "rollbacks": -1})
    with pytest.raises(EntrotrainError, match="max_rollbacks"):
        guard(max_rollbacks=0)


def test_a_strategy_that_wraps_the_module_in_fsdp_from_outside_is_refused() -> None:
    """Lightning's FSDPStrategy without an auto-wrap policy wraps the LightningModule itself: ``pl_module`` then
    holds no FSDP submodule, its parameters are views of the flat parameter. The guard must look at the strategy's
    model too (CUDA-only in Lightning: the hook is driven directly, on a 1-process gloo group)."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from entrotrain.errors import EntrotrainError
    from tests.helpers.gloo import in_one_process_group

    def body() -> None:
        module = Net()
        wrapped = FSDP(module, device_id=torch.device("cpu"))
        opt = torch.optim.Adam(wrapped.parameters(), lr=LR)
        trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped), optimizers=[opt])
        with pytest.raises(EntrotrainError, match="FSDP"):
            guard().on_train_start(trainer, module)
        ddp_like = SimpleNamespace(strategy=SimpleNamespace(model=torch.nn.parallel.DistributedDataParallel(Net())),
                                   optimizers=[opt])
        plain = Net()
        g = guard()
        g.on_train_start(ddp_like, plain)  # DDP keeps the module's own parameters: fine
        assert g._tracked[0] is plain

    in_one_process_group(body)


S = torch.optim.lr_scheduler
SCHEDULES = {  # (scheduler on an optimizer at rate lr, the same schedule at rate lr * factor)
    "lambda": lambda o, lr: S.LambdaLR(o, lambda s: 1 / (1 + s)),
    "step": lambda o, lr: S.StepLR(o, 3, 0.5),
    "exponential": lambda o, lr: S.ExponentialLR(o, 0.9),
    "cosine": lambda o, lr: S.CosineAnnealingLR(o, 10),
    "cosine_restarts": lambda o, lr: S.CosineAnnealingWarmRestarts(o, 4),
    "one_cycle": lambda o, lr: S.OneCycleLR(o, max_lr=lr, total_steps=20),
    "cyclic": lambda o, lr: S.CyclicLR(o, 0.1 * lr, lr, step_size_up=3),
    "linear": lambda o, lr: S.LinearLR(o, 0.1, 1.0, 5),
    "polynomial": lambda o, lr: S.PolynomialLR(o, 10, 2.0),
    "multistep": lambda o, lr: S.MultiStepLR(o, [2, 5], 0.5),
    # SWALR (Lightning's StochasticWeightAveraging) anneals towards its groups' swa_lr: lowered too (it climbed back)
    "swalr": lambda o, lr: torch.optim.swa_utils.SWALR(o, swa_lr=0.2 * lr, anneal_epochs=5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_lowered_rate_stays_lowered_under_each_scheduler(name: str) -> None:
    """After reduce_lr at step 3 the rates follow the same schedule built at the lowered rate: the scheduler does
    not recompute the old rate at its next step (OneCycleLR reads its groups' max_lr / initial_lr / min_lr, CyclicLR
    its max_lrs)."""
    runs = []
    for lr, reduce in ((1.0, True), (0.5, False)):
        p = torch.nn.Parameter(torch.ones(1))
        opt = torch.optim.SGD([p], lr=lr)
        sched = SCHEDULES[name](opt, lr)
        lrs = []
        for t in range(12):
            if t == 3 and reduce:
                assert guard().reduce_lr([opt], [sched])
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        runs.append(lrs[3:])
    assert runs[0] == pytest.approx(runs[1], rel=1e-9, abs=1e-12)


def test_a_max_drop_right_after_a_resume_stops_nothing_held_yet(tmp_path) -> None:
    """The resumed guard compares with the history its checkpoint carried, but holds no state until its first good
    observation in this fit: a fall at the first one stops, naming why."""
    g = guard(threshold=None, max_drop=0.5, drop_window=1)
    trainer, _, _ = fit([Script([0.9, 0.9]), g], 2)
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    g2 = guard(threshold=None, max_drop=0.5, drop_window=1)
    trainer2, _, messages = fit([Script([0.9, 0.9, 0.1, 0.9]), g2], 4, ckpt_path=ckpt)
    assert trainer2.should_stop and g2.rollbacks == 0 and trainer2.global_step == 3
    assert "fell by" in messages[0] and "No good state is held" in messages[0]


def test_with_a_real_attention_monitor_publishing_the_key() -> None:
    """AttentionEntropyMonitor publishes entropy/attn_norm/min every step; from step 3 on the threshold is raised
    above any entropy (every value bad): rollbacks at steps 3 and 4 to the end of step 2, a stop at step 5, the
    monitor's taps gone after fit."""
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from tests.helpers.lightning_models import TinyLM, token_loader

    class Tighten(L.Callback):
        def __init__(self, target) -> None:
            self.target = target

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if _step(trainer) == 3:
                self.target.threshold = 1e9

    before, after = Snap(), Snap()
    g = guard(max_rollbacks=2)
    monitor = AttentionEntropyMonitor(every_n_steps=1, log_media=False)
    L.seed_everything(0)
    model = TinyLM()
    trainer = quiet_trainer(callbacks=[monitor, Tighten(g), before, g, after], max_steps=10, logger=SpyLogger(),
                            log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, token_loader())
    assert g.rollbacks == 2 and trainer.should_stop and trainer.global_step == 6
    assert same(after.end[3][0], before.end[2][0]) and same(after.end[4][0], before.end[2][0])
    assert same(after.end[4][1], before.end[2][1])
    assert not [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert torch._C._len_torch_function_stack() == 0


def test_rollback_with_checkpoint_rotation_names_the_kept_checkpoint(tmp_path) -> None:
    """The in-memory rollback and the on-disk hint agree: the message names the checkpoint of the step rolled
    back to, kept from ModelCheckpoint's rotation (save_top_k=1 deletes it at the next save)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=1, monitor="step",
                           mode="max")
    g = guard()
    _, _, messages = fit([Script([0.9, 0.9, 0.9, 0.0, 0.9]), g, ckpt], 5, enable_checkpointing=True)
    assert g.rollbacks == 1
    assert "to step 2" in messages[0] and "Newest checkpoint at or before step 2" in messages[0]
    kept = g.rollback_checkpoint
    assert kept is not None and kept.exists() and "step=2" in kept.name
