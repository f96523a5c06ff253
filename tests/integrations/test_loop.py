"""EntropyMonitors (entrotrain.integrations.loop) in a hand-written training loop: the same keys and values as the
Lightning monitors on the same model and batches, training unchanged, taps armed only on due steps (all
micro-batches of the step), released on every exit, guard actions, ``log=`` and wandb media, resume, configuration
errors, 2-rank DDP, and an import that pulls in no trainer library."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.callbacks.information_plane_monitor import InformationPlaneMonitor
from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.fake_wandb_run import FakeRun
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import (
    LogitsGPT, MaskedToyMoE, fit_lightning, leftovers, run_loop, same_weights, token_batches,
)
from tests.helpers.router_models import toy_batches
from tests.helpers.scripts import run_script

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _attention(every: int = 1, **kw) -> AttentionEntropyMonitor:
    return AttentionEntropyMonitor(**{"every_n_steps": every, "log_media": False, "print_summary": False, **kw})


def _representation(every: int = 1, **kw) -> RepresentationEntropyMonitor:
    kw = {"include": ["model.blocks.*"], "every_n_steps": every, "log_spectrum": False, "print_summary": False, **kw}
    return RepresentationEntropyMonitor(**kw)


def _train(module, opt, batch, step: int) -> None:
    """One optimizer step of ``module`` on ``batch``: what runs inside ``with monitors.step(step):``."""
    module.training_step(batch, step).backward()
    opt.step()
    opt.zero_grad()


def _assert_same_logs(loop: dict[int, dict[str, float]], lit: dict[int, dict[str, float]]) -> None:
    assert set(loop) == set(lit)
    for step, row in lit.items():
        assert set(loop[step]) == set(row), step
        for key, value in row.items():
            assert loop[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


# ------------------------------------------------------------------ 1. same keys and values as Lightning
@pytest.mark.parametrize("accumulate", [1, 2])
def test_same_keys_values_and_weights_as_lightning(accumulate: int) -> None:
    """Attention, representation and σReparam monitors every k = 2 steps over 5 steps: the loop logs at steps 0, 2,
    4 exactly what Lightning logs there, and both runs end on the same weights (Lightning's automatic optimisation
    is forward, backward, ``optimizer.step(closure)``, ``zero_grad``: the same operations)."""
    k, steps = 2, 5

    def monitors() -> list:
        return [_attention(k), _representation(k, max_tokens=None), SigmaReparamMonitor(every_n_steps=k)]

    batches = token_batches(steps * accumulate, rows=2 if accumulate > 1 else 4)
    lit_module = GPTModule(seed=0)
    loop_module = copy.deepcopy(lit_module)
    lit = fit_lightning(lit_module, batches, monitors(), steps, accumulate)
    loop, _ = run_loop(loop_module, batches, EntropyMonitors(monitors(), print_summary=False), steps, accumulate)
    assert sorted(loop) == [0, k, 2 * k]
    assert {"entropy/attn_norm/L1/H1", "entropy/repr/model.blocks.1/rankme", "sigma_reparam/qk_norm/max"} <= set(loop[0])
    assert loop[0]["entropy/repr/model.blocks.0/n_streamed"] == accumulate * len(batches[0][0]) * (batches[0][0].shape[1] - 1)
    _assert_same_logs(loop, lit)
    assert same_weights(loop_module, lit_module)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_router_monitor_same_as_lightning(accumulate: int) -> None:
    """A two-layer soft MoE whose root forward takes ``attention_mask``: the loop's router statistics (padding left
    out through that keyword argument, micro-batch by micro-batch) equal Lightning's, which reads the mask from the
    batch."""
    batches = toy_batches(3 * accumulate)

    def monitors() -> list:
        return [RouterEntropyMonitor(every_n_steps=1, top_k=2, log_media=False, print_summary=False)]

    lit_module = MaskedToyMoE()
    loop_module = copy.deepcopy(lit_module)
    lit = fit_lightning(lit_module, batches, monitors(), 3, accumulate)
    loop, _ = run_loop(loop_module, batches, EntropyMonitors(monitors(), print_summary=False), 3, accumulate)
    assert "entropy/router/L1/entropy" in loop[0]
    _assert_same_logs(loop, lit)
    assert same_weights(loop_module, lit_module)

    # without the mask every position counts: the statistics differ, so the mask above was used
    unmasked = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in batches]
    other, _ = run_loop(MaskedToyMoE(), unmasked, EntropyMonitors(monitors(), print_summary=False), 1, accumulate)
    assert other[0]["entropy/router/L0/entropy"] != pytest.approx(loop[0]["entropy/router/L0/entropy"], rel=1e-9)


@pytest.mark.parametrize(("source", "accumulate"), [("output", 1), ("output", 2), ("head", 2)])
def test_prediction_monitor_same_as_lightning(source: str, accumulate: int) -> None:
    """``source="output"``: the loop reads the root forward's logits and ``labels=`` keyword argument, Lightning the
    ``training_step`` outputs; ``source="head"``: the ``lm_head`` hook in both, labels from the forward's keyword
    argument in the loop and from the ``(inputs, labels)`` batch in Lightning. The probe (tensors) is scored and
    greedy generation runs on the weights after each step in both."""
    batches = [(idx[:, :-1], idx[:, 1:]) for (idx,) in token_batches(4 * accumulate, rows=4 // accumulate)]
    probe = token_batches(1, rows=3, seed=9)[0][0]

    def monitors() -> list:
        return [PredictionEntropyMonitor(
            every_n_steps=2, source=source, head="model.lm_head", probe=(probe[:, :-1], probe[:, 1:]), positions=3,
            generation_prompts=2, prompt_length=3, max_new_tokens=3, log_media=False, print_summary=False,
        )]

    lit_module = LogitsGPT(seed=0, convert=False)
    loop_module = copy.deepcopy(lit_module)
    lit = fit_lightning(lit_module, batches, monitors(), 4, accumulate)
    loop, losses = run_loop(loop_module, batches, EntropyMonitors(monitors(), print_summary=False), 4, accumulate)
    assert sorted(loop) == [0, 2]
    for key in ("train/mean", "train/nll", "train/p50", "probe/mean", "probe/nll", "probe/pos/0", "gen/distinct_1"):
        assert f"entropy/pred/{key}" in loop[0], key
    assert loop[0]["entropy/pred/train/nll"] == pytest.approx(float(sum(losses[:accumulate])) / accumulate, rel=1e-5)
    assert loop[0]["entropy/pred/train/tokens"] == 4 * batches[0][0].shape[1]  # every micro-batch's positions
    _assert_same_logs(loop, lit)
    assert same_weights(loop_module, lit_module)


def test_hf_moe_lm_with_padding_same_as_lightning() -> None:
    """A tiny HF Mixtral on right-padded rows, called ``model(**batch)``: attention (padding from the HF mask),
    router (``attention_mask`` keyword) and head prediction entropy (``labels`` keyword, shifted) with a dict probe
    log in the loop what they log in Lightning (which reads the batch), and training ends on the same weights."""
    pytest.importorskip("transformers")
    from tests.helpers.loop_runs import HFLit
    from tests.helpers.tiny_hf_lms import padded_rows, stack_rows, tiny_mixtral_lm

    vocab, t = 40, 10
    rows = padded_rows(8, vocab, t)
    batches = [stack_rows(rows[:4]), stack_rows(rows[4:])]
    probe = stack_rows(padded_rows(4, vocab, t, seed=7))

    def monitors() -> list:
        return [
            _attention(max_rows=None, max_queries=None),
            RouterEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False),
            PredictionEntropyMonitor(every_n_steps=1, source="head", shift_labels=True, probe=probe, positions=2,
                                     log_media=False, print_summary=False),
        ]

    lit_module = HFLit(tiny_mixtral_lm(vocab))
    loop_module = copy.deepcopy(lit_module)
    lit = fit_lightning(lit_module, batches, monitors(), 2)
    loop, losses = run_loop(loop_module, batches, EntropyMonitors(monitors(), print_summary=False), 2)
    labels = batches[0]["labels"]
    assert loop[0]["entropy/pred/train/tokens"] == float((labels[:, 1:] != -100).sum())  # padding not scored
    assert loop[0]["entropy/pred/train/nll"] == pytest.approx(float(losses[0]), rel=1e-5)
    assert {"entropy/attn_norm/L1/H1", "entropy/router/L1/entropy", "entropy/pred/probe/mean"} <= set(loop[0])
    _assert_same_logs(loop, lit)
    assert same_weights(loop_module, lit_module)


# ------------------------------------------------------------------ 2. monitoring never changes training
def test_training_bit_identical_with_and_without_monitors() -> None:
    """Every monitor captures at every step (the probe forward and generation run after each update), with dropout
    on: same losses, same weights, so no monitor draws from the global RNG either."""
    batches = token_batches(6)
    probe = token_batches(1, rows=2, seed=5)[0][0]

    def monitors() -> EntropyMonitors:
        return EntropyMonitors(
            [_attention(), _representation(measures=("rankme", "effective_rank", "vendi")),
             SigmaReparamMonitor(every_n_steps=1),
             PredictionEntropyMonitor(every_n_steps=1, probe=(probe[:, :-1], probe[:, 1:]), generation_prompts=1,
                                      prompt_length=3, max_new_tokens=3, log_media=False, print_summary=False)],
            guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.01)],
            print_summary=False,
        )

    bare = LogitsGPT(seed=0, dropout=0.1)
    watched = copy.deepcopy(bare)
    torch.manual_seed(1)
    _, loss_a = run_loop(bare, batches, None, 6)
    torch.manual_seed(1)
    logs, loss_b = run_loop(watched, batches, monitors(), 6)
    assert sorted(logs) == list(range(6)) and all("entropy/pred/probe/mean" in row for row in logs.values())
    assert len(loss_a) == len(loss_b) == 6 and all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    assert same_weights(bare, watched)


# ------------------------------------------------------------------ 3. when it captures
def _armed_trace(monitors: EntropyMonitors, steps: int) -> list[tuple[bool, bool, list[str], set[str]]]:
    """Per step: (attention tap armed, representation tap armed, what is hooked on the model) seen inside the block
    before the forward, and the key families logged after it."""
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    batches = token_batches(steps)
    trace = []
    with monitors.watch(module, opt):
        attn, repr_ = monitors.monitors
        for step in range(steps):
            with monitors.step(step):
                seen = (attn.tap.armed, repr_.tap.armed, leftovers(module))
                _train(module, opt, batches[step], step)
            families = {key.split("/")[1] for key in monitors.logs}
            trace.append((*seen, families))
            assert not leftovers(module) and not attn.tap.armed and not repr_.tap.armed  # disarmed after every block
    return trace


def test_arms_only_on_each_monitors_due_steps() -> None:
    steps = 7
    trace = _armed_trace(EntropyMonitors([_attention(2), _representation(3)], print_summary=False), steps)
    for step, (attn_armed, repr_armed, hooked, families) in enumerate(trace):
        assert attn_armed == (step % 2 == 0), step
        assert repr_armed == (step % 3 == 0), step
        assert bool(hooked) == (attn_armed or repr_armed), (step, hooked)  # nothing on the model otherwise
        expected = ({"attn", "attn_norm"} if step % 2 == 0 else set()) | ({"repr"} if step % 3 == 0 else set())
        assert families == expected, step


def test_every_n_steps_override_applies_to_all_monitors() -> None:
    steps = 6
    trace = _armed_trace(EntropyMonitors([_attention(2), _representation(3)], every_n_steps=4, print_summary=False), steps)
    assert [(a, r) for a, r, _, _ in trace] == [(s % 4 == 0, s % 4 == 0) for s in range(steps)]
    assert [bool(f) for *_, f in trace] == [s % 4 == 0 for s in range(steps)]


@settings(max_examples=12)
@given(
    attn_every=st.integers(1, 4), repr_every=st.integers(1, 4), override=st.none() | st.integers(1, 4),
    steps=st.integers(1, 7),
)
def test_armed_exactly_on_due_steps_property(attn_every: int, repr_every: int, override: int | None, steps: int) -> None:
    """Any cadences, with or without the override: armed, hooked and logged exactly at the steps ``s % n == 0``."""
    monitors = EntropyMonitors([_attention(attn_every), _representation(repr_every)], every_n_steps=override)
    trace = _armed_trace(monitors, steps)
    attn_n, repr_n = override or attn_every, override or repr_every
    for step, (attn_armed, repr_armed, hooked, families) in enumerate(trace):
        assert (attn_armed, repr_armed) == (step % attn_n == 0, step % repr_n == 0), step
        assert bool(hooked) == (attn_armed or repr_armed) == bool(families), step
        assert ("repr" in families) == repr_armed and ("attn" in families) == attn_armed, step


def test_probe_and_generation_forwards_are_not_captured_by_other_monitors() -> None:
    """The prediction monitor's probe and generation forwards run after the step's taps are released (and under
    exclusive_capture): attention and representation log the same with it as without it, whatever the order."""
    probe = token_batches(1, rows=3, seed=9)[0][0]

    def logs(with_prediction: bool) -> dict[int, dict[str, float]]:
        monitors = [_attention(), _representation(max_tokens=None)]
        if with_prediction:  # listed first: its probe forward runs before the others compute (Lightning says last)
            monitors.insert(0, PredictionEntropyMonitor(
                every_n_steps=1, probe=(probe[:, :-1], probe[:, 1:]), generation_prompts=2, prompt_length=3,
                max_new_tokens=4, log_media=False, print_summary=False,
            ))
        out, _ = run_loop(LogitsGPT(seed=0), token_batches(2), EntropyMonitors(monitors, print_summary=False), 2)
        return out

    with_it, without = logs(True), logs(False)
    assert "entropy/pred/gen/distinct_1" in with_it[0]
    assert {s: {k: v for k, v in row.items() if not k.startswith("entropy/pred/")} for s, row in with_it.items()} == without


def test_micro_batches_of_one_step_add_up_to_the_union_batch() -> None:
    """Two micro-batches (forward + backward each) inside one ``step()`` block log what one forward of the two
    batches concatenated logs (every row and query scored, every token streamed)."""
    (a,), (b,) = token_batches(2, rows=3)

    def monitors() -> EntropyMonitors:
        return EntropyMonitors(
            [_attention(max_rows=None, max_queries=None), _representation(max_tokens=None)], print_summary=False
        )

    module = GPTModule(seed=0)
    union_module = copy.deepcopy(module)
    split, _ = run_loop(module, [(a,), (b,)], monitors(), 1, accumulate=2)
    union, _ = run_loop(union_module, [(torch.cat([a, b]),)], monitors(), 1)
    assert split[0]["entropy/repr/model.blocks.0/n_streamed"] == 6 * (a.shape[1] - 1)
    one, _ = run_loop(copy.deepcopy(union_module), [(a,)], monitors(), 1)  # a single micro-batch is not the union
    assert one[0]["entropy/repr/model.blocks.0/n_streamed"] == 3 * (a.shape[1] - 1)
    _assert_same_logs(split, union)


# ------------------------------------------------------------------ 4. lifecycle
def test_watch_releases_every_hook_on_normal_exit_and_on_an_exception() -> None:
    """Attention (function mode + site hooks), representation (module hooks) and prediction (head hook, root
    forward hooks for the keyword arguments) taps."""
    module = LogitsGPT(seed=0)
    opt = module.configure_optimizers()
    batches = token_batches(3)
    prediction = PredictionEntropyMonitor(every_n_steps=1, source="head", head="model.lm_head", probe_batches=0,
                                          log_media=False, print_summary=False)
    monitors = EntropyMonitors([_attention(), _representation(), prediction], print_summary=False)
    taps = lambda: [monitors.monitors[0].tap.armed, monitors.monitors[1].tap.armed]  # noqa: E731

    def forward_backward(step: int) -> None:
        module.training_step(batches[step], step)["loss"].backward()

    with monitors.watch(module, opt):
        with monitors.step(0):
            forward_backward(0)
        assert "entropy/pred/train/mean" in monitors.logs
    assert not leftovers(module)

    with pytest.raises(RuntimeError, match="boom"):
        with monitors.watch(module, opt):
            with monitors.step(0):
                forward_backward(0)
                assert {"<root>", "model.blocks.0"} <= set(leftovers(module)) and all(taps())  # armed in a due step
                raise RuntimeError("boom")
    assert monitors.logs == {}  # the failed step computed nothing
    assert not leftovers(module) and not any(taps())

    # an exception caught inside the loop: the step's taps are released, the next step captures normally
    with monitors.watch(module, opt):
        with pytest.raises(ValueError):
            with monitors.step(0):
                module.training_step(batches[0], 0)
                raise ValueError("bad batch")
        assert not leftovers(module) and monitors.logs == {}
        with monitors.step(1):
            forward_backward(1)
        assert {"entropy/attn_norm/min", "entropy/pred/train/mean"} <= set(monitors.logs)
    assert not leftovers(module)


def test_a_monitor_that_cannot_capture_fails_clearly_and_leaves_the_model_clean() -> None:
    moe = MaskedToyMoE()  # no attention
    monitors = EntropyMonitors([_attention()])
    with pytest.raises(TapError, match="captured no attention in MaskedToyMoE"):
        with monitors.watch(moe):
            with monitors.step(0):
                moe.training_step(toy_batches(1)[0], 0).backward()
    assert not leftovers(moe)
    gpt = GPTModule(seed=0)  # no router
    with pytest.raises(TapError, match="RouterEntropyMonitor in a plain training loop: .*found no MoE router"):
        EntropyMonitors([RouterEntropyMonitor(top_k=2)]).watch(gpt)
    assert not leftovers(gpt)


def test_close_is_idempotent_and_prints_the_summary_once(capsys: pytest.CaptureFixture[str]) -> None:
    module = GPTModule(seed=0)

    def run(print_summary: bool) -> EntropyMonitors:
        monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False)], print_summary=print_summary)
        run_loop(module, token_batches(2), monitors, 2)
        monitors.close()
        monitors.close()
        return monitors

    run(True)
    printed = capsys.readouterr().out
    title = printed.strip().splitlines()[0]
    assert title and printed.count(title) == 1  # one table, at the first close
    run(False)
    assert capsys.readouterr().out == ""

    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False)])
    with pytest.raises(RuntimeError, match="boom"):  # a run that fails prints no summary (as Lightning)
        with monitors.watch(module):
            with monitors.step(0):
                module.training_step(token_batches(1)[0], 0)
            raise RuntimeError("boom")
    monitors.close()
    assert monitors.monitors[0].first_summary is not None and capsys.readouterr().out == ""


def test_misuse_is_a_clear_error() -> None:
    monitors = EntropyMonitors([_attention()])
    with pytest.raises(EntrotrainError, match=r"before watch\(model\)"):
        with monitors.step(0):
            pass
    with pytest.raises(EntrotrainError, match="monitors.watch"):
        with monitors:
            pass
    module = GPTModule(seed=0)
    with monitors.watch(module):
        with pytest.raises(EntrotrainError, match=r"inside a `with monitors.step\(step\):` block"):
            monitors.observe(loss=1.0)
        with pytest.raises(EntrotrainError, match="step"):
            with monitors.step(-1):
                pass
    assert not leftovers(module)


def test_watch_again_starts_fresh() -> None:
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, patience=100, arm_on_good=False)
    monitors = EntropyMonitors([_attention()], guards=[guard], print_summary=False)
    run_loop(GPTModule(seed=0), token_batches(3), monitors, 3)
    attn = monitors.monitors[0]
    assert list(attn._history_steps) == [0, 1, 2] and guard.bad_streak == 3
    run_loop(GPTModule(seed=1), token_batches(1), monitors, 1)
    assert list(attn._history_steps) == [0] and guard.bad_streak == 1
    assert attn.first_summary[0] == 0


# ------------------------------------------------------------------ 5. guards
def test_stop_guard_sets_should_stop_and_logs_the_alert() -> None:
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    batches = token_batches(5)
    # always "collapsed" (normalised entropy <= 1), judged from the first observation
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, action="stop", arm_on_good=False)
    monitors = EntropyMonitors([_attention(2)], guards=[guard], print_summary=False)
    ran = []
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 0: .*Stopping training"):
        with monitors.watch(module, opt):
            for step in range(5):
                with monitors.step(step):
                    _train(module, opt, batches[step], step)
                ran.append(step)
                if monitors.should_stop:
                    break
    assert ran == [0] and monitors.should_stop and guard.times_fired == 1
    assert monitors.logs["entropy/attn_norm/min/alert"] == 1.0 and "entropy/attn_norm/min" in monitors.logs
    with monitors.watch(module, opt):  # a new run starts without the stop
        assert not monitors.should_stop


def test_reduce_lr_guard_on_an_observed_key_lowers_lr_once_per_episode() -> None:
    """A guard on ``loss`` handed over with ``observe``: bad, bad, good, bad -> two episodes, two reductions of both
    optimizers' lr and of the scheduler's base rate; the observed value itself is not logged."""
    module = GPTModule(seed=0)
    params = list(module.parameters())
    opt_a = torch.optim.SGD(params[:4], lr=0.1)
    opt_b = torch.optim.Adam(params[4:], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0)
    guard = EntropyCollapseGuard("loss", threshold=0.0, mode="max", action="reduce_lr", lr_factor=0.5, arm_on_good=False)
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    batches = token_batches(4)
    observed = [3.0, 2.0, -1.0, 4.0]  # "loss" above 0 is bad
    lrs, logs = [], []
    with pytest.warns(UserWarning, match="multiplied by 0.5"):
        with monitors.watch(module, [opt_a, opt_b], sched):
            for step in range(4):
                with monitors.step(step):
                    module.training_step(batches[step], step).backward()
                    for opt in (opt_a, opt_b):
                        opt.step()
                        opt.zero_grad()
                    sched.step()
                    monitors.observe(loss=torch.tensor(observed[step]), ignored=object())
                lrs.append((opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"]))
                logs.append(dict(monitors.logs))
    halved, quartered = (pytest.approx(0.05), pytest.approx(0.005)), (pytest.approx(0.025), pytest.approx(0.0025))
    assert lrs == [halved, halved, halved, quartered]
    assert sched.base_lrs == [pytest.approx(0.025)]  # the scheduler recomputes lr from it: the reduction stays
    assert guard.lr_reductions == 2 and guard.times_fired == 2
    assert logs == [{"loss/alert": 1.0}, {}, {}, {"loss/alert": 1.0}]


def test_a_statistic_that_vanishes_is_nan_to_the_guard_and_absent_from_logs() -> None:
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.0, action="stop")  # finite values are fine
    monitors = EntropyMonitors([_attention()], guards=[guard], print_summary=False)
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    batches = token_batches(4)
    rows = []
    with pytest.warns(UserWarning, match="is nan"):
        with monitors.watch(module, opt):
            driver = monitors.session.drivers[0]
            compute = driver.compute
            driver.compute = lambda step, *a: compute(step, *a) if step == 0 else {}  # the statistic vanishes
            for step in range(4):
                with monitors.step(step):
                    _train(module, opt, batches[step], step)
                rows.append(dict(monitors.logs))
                if monitors.should_stop:
                    break
    assert len(rows) == 2 and "entropy/attn_norm/min" in rows[0]
    assert rows[1] == {"entropy/attn_norm/min/alert": 1.0}  # NaN never reaches the logs, the alert does
    assert guard.times_fired == 1 and guard.last_seen_step == 1


def test_a_key_that_stops_being_published_goes_stale() -> None:
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.0, action="stop", stale_after=2)
    monitors = EntropyMonitors([_attention()], guards=[guard], print_summary=False)
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    batches = token_batches(8)
    stopped_at = None
    with pytest.warns(UserWarning, match="not published for 3 steps"):
        with monitors.watch(module, opt):
            for step in range(8):
                with monitors.step(step):
                    _train(module, opt, batches[step], step)
                monitors.monitors[0].every_n_steps = 1000  # the monitor publishes at step 0, then falls silent
                if monitors.should_stop:
                    stopped_at = step
                    break
    assert stopped_at == 3 and guard.times_fired == 1  # silent at 1, 2 (allowed), 3: stale
    assert monitors.logs == {"entropy/attn_norm/min/alert": 1.0}


# ------------------------------------------------------------------ 6. log= and wandb
def test_log_is_called_only_on_steps_with_something_to_log() -> None:
    calls: list[tuple[dict, int]] = []
    guard = EntropyCollapseGuard("loss", threshold=0.0, mode="max", arm_on_good=False)  # fires on an observed 1.0
    monitors = EntropyMonitors(
        [_attention(2)], guards=[guard], log=lambda metrics, *, step: calls.append((metrics, step)), print_summary=False
    )
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    batches = token_batches(5)
    logs = {}
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 1"):
        with monitors.watch(module, opt):
            for step in range(5):
                with monitors.step(step):
                    _train(module, opt, batches[step], step)
                    if step == 1:
                        monitors.observe(loss=1.0)
                logs[step] = dict(monitors.logs)
    assert [step for _, step in calls] == [0, 1, 2, 4]  # step 3: nothing due, nothing fired
    assert logs[3] == {} and calls[1][0] == {"loss/alert": 1.0}
    for metrics, step in calls:
        assert metrics == logs[step]  # no wandb run: no media


def test_log_feeds_a_run_record_for_entrotrain_report(tmp_path: Path) -> None:
    """The docstring's ``log=RunRecordLogger(...).log_metrics``: the record holds each logging step's scalars, as
    ``entrotrain report`` reads them back."""
    from entrotrain.dashboards.run_reader import load_run
    from entrotrain.dashboards.run_record import RunRecordLogger

    record = RunRecordLogger(save_dir=tmp_path, name="loop", version="v0")
    monitors = EntropyMonitors([_attention(2)], log=record.log_metrics, print_summary=False)
    logs, _ = run_loop(GPTModule(seed=0), token_batches(5), monitors, 5)
    record.finalize("success")
    run = load_run(tmp_path / "loop" / "v0")
    steps, values = run.scalars["entropy/attn_norm/min"]
    assert list(steps) == [0, 2, 4]
    assert list(values) == pytest.approx([logs[s]["entropy/attn_norm/min"] for s in (0, 2, 4)], rel=1e-12)
    assert run.status == "finished"


def test_media_and_alerts_go_to_the_active_wandb_run(monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    run = FakeRun()
    monkeypatch.setattr(wandb, "run", run)
    calls: list[tuple[dict, int]] = []
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, action="alert", arm_on_good=False)
    monitors = EntropyMonitors(
        [AttentionEntropyMonitor(every_n_steps=2, print_summary=False),
         _representation(2, include=["model.blocks.0"], measures=("rankme",), log_spectrum=True,
                         spectrum_every=1)],
        guards=[guard], log=lambda metrics, *, step: calls.append((metrics, step)), print_summary=False,
    )
    media_keys = {"entropy/attn_norm/hist", "entropy/attn_norm/heatmap", "entropy/repr/model.blocks.0/spectrum"}
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 0"):
        run_loop(GPTModule(seed=0), token_batches(3), monitors, 3)
    assert [step for _, step in calls] == [0, 2]
    assert media_keys <= set(calls[0][0]) and media_keys <= set(monitors.media)
    assert "entropy/attn_norm/min/alert" in calls[0][0] and "entropy/attn_norm/min" in calls[0][0]
    assert not media_keys & set(monitors.logs)  # media are not scalars
    assert len(run.alerts) == 1 and "entropy/attn_norm/min" in run.alerts[0]["title"]
    assert run.logged == []  # the loop sends nothing behind log='s back
    defined = dict(run.defined)  # the run table's summaries, as under Lightning (min for entropies, max for shares)
    assert defined["entropy/*"] == {"summary": "min,last"}
    assert defined["entropy/attn/collapse_frac"] == {"summary": "max,last"}

    monkeypatch.setattr(wandb, "run", None)  # no active run: no media
    calls.clear()
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, print_summary=False)],
                               log=lambda metrics, *, step: calls.append((metrics, step)))
    run_loop(GPTModule(seed=0), token_batches(1), monitors, 1)
    assert monitors.media == {} and calls and not media_keys & set(calls[0][0])


# ------------------------------------------------------------------ 7. resume
def _resumable() -> EntropyMonitors:
    return EntropyMonitors(
        [_attention(), _representation()],
        # bad from the first observation (arm_on_good=False judges it), never fires: the streak grows each step
        guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, patience=100, arm_on_good=False)],
        print_summary=False,
    )


def _json(obj):
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("load", ["before_watch", "after_watch"])
def test_resume_continues_guard_streaks_and_histories(load: str) -> None:
    steps, save_at = 4, 2
    batches = token_batches(steps)
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    full = _resumable()
    saved = snapshot = None
    with full.watch(module, opt):
        for step in range(steps):
            if step == save_at:
                saved = _json(full.state_dict())  # what a checkpoint holds: JSON-able
                snapshot = copy.deepcopy((module, opt))
            with full.step(step):
                _train(module, opt, batches[step], step)
    assert full.guards[0].bad_streak == steps and list(full.monitors[0]._history_steps) == list(range(steps))

    module2, opt2 = snapshot
    resumed = _resumable()
    if load == "before_watch":
        resumed.load_state_dict(saved)
    with resumed.watch(module2, opt2):
        if load == "after_watch":
            resumed.load_state_dict(saved)
        for step in range(save_at, steps):
            with resumed.step(step):
                module2.training_step(batches[step], step).backward()
                opt2.step()
                opt2.zero_grad()
    assert resumed.guards[0].state_dict() == full.guards[0].state_dict()
    assert list(resumed.monitors[0]._history_steps) == list(range(steps))  # the saved steps + the ones after
    assert len(resumed.monitors[1].history) == len(full.monitors[1].history) == steps
    assert _json(resumed.monitors[0].first_summary) == _json(full.monitors[0].first_summary)
    assert _json(resumed.state_dict()) == _json(full.state_dict())  # histories, summaries, streaks: all of it


def test_without_load_state_dict_a_resumed_run_starts_fresh() -> None:
    monitors = _resumable()
    monitors.load_state_dict({})  # nothing saved: nothing restored
    run_loop(GPTModule(seed=0), token_batches(1), monitors, 1)
    assert monitors.guards[0].bad_streak == 1
    with pytest.raises(EntrotrainError, match="the dict state_dict"):
        monitors.load_state_dict("checkpoint.pt")


# ------------------------------------------------------------------ 8. configuration errors
def test_configuration_errors_name_the_fix() -> None:
    with pytest.raises(EntrotrainError, match=r"monitors\[1\]\) must be one of .*Guards go in guards"):
        EntropyMonitors([_attention(), InformationPlaneMonitor()])
    with pytest.raises(EntrotrainError, match=r"monitors\[0\]\) must be one of .*Guards go in guards"):
        EntropyMonitors([EntropyCollapseGuard()])
    with pytest.raises(EntrotrainError, match=r"guards\[0\]\) must be an EntropyCollapseGuard"):
        EntropyMonitors(guards=[_attention()])
    with pytest.raises(EntrotrainError, match="share a configuration.*drop the duplicate"):
        EntropyMonitors([_attention(), _attention(2)])
    with pytest.raises(EntrotrainError, match="share a configuration"):
        EntropyMonitors(guards=[EntropyCollapseGuard(), EntropyCollapseGuard(threshold=0.2)])
    with pytest.raises(EntrotrainError, match="every_n_steps"):
        EntropyMonitors([_attention()], every_n_steps=0)
    with pytest.raises(EntrotrainError, match="callable such as wandb.log"):
        EntropyMonitors([_attention()], log="x")
    with pytest.raises(EntrotrainError, match="stage='train'"):
        EntropyMonitors([RepresentationEntropyMonitor(stage="validation")])
    with pytest.raises(EntrotrainError, match="drop 'dsmi'"):
        EntropyMonitors([RepresentationEntropyMonitor(measures=("dsmi",))])
    with pytest.raises(EntrotrainError, match="at least one monitor or guard"):
        EntropyMonitors()
    with pytest.raises(EntrotrainError, match="print_summary"):
        EntropyMonitors([_attention()], print_summary="yes")
    monitors = EntropyMonitors([_attention()])
    with pytest.raises(EntrotrainError, match="needs an nn.Module, got str"):
        monitors.watch("model")
    # two different include patterns are two monitors (no collision)
    EntropyMonitors([_representation(include=["model.blocks.0"]), _representation(include=["model.blocks.1"])])


# ------------------------------------------------------------------ 10. imports
def test_import_pulls_in_no_trainer_library() -> None:
    """Lightning imports torchmetrics, which imports transformers when it is installed (BERTScore): hide that
    from torchmetrics; then nothing entrotrain.integrations.loop imports brings transformers, trl, verl or wandb."""
    code = textwrap.dedent(
        """
        import sys
        import lightning_utilities.core.imports as imports

        class Hidden(imports.RequirementCache):
            def __bool__(self):
                return False if str(self.requirement).startswith("transformers") else super().__bool__()

        imports.RequirementCache = Hidden
        import entrotrain.integrations.loop
        bad = sorted(m for m in ("transformers", "trl", "verl", "wandb", "accelerate") if m in sys.modules)
        assert not bad, bad
        assert "entrotrain.integrations.transformers" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ 9. DDP
