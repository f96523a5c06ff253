"""Run by test_checkpoint_keeper_killed.py as a script: ``python keeper_killed_run.py ROOT CASE...`` forks one process
per case (one import of Lightning for all), each a Lightning fit into ``ROOT/CASE`` saving every 3 steps
(``save_top_k=1``) with two guards keeping checkpoints: one on ``KEY`` (good until step 7, bad after; patience 100:
it never fires) and one on ``KEY + "/b"`` (good until step 4: fires at step 5, freezes the step-3 pin). The guards
share their pins: one link per checkpoint. At step 10 each writes its pid
to ``ROOT/CASE.ready`` and waits to be killed (SIGKILL); the parent exits once they are gone."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks import EntropyCollapseGuard  # noqa: E402
from tests.callbacks.test_guard_scenarios import KEY, Lin, Script, loader  # noqa: E402
from tests.helpers.lightning_models import quiet_trainer  # noqa: E402

KILL_AT = 10


class WaitToBeKilled(L.Callback):
    def __init__(self, ready: Path) -> None:
        self.ready = ready

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == KILL_AT:
            tmp = self.ready.with_suffix(".tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, self.ready)
            time.sleep(600)


def fit(folder: Path, ready: Path) -> None:
    L.seed_everything(0)
    values = [{KEY: v, KEY + "/b": b} for v, b in zip([0.5] * 8 + [0.01] * 40, [0.5] * 5 + [0.01] * 43)]
    guards = [EntropyCollapseGuard(KEY, threshold=0.05, patience=100),
              EntropyCollapseGuard(KEY + "/b", threshold=0.05)]
    trainer = quiet_trainer(callbacks=[Script(values), *guards, ModelCheckpoint(dirpath=folder, every_n_train_steps=3),
                                       WaitToBeKilled(ready)], max_steps=40, enable_checkpointing=True)
    trainer.fit(Lin(), loader())


if __name__ == "__main__":
    root, cases = Path(sys.argv[1]), sys.argv[2:]
    children = []
    for case in cases:
        pid = os.fork()
        if pid == 0:
            try:
                fit(root / case, root / f"{case}.ready")
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
