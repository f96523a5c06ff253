"""Run by test_trl.py as a script: 2 CPU ranks (gloo), each feeding PolicyStatsRecorder its own rows of the union
batches (rank 0: two micro-batches per step, 7 tokens; rank 1: one, 9 tokens); rank 0 writes the logged rows. Then
the recorder's refusals on one rank alone (:data:`REFUSALS`): each rank writes ``refusals{rank}.json`` beside the
rows, what its ``add`` and ``compute`` raised per case, and the row of the step after them."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.gloo import spawn_gloo  # noqa: E402
from tests.helpers.policy_batches import rl_batch  # noqa: E402

STEPS = 4

#: seconds after which a worker is killed (a rank left waiting in a collective: the bug); the script takes ~10 s
WATCHDOG_S = 120

#: a refusal on one rank alone: (the rank, what its micro-batches do): "mask=2": its first micro-batch's mask holds
#: a 2 (refused by ``add``); "rewards on 0": only its first micro-batch hands rewards over (refused by ``compute``)
REFUSALS = {"mask_on_rank1": (1, "mask=2"), "rewards_on_rank0": (0, "rewards on 0")}


def rank_parts(rank: int, step: int) -> list[dict]:
    """This rank's micro-batches of union batch ``step`` (rows 0..3 on rank 0, split in two; rows 4..5 on rank 1)."""
    union = rl_batch(200 + step)
    if rank == 0:
        part = {k: (v[:4, :7] if v.dim() == 2 else v[:4]) for k, v in union.items() if hasattr(v, "dim")}
        return [{k: v[:1] for k, v in part.items()}, {k: v[1:] for k, v in part.items()}]
    return [{k: v[4:] for k, v in union.items() if hasattr(v, "dim")}]


def worker(rank: int, out: str) -> None:
    from entrotrain.integrations.policy_stats import PolicyStatsRecorder

    signal.alarm(WATCHDOG_S)  # SIGALRM ends a hung rank (even in a C++ wait), so the test fails instead of hanging
    stats = PolicyStatsRecorder(fit_min_points=2)
    rows = []
    for step in range(STEPS):
        for p in rank_parts(rank, step):
            stats.add(p["token_entropy"], p["logprobs"], p["advantages"], p["response_mask"], rewards=p["rewards"])
        rows.append(stats.compute(step))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    Path(out).with_name(f"refusals{rank}.json").write_text(json.dumps(refusals(rank)))


def refusals(rank: int) -> dict[str, dict]:
    """Each case of :data:`REFUSALS` at step ``STEPS``, then an ordinary step: ``{"add": ..., "compute": ...,
    "next": ...}``, the error ``add`` / ``compute`` raised ('' if none) and the next step's row."""
    import torch

    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.policy_stats import PolicyStatsRecorder

    result = {}
    for case, (who, how) in REFUSALS.items():
        stats, got = PolicyStatsRecorder(fit_min_points=2), {"add": "", "compute": ""}
        try:
            for i, p in enumerate(rank_parts(rank, STEPS)):
                mask, rewards = p["response_mask"], p["rewards"]
                if rank == who and i == 0 and how == "mask=2":
                    mask = mask.float().index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(2.0))
                if rank == who and i > 0 and how == "rewards on 0":
                    rewards = None
                stats.add(p["token_entropy"], p["logprobs"], p["advantages"], mask, rewards=rewards)
        except EntrotrainError as error:  # (before: raised here, on one rank, and the other waited in compute)
            got["add"] = str(error)
        try:
            stats.compute(STEPS)
        except EntrotrainError as error:
            got["compute"] = str(error)
        for p in rank_parts(rank, STEPS + 1):  # the ranks go on together
            stats.add(p["token_entropy"], p["logprobs"], p["advantages"], p["response_mask"], rewards=p["rewards"])
        got["next"] = stats.compute(STEPS + 1)
        result[case] = got
    return result


if __name__ == "__main__":
    spawn_gloo(worker, sys.argv[1])
