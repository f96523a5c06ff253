"""EntropyMonitors refuses two silent misuses (found by the test suite): a step index that does not increase, and an
observe() value a guard cannot read."""
import pytest
import torch

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import token_batches


def test_a_step_index_that_does_not_increase_is_refused() -> None:
    """The docstring's `enumerate(loader)` run for two epochs restarts at step 0: the guards then skip every
    observation (step <= last_seen_step) and the histories hold steps 0, 1, 2, 0, 1, 2 -- silently."""
    module = GPTModule(seed=0)
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, arm_on_good=False, patience=100)
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False)], guards=[guard])
    batches = token_batches(2)
    with monitors.watch(module):
        for step, batch in enumerate(batches):
            with monitors.step(step):
                module.training_step(batch, step).backward()
        with pytest.raises(EntrotrainError, match="step"):
            with monitors.step(0):  # second epoch, batch index again
                module.training_step(batches[0], 0).backward()


def test_observe_refuses_a_value_a_guard_cannot_read() -> None:
    """A per-sample loss tensor (or a string) for a watched key is silently dropped: the guard never observes."""
    guard = EntropyCollapseGuard("loss", threshold=0.0, mode="max", arm_on_good=False)
    monitors = EntropyMonitors(guards=[guard])
    with monitors.watch(torch.nn.Linear(2, 2)):
        with pytest.raises(EntrotrainError, match="loss"):
            with monitors.step(0):
                monitors.observe(loss=torch.tensor([5.0, 6.0]))


def test_generation_keys_are_not_nan_between_generation_steps() -> None:
    """Lightning publishes the prediction monitor's gen/* keys as their own source, only at generate_every_n_steps;
    the session turns them NaN at every other logging step, so a guard on one fires 'is nan' where Lightning's
    guard sees nothing."""
    import copy

    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from tests.helpers.loop_runs import LogitsGPT, fit_lightning, run_loop

    batches = token_batches(4)
    probe = token_batches(1, rows=3, seed=9)[0][0]

    def monitors() -> list:
        return [PredictionEntropyMonitor(
            every_n_steps=1, generate_every_n_steps=2, probe=(probe[:, :-1], probe[:, 1:]), positions=0,
            generation_prompts=2, prompt_length=3, max_new_tokens=3, log_media=False, print_summary=False,
        )]

    def guard() -> EntropyCollapseGuard:
        return EntropyCollapseGuard("entropy/pred/gen/distinct_1", threshold=0.0)

    lit_module = LogitsGPT(seed=0, convert=False)
    loop_module = copy.deepcopy(lit_module)
    lit_guard, loop_guard = guard(), guard()
    fit_lightning(lit_module, batches, monitors() + [lit_guard], 4)
    run_loop(loop_module, batches, EntropyMonitors(monitors(), guards=[loop_guard], print_summary=False), 4)
    assert lit_guard.times_fired == 0 and lit_guard.last_seen_step == 2
    assert loop_guard.state_dict() == lit_guard.state_dict()


def test_watch_sets_lightnings_rank_for_rank_zero_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started without RANK in the environment (mp.spawn), Lightning's rank-zero helpers think every process is rank
    0 and every rank repeats the guards' warnings; watch() sets the rank from torch.distributed, as Lightning does."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    import entrotrain.integrations.loop as loop

    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setattr(loop, "distributed", lambda: (2, 1, None))
    EntropyMonitors([AttentionEntropyMonitor()]).watch(GPTModule(seed=0))
    assert rank_zero_only.rank == 1


def test_a_data_parallel_wrapper_is_watched_through_its_module() -> None:
    """accelerate / DDP hand back the model wrapped (``.module``): globs and keys stay those of the bare model."""
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.models import TinyGPT

    model = TinyGPT(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
    wrapped = torch.nn.DataParallel(model)  # CPU: forwards to .module; DDP holds its model the same way
    monitors = EntropyMonitors(
        [RepresentationEntropyMonitor(include=["blocks.*"], every_n_steps=1, print_summary=False)],
        print_summary=False,
    )
    with monitors.watch(wrapped), monitors.step(0):
        wrapped(torch.randint(0, 32, (4, 16)))
    assert any(key.startswith("entropy/repr/blocks.0/") for key in monitors.logs), sorted(monitors.logs)[:5]
