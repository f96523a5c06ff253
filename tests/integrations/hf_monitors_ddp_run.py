"""RouterEntropyMonitor and PredictionEntropyMonitor (head, probe, generation) under 2-process CPU DDP (gloo) in HF
Trainer, and the same step in one process.

``python hf_monitors_ddp_run.py OUT`` starts two ranks (each trains one step with lr = 0 on its half of 8 padded rows
and writes ``rank{r}.json``: what it logged). The test runs ``run(OUT, "single", 8, None)`` itself (one process, all
8 rows) and checks that the reduced statistics equal the one-process statistics of the union batch, on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.hf_trainer import fork_ranks, train_one_step  # noqa: E402
from tests.helpers.tiny_hf_lms import padded_rows, stack_rows, tiny_mixtral_lm  # noqa: E402

VOCAB, T, ROWS = 40, 10, 8


def run(out: Path, name: str, per_device: int, backend: str | None) -> None:
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor

    probe = stack_rows(padded_rows(4, VOCAB, T, seed=7))

    def monitors() -> list:
        return [
            RouterEntropyMonitor(log_media=False, print_summary=False),
            PredictionEntropyMonitor(
                source="head", shift_labels=True, probe=probe, generation_prompts=2, prompt_length=3,
                max_new_tokens=3, log_media=False, print_summary=False,
            ),
        ]

    torch.set_num_threads(1)
    model = tiny_mixtral_lm(VOCAB, seed=0)
    train_one_step(out, name, model, padded_rows(ROWS, VOCAB, T, seed=1), monitors, per_device, backend)


if __name__ == "__main__":
    fork_ranks(run, Path(sys.argv[1]), ROWS)
