"""Run by test_checkpoint_keeper_findings.py as a script: 2 CPU processes (gloo DDP), a guard with keep_last_good
and ModelCheckpoint(every_n_train_steps=3) keeping one; each rank writes what its guard kept and named."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks import EntropyCollapseGuard  # noqa: E402
from tests.callbacks.test_guard_scenarios import KEY, Lin, Script, loader  # noqa: E402
from tests.helpers.ddp_trainer import ddp_trainer  # noqa: E402

if __name__ == "__main__":
    out, folder = Path(sys.argv[1]), Path(sys.argv[2])
    L.seed_everything(0)
    guard = EntropyCollapseGuard(KEY, threshold=0.05)
    linked: list[str] = []
    link = os.link

    def spy(src, dst, *args, **kwargs):  # every hard link this process makes
        linked.append(str(dst))
        return link(src, dst, *args, **kwargs)

    os.link = spy
    trainer = ddp_trainer(callbacks=[Script([0.5] * 10 + [0.01] * 6), guard,
                                     ModelCheckpoint(dirpath=folder, every_n_train_steps=3)],
                          max_steps=15, enable_checkpointing=True)
    trainer.fit(Lin(), loader())
    rank = trainer.global_rank
    named = str(guard.rollback_checkpoint) if guard.rollback_checkpoint else None
    (out / f"rank{rank}.json").write_text(json.dumps({"named": named, "linked": linked, "fired": guard.times_fired}))
