"""Which implementation runs: the torch path (always there, the oracle) or a Triton kernel (optional).

``impl`` is ``"auto"``, ``"torch"`` or ``"triton"``; the environment variable ``ENTROTRAIN_IMPL`` (same values)
overrides the argument when set, so a whole run can be pinned to one path without touching code (e.g.
``ENTROTRAIN_IMPL=torch`` to rule a kernel out while debugging).

- ``"torch"``: the torch path.
- ``"triton"``: the Triton kernel; raises :class:`KernelUnavailableError`, naming the fix, when it cannot run here,
  and naming the error when it fails to compile or launch (forward or backward).
- ``"auto"``: the Triton kernel when it can run on these tensors, the torch path otherwise, silently. A kernel that
  fails to compile or launch, in its forward or its backward, is switched off for the rest of the process with one
  warning, and the torch path (same result) takes over (:func:`call_kernel`, :func:`kernel_backward`).

A Triton kernel can run when ``triton`` (3.0 or newer: :data:`MIN_TRITON`) is importable and every tensor is on
a CUDA device, or, with ``TRITON_INTERPRET=1`` set before ``triton`` is imported, on CPU tensors through Triton's
interpreter (slow: for tests). float64 tensors always take the torch path under ``"auto"`` (the kernels accumulate
in float32).

Under ``torch.compile`` the dispatch traces into the caller's graph (no graph break, ``fullgraph=True`` works): while
dynamo traces, :func:`call_kernel` passes the ``"auto"`` flag to the kernel's autograd function through a plain dict
(dynamo cannot trace a ``ContextVar``); in eager mode through a ``ContextVar`` and the dict, so that a kernel forward
that dynamo compiles on its own (after a graph break inside the kernel call) still sees the caller's ``impl``.

Errors subclass :class:`entrotrain.errors.EntrotrainError` (a ``ValueError``); ``entrotrain.errors`` is the only
other entrotrain module this package imports (a leaf module with no imports of its own).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from typing import Literal, TypeVar

import torch

from entrotrain.errors import EntrotrainError

__all__ = [
    "IMPL_ENV",
    "Impl",
    "KernelUnavailableError",
    "call_kernel",
    "can_run_triton",
    "check_kernel_inputs",
    "fallback_allowed",
    "kernel_backward",
    "on_device",
    "require_triton",
    "resolve_impl",
    "triton_available",
    "triton_interpret",
]

IMPL_ENV = "ENTROTRAIN_IMPL"
Impl = Literal["auto", "torch", "triton"]
_CHOICES = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelUnavailableError(EntrotrainError):
    """``impl="triton"`` was asked for where no Triton kernel can run."""


#: Answers looked up once per process. A plain dict, not ``functools.lru_cache``: these run where ``torch.compile``
#: may trace them (a path's dispatch), and dynamo warns about and graph-breaks on ``lru_cache``-wrapped functions.
_ONCE: dict[str, bool] = {}


def _constant_under_compile(fn: Callable[..., T]) -> Callable[..., T]:
    """Mark ``fn`` as a constant for ``torch.compile``: dynamo calls it while tracing and keeps the answer.

    What :func:`torch.compiler.assume_constant_result` sets (torch 2.3 to 2.15), without importing ``torch._dynamo``
    at import time (seconds). For facts of the process that the traced code only reads: the environment, whether
    triton is installed. Dynamo of torch 2.3 cannot trace them (``os.environ.get`` of an unset variable raised
    ``InternalTorchDynamoError: b'ENTROTRAIN_IMPL'``, ``importlib.util.find_spec`` is a skipped function), so every
    compiled call of a dispatched function failed there; newer dynamo traces them to the same constant, no guard.
    """
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_constant_under_compile
def _triton_installed() -> bool:
    """Whether a ``triton`` package is on the path (looked up once; nothing imported)."""
    found = _ONCE.get("installed")
    if found is None:
        found = _ONCE["installed"] = importlib.util.find_spec("triton") is not None
    return found


#: The oldest triton the kernels compile with. Triton 2.3.1 (what PyPI's torch 2.3.1 pins) rejects them ("arange's
#: arguments must be of type tl.constexpr"); 3.6 and 3.9 are tested. An older triton counts as absent.
MIN_TRITON = (3, 0)
#: Set when the installed triton imports but is older than :data:`MIN_TRITON`: its version, for the error message.
_TOO_OLD: dict[str, str] = {}


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: ``"2.3.1"`` -> (2, 3); unreadable parts count as 0."""
    parts = [int(p) if p.isdigit() else 0 for p in version.split("+")[0].split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _triton_imports() -> bool:
    if not _triton_installed():
        return False
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # a broken install (missing driver libraries, ...) counts as absent
        return False
    version = str(getattr(triton, "__version__", "0"))
    if _release(version) < MIN_TRITON:
        _TOO_OLD["version"] = version
        return False
    return True


def _not_available() -> str:
    """Why ``triton_available()`` is False, and the fix."""
    if "version" in _TOO_OLD:
        return (
            f"triton {_TOO_OLD['version']} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest the kernels "
            "compile with (torch < 2.4 pins triton 2.x); upgrade torch and triton together, e.g. "
            "`pip install -U torch 'entrotrain[triton]'`"
        )
    return "triton is not installed (or does not import); install it with `pip install entrotrain[triton]`"


@_constant_under_compile
def triton_available() -> bool:
    """Whether ``triton`` is installed, imports and is at least :data:`MIN_TRITON` (checked once, lazily)."""
    found = _ONCE.get("imports")
    if found is None:
        found = _ONCE["imports"] = _triton_imports()
    return found


def triton_interpret() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read by triton when a kernel is defined)."""
    return _env("TRITON_INTERPRET") in ("1", "true", "yes", "on")


@_constant_under_compile
def _env(name: str) -> str:
    """The environment variable ``name``, stripped and lower-cased (``""`` when unset); a constant under compile."""
    return os.environ.get(name, "").strip().lower()


def _why_not(tensors: tuple[torch.Tensor | None, ...]) -> str | None:
    """``None`` when a Triton kernel can run on ``tensors``, else the reason and the fix."""
    # Decide from cheap facts first: importing triton here (where no kernel will run) would fix its interpreter mode
    # for the whole process before TRITON_INTERPRET could be set (triton reads it when triton.language is imported).
    not_installed = "triton is not installed (or does not import); install it with `pip install entrotrain[triton]`"
    if not _triton_installed():
        return not_installed
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    floats = [t for t in present if t.is_floating_point()]
    bad = sorted({str(t.dtype) for t in floats if t.dtype not in _KERNEL_DTYPES})
    if bad:
        return (
            f"the Triton kernels take float32, bfloat16 or float16 inputs, got {', '.join(bad)}; "
            "use impl='torch' (float64 stays on the torch path) or cast the inputs"
        )
    devices = {t.device.type for t in present}
    if devices <= {"cuda"}:
        if present and not torch.cuda.is_available():  # pragma: no cover - a CUDA tensor implies CUDA
            return "CUDA is not available"
        return None if triton_available() else _not_available()
    if triton_interpret() and devices <= {"cpu"}:
        return None if triton_available() else _not_available()
    where = ", ".join(sorted(devices))
    return (
        f"the tensors are on {where}: Triton kernels run on CUDA tensors; move the tensors to CUDA, or set "
        "TRITON_INTERPRET=1 before triton is imported to run them on CPU through Triton's (slow) interpreter"
    )


def can_run_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a Triton kernel can run on these tensors here (``None`` entries are ignored)."""
    return _why_not(tensors) is None


