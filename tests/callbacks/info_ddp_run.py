"""InformationPlaneMonitor under 2-process CPU DDP (gloo): one evaluation at step 0 on all 4,096 patterns, the probe
sharded across ranks and gathered (and a 600-row probe that only rank 0 forwards); rank 0 writes what it logged and the collectives the evaluation issued.
Run by test_information_plane_monitor.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import lightning as L
    import torch

    from entrotrain.callbacks.information_plane_monitor import InformationPlaneMonitor
    from entrotrain.tasks.information_plane import InformationPlaneDataModule, InformationPlaneTask
    from tests.helpers.ddp_trainer import COLLECTIVES, count_collectives, ddp_trainer

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    L.seed_everything(3)
    model = InformationPlaneTask(lr=1e-2)
    monitor = InformationPlaneMonitor(
        estimators=["binning", "adaptive_binning"], every_n_steps=100, print_summary=False
    )
    small = InformationPlaneMonitor(  # 600 rows < one chunk of 1024: rank 1 forwards nothing and sends padding
        estimators=["binning", "adaptive_binning"], every_n_steps=100, max_probe=600, prefix="small",
        print_summary=False,
    )
    trainer = ddp_trainer(callbacks=[monitor, small], max_steps=1, num_sanity_val_steps=0, limit_val_batches=0)
    collectives = count_collectives(monitor, "evaluate", (*COLLECTIVES, "all_gather_into_tensor"))
    trainer.fit(model, datamodule=InformationPlaneDataModule(batch_size=512))
    if trainer.is_global_zero:
        out.write_text(json.dumps({"logged": monitor.last_logged, "small": small.last_logged, "collectives": collectives}))
