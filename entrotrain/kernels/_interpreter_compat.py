"""Triton's CPU interpreter under NumPy >= 2.4: scalar kernel arguments as loop bounds and indices.

The interpreter holds a scalar kernel argument (``n_k``, ``n_cols``, ...) as a one-element 1-D NumPy array, and
``tensor.__index__`` (what ``range(lo, hi, BLOCK)`` and ``x[i]`` call) converts it with ``int(array)``. NumPy 2.4
turned that conversion of an ``ndim > 0`` array into ``TypeError: only 0-dimensional arrays can be converted to Python
scalars`` (a DeprecationWarning since 1.25). Triton 3.6's interpreter does exactly that, so every kernel here (each
loops over a runtime bound) fails under ``TRITON_INTERPRET=1`` with triton 3.6 and numpy >= 2.4; triton 3.9 squeezes
the array first (``int(data.squeeze())``). :func:`patch_interpreter_index` gives an older interpreter the same
``__index__``, by feature detection: only when the interpreter's own one fails on a one-element 1-D array. Compiled
kernels (CUDA) never meet this code.
"""

from __future__ import annotations

import sys

_DONE: dict[str, bool] = {}


def _index(self) -> int:
    """``int`` of a one-element tensor of the interpreter (any number of unit axes): what triton 3.9 computes."""
    return int(self.handle.data.squeeze())


class _Recorder:
    """A stand-in for the interpreter's patch scope: records what ``_patch_lang_tensor`` would set."""

    def __init__(self) -> None:
        self.attrs: dict[str, object] = {}

    def set_attr(self, obj: object, name: str, value: object) -> None:
        self.attrs[name] = value


def _index_is_broken(patch_lang_tensor) -> bool:
    """Whether the interpreter's ``tensor.__index__`` fails on a scalar argument held as a 1-element 1-D array."""
    import numpy as np

    class _Handle:
        data = np.zeros(1, dtype=np.int32)

    class _Tensor:
        handle = _Handle()

    recorder = _Recorder()
    try:
        patch_lang_tensor(_Tensor, recorder)
        index = recorder.attrs["__index__"]
        index(_Tensor())
    except TypeError:
        return True
    except Exception:  # another interpreter layout: leave it alone
        return False
    return False


def patch_interpreter_index() -> bool:
    """Give Triton's interpreter a ``tensor.__index__`` that works under NumPy >= 2.4; ``True`` when it patched.

    A no-op (``False``) when the interpreter is not loaded, has no ``_patch_lang_tensor`` (another layout), or its own
    ``__index__`` already works (triton 3.9; numpy < 2.4). Idempotent.
    """
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if interpreter is None or _DONE.get("patched"):
        return bool(_DONE.get("patched"))
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or not _index_is_broken(original):
        return False

    def _patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _DONE["patched"] = True
    return True
