"""EntropyTrainerCallback under 2-process CPU DDP (gloo) in HF Trainer, and the same step in one process.

``python hf_ddp_run.py OUT`` starts two ranks (each trains one step with lr = 0 on its half of 8 rows and writes
``rank{r}.json``: what it logged). The test runs ``run(OUT, "single", 8, None)`` itself (one process, all 8 rows)
and checks that the reduced statistics equal the one-process statistics of the union batch, on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# imported before the fork, so rank_zero_only.rank is 0 in every rank until the callback sets it (as after mp.spawn)
import lightning.pytorch  # noqa: E402, F401
from tests.helpers.hf_trainer import fork_ranks, train_one_step  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402

VOCAB, T, ROWS = 48, 12, 8


def run(out: Path, name: str, per_device: int, backend: str | None) -> None:
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor

    def monitors() -> list:
        return [
            AttentionEntropyMonitor(max_rows=None, max_queries=None, log_media=False, print_summary=False),
            RepresentationEntropyMonitor(
                include=["transformer.h.?"], measures=("rankme", "matrix_entropy"), max_tokens=None,
                log_spectrum=False, print_summary=False,
            ),
        ]

    torch.set_num_threads(1)
    model = tiny_gpt2_lm(VOCAB, T, seed=0)
    train_one_step(out, name, model, lm_rows(ROWS, VOCAB, T, seed=1), monitors, per_device, backend)


if __name__ == "__main__":
    fork_ranks(run, Path(sys.argv[1]), ROWS)
