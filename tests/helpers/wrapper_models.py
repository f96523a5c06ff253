"""A 2-layer TinyGPT whose blocks may be wrapped (activation checkpointing, FSDP1), fitted through
AttentionEntropyMonitor + RepresentationEntropyMonitor or looked at with ``entropy_snapshot``: what
tests/taps/test_wrapper_names.py and its FSDP1 script (tests/taps/fsdp1_cpu_run.py) compare with the plain model."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.models.tiny_gpt import Block, TinyGPT
from tests.helpers.gpt_module import GPTModule
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import LossRecorder
from tests.helpers.spy_logger import SpyLogger

VOCAB, SEQ, STEPS = 29, 12, 3
Wrap = Callable[[nn.Module], nn.Module]


def data(steps: int = STEPS) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (steps * 4, SEQ + 1), generator=g)


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data()), batch_size=4, shuffle=False)


def tiny_gpt() -> TinyGPT:
    """The model of :class:`GPT` (seed 0, width 16, 2 layers, 2 heads)."""
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16)


class GPT(GPTModule):
    """An unconverted 2-layer TinyGPT (width 16, seed 0) with Adam (lr 1e-2); ``wrap(self.model)`` (e.g.
    ``apply_activation_checkpointing`` or FSDP1) replaces the model when given."""

    def __init__(self, wrap: Wrap | None = None) -> None:
        super().__init__(convert=False, vocab_size=VOCAB, block_size=SEQ, n_embd=16, seed=0)
        if wrap is not None:
            self.model = wrap(self.model)

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        logits = self.model(idx[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def monitors(prefix: str = "model.") -> list[L.Callback]:
    return [
        AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False),
        RepresentationEntropyMonitor(
            include=[f"{prefix}blocks.*", f"{prefix}blocks.*.attn"], measures=["rankme", "effective_rank"], every_n_steps=1, log_spectrum=False,
            print_summary=False,
        ),
    ]


def fit(wrap: Wrap | None = None) -> dict:
    """Fit STEPS steps, logging every step: ``{"losses": [...], "metrics": {step: {key: value}}}`` (``entropy/``
    keys only), plus the attention sites the monitor announced."""
    module = GPT(wrap)
    recorder, spy = LossRecorder(), SpyLogger()
    callbacks = monitors()
    trainer = quiet_trainer(callbacks=[recorder, *callbacks], max_steps=STEPS, logger=spy, log_every_n_steps=1)
    trainer.fit(module, loader())
    metrics: dict[int, dict[str, float]] = {}
    for step, row in spy.rows:
        metrics.setdefault(int(step), {}).update({k: float(v) for k, v in row.items() if k.startswith("entropy/")})
    return {
        "losses": [float(x) for x in recorder.losses],
        "metrics": {str(k): v for k, v in metrics.items()},
        "sites": list(callbacks[0].site_names),
    }


def snapshot(model: nn.Module) -> dict[str, float]:
    """``entropy_snapshot`` of ``model`` on two batches: attention and representation (``blocks.*``) keys."""
    from entrotrain.integrations.snapshot import entropy_snapshot

    batches = list(data(2)[:, :-1].split(4))
    shot = entropy_snapshot(model, batches, monitors(prefix=""))
    return {k: v for k, v in shot.metrics.items() if k.startswith("entropy/")}


def is_block(module: nn.Module) -> bool:
    return isinstance(module, Block)


def same_values(got: dict[str, float], want: dict[str, float], tol: float = 1e-5) -> list[str]:
    """The keys of ``want`` whose value in ``got`` differs by more than ``tol`` (absolute and relative)."""
    bad = []
    for key, value in want.items():
        other = got[key]
        if math.isnan(value) and math.isnan(other):
            continue
        if not abs(other - value) <= tol * max(1.0, abs(value)):
            bad.append(f"{key}: {other} != {value}")
    return bad
