"""EntropyCollapseGuard(action="rollback") under Lightning DDP, 2 gloo CPU ranks (tests/callbacks/rollback_ddp_run.py):
both ranks roll back at the same step, to identical weights equal to the ones each held."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.callbacks.test_guard_rollback import LR, same


def test_ddp_two_ranks_roll_back_at_the_same_step_to_identical_weights(tmp_path) -> None:
    from tests.helpers.scripts import run_script

    root = Path(__file__).resolve().parents[2]
    run_script(Path(__file__).with_name("rollback_ddp_run.py"), root, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["rollbacks"] == 1 and r["restored"] and r["moved"], r
        assert r["lr"] == pytest.approx(LR * 0.5)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in range(2))
    assert same(w0, w1)