def resolve_impl(impl: str, *tensors: torch.Tensor | None) -> Literal["torch", "triton"]:
    """Resolve ``impl`` (and the ``ENTROTRAIN_IMPL`` override) to ``"torch"`` or ``"triton"`` for ``tensors``.

    Args:
        impl: ``"auto"``, ``"torch"`` or ``"triton"``.
        tensors: the inputs the kernel would read (``None`` allowed, e.g. an absent mask).

    Raises:
        KernelUnavailableError: ``"triton"`` (asked for or set in ``ENTROTRAIN_IMPL``) cannot run here; the message
            says why and how to fix it.
        EntrotrainError: an unknown ``impl`` or ``ENTROTRAIN_IMPL`` value.
    """
    if impl not in _CHOICES:
        raise EntrotrainError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}.")
    env = _env(IMPL_ENV)
    source = "impl"
    if env:
        if env not in _CHOICES:
            raise EntrotrainError(f"{IMPL_ENV} must be 'auto', 'torch' or 'triton', got {env!r}; unset it or fix it.")
        impl, source = env, IMPL_ENV
    if impl == "torch":
        return "torch"
    why = _why_not(tensors)
    if impl == "triton":
        if why is not None:
            raise KernelUnavailableError(f"{source}='triton' cannot run here: {why}. Or use impl='auto' / 'torch'.")
        return "triton"
    return "triton" if why is None else "torch"


