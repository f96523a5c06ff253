"""``transformers.Trainer`` with ``TrainingArguments(fsdp=...)`` (a 1-process gloo group, as torchrun would set it up)
under an EntropyTrainerCallback with a rollback guard: ``train()`` must refuse it with an EntrotrainError naming
``fsdp=...``. Prints ``REFUSED`` then. Run by tests/integrations/test_rollback_glue.py in a fresh interpreter (the
process group stays up until exit)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.gloo import free_port  # noqa: E402


def main(out: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    warnings.simplefilter("ignore")
    from transformers import Trainer, TrainingArguments

    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.errors import EntrotrainError
    from entrotrain.integrations.transformers import EntropyTrainerCallback
    from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm

    args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=4, logging_steps=1, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, fsdp="full_shard",
                             ddp_backend="gloo")
    trainer = Trainer(model=tiny_gpt2_lm(48, 12, 0), args=args, train_dataset=lm_rows(8, 48, 12, 1))
    EntropyTrainerCallback(guards=[EntropyCollapseGuard("loss", threshold=1e9, action="rollback")]).attach(trainer)
    try:
        trainer.train()
    except EntrotrainError as err:
        if "fsdp=..." in str(err) and "reduce_lr" in str(err):
            print("REFUSED")
            return
        raise
    raise SystemExit("train() was not refused")


if __name__ == "__main__":
    main(sys.argv[1])
