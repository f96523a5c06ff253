"""EntropyCollapseGuard(action="rollback") under Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` on the
``data_parallel`` mesh, 2 CPU ranks, gloo).

``python rollback_fsdp2_lightning_run.py OUT`` (Lightning launches the second rank): each rank trains a two-block MLP
(``fully_shard`` per block and root) with Adam on its own rows; a scripted key (the same on both ranks, as a monitor
reduced across ranks publishes it) falls at step 3, so the guard rolls back to the end of step 2. Each rank writes
``rank{r}.json``: the guard's rollbacks, whether the parameters were DTensors, whether its local shards and Adam state
right after the rollback equal those at the end of step 2 (bit for bit), whether step 3 had moved them, the rate, the
losses. Run by tests/integrations/test_rollback_fsdp2.py.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from entrotrain.callbacks._publish import publish_scalars
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from tests.helpers.ddp_trainer import rank_loader

    KEY, VALUES, WORLD = "entropy/attn_norm/min", [0.9, 0.9, 0.9, 0.0, 0.9, 0.9], 2

    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()),
                                           torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh()),
                                           torch.nn.Linear(6, 1))
            self.losses: list[float] = []

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in list(self.net)[:2]:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the root's hooks gather the head's shards
            return self.net(x)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            loss = (self(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    class Script(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step - 1
            if step < len(VALUES):
                publish_scalars(trainer, pl_module, {KEY: VALUES[step]}, source=f"script:{KEY}")

    class Snap(L.Callback):
        def __init__(self) -> None:
            self.end: dict[int, dict] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            opt = trainer.optimizers[0]
            self.end[trainer.global_step - 1] = {
                "local": {n: local(p) for n, p in pl_module.named_parameters()},
                "adam": {n: {k: local(v) for k, v in opt.state[p].items()} for n, p in pl_module.named_parameters()},
            }

    out = Path(sys.argv[1])
    faulthandler.dump_traceback_later(float(sys.argv[2]) if len(sys.argv) > 2 else 200.0, exit=True)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    before, after = Snap(), Snap()
    guard = EntropyCollapseGuard(KEY, threshold=0.5, action="rollback", lr_factor=0.5)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        callbacks=[Script(), before, guard, after], logger=False, max_steps=len(VALUES), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    data = torch.utils.data.TensorDataset(torch.randn(48, 4, generator=torch.Generator().manual_seed(0)))
    model = Net()
    trainer.fit(model, rank_loader(trainer, data, 4, WORLD))
    rank = trainer.global_rank
    result = {
        "rollbacks": guard.rollbacks, "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "restored": same(after.end[3]["local"], before.end[2]["local"]),
        "adam_restored": same(after.end[3]["adam"], before.end[2]["adam"]),
        "moved": not same(before.end[3]["local"], before.end[2]["local"]),
        "lr": trainer.optimizers[0].param_groups[0]["lr"], "losses": model.losses,
        "steps": trainer.global_step,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    faulthandler.cancel_dump_traceback_later()
