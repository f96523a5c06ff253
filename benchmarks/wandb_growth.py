"""What entrotrain adds to a wandb run over a long run: bytes per logging step in the offline run folder, by kind.

Each monitor logs ``--steps`` logging steps through :class:`~entrotrain.integrations.loop.EntropyMonitors` with
``log=wandb.log`` into its own offline wandb run (``WANDB_MODE=offline``, every wandb folder under a temporary
directory: no login, no network). The run folder is measured by kind of file:

- ``history``: the records of the ``.wandb`` transaction log (scalars, histograms, the media's references,
  summaries; read with ``tests.helpers.wandb_offline.records``: the file itself grows in 32 KiB blocks);
- ``images``: ``files/media/images/*.png`` (heatmaps, heads over time);
- ``tables``: ``files/media/table/*.json`` (the representation monitor's spectrum charts);

and divided by the logging steps (a run of one logging step, which holds the run's header, is subtracted). The
heads-over-time image and the spectrum charts are logged at every 10th logging step by default (``--media-every``
sets ``over_time_every`` / ``spectrum_every``; 1 = every step, as before they were paced): keep ``--steps`` a
multiple of it. The attention monitor's heads-over-time image grows with its history (one column per logging step,
thinned at its capacity): ``--warm`` fills that history to its capacity first (each head drifting slowly, with a
little noise), which is the image's size for the rest of a long run.

Then each rate is extrapolated to ``--total`` optimizer steps logging every ``--every`` (default 1 000 000 / 50 =
20 000 logging steps). Prints a Markdown table.

Monitors (CPU, a few seconds each): the attention monitor on a 12-layer × 12-head TinyGPT (n_embd 96, 16 tokens),
the policy monitor (``record_policy`` with 64 × 128 random tokens per step), the representation monitor on 4 blocks
of the same model (its spectrum charts as ``wandb.Table`` line plots).

Usage::

    python benchmarks/wandb_growth.py --warm                  # 20 logging steps per monitor, ~1-2 min
    python benchmarks/wandb_growth.py --warm --media-every 1  # the heavy media at every logging step
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers.wandb_offline reads logs


def _log_bytes(path: Path, timeout: float = 60.0) -> int:
    """Bytes of the records in a ``.wandb`` log (the file itself grows in 32 KiB blocks), once its ``exit`` record
    is written (``run.finish()`` can return before wandb's service has written the whole log)."""
    from tests.helpers.wandb_offline import records

    deadline = time.monotonic() + timeout
    while True:
        found = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return sum(r.ByteSize() for r in found)
        time.sleep(0.25)


def _folder_bytes(run_dir: Path) -> dict[str, int]:
    sizes = {"history": 0, "images": 0, "tables": 0, "other": 0}
    for path in run_dir.rglob("*"):
        if not path.is_file():
            continue
        name = str(path.relative_to(run_dir))
        if name.endswith(".wandb"):
            sizes["history"] += _log_bytes(path)
            continue
        kind = "images" if "media/images" in name else "tables" if "media/table" in name else "other"
        sizes[kind] += path.stat().st_size
    return sizes


def _run(name: str, build, steps: int, root: Path) -> tuple[dict[str, int], int]:
    """Log ``steps`` logging steps of the monitor ``build()`` returns into a fresh offline run; the run folder's bytes
    by kind once the run has finished, and the most keys logged at one step."""
    import wandb

    from entrotrain.integrations.loop import EntropyMonitors

    model, monitor, feed = build()
    root.mkdir(parents=True)
    run = wandb.init(project="entrotrain-growth", name=name, dir=str(root), settings=wandb.Settings(silent=True))
    run_dir = Path(run.dir).parent
    monitors = EntropyMonitors([monitor], every_n_steps=1, log=wandb.log, print_summary=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    keys = 0
    with monitors.watch(model, optimizer):
        for step in range(steps):
            with monitors.step(step):
                feed(monitors, step)
                optimizer.step()
                optimizer.zero_grad()
            keys = max(keys, len(monitors.logs) + len(monitors.media))
    run.finish()
    return _folder_bytes(run_dir), keys


def _gpt(layers: int = 12, heads: int = 12):
    from entrotrain.models import TinyGPT

    torch.manual_seed(0)
    return TinyGPT(vocab_size=64, block_size=16, n_layer=layers, n_head=heads, n_embd=8 * heads)


def _lm_feed(model):
    idx = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))

    def feed(monitors, step):
        model(idx).float().pow(2).mean().backward()

    return feed