def require_triton() -> None:
    """Raise :class:`KernelUnavailableError` (with the fix) when ``triton`` cannot be imported.

    Under ``TRITON_INTERPRET=1`` it also makes triton 3.6's interpreter work with NumPy >= 2.4
    (:mod:`entrotrain.kernels._interpreter_compat`).
    """
    if not triton_available():
        raise KernelUnavailableError(f"the Triton kernels need triton: {_not_available()}; or use impl='torch'.")
    if triton_interpret():  # the kernels are about to be defined interpreted: fix triton 3.6's interpreter first
        importlib.import_module("triton.runtime.interpreter")  # what the first interpreted @triton.jit imports
        from entrotrain.kernels._interpreter_compat import patch_interpreter_index

        patch_interpreter_index()


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s CUDA device the current one while a kernel launches (a no-op off CUDA).

    Triton compiles for and launches on ``torch.cuda.current_device()``, whatever device the pointers are on: a model on
    ``cuda:1`` in a process that never called ``torch.cuda.set_device(1)`` would run its kernels on ``cuda:0``. (The
    backward needs no such guard: autograd runs it on a thread whose current device is the tensors'.)
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_kernel_inputs(*tensors: torch.Tensor | None) -> None:
    """Raise :class:`KernelUnavailableError` when a Triton kernel cannot run on ``tensors`` (as ``resolve_impl``)."""
    why = _why_not(tensors)
    if why is not None:
        raise KernelUnavailableError(f"the Triton kernel cannot run here: {why}.")


T = TypeVar("T")

#: Kernels that failed under ``impl="auto"`` in this process (name -> error): they are not tried again.
_FAILED: dict[str, str] = {}
#: Set by :func:`call_kernel` while an ``impl="auto"`` kernel runs its forward in eager mode: the kernel's autograd
#: function reads it (:func:`fallback_allowed`) so that its backward may fall back too.
_AUTO: ContextVar[bool] = ContextVar("entrotrain_kernel_auto", default=False)
#: The same flag for code that dynamo traces (``torch.compile``), set by every :func:`call_kernel`, traced or eager:
#: dynamo cannot trace ``ContextVar.get`` / ``.set`` (a graph break each; ``fullgraph=True`` raises), but it traces
#: a dict's items (guarding on them) and replays their writes when the compiled code runs. One per process: a
#: compiled kernel forward on one thread could read another thread's flag (tracing runs on one thread).
_TRACED_AUTO: dict[str, bool] = {"auto": False}


def fallback_allowed() -> bool:
    """Whether the kernel forward now running was chosen by ``impl="auto"`` (its backward may then fall back).

    While dynamo traces, the flag in ``_TRACED_AUTO``: set by a :func:`call_kernel` traced with the forward, or by
    one that runs eagerly while dynamo compiles the kernel's forward on its own (a graph break inside the kernel
    call makes dynamo skip :func:`call_kernel`'s frame, whose ``try`` block it cannot resume). In eager mode, the
    ``ContextVar`` of the eager :func:`call_kernel` running in this context.
    """
    if torch.compiler.is_compiling():
        return _TRACED_AUTO["auto"]
    return _AUTO.get()


def _failed(name: str, error: Exception, where: str) -> str:
    return f"the Triton {name} kernel failed{where} ({error!r})"


def _switch_off(name: str, error: Exception, where: str, stacklevel: int) -> None:
    _FAILED[name] = repr(error)
    warnings.warn(
        f"entrotrain: {_failed(name, error, where)}; using the torch path (same result) for the rest of this run. "
        f"Please report it; set {IMPL_ENV}=torch to skip the kernels.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _unavailable(name: str, error: Exception, where: str) -> KernelUnavailableError:
    return KernelUnavailableError(
        f"{_failed(name, error, where)}; use impl='auto' (falls back to the torch path with a warning) or "
        f"impl='torch', or unset {IMPL_ENV}=triton."
    )


def call_kernel(name: str, impl: str, kernel: Callable[[], T], fallback: Callable[[], T]) -> T:
    """Run ``kernel()`` (after :func:`resolve_impl` chose Triton); under ``impl="auto"`` a kernel that fails to import,
    compile or launch is switched off for the rest of the process, with one warning, and ``fallback()`` (the torch
    path, same result) runs instead (its backward likewise: :func:`kernel_backward`). An explicit ``"triton"``
    (argument or ``ENTROTRAIN_IMPL``) raises :class:`KernelUnavailableError` naming the error; running out of GPU
    memory (the torch path would need more) and :class:`EntrotrainError` (bad input) propagate as they are.
    """
    explicit = (_env(IMPL_ENV) or impl) != "auto"
    if name in _FAILED and not explicit:
        return fallback()
    # Under torch.compile: no ContextVar (dynamo breaks the graph on it), the dict only. In eager mode both: a frame
    # below this one may be compiled (a graph break inside the try block below makes dynamo run this frame eagerly
    # and compile the kernel's own frames), and there fallback_allowed() can read the dict only.
    traced = torch.compiler.is_compiling()
    token, _TRACED_AUTO["auto"] = _TRACED_AUTO["auto"], not explicit
    context = None if traced else _AUTO.set(not explicit)
    try:
        return kernel()
    except (torch.cuda.OutOfMemoryError, EntrotrainError):
        raise
    except Exception as error:  # noqa: BLE001 - any compile / launch failure of an optional accelerator
        if explicit:
            raise _unavailable(name, error, "") from error
        _switch_off(name, error, "", stacklevel=4)
    finally:
        _TRACED_AUTO["auto"] = token
        if context is not None:
            _AUTO.reset(context)
    return fallback()


def kernel_backward(name: str, allowed: bool, kernel: Callable[[], T], fallback: Callable[[], T]) -> T:
    """Run a kernel's backward ``kernel()``; when it fails to compile or launch and its forward ran under
    ``impl="auto"`` (``allowed``, from :func:`fallback_allowed` at forward time), switch the kernel off as
    :func:`call_kernel` does (one warning) and return ``fallback()``: the same gradients through the torch path.
    Otherwise raise :class:`KernelUnavailableError` naming the error (out-of-memory propagates as it is).
    """
    if allowed and name in _FAILED:
        return fallback()
    try:
        return kernel()
    except (torch.cuda.OutOfMemoryError, EntrotrainError):
        raise
    except Exception as error:  # noqa: BLE001
        if not allowed:
            raise _unavailable(name, error, " in backward") from error
        _switch_off(name, error, " in backward", stacklevel=3)
        return fallback()
