"""Findings (session 28): EntropyCollapseGuard(action="rollback") under the setups users have.

- A Lightning fit ended by an exception calls ``on_exception``, not the callbacks' ``teardown``: the guard kept the
  model and its held host copy (one copy of the model and its optimizer state) alive after ``fit`` raised.
- After a guard lowered the learning rates, the schedulers' ``get_last_lr()`` still gave the old rates until their
  next step: ``transformers.Trainer`` logs ``learning_rate`` from it, so the step after a rollback (or a
  ``reduce_lr``) was logged at the rate before it.
- ``SWALR`` (Lightning's ``StochasticWeightAveraging``) anneals towards its groups' ``swa_lr``, which the guard did not
  lower: within ``anneal_epochs`` the rate climbed back to the one before the rollback (tested with the other
  schedulers: ``SCHEDULES["swalr"]`` in test_guard_rollback.py).
- ``ReduceLROnPlateau`` counted the collapse's bad epochs towards its patience: the next bad metric after a
  rollback lowered the rate again, on top of the guard's reduction.
- A parameter an optimizer steps outside the tracked model (the discriminator when a loop watches the generator, a
  learnable temperature outside any module) had its moments rolled back but not its value.
- ``ZeroRedundancyOptimizer`` keeps its state in ``.optim`` (tests/integrations/rollback_ddp_run.py).
- Setups that roll back bit for bit and go on (kept so): optimizers other than Adam (SGD with momentum, LBFGS with a
  closure, Adafactor's factored moments, a state with non-tensor values), a param group added mid-run, two
  optimizers, ``torch.amp.GradScaler``
  skipping an infinite step in a plain loop, and Lightning's ``bf16-mixed`` / ``16-mixed`` precision.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.integrations.loop import EntropyMonitors
from tests.callbacks.test_guard_rollback import Net, Script, Snap, fit, guard
from tests.helpers.training_state import model_state, opt_state, same
from tests.helpers.torch_release import needs_torch


def _held_bytes(g: EntropyCollapseGuard) -> int:
    return sum(getattr(g, name).nbytes for name in ("held_states", "rollback_state") if hasattr(g, name))


# ---------------------------------------------------------------------------- Lightning: an exception
class Boom(Net):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_fit_ended_by_an_exception_after_a_rollback_lets_the_held_state_go() -> None:
    g = guard()
    with pytest.raises(RuntimeError, match="boom"):
        fit([Script([0.9, 0.9, 0.9, 0.0, 0.9, 0.9]), g], 6, model=Boom())
    assert g.rollbacks == 1
    assert g._tracked is None and _held_bytes(g) == 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_rolls_back_bit_for_bit(precision: str) -> None:
    """Autocast on CPU; ``16-mixed`` steps through a GradScaler, whose scale is not part of the rollback."""
    before, after, g = Snap(), Snap(), guard()
    fit([Script([0.9, 0.9, 0.9, 0.0, 0.9]), before, g, after], 5, precision=precision)
    assert g.rollbacks == 1
    assert same(after.end[3][0], before.end[2][0]) and same(after.end[3][1], before.end[2][1]) and all(after.end[3][2])
    assert not same(after.end[4][0], after.end[3][0])  # and it trains on


# ---------------------------------------------------------------------------- schedulers report the lowered rates
def _schedulers(opt: torch.optim.Optimizer) -> dict[str, object]:
    lam = torch.optim.lr_scheduler.LambdaLR
    return {
        "lambda": lam(opt, lambda s: 1.0 / (1 + s)),
        "sequential": torch.optim.lr_scheduler.SequentialLR(opt, [lam(opt, lambda s: 1.0), lam(opt, lambda s: 0.5)],
                                                            milestones=[2]),
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
    }


@pytest.mark.parametrize("action", ["rollback", "reduce_lr"])
@pytest.mark.parametrize("name", ["lambda", "sequential", "plateau"])
def test_after_a_lowering_get_last_lr_gives_the_rates_in_use(name: str, action: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.2}])
    sched = _schedulers(opt)[name]
    g = EntropyCollapseGuard("k", threshold=0.5, action=action, keep_last_good=False)
    g.track(model, [opt])
    g.observe(0.9, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.fire(g.observe(0.1, 1), 1, [opt], [sched])
    rates = [group["lr"] for group in opt.param_groups]
    assert rates == pytest.approx([0.05, 0.1]) if name == "plateau" else rates[0] < 0.1
    assert sched.get_last_lr() == rates


@pytest.mark.parametrize("action", ["rollback", "reduce_lr"])
def test_reduce_lr_on_plateau_counts_its_patience_from_the_lowered_rate(action: str) -> None:
    """The bad epochs ReduceLROnPlateau counted during the collapse (weights a rollback abandoned) made it lower the
    rate again at the next bad metric, on top of the guard's reduction; the guard's lowering now resets the count as
    the plateau's own reduction does."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=2)
    g = EntropyCollapseGuard("k", threshold=0.5, action=action, keep_last_good=False)
    g.track(model, [opt])
    g.observe(0.9, 0)
    for metric in (1.0, 0.9, 1.5, 1.6):  # improving, then two bad epochs: the collapse
        plateau.step(metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.fire(g.observe(0.1, 1), 1, [opt], [plateau])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    plateau.step(1.7)  # the collapsed epoch's metric, as Lightning steps it after the firing
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# ---------------------------------------------------------------------------- optimizers and loops that work
def _roll_back_after(model: nn.Module, opts: list, step, good: int = 2, bad: int = 2) -> tuple[list, list]:
    """Train ``good`` steps judged good, ``bad`` more, fire: the model and optimizers equal the last good step's;
    then one more step trains on finite weights. Returns the state held at the last good step and the state right
    after the rollback, each ``[model state, optimizers' states]``, for the caller to compare."""
    g = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)
    g.track(model, opts)
    for s in range(good):
        step()
        g.observe(0.9, s)
    held = model_state(model), copy.deepcopy([opt_state(o) for o in opts])  # (LBFGS edits its lists in place)
    for _ in range(bad):
        step()
    assert not same(model_state(model), held[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "Rolled back" in g.fire(g.observe(0.1, good + bad), good + bad, opts)
    restored = model_state(model), copy.deepcopy([opt_state(o) for o in opts])  # (the next step edits LBFGS's)
    assert same(restored[0], held[0]) and same(restored[1], held[1])
    step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return list(held), list(restored)


class Counting(torch.optim.Optimizer):
    """SGD whose per-parameter state holds non-tensor values: an int, a list and a dict holding a tensor."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["n"] = state.get("n", 0) + 1
                state["norms"] = [*state.get("norms", []), float(p.grad.norm())]
                state["last"] = {"grad": p.grad.clone()}
                p.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=0.01),
    "non-tensor-state": Counting,
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4, history_size=3),
}


_ADAFACTOR = needs_torch(2, 5, "torch.optim.Adafactor is new in torch 2.5")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_ADAFACTOR) if n == "adafactor" else n for n in sorted(OPTIMIZERS)]
)
def test_optimizers_other_than_adam_roll_back_bit_for_bit(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = OPTIMIZERS[name](model.parameters())
    x = torch.randn(16, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    held, restored = _roll_back_after(model, [opt], lambda: opt.step(closure))
    assert same(restored, held)  # weights, BatchNorm statistics and this optimizer's state, bit for bit


def test_a_param_group_added_after_the_held_step_keeps_its_rate_and_loses_its_moments() -> None:
    """``add_param_group`` mid-run (Lightning's BackboneFinetuning): the rollback brings back the weights of every
    parameter and the moments held, the new group's parameters had none then and have none now, its rate lowered."""
    torch.manual_seed(0)
    head, backbone = nn.Linear(4, 4), nn.Linear(4, 1)
    model, x = nn.Sequential(head, backbone), torch.randn(8, 4)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    g = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)
    g.track(model, [opt])

    def step() -> None:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    step()
    g.observe(0.9, 0)
    held = model_state(model), opt_state(opt)
    opt.add_param_group({"params": backbone.parameters(), "lr": 0.2})
    step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.fire(g.observe(0.1, 1), 1, [opt])
    assert same(model_state(model), held[0]) and same(opt_state(opt), held[1] + [{}, {}])
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([0.05, 0.1])


def test_two_optimizers_roll_back_together() -> None:
    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=0.01, betas=(0.5, 0.9))
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, 4)

    def step() -> None:
        opt_d.zero_grad()
        disc(gen(x).detach()).mean().backward()
        opt_d.step()
        opt_g.zero_grad()
        (-disc(gen(x)).mean()).backward()
        opt_g.step()

    held, restored = _roll_back_after(nn.ModuleDict({"gen": gen, "disc": disc}), [opt_g, opt_d], step)
    assert len(restored[1]) == 2 and same(restored, held)  # both networks and both optimizers' states