def build_attention(warm: bool, pace: dict):
    from entrotrain.callbacks import AttentionEntropyMonitor

    def build():
        model = _gpt()
        monitor = AttentionEntropyMonitor(every_n_steps=1, print_summary=False, **pace)
        lm_feed = _lm_feed(model)

        def feed(monitors, step):
            lm_feed(monitors, step)
            if warm and not monitor._history:  # the history a long run holds (watch starts it empty): at capacity,
                g = torch.Generator().manual_seed(1)  # each head drifting slowly, with a little measurement noise
                x = torch.rand(12, 12, generator=g)
                for s in range(monitor._history.capacity - 1):
                    x = (x + 0.01 * torch.randn(12, 12, generator=g)).clamp(0, 1)
                    monitor._history.append(x + 0.003 * torch.randn(12, 12, generator=g))
                    monitor._history_steps.append(s - monitor._history.capacity)

        return model, monitor, feed

    return build


def build_policy():
    from entrotrain.callbacks import PolicyEntropyMonitor

    def build():
        model = torch.nn.Linear(2, 2)
        g = torch.Generator().manual_seed(0)

        def feed(monitors, step):
            model(torch.zeros(1, 2)).sum().backward()
            entropy = torch.rand(64, 128, generator=g) * 3
            logprobs = -torch.rand(64, 128, generator=g)
            monitors.record_policy(entropy, logprobs, torch.randn(64, generator=g), torch.ones(64, 128),
                                   rewards=torch.rand(64, generator=g))

        return model, PolicyEntropyMonitor(print_summary=False), feed

    return build


def build_representation(pace: dict):
    from entrotrain.callbacks import RepresentationEntropyMonitor

    def build():
        model = _gpt()
        monitor = RepresentationEntropyMonitor(include=["blocks.2", "blocks.5", "blocks.8", "blocks.11"],
                                               every_n_steps=1, stage="train", print_summary=False, **pace)
        return model, monitor, _lm_feed(model)

    return build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="logging steps per monitor")
    parser.add_argument("--warm", action="store_true", help="attention: start with the heads-over-time history full")
    parser.add_argument("--total", type=int, default=1_000_000, help="optimizer steps to extrapolate to")
    parser.add_argument("--every", type=int, default=50, help="log every this many optimizer steps")
    parser.add_argument("--media-every", type=int, default=None,
                        help="over_time_every / spectrum_every (default: the monitors' own, 10; 1 = every step)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ[var] = os.path.join(tmp, var.lower())
            os.makedirs(os.environ[var], exist_ok=True)
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        every = args.media_every
        cases = [
            ("attention 12x12" + (" (history full)" if args.warm else ""),
             build_attention(args.warm, {} if every is None else {"over_time_every": every})),
            ("policy", build_policy()),
            ("representation 4 layers", build_representation({} if every is None else {"spectrum_every": every})),
        ]
        logging_steps = args.total // args.every
        paced = "the monitors' defaults" if every is None else f"over_time_every = spectrum_every = {every}"
        print(f"{args.steps} logging steps per monitor ({paced}); extrapolated to {args.total:,} steps logging every "
              f"{args.every} = {logging_steps:,} logging steps\n")
        print("| monitor | keys / step | history B/step | images B/step | tables B/step | total at "
              f"{logging_steps:,} logs |")
        print("|---|---|---|---|---|---|")
        for name, build in cases:
            small, _ = _run(name, build, 1, Path(tmp) / f"{name}-1")
            big, keys = _run(name, build, 1 + args.steps, Path(tmp) / f"{name}-n")
            rate = {k: (big[k] - small[k]) / args.steps for k in big}
            total = sum(rate[k] for k in ("history", "images", "tables")) * logging_steps
            print(f"| {name} | {keys} | {rate['history']:,.0f} | {rate['images']:,.0f} | {rate['tables']:,.0f} | "
                  f"{total / 2**20:,.0f} MiB |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