def test_two_ranks_reduce_to_the_union_batch_and_only_rank_zero_logs(tmp_path: Path) -> None:
    from tests.integrations.loop_ddp_run import ROWS, STEPS, run

    run_script(Path(__file__).with_name("loop_ddp_run.py"), ROOT, str(tmp_path), timeout=300)
    with pytest.warns(UserWarning, match="Stopping training"):
        run(tmp_path, "single")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    assert ranks[0]["logs"] == ranks[1]["logs"]  # every rank holds the same reduced numbers
    assert ranks[0]["stop"] == ranks[1]["stop"] == single["stop"] == [False] * (STEPS - 1) + [True]  # same decision
    assert ranks[0]["logs"][str(STEPS - 1)]["entropy/attn_norm/min/alert"] == 1.0
    assert [step for step, _ in ranks[0]["calls"]] == list(range(STEPS)) and ranks[1]["calls"] == []
    assert [metrics for _, metrics in ranks[0]["calls"]] == list(ranks[0]["logs"].values())
    from entrotrain.dashboards.run_reader import find_records, load_run

    assert not (tmp_path / "rank1_record").exists()  # one writer: rank 0
    records = [load_run(find_records(tmp_path / f"{name}_record")[0]) for name in ("rank0", "single")]
    assert records[0].scalars.keys() == records[1].scalars.keys() and records[0].status == "finished"
    for key, (steps, values) in records[1].scalars.items():
        assert list(records[0].scalars[key][0]) == list(steps) and records[0].scalars[key][1] == pytest.approx(values)
    assert [e["step"] for e in records[0].events] == [STEPS - 1]
    reduced, reference = ranks[0]["logs"], single["logs"]
    assert set(reduced) == set(reference) == {str(s) for s in range(STEPS)}
    assert reduced["0"]["entropy/repr/model.blocks.1/n_streamed"] == ROWS * 16  # both ranks' tokens, not one's
    for step, row in reference.items():
        assert set(reduced[step]) == set(row), step
        for key, value in row.items():
            assert reduced[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    # record_policy refusing a micro-batch on rank 1 alone (its mask holds a 2) used to raise there, inside the
    # step block, and leave rank 0 waiting in the block's gather; the refusal now travels with that gather (no
    # collective more): every rank raises the same error at the block's end, naming the rank, and both go on
    policy = [json.loads((tmp_path / f"policy{r}.json").read_text()) for r in (0, 1)]
    assert [p["record_policy"] for p in policy] == ["", ""]
    assert policy[0]["step0"] == policy[1]["step0"]
    assert "at step 0: rank(s) [1] refused the tensors handed over with record_policy()" in policy[0]["step0"]
    assert "micro-batch 0 of the step" in policy[0]["step0"] and "found [2.0]" in policy[0]["step0"]
    assert policy[0]["logs0"] == policy[1]["logs0"] == {}
    assert policy[0]["logs1"] == policy[1]["logs1"] and "entropy/policy/mean" in policy[0]["logs1"]


@pytest.mark.parametrize("training_only", [True, False])
def test_no_grad_forwards_in_the_block_are_not_captured(training_only: bool) -> None:
    """An RL loop samples (no-grad forwards) inside the step block before its training forward: by default the
    monitors see only the training forward (the same logs as a block without the sampling); with
    ``training_forwards_only=False`` they see both."""
    batches = token_batches(2, rows=4)

    def logs(sample: bool, **kw) -> dict[str, float]:
        module = GPTModule(seed=0)
        monitors = EntropyMonitors([_attention(1), _representation(1)], print_summary=False, **kw)
        with monitors.watch(module, module.configure_optimizers()):
            with monitors.step(0):
                if sample:
                    with torch.no_grad():
                        module.model(batches[1][0][:, :-1])  # another batch: it would move every statistic
                module.training_step(batches[0], 0).backward()
        return monitors.logs

    plain, sampled = logs(False), logs(True, training_forwards_only=training_only)
    if training_only:  # (a model's first forward leaves float32-rounding differences in the entropies: ~1e-8)
        assert sampled == pytest.approx(plain, rel=1e-6)
        assert sampled["entropy/repr/model.blocks.0/n_streamed"] == plain["entropy/repr/model.blocks.0/n_streamed"]
    else:
        assert sampled["entropy/repr/model.blocks.0/n_streamed"] == 2 * plain["entropy/repr/model.blocks.0/n_streamed"]
        assert sampled["entropy/attn/mean"] != plain["entropy/attn/mean"]
