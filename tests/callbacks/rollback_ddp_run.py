"""EntropyCollapseGuard(action="rollback") under Lightning DDP on 2 CPU ranks (gloo).

``python rollback_ddp_run.py OUT``: each rank trains tests/callbacks/test_guard_rollback.py's ``Net`` (Adam) on its
own shard; a scripted key (the same on both ranks, as a monitor reduced across ranks publishes it) falls at step 3, so
the guard rolls back to the end of step 2. Each rank writes ``rank{r}.json`` (its guard's rollbacks, whether its state
right after the rollback equals its state at the end of step 2) and ``weights{r}.pt`` (the weights right after).
Run by test_guard_rollback_ddp.py.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # noqa: E402
from tests.callbacks.test_guard_rollback import Net, Script, Snap, same  # noqa: E402
from tests.helpers.ddp_trainer import ddp_trainer, rank_loader  # noqa: E402


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    before, after = Snap(), Snap()
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.5, action="rollback", lr_factor=0.5)
    trainer = ddp_trainer(callbacks=[Script([0.9, 0.9, 0.9, 0.0, 0.9]), before, guard, after], max_steps=5,
                          use_distributed_sampler=False)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)))
    trainer.fit(Net(), rank_loader(trainer, data, batch_size=2))
    rank = trainer.global_rank
    restored = same(after.end[3][0], before.end[2][0]) and same(after.end[3][1], before.end[2][1])
    moved = not same(before.end[3][0], before.end[2][0])
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rollbacks": guard.rollbacks, "restored": restored, "moved": moved,
         "lr": trainer.optimizers[0].param_groups[0]["lr"]}))
    torch.save(after.end[3][0], Path(out, f"weights{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
