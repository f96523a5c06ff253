"""What ``EntropyCollapseGuard(action="rollback")`` costs: holding the training state at each good observation, and
rolling back, against one training step and against what users would otherwise do.

The guard holds the model's and the optimizer's state in host memory at every good observation (one logging step in
``every_n_steps``), copied into buffers it re-uses (:class:`~entrotrain.callbacks.rollback_state.RollbackState`).
Rows, interleaved round-robin in one process (ratios are what to quote):

- ``train step``: one AdamW step of a GPT (forward, backward, step), the unit everything is divided by;
- ``hold (RollbackState.take)``: the guard's copy, buffers re-used (the steady state);
- ``deepcopy state_dicts``: ``copy.deepcopy`` of the model's and optimizer's ``state_dict()`` (the naive in-memory
  snapshot: new tensors every time);
- ``torch.save to disk``: the same two state dicts written to a file (a checkpoint: ``ModelCheckpoint``'s path);
- ``roll back (restore)``: the in-place copy back;
- ``load_state_dict``: ``model.load_state_dict`` + ``optimizer.load_state_dict`` from the deep copy (the naive
  restore);
- ``hold='trainable'`` / ``roll back, hold='trainable'``: a copy of the GPT whose LayerNorms alone train (about 1 % of
  the parameters, as a LoRA run's adapters): the frozen rest is fingerprinted, not copied
  (:mod:`~entrotrain.callbacks.rollback_frozen`); its held MiB are printed beside the model's.

The amortised cost of holding is ``hold / (every × train step)``: printed for every 25 and 50 steps.

    python benchmarks/rollback.py                        # tiny (the recipe's GPT) and gpt-mini, CPU, 1 thread
    python benchmarks/rollback.py --model gpt-small --device cuda
    python benchmarks/rollback.py --quick                # one round: proves the script runs
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table, resolve_device, time_cases  # noqa: E402

from entrotrain.callbacks.rollback_state import RollbackState  # noqa: E402
from entrotrain.models import TinyGPT  # noqa: E402

MODELS = {  # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "tiny": (4, 4, 128, 64, 32),
    "gpt-mini": (6, 6, 384, 256, 8),
    "gpt-small": (12, 12, 768, 1024, 8),
}
VOCAB = 256


def measure(name: str, device: torch.device, repeats: int, warmup: int) -> list[list[str]]:
    n_layer, n_head, n_embd, block, batch = MODELS[name]
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, VOCAB, (batch, block), device=device)

    def train_step() -> None:
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # Adam's state exists from here on
    state = RollbackState()
    state.take(model, [optimizer], step=0)
    naive: dict[str, object] = {}
    folder = tempfile.TemporaryDirectory()
    path = Path(folder.name) / "state.pt"

    def deepcopy_state() -> None:
        naive["model"] = copy.deepcopy(model.state_dict())
        naive["optimizer"] = copy.deepcopy(optimizer.state_dict())

    deepcopy_state()
    frozen_model, frozen_optimizer, frozen_step = _norms_only(model, x)
    frozen_step()
    frozen = RollbackState(trainable_only=True)
    frozen.take(frozen_model, [frozen_optimizer], step=0)
    cases = {
        "train step": train_step,
        "hold (RollbackState.take)": lambda: state.take(model, [optimizer], step=1),
        "deepcopy state_dicts": deepcopy_state,
        "torch.save to disk": lambda: torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                                                 path),
        "roll back (restore)": lambda: state.restore(model, [optimizer]),
        "load_state_dict": lambda: (model.load_state_dict(naive["model"]),
                                    optimizer.load_state_dict(naive["optimizer"])),
        "hold='trainable' (LayerNorms train)": lambda: frozen.take(frozen_model, [frozen_optimizer], step=1),
        "roll back, hold='trainable'": lambda: frozen.restore(frozen_model, [frozen_optimizer]),
    }
    timings = time_cases(cases, repeats=repeats, warmup=warmup, device=device)
    folder.cleanup()
    step = timings["train step"].min_ms
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in frozen_model.parameters() if p.requires_grad)
    held = (f"{state.nbytes / 2**20:.0f} MiB held; hold='trainable': {100 * trainable / params:.1f} % train, "
            f"{frozen.nbytes / 2**20:.2f} MiB held")
    rows = []
    for case, timing in timings.items():
        amortised = ""
        if case.startswith("hold"):
            amortised = f"{100 * timing.min_ms / (25 * step):.2f} % / {100 * timing.min_ms / (50 * step):.2f} %"
        rows.append([f"{name} ({params / 1e6:.1f} M params, {held})", case,
                     f"{timing.min_ms:.2f}", f"{timing.min_ms / step:.3f}", amortised])
    return rows


def _norms_only(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """A copy of ``model`` whose LayerNorms alone train (the rest frozen, as a LoRA run's base), its AdamW and its
    training step."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        module.requires_grad_(isinstance(module, torch.nn.LayerNorm))
    optimizer = torch.optim.AdamW([p for p in copied.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        logits = copied(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return copied, optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="default: tiny and gpt-mini")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one round, tiny only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    models = ["tiny"] if args.quick else (args.model or ["tiny", "gpt-mini"])
    repeats, warmup = (1, 0) if args.quick else (args.repeats, 1)
    print(environment_line(device, args.threads))
    print("min of interleaved rounds; ratio = time / one train step; amortised = hold / (every × step), every 25 / 50")
    rows = []
    for name in models:
        rows += measure(name, device, repeats, warmup)
    print(markdown_table(["model", "what", "ms", "× train step", "amortised (25 / 50)"], rows))


if __name__ == "__main__":
    main()
