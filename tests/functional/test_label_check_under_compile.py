"""token_logprobs and linear_entropy_and_logprobs check ``labels < V`` with a host read of ``labels.max()`` in eager
mode only: inside torch.compile that read was a graph break (a device sync in the hot path); there a label out of
range now gives a NaN log-prob with zero gradient instead."""

from __future__ import annotations

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional import linear_entropy_and_logprobs, token_logprobs
from tests.helpers.torch_release import needs_torch

_DYNAMO_2_3 = needs_torch(
    2, 4, "dynamo of torch 2.3 breaks the graph inside the chunked log-prob autograd.Function (call_method is_complex)"
)


def _head(h, w, labels):
    return linear_entropy_and_logprobs(h, w, labels).logprobs


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g, requires_grad=True)
    h = torch.randn(4, 3, generator=g, requires_grad=True)
    w = torch.randn(6, 3, generator=g, requires_grad=True)
    return z, h, w


@_DYNAMO_2_3
def test_the_label_check_is_no_graph_break_under_torch_compile():
    z, h, w = _inputs()
    labels = torch.tensor([0, 5, -100, 2])
    for fn, args in ((token_logprobs, (z, labels)), (_head, (h, w, labels))):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons


@_DYNAMO_2_3
def test_a_label_out_of_range_raises_in_eager_mode_and_is_nan_with_zero_gradient_when_compiled():
    z, h, w = _inputs()
    labels = torch.tensor([0, 6, -100, 2])  # 6 >= V = 6
    with pytest.raises(EntrotrainError, match="token id 6, out of range for a vocabulary of 6"):
        token_logprobs(z, labels)
    with pytest.raises(EntrotrainError, match="token id 6, out of range for a vocabulary of 6"):
        _head(h, w, labels)
    ok = labels.clamp(max=5)
    for fn, args in ((token_logprobs, (z, labels)), (_head, (h, w, labels))):
        torch._dynamo.reset()
        out = torch.compile(fn, backend="eager", fullgraph=True)(*args)
        want = fn(*args[:-1], ok)
        assert out[1].isnan() and torch.equal(out[[0, 2, 3]], want[[0, 2, 3]]), (out, want)
        inputs = args[:-1]
        grads = torch.autograd.grad(out, inputs, torch.tensor([1.0, 1.0, 0.0, 1.0]))
        wants = torch.autograd.grad(want, inputs, torch.tensor([1.0, 0.0, 0.0, 1.0]))
        for got, ref in zip(grads, wants):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
