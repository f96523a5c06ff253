"""Real offline wandb runs for ``test_wandb_long_run.py`` (run in a fresh process, WANDB_* set by the test): prints
``RESULT {json}`` with what each run's ``.wandb`` file holds."""

from __future__ import annotations

import json
import warnings

import lightning as L
import torch
import wandb

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader
from tests.helpers.loop_runs import train_steps as train
from tests.helpers.wandb_offline import history_rows

torch.set_num_threads(1)
warnings.simplefilter("ignore")
out: dict = {}


def loop(log):
    return EntropyMonitors([AttentionEntropyMonitor(every_n_steps=2, log_media=False, print_summary=False)],
                           log=log, print_summary=False)


def entropy_rows(run_dir):
    return [r for r in history_rows(run_dir) if "entropy/attn_norm/min" in r]


# the loop resumed from the checkpoint of step 3 into the same run
run = wandb.init(project="entrotrain-test")
model, saved = GPTModule(seed=0), {}
train(loop(wandb.log), model, 9, saved=saved)
resumed = loop(wandb.log)
resumed.load_state_dict(saved[3])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(resumed, model, 9, start=4)
run_dir = run.dir
wandb.finish()
rows = entropy_rows(run_dir)
out["resumed"] = {"global_steps": [r["trainer/global_step"] for r in rows], "steps": [r["_step"] for r in rows],
                  "warned": any("past the loop's step 4" in str(w.message) for w in caught)}

# log=wandb.log taken before wandb.init
monitors = loop(wandb.log)
run = wandb.init(project="entrotrain-test")
train(monitors, GPTModule(seed=0), 3)
run_dir = run.dir
wandb.finish()
out["preinit"] = [r["trainer/global_step"] for r in entropy_rows(run_dir)]


# Lightning: a guard rolls back at steps 6, 7 and 8
class Falls(TinyLM):
    def training_step(self, batch, i):
        loss = super().training_step(batch, i)
        self.log("toy/x", 0.9 if self.global_step < 6 or self.global_step > 8 else 0.1)
        return loss


from lightning.pytorch.loggers import WandbLogger  # noqa: E402

L.seed_everything(0)
logger = WandbLogger(project="entrotrain-test")
sent: list[int] = []
log = logger.experiment.log
logger.experiment.log = lambda row, **k: (sent.append(row["trainer/global_step"]), log(row, **k))
guard = EntropyCollapseGuard("toy/x", threshold=0.5, action="rollback", rollback_states=2, max_rollbacks=5)
trainer = quiet_trainer(max_steps=12, logger=logger, log_every_n_steps=1, callbacks=[
    AttentionEntropyMonitor(every_n_steps=2, print_summary=False, log_media=False), guard])
trainer.fit(Falls(), token_loader(n=64, batch_size=4))
run_dir = logger.experiment.dir
wandb.finish()
rows = history_rows(run_dir)
out["lightning"] = {
    "rows": [r["trainer/global_step"] for r in rows], "sent": sent,
    "entropy": [r["trainer/global_step"] for r in rows if "entropy/attn_norm/min" in r],
    "alerts": [r["trainer/global_step"] for r in rows if "toy/x/alert" in r],
}
print("RESULT " + json.dumps(out))
