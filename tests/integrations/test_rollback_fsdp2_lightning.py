"""EntropyCollapseGuard(action="rollback") under Lightning's ``ModelParallelStrategy`` (FSDP2, 2 gloo CPU ranks;
tests/integrations/rollback_fsdp2_lightning_run.py): the guard (which looks at ``trainer.strategy.model``, the
LightningModule itself here) accepts the DTensor-sharded module, rolls back once at step 3, and each rank's local
shards and Adam state right after equal those at the end of step 2, bit for bit; training then runs to
``max_steps`` at half the rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import run_script
from tests.helpers.torch_release import needs_torch

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="FSDP2 on CPU needs torch.distributed with gloo",
    ),
    needs_torch(2, 6, "torch.distributed.fsdp.fully_shard is public from torch 2.6"),
]


def test_model_parallel_strategy_rolls_back_each_ranks_shards(tmp_path: Path) -> None:
    script = Path(__file__).with_name("rollback_fsdp2_lightning_run.py")
    run_script(script, Path(__file__).resolve().parents[2], str(tmp_path), "200", timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["sharded"], r
        assert r["rollbacks"] == 1, r
        assert r["moved"], r  # step 3 changed the shards: the equality is the rollback's
        assert r["restored"] and r["adam_restored"], r
        assert r["lr"] == pytest.approx(0.025) and r["steps"] == 6
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 6
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank its own rows
