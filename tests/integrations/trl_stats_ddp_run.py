"""Run by test_trl.py as a script: 2 CPU ranks (gloo), each feeding PolicyStatsRecorder its own rows of the union
batches (rank 0: two micro-batches per step, 7 tokens; rank 1: one, 9 tokens); rank 0 writes the logged rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.gloo import spawn_gloo  # noqa: E402
from tests.helpers.policy_batches import rl_batch  # noqa: E402

STEPS = 4


def rank_parts(rank: int, step: int) -> list[dict]:
    """This rank's micro-batches of union batch ``step`` (rows 0..3 on rank 0, split in two; rows 4..5 on rank 1)."""
    union = rl_batch(200 + step)
    if rank == 0:
        part = {k: (v[:4, :7] if v.dim() == 2 else v[:4]) for k, v in union.items() if hasattr(v, "dim")}
        return [{k: v[:1] for k, v in part.items()}, {k: v[1:] for k, v in part.items()}]
    return [{k: v[4:] for k, v in union.items() if hasattr(v, "dim")}]


def worker(rank: int, out: str) -> None:
    from entrotrain.integrations.policy_stats import PolicyStatsRecorder

    stats = PolicyStatsRecorder(fit_min_points=2)
    rows = []
    for step in range(STEPS):
        for p in rank_parts(rank, step):
            stats.add(p["token_entropy"], p["logprobs"], p["advantages"], p["response_mask"], rewards=p["rewards"])
        rows.append(stats.compute(step))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    spawn_gloo(worker, sys.argv[1])
