"""Findings of session 26 on taps under activation checkpointing (each test failed before its fix)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from entrotrain.regularizers.attention_entropy import AttentionEntropyMaximization


class Blocks(nn.Module):
    def __init__(self, checkpoint: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2))
        self.checkpoint = checkpoint

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h + self.attn[i](h, h, h, need_weights=False)[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.attn)):
            if self.checkpoint is None:
                h = self.block(i, h)
            else:
                h = torch_checkpoint.checkpoint(self.block, i, h, use_reentrant=self.checkpoint == "reentrant")
        return h


def _grads(checkpoint: str | None) -> torch.Tensor:
    model = Blocks(checkpoint)
    reg = AttentionEntropyMaximization(1.0)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with reg.capture(model):
        out = model(x)
    (out.square().mean() + reg().total).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_a_regulariser_on_checkpointed_multihead_attention_gets_the_plain_gradient() -> None:
    """nn.MultiheadAttention's adapter projects q and k itself, inside the checkpointed region: those saves went
    through non-reentrant checkpointing's hooks, and the recomputation (without the tap) saved fewer tensors:
    torch's CheckpointError in backward ("A different number of tensors was saved")."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _grads("non_reentrant")
    assert torch.allclose(got, _grads(None), atol=1e-6)


def test_a_regulariser_under_reentrant_checkpointing_warns_that_it_does_not_train() -> None:
    """Reentrant checkpointing runs the region's forward under no_grad: the regulariser adds nothing to the gradient,
    and the tap says so (sound, no finding)."""
    with pytest.warns(UserWarning, match="ran with gradients off.*use_reentrant=False"):
        got = _grads("reentrant")
    assert not torch.allclose(got, _grads(None), atol=1e-6)  # the regulariser's part is missing: hence the warning


def test_no_warning_when_the_capture_runs_without_gradients() -> None:
    """A capture armed under no_grad (an evaluation of the regulariser) is not the reentrant-checkpointing case: no
    warning, and the value is still computed (the negative mean entropy of the captured heads, without a graph)."""
    model = Blocks(None)
    reg = AttentionEntropyMaximization(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), reg.capture(model):
            model(torch.randn(2, 5, 8))
        out = reg()
    assert torch.isfinite(out.total) and out.total < 0 and not out.total.requires_grad


class MLPBlocks(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.reentrant = reentrant

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for proj in self.proj:
            h = h + (proj(h) if self.reentrant is None else torch_checkpoint.checkpoint(
                proj, h, use_reentrant=self.reentrant))
        return h


def _representation_grads(reentrant: bool | None) -> torch.Tensor:
    from entrotrain.regularizers.representation import MatrixEntropyRegularizer

    model = MLPBlocks(reentrant)
    reg = MatrixEntropyRegularizer(1.0, include=["proj.*"])
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with reg.capture(model):
        out = model(x)
    (out.square().mean() + reg().total).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_a_representation_regulariser_under_reentrant_checkpointing_warns_that_it_does_not_train() -> None:
    """The ActivationTap kept the no-grad outputs of a reentrant checkpointed region without a word, so
    MatrixEntropyRegularizer (Vendi, MMCR) silently added nothing to the gradient; the AttentionTap warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = _representation_grads(None)
        assert torch.allclose(_representation_grads(False), plain, atol=1e-6)  # non-reentrant: the same gradient
    with pytest.warns(UserWarning, match=r"ActivationTap\(differentiable=True\): module 'proj.0' ran with gradients off"):
        got = _representation_grads(True)
    assert not torch.allclose(got, plain, atol=1e-6)
