"""Finding (session 27): a hand-written loop that loads the monitors' state on resume but restarts its step counter
at 0 (``for step in range(num_steps)``) left the restored guards blind: each guard judges a step once, so every step
up to the saved one was skipped, silently — a model gone NaN at step 8 after the resume was never reported. Now the
first step of a watch before the restored guards' step is refused with the fix."""

from __future__ import annotations

import warnings

import pytest
import torch

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.models import TinyGPT

KEY = "entropy/attn_norm/min"


def _run(steps: range, saved: dict | None, nan_from: int = 10**9) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
    sent: list[str] = []
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=4)],
                               guards=[EntropyCollapseGuard(KEY, threshold=0.01, notify=sent.append)],
                               print_summary=False)
    if saved is not None:
        monitors.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monitors.watch(model):
            for step in steps:
                if step >= nan_from:
                    with torch.no_grad():
                        next(model.parameters()).fill_(float("nan"))
                with monitors.step(step):
                    model(torch.randint(0, 16, (4, 8))).sum().backward()
            state = monitors.state_dict()
    return sent, state


def test_a_resumed_loop_that_restarts_its_step_counter_is_refused() -> None:
    _, saved = _run(range(41), None)
    with pytest.raises(EntrotrainError, match=r"step\(0\).*saved at step 40"):
        _run(range(20), saved, nan_from=8)


def test_a_resumed_loop_that_goes_on_from_the_saved_step_sees_the_nan() -> None:
    _, saved = _run(range(41), None)
    sent, _ = _run(range(41, 60), saved, nan_from=48)
    assert len(sent) == 1 and sent[0].startswith(f"EntropyCollapseGuard at step 48: {KEY} is nan"), sent
