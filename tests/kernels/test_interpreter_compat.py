"""Triton 3.6's CPU interpreter under NumPy >= 2.4 (``entrotrain.kernels._interpreter_compat``).

Before the fix every kernel test failed there with ``InterpreterError: TypeError('only 0-dimensional arrays can be
converted to Python scalars')``: ``range(lo, hi, BLOCK)`` over a scalar kernel argument calls the interpreter's
``tensor.__index__``, which did ``int()`` of a one-element 1-D array.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", minversion="3.0")  # older triton: no kernels (dispatch.MIN_TRITON)
tl = pytest.importorskip("triton.language")

from entrotrain.kernels import _interpreter_compat as compat  # noqa: E402
from entrotrain.kernels.dispatch import require_triton  # noqa: E402


def _setter(index):
    def patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__index__", index)

    return patch_lang_tensor


def test_detects_an_index_that_converts_a_1d_array_with_int():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.25 - 2.3 only warn
            int(np.zeros(1))
        strict = False
    except TypeError:  # numpy >= 2.4
        strict = True
    assert compat._index_is_broken(_setter(lambda self: int(self.handle.data))) is strict
    assert compat._index_is_broken(_setter(compat._index)) is False
    assert compat._index_is_broken(lambda tensor, scope: None) is False  # another layout: left alone


def test_patched_index_reads_one_element_arrays_of_any_rank():
    class _T:
        def __init__(self, data):
            self.handle = type("H", (), {"data": data})()

    for shape in [(), (1,), (1, 1)]:
        assert compat._index(_T(np.full(shape, 7, dtype=np.int64))) == 7


def test_a_loop_over_a_scalar_argument_runs(device):
    require_triton()  # what each kernel module calls before defining its kernels

    @triton.jit
    def _sum_first(x_ptr, out_ptr, n):
        acc = tl.zeros([1], tl.float32)
        for i in range(0, n):
            acc += tl.load(x_ptr + i + tl.arange(0, 1))
        tl.store(out_ptr + tl.arange(0, 1), acc)

    x = torch.arange(8, dtype=torch.float32, device=device)
    out = torch.zeros(1, dtype=torch.float32, device=device)
    _sum_first[(1,)](x, out, 5)
    assert out.item() == 0 + 1 + 2 + 3 + 4
