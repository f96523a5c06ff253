"""Finding (session 27): a hand-written loop that loads the monitors' state on resume but restarts its step counter
at 0 (``for step in range(num_steps)``) left the restored guards blind: each guard judges a step once, so every step
up to the saved one was skipped, silently — a model gone NaN at step 8 after the resume was never reported. Now the
first step of a watch before the restored guards' step is refused with the fix."""

from __future__ import annotations

import pytest

from entrotrain.errors import EntrotrainError
from tests.callbacks.test_guard_resume_nan import loop_run

KEY = "entropy/attn_norm/min"


def test_a_resumed_loop_that_restarts_its_step_counter_is_refused() -> None:
    _, saved = loop_run(range(41), None)
    with pytest.raises(EntrotrainError, match=r"step\(0\).*saved at step 40"):
        loop_run(range(20), saved, nan_from=8)


def test_a_resumed_loop_that_goes_on_from_the_saved_step_sees_the_nan() -> None:
    _, saved = loop_run(range(41), None)
    sent, _ = loop_run(range(41, 60), saved, nan_from=48)
    assert len(sent) == 1 and sent[0].startswith(f"EntropyCollapseGuard at step 48: {KEY} is nan"), sent
