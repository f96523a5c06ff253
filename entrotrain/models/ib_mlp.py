r"""The Shwartz-Ziv & Tishby (2017) information-plane network: 12-10-7-5-4-3-2, tanh or ReLU hidden layers, softmax out.

Shwartz-Ziv & Tishby, "Opening the Black Box of Deep Neural Networks via Information" (arXiv 1703.00810), code
``ravidziv/IDNNs`` (``net '1'``): five hidden layers of widths 10, 7, 5, 4, 3 and a 2-way softmax output. Each block is
``nn.Sequential(Linear, activation)`` so that the output of ``layers.{i}`` (and of ``layers.{i}.1``) is the layer's
post-activation representation T_i; ``output`` is ``Sequential(Linear, Softmax)`` whose output, the class
probabilities, is the 6th "layer" the paper records.

Initialisation (state it, it changes the picture): weights from a normal truncated at ±2 std with
``std = gain / sqrt(fan_in)`` and zero biases. ``gain = 1`` is IDNNs (tanh and ReLU); Chelombiev et al. (2019) use
``gain = 2`` for ReLU-like units; Saxe et al. (2018) use ``1/sqrt(fan_out)`` (``init="fan_out"``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from entrotrain._validation import check_choice, check_real
from entrotrain.errors import EntrotrainError

__all__ = ["IBMLP", "IB_WIDTHS"]

#: Layer widths of the paper's network, input first.
IB_WIDTHS: tuple[int, ...] = (12, 10, 7, 5, 4, 3, 2)

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class IBMLP(nn.Module):
    """``x (B, 12) → [Linear → tanh|ReLU] × 5 (layers.0..4) → Linear → Softmax (output)``; returns probabilities.

    Args:
        widths: layer widths, input first and classes last (default :data:`IB_WIDTHS`).
        activation: ``"tanh"`` (the paper) or ``"relu"`` (Saxe et al.; Chelombiev et al.).
        init: ``"fan_in"`` (IDNNs, Chelombiev: std = gain/√fan_in) or ``"fan_out"`` (Saxe et al.'s ibsgd:
            std = gain/√fan_out); truncated at ±2 std; biases 0.
        gain: multiplies the std (1 = IDNNs; Chelombiev uses 2 for ReLU).

    Shapes:
        ``forward(x)``: ``x`` ``(B, 12)`` (any float dtype) → class probabilities ``(B, 2)`` (the softmax, which the
        paper records as its last layer). Train with the log of the clipped probabilities
        (:class:`entrotrain.tasks.information_plane.InformationPlaneTask`).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = IB_WIDTHS,
        activation: Literal["tanh", "relu"] = "tanh",
        init: Literal["fan_in", "fan_out"] = "fan_in",
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice(activation, "activation", tuple(_ACTIVATIONS))
        check_choice(init, "init", ("fan_in", "fan_out"))
        check_real(gain, "gain", low=0.0, low_open=True)
        widths = tuple(int(w) for w in widths)
        if len(widths) < 3 or min(widths) < 1:
            raise EntrotrainError(f"widths must list >= 3 positive widths (input, hidden..., classes), got {widths!r}")
        self.widths, self.activation, self.init, self.gain = widths, activation, init, float(gain)
        act = _ACTIVATIONS[activation]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), act()) for a, b in zip(widths[:-2], widths[1:-1])
        )
        self.output = nn.Sequential(nn.Linear(widths[-2], widths[-1]), nn.Softmax(dim=-1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated-normal weights, std ``gain/sqrt(fan)``, cut at ±2 std; zero biases (uses the global RNG)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan = module.in_features if self.init == "fan_in" else module.out_features
                std = self.gain / math.sqrt(fan)
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, classes)``."""
        x = x.reshape(len(x), -1).to(self.output[0].weight.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.output(x)