def test_parameters_an_optimizer_steps_outside_the_model_roll_back_with_their_moments() -> None:
    """A loop that watches the network it monitors (the generator) with every optimizer (the discriminator's too),
    or an optimizer over a learnable tensor kept outside any module (SAC's temperature): their moments rolled back,
    their values did not, so the moments no longer matched the weights they step."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    log_alpha = torch.zeros(1, requires_grad=True)
    opt_g = torch.optim.Adam(gen.parameters(), lr=0.01)
    opt_d = torch.optim.Adam([*disc.parameters(), log_alpha], lr=0.01)
    x = torch.randn(8, 4)

    def step() -> None:
        for opt in (opt_g, opt_d):
            opt.zero_grad()
        (disc(gen(x)).mean() + log_alpha.exp().sum()).backward()
        opt_g.step()
        opt_d.step()

    outside = [*disc.parameters(), log_alpha]
    g = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)
    g.track(gen, [opt_g, opt_d])
    step()
    g.observe(0.9, 0)
    held = [t.detach().clone() for t in outside]
    step()
    step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.fire(g.observe(0.1, 1), 1, [opt_g, opt_d])
    assert all(torch.equal(t, h) for t, h in zip(outside, held))
    assert all(t.grad is None for t in outside)


def test_a_grad_scaler_skipping_an_infinite_step_in_a_loop_rolls_back_and_goes_on() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitors = EntropyMonitors(guards=[EntropyCollapseGuard("ok", threshold=0.5, action="rollback",
                                                            keep_last_good=False)], print_summary=False)
    x, after = torch.randn(16, 4), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monitors.watch(model, opt):
            for step in range(6):
                with monitors.step(step):
                    for _ in range(2):  # two micro-batches of one window
                        with torch.autocast("cpu", dtype=torch.float16):
                            loss = model(x).pow(2).mean()
                        scaler.scale(loss * (math.inf if step == 3 else 0.5)).backward()
                    scaler.step(opt)  # skipped at step 3 (infinite gradients), the scale halves
                    scaler.update()
                    opt.zero_grad()
                    monitors.observe(ok=math.nan if step == 3 else 0.9)
                after[step] = model_state(model), opt_state(opt), monitors.rolled_back
    assert [s for s in after if after[s][2]] == [3]
    assert same(after[3][0], after[2][0]) and same(after[3][1], after[2][1])
    assert scaler.get_scale() == 2.0**9 and not same(after[5][0], after[3][0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
