"""Monitors on a ``torch.compile``'d model: compiles with and without them, and the step times.

The recipe's TinyGPT (``LanguageModelingTask``, 4 × 4 × 128, batch 32 × 64) with ``task.model = torch.compile(...)``,
trained through ``Trainer.fit`` for ``--steps`` steps, once without monitors and once with
``AttentionEntropyMonitor`` + ``RepresentationEntropyMonitor`` (every block's output) logging every ``--every``
steps. Reported: graphs compiled (dynamo's ``unique_graphs``, recompiles included) and graph breaks in each run, the
median step time of non-logging steps (should equal the run without monitors) and of logging steps (the extra is
the cost of a logging step: the queued captures scored eagerly, the reductions, the logging), steps 0 and 1 left out
(they compile), and whether the weights after training are bit-identical.

    python benchmarks/compiled_monitors.py                      # inductor, CPU (a few minutes: compiles)
    python benchmarks/compiled_monitors.py --backend eager      # dynamo only (fast; no inductor)
    python benchmarks/compiled_monitors.py --quick              # 6 steps, eager backend: proves the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table  # noqa: E402
from monitor_overhead import _StepTimer  # noqa: E402

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor  # noqa: E402
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor  # noqa: E402
from entrotrain.tasks.char_corpus import CharCorpusDataModule  # noqa: E402
from entrotrain.tasks.language_modeling import LanguageModelingTask  # noqa: E402


def fit(batches: list, with_monitors: bool, args: argparse.Namespace) -> dict:
    import lightning as L

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    task = LanguageModelingTask(block_size=64, n_layer=4, n_head=4, n_embd=128, lr=1e-3)
    task.model = torch.compile(task.model, backend=args.backend)
    monitors = [
        AttentionEntropyMonitor(every_n_steps=args.every, log_media=False, print_summary=False),
        RepresentationEntropyMonitor(
            include=["model.blocks.?"], every_n_steps=args.every, log_spectrum=False, print_summary=False
        ),
    ]
    timer = _StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer.start, *(monitors if with_monitors else []), timer.stop],
    )
    trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "times": dict(zip(timer.steps, timer.samples)),
        "weights": [p.detach().clone() for p in task.parameters()],
        "keys": sorted(monitors[0].last_logged) if with_monitors else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=26)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, eager, aot_eager)")
    parser.add_argument("--quick", action="store_true", help="6 steps, eager backend: proves the script runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.backend = 6, 2, "eager"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    data = CharCorpusDataModule(block_size=64, batch_size=32, seed=0, steps_per_epoch=args.steps)
    data.setup("fit")
    batches = list(data.train_dataloader())[: args.steps]
    plain = fit(batches, False, args)
    watched = fit(batches, True, args)
    timed = [s for s in watched["times"] if s >= 2]
    quiet = statistics.median(plain["times"][s] for s in timed)
    quiet_watched = statistics.median(watched["times"][s] for s in timed if s % args.every)
    loud = [watched["times"][s] for s in timed if s % args.every == 0]
    loud_median = statistics.median(loud) if loud else float("nan")
    print(environment_line(torch.device("cpu"), args.threads))
    print(
        f"TinyGPT 4 x 4 x 128, batch 32 x 64, task.model = torch.compile(backend={args.backend!r}); {args.steps} "
        f"steps; monitors: attention + representation (blocks), every {args.every} steps"
    )
    rows = [
        ["graphs compiled (recompiles included)", str(plain["graphs"]), str(watched["graphs"])],
        ["graph breaks", str(plain["breaks"]), str(watched["breaks"])],
        ["median non-logging step (steps >= 2)", f"{1e3 * quiet:.1f} ms", f"{1e3 * quiet_watched:.1f} ms"],
        ["median logging step (steps >= 2)", "", f"{1e3 * loud_median:.1f} ms (+{1e3 * (loud_median - quiet):.1f} ms)"],
    ]
    print(markdown_table(["", "no monitor", "monitors"], rows))
    same = all(torch.equal(a, b) for a, b in zip(plain["weights"], watched["weights"]))
    print(f"weights after training, none vs monitors: {'bit-identical' if same else 'DIFFERENT'}")
    print(f"keys with '_orig_mod': {[k for k in watched['keys'] if '_orig_mod' in k]}")


if __name__ == "__main__":
    main()
