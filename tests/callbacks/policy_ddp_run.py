"""Run by test_policy_monitor.py as a script: 2 CPU ranks (gloo DDP); each rank returns its own rows of one
batch (different sizes and lengths per rank: tests/helpers/policy_batches.rank_batches); rank 0 writes what the
monitor logged."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks import PolicyEntropyMonitor  # noqa: E402
from tests.helpers.policy_batches import fit_rank_batches  # noqa: E402

if __name__ == "__main__":
    L.seed_everything(0)
    fit_rank_batches(PolicyEntropyMonitor(fit_min_points=2, print_summary=False), Path(sys.argv[1]))
