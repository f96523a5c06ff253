"""Step-time cost of the MoE router monitor and of the router losses, against the plain training step.

The model is the recipes' :class:`~entrotrain.models.tiny_moe.TinyMoE` (8 experts, top-1, 2 layers, 8 row tokens per
digit, batch 64 → 512 router rows per layer; ``--batch``/``--experts``/``--layers`` scale it).

1. **Router losses** (manual loop: forward, loss, backward, AdamW step; no Lightning): the plain step and the same
   step + ``TsallisRouterLoss`` (DynMoLE), ``LoadBalancingLoss``, ``RouterZLoss``; interleaved rounds in one process
   (``_common.time_cases``), ratio of the minima to the plain step.
2. **RouterEntropyMonitor** (real ``Trainer.fit`` runs, the step timed from the first callback's
   ``on_train_batch_start`` to the last callback's ``on_train_batch_end``, so every monitor hook is inside): fits
   without a monitor and with ``RouterEntropyMonitor(every_n_steps=--log-every)`` alternate for ``--rounds`` rounds.
   Reported: the median step without monitor, the median non-logging and logging step with it (minimum over rounds
   of each median), the extra time of one logging step, and the amortised overhead at every 50 steps,
   ``1 + (logging − non-logging) / 50 / plain`` (as ``monitor_overhead.py``; non-logging steps return at the hooks'
   first line, so their ratio to the plain step measures the machine's noise). No logger (wandb media off).

    OMP_NUM_THREADS=1 python benchmarks/router.py              # CPU, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table, time_cases  # noqa: E402

from entrotrain.callbacks.router_monitor import RouterEntropyMonitor  # noqa: E402
from entrotrain.regularizers.router_loss import LoadBalancingLoss, RouterZLoss, TsallisRouterLoss  # noqa: E402
from entrotrain.tasks.moe_classification import MoEDigitsTask  # noqa: E402


def _task(args: argparse.Namespace, regularizers=None) -> MoEDigitsTask:
    torch.manual_seed(0)
    return MoEDigitsTask(
        n_experts=args.experts, top_k=1, n_layer=args.layers, lr=3e-3, router_lr=0.1, regularizers=regularizers,
        print_summary=False,
    )


def loss_cases(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.batch, 64, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    regs = {
        "plain step": None,
        "+ TsallisRouterLoss (DynMoLE)": TsallisRouterLoss(0.01, aux_weight=0.1, top_p=0.0, keep_top_k=1,
                                                           entropy_threshold=1.0),
        "+ TsallisRouterLoss, DynMoLE routing defaults": TsallisRouterLoss(0.01, aux_weight=0.1),
        "+ LoadBalancingLoss": LoadBalancingLoss(0.01, top_k=1),
        "+ RouterZLoss": RouterZLoss(0.001),
    }
    out = {}
    for name, reg in regs.items():
        task = _task(args, None if reg is None else [reg])
        opt = task.configure_optimizers()

        def run(task=task, opt=opt):
            opt.zero_grad(set_to_none=True)
            logits, router = task.model(x)
            loss = F.cross_entropy(logits, y)
            if task.regularizer is not None:
                loss = loss + task.regularizer(router).total
            loss.backward()
            opt.step()

        out[name] = run
    return out


class _StepTimer:
    """Two callbacks bracketing all others: start at the first ``on_train_batch_start``, stop at the last ``..._end``."""

    def __init__(self) -> None:
        import lightning as L

        timer = self
        self.samples: list[tuple[int, float]] = []
        self._t0 = 0.0

        class Start(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer._t0 = time.perf_counter()

        class Stop(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timer.samples.append((trainer.global_step - 1, time.perf_counter() - timer._t0))

        self.start, self.stop = Start(), Stop()


def _fit(args: argparse.Namespace, monitor: bool) -> list[tuple[int, float]]:
    import lightning as L

    from entrotrain.tasks.image_classification import DigitsDataModule

    timer = _StepTimer()
    callbacks = [timer.start]
    if monitor:
        callbacks.append(RouterEntropyMonitor(every_n_steps=args.log_every, top_k=1, log_media=False,
                                              print_summary=False))
    callbacks.append(timer.stop)
    trainer = L.Trainer(
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, num_sanity_val_steps=0,
    )
    dm = DigitsDataModule(batch_size=args.batch, steps_per_epoch=args.steps)
    trainer.fit(_task(args), dm)
    return timer.samples[args.skip:]


def monitor_table(args: argparse.Namespace) -> str:
    plain, quiet, loud = [], [], []
    for _ in range(args.rounds):
        plain.append(statistics.median(t for _, t in _fit(args, False)))
        samples = _fit(args, True)
        quiet.append(statistics.median(t for s, t in samples if s % args.log_every))
        loud.append(statistics.median(t for s, t in samples if s % args.log_every == 0))
    p, q, lo = min(plain), min(quiet), min(loud)
    extra = lo - q
    rows = [
        ["plain step (no monitor), median", f"{p * 1e3:.3f}", "1.000"],
        ["step with monitor, not logging", f"{q * 1e3:.3f}", f"{q / p:.3f}"],
        ["step with monitor, logging", f"{lo * 1e3:.3f}", f"{lo / p:.3f}"],
        ["one logging step, extra", f"{extra * 1e3:.3f}", f"{extra / p:.3f}"],
        ["amortised at every 50 steps: 1 + extra / 50 / plain", "", f"{1 + extra / 50 / p:.3f}"],
    ]
    return markdown_table(["RouterEntropyMonitor (Trainer.fit)", "ms", "× plain"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40, help="interleaved rounds of the loss cases")
    parser.add_argument("--rounds", type=int, default=3, help="alternating fits with / without the monitor")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per fit")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of each fit")
    parser.add_argument("--log-every", type=int, default=5, help="monitor interval in the fits (amortised at 50)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(environment_line(device, args.threads))
    print(f"\n# TinyMoE step: batch {args.batch} x 8 tokens, {args.layers} MoE layers x {args.experts} experts, top-1, "
          f"fp32, {args.repeats} interleaved rounds (min / median)\n")
    times = time_cases(loss_cases(args), repeats=args.repeats, warmup=3, device=device)
    base = times["plain step"]
    rows = [[n, f"{t.min_ms:.3f}", f"{t.median_ms:.3f}", f"{t.min_ms / base.min_ms:.2f}"] for n, t in times.items()]
    print(markdown_table(["router loss", "min ms", "median ms", "× plain (min)"], rows))
    print(f"\n# RouterEntropyMonitor: {args.rounds} rounds of fits of {args.steps} steps (first {args.skip} skipped), "
          f"logging every {args.log_every}; minimum over rounds of the medians\n")
    print(monitor_table(args))


if __name__ == "__main__":
    main()
