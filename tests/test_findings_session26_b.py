"""Findings (session 26, hunt 3): training_forwards_only, keep_last_good's frozen pins, the guard's notify in a CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.integrations.loop import EntropyMonitors


class _Net(nn.Module):
    """A stem, a backbone (a direct child of the watched root) and a head; ``mode`` says how the backbone runs in the
    training forward: plainly, frozen under ``torch.no_grad()`` (linear probing), or reentrant-checkpointed."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.stem = nn.Linear(6, 12)
        self.backbone = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.mode == "frozen":
            with torch.no_grad():
                h = self.backbone(h)
        elif self.mode == "reentrant":
            h = checkpoint(self.backbone, h, use_reentrant=True)
        else:
            h = self.backbone(h)
        return self.head(h)


def _logs(mode: str, training_only: bool = True) -> dict[str, float]:
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = _Net(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = RepresentationEntropyMonitor(include=["backbone.0"], every_n_steps=1, log_spectrum=False,
                                           print_summary=False)
    monitors = EntropyMonitors([monitor], print_summary=False, training_forwards_only=training_only)
    with monitors.watch(model, opt):
        with monitors.step(0):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return monitors.logs


def test_a_reentrant_checkpointed_child_of_a_grad_forward_is_captured() -> None:
    """``checkpoint(self.backbone, h, use_reentrant=True)`` runs the backbone under ``no_grad`` inside the training
    forward (and again in backward, never captured): it was skipped as a no-grad forward, so the monitor saw nothing
    of a training step that had only this forward."""
    plain = _logs("plain")
    assert plain["entropy/repr/backbone.0/n_streamed"] == 32
    assert _logs("reentrant") == pytest.approx(plain, rel=1e-6)


def test_a_frozen_child_called_without_grad_inside_the_training_forward_is_captured() -> None:
    """Linear probing: the training forward runs a frozen backbone under ``torch.no_grad()``. It is part of the
    step's training forward (the same as with ``training_forwards_only=False``), not a separate no-grad pass."""
    every = _logs("frozen", training_only=False)
    assert every["entropy/repr/backbone.0/n_streamed"] == 32
    assert _logs("frozen") == pytest.approx(every, rel=1e-6)


def test_a_second_firing_during_the_frozen_pins_copy_keeps_it(tmp_path, monkeypatch) -> None:
    """Save every 1000 steps, observe every 50: the guard fires at 1200 (last good 1100: checkpoint-1000 frozen, its
    copy starts in the background), is good at 1250 and fires at 1300: the newest pin at or before 1250 is the same
    frozen one, checked while its copy runs. The copy's temporary file inside the pin made it look changed: the kept
    checkpoint was deleted under its copy and the second firing named none."""
    import threading
    import warnings

    from entrotrain.callbacks import checkpoint_keeper
    from entrotrain.callbacks.checkpoint_keeper import LastGoodCheckpoints

    ckpt = tmp_path / "checkpoint-1000"
    ckpt.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (ckpt / name).write_bytes(name.encode() * 100)
    started, go = threading.Event(), threading.Event()
    real_copy = checkpoint_keeper._copy

    def slow_copy(src, dst):  # a large file: the copy is under way (its temporary file exists) for a while
        real_copy(src, dst)
        started.set()
        go.wait(10)

    monkeypatch.setattr(checkpoint_keeper, "_copy", slow_copy)
    keeper = LastGoodCheckpoints()
    pin = keeper.saved(ckpt)
    keeper.judged(1100, 1100)
    keeper.judged(1200, 1100)
    assert keeper.freeze(1100) == pin
    assert started.wait(10)
    keeper.judged(1250, 1250)
    keeper.judged(1300, 1250)
    timer = threading.Timer(0.2, go.set)  # the copy finishes (only unblocks a fixed keeper, which waits for it)
    timer.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert keeper.freeze(1250) == pin
    finally:
        go.set()
        keeper.wait()
        timer.join()
    assert sorted(p.name for p in pin.iterdir()) == ["model.safetensors", "optimizer.pt", "trainer_state.json"]
    assert all(p.stat().st_nlink == 1 for p in pin.iterdir())  # its own copy of every file


@pytest.mark.parametrize("source", ["output", "head"])
def test_prediction_monitor_skips_a_no_grad_forward_of_the_root(source: str) -> None:
    """An RL loop samples (a no-grad forward of the root model) inside the step block: the prediction monitor reads
    the root forward's output (or its head's input) through its own hooks, which did not ask whether the forward was
    a training one: it scored the sampling forward as training data."""
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from tests.helpers.loop_runs import LogitsGPT, token_batches

    batches = token_batches(2, rows=4)

    def logs(sample: bool) -> dict[str, float]:
        module = LogitsGPT(seed=0)
        monitor = PredictionEntropyMonitor(every_n_steps=1, source=source, head="model.lm_head", probe_batches=0,
                                           log_media=False, print_summary=False)
        monitors = EntropyMonitors([monitor], print_summary=False)
        with monitors.watch(module, module.configure_optimizers()):
            with monitors.step(0):
                if sample:
                    with torch.no_grad():
                        module(input_ids=batches[1][0][:, :-1])  # another batch: it would move every statistic
                module.training_step(batches[0], 0)["loss"].backward()
        return monitors.logs

    plain, sampled = logs(False), logs(True)
    assert sampled["entropy/pred/train/tokens"] == plain["entropy/pred/train/tokens"]
    assert sampled == pytest.approx(plain, rel=1e-6)


def test_a_tap_on_a_watched_child_skips_that_childs_own_no_grad_call() -> None:
    """A LightningModule-style loop samples with ``module.backbone(...)`` (a direct child called outermost, without
    gradient): a tap on that child itself ran its hook after training_forwards_only's post-hook had popped the call's
    note, so it recorded the sampling forward."""
    torch.manual_seed(1)
    x, y, other = torch.randn(32, 6), torch.randint(0, 3, (32,)), torch.randn(32, 12)

    def logs(sample: bool) -> dict[str, float]:
        model = _Net("plain")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = RepresentationEntropyMonitor(include=["backbone"], every_n_steps=1, log_spectrum=False,
                                               print_summary=False)
        monitors = EntropyMonitors([monitor], print_summary=False)
        with monitors.watch(model, opt):
            with monitors.step(0):
                if sample:
                    with torch.no_grad():
                        model.backbone(other)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return monitors.logs

    plain, sampled = logs(False), logs(True)
    assert plain["entropy/repr/backbone/n_streamed"] == 32
    assert sampled == pytest.approx(plain, rel=1e-6)


class _Tuner(nn.Module):
    """PEFT's ``LoraModel``: calls its model's ``forward`` directly (no hooks of that model run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return self.model.forward(**kw)


class _PeftLike(nn.Module):
    """PEFT's ``PeftModelForCausalLM``: ``forward`` through the tuner, ``generate`` on the wrapped HF model itself
    (TRL with ``peft_config``: the trainer's model, whose generation runs a grandchild's forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = _Tuner(model)

    def forward(self, **kw):
        return self.base_model(**kw)

    def generate(self, **kw):
        return self.base_model.model.generate(**kw)


def test_generation_of_a_wrapped_hf_model_is_not_captured() -> None:
    """The watched model wraps an HF model two levels down (PEFT) and generates through it: the generation forwards
    run the HF model's own ``__call__``, neither the root's nor a direct child's, so nothing noted them as no-grad
    and the monitors recorded the generated tokens' forwards as training data."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))

    def logs(generate: bool) -> dict[str, float]:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, pad_token_id=0,
                            eos_token_id=49, bos_token_id=49, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = _PeftLike(GPT2LMHeadModel(config))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = RepresentationEntropyMonitor(include=["base_model.model.transformer.h.0"], every_n_steps=1,
                                               log_spectrum=False, print_summary=False)
        monitors = EntropyMonitors([monitor], print_summary=False)
        with monitors.watch(model, opt):
            with monitors.step(0):
                if generate:
                    with torch.no_grad():
                        model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False)
                model(input_ids=ids, labels=ids).loss.backward()
        return monitors.logs

    plain, generated = logs(False), logs(True)
    assert plain["entropy/repr/base_model.model.transformer.h.0/n_streamed"] == 16
    assert generated == pytest.approx(plain, rel=1e-6)
