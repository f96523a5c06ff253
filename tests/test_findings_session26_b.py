"""Findings (session 26, hunt 3): training_forwards_only, keep_last_good's frozen pins, the guard's notify in a CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.integrations.loop import EntropyMonitors


class _Net(nn.Module):
    """A stem, a backbone (a direct child of the watched root) and a head; ``mode`` says how the backbone runs in the
    training forward: plainly, frozen under ``torch.no_grad()`` (linear probing), or reentrant-checkpointed."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.stem = nn.Linear(6, 12)
        self.backbone = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.mode == "frozen":
            with torch.no_grad():
                h = self.backbone(h)
        elif self.mode == "reentrant":
            h = checkpoint(self.backbone, h, use_reentrant=True)
        else:
            h = self.backbone(h)
        return self.head(h)


def _logs(mode: str, training_only: bool = True) -> dict[str, float]:
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = _Net(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = RepresentationEntropyMonitor(include=["backbone.0"], every_n_steps=1, log_spectrum=False,
                                           print_summary=False)
    monitors = EntropyMonitors([monitor], print_summary=False, training_forwards_only=training_only)
    with monitors.watch(model, opt):
        with monitors.step(0):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return monitors.logs


def test_a_reentrant_checkpointed_child_of_a_grad_forward_is_captured() -> None:
    """``checkpoint(self.backbone, h, use_reentrant=True)`` runs the backbone under ``no_grad`` inside the training
    forward (and again in backward, never captured): it was skipped as a no-grad forward, so the monitor saw nothing
    of a training step that had only this forward."""
    plain = _logs("plain")
    assert plain["entropy/repr/backbone.0/n_streamed"] == 32
    assert _logs("reentrant") == pytest.approx(plain, rel=1e-6)


def test_a_frozen_child_called_without_grad_inside_the_training_forward_is_captured() -> None:
    """Linear probing: the training forward runs a frozen backbone under ``torch.no_grad()``. It is part of the
    step's training forward (the same as with ``training_forwards_only=False``), not a separate no-grad pass."""
    every = _logs("frozen", training_only=False)
    assert every["entropy/repr/backbone.0/n_streamed"] == 32
    assert _logs("frozen") == pytest.approx(every, rel=1e-6)
