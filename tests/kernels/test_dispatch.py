"""``entrotrain.kernels.dispatch``: impl resolution, the environment override, clear errors, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.kernels import dispatch
from entrotrain.kernels.dispatch import KernelUnavailableError, resolve_impl
from tests.helpers.torch_release import needs_torch


def test_torch_is_always_torch():
    x = torch.zeros(2, 3)
    assert resolve_impl("torch", x) == "torch"
    assert resolve_impl("torch", x.double()) == "torch"


def test_unknown_impl_raises():
    with pytest.raises(EntrotrainError, match="impl must be"):
        resolve_impl("cuda", torch.zeros(1))


def test_cpu_without_interpreter_falls_back_or_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 3)
    assert resolve_impl("auto", x) == "torch"
    assert not dispatch.can_run_triton(x)
    with pytest.raises(KernelUnavailableError) as err:
        resolve_impl("triton", x)
    message = str(err.value)
    if dispatch._triton_installed():  # any version: the device is the first reason
        assert "CUDA" in message and "TRITON_INTERPRET=1" in message
    else:
        assert "entrotrain[triton]" in message


def test_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(dispatch, "_TOO_OLD", {})  # not installed, rather than too old
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 3)
    assert resolve_impl("auto", x) == "torch"
    with pytest.raises(KernelUnavailableError, match=r"pip install entrotrain\[triton\]"):
        resolve_impl("triton", x)
    with pytest.raises(KernelUnavailableError, match=r"entrotrain\[triton\]"):
        dispatch.require_triton()
    assert issubclass(KernelUnavailableError, ValueError)


def test_float64_stays_on_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", torch.zeros(3, dtype=torch.float64)) == "torch"
    with pytest.raises(KernelUnavailableError, match="float64"):
        resolve_impl("triton", torch.zeros(3, dtype=torch.float64))


def test_interpreter_selects_triton_on_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    mask = torch.ones(2, 3, dtype=torch.bool)  # non-float tensors do not veto
    assert resolve_impl("auto", x, None, mask) == "triton"
    assert resolve_impl("triton", x, None, mask) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", x) == "torch"


def test_environment_override(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 3)
    monkeypatch.setenv("ENTROTRAIN_IMPL", "torch")
    assert resolve_impl("triton", x) == "torch"
    assert resolve_impl("auto", x) == "torch"
    monkeypatch.setenv("ENTROTRAIN_IMPL", "triton")
    assert resolve_impl("torch", x) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelUnavailableError, match="ENTROTRAIN_IMPL='triton'"):
        resolve_impl("auto", x)
    monkeypatch.setenv("ENTROTRAIN_IMPL", "fast")
    with pytest.raises(EntrotrainError, match="ENTROTRAIN_IMPL must be"):
        resolve_impl("auto", x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_select_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 3, device="cuda")
    expected = "triton" if dispatch.triton_available() else "torch"
    assert resolve_impl("auto", x) == expected
    mixed = torch.zeros(2, 3)
    assert resolve_impl("auto", x, mixed) == "torch"  # a CPU tensor among CUDA ones: no kernel


def test_import_entrotrain_imports_no_kernel():
    code = (
        "import sys, entrotrain, entrotrain.functional\n"
        "print(any(m == 'entrotrain.kernels' or m.startswith('entrotrain.kernels.') for m in sys.modules))\n"
        "import entrotrain.kernels\n"
        "print('entrotrain.kernels.logits_entropy' in sys.modules, 'triton' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]


def test_call_kernel_marks_only_an_auto_kernel_call_for_the_backward_fallback(monkeypatch):
    """The kernel's autograd function reads fallback_allowed() in its forward: True inside an impl='auto' kernel
    call only (not in the torch fallback, not under an explicit 'triton', not after the call)."""
    seen = []

    def kernel():
        seen.append(("kernel", dispatch.fallback_allowed()))
        raise RuntimeError("boom")

    def fallback():
        seen.append(("fallback", dispatch.fallback_allowed()))
        return 1

    monkeypatch.setattr(dispatch, "_FAILED", {})
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)
    with pytest.warns(RuntimeWarning, match="the Triton k kernel failed .*boom"):
        assert dispatch.call_kernel("k", "auto", kernel, fallback) == 1
    assert seen == [("kernel", True), ("fallback", False)] and not dispatch.fallback_allowed()
    seen.clear()
    with pytest.raises(KernelUnavailableError, match="the Triton k2 kernel failed .*boom.*impl='auto'"):
        dispatch.call_kernel("k2", "triton", kernel, fallback)
    assert seen == [("kernel", False)] and "k2" not in dispatch._FAILED


def test_call_kernel_and_fallback_allowed_trace_under_torch_compile_fullgraph(monkeypatch):
    """Under torch.compile the dispatch and a kernel's autograd function (fallback_allowed() in its forward,
    kernel_backward in its backward) trace into one graph: dynamo graph-breaks on ContextVar.get / .set, which
    call_kernel and fallback_allowed used (fullgraph=True raised Unsupported). The flag still reaches the forward:
    True inside an impl='auto' call, False inside an explicit 'triton' one and after either."""
    monkeypatch.setattr(dispatch, "_FAILED", {})
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.fallback = dispatch.fallback_allowed()
            return x * (2.0 if ctx.fallback else 3.0)

        @staticmethod
        def backward(ctx, g):
            return dispatch.kernel_backward("twice", ctx.fallback, lambda: g * 5.0, lambda: g * 7.0)

    def run(x, impl):
        y = dispatch.call_kernel("twice", impl, lambda: Twice.apply(x), lambda: x * 11.0)
        return y, dispatch.fallback_allowed()

    compiled = torch.compile(run, backend="eager", fullgraph=True)
    for impl, factor in (("auto", 2.0), ("triton", 3.0)):
        x = torch.ones(3, requires_grad=True)
        y, after = compiled(x, impl)
        assert torch.equal(y, torch.full((3,), factor)) and after is False
        y.sum().backward()
        assert torch.equal(x.grad, torch.full((3,), 5.0))
    assert not dispatch.fallback_allowed() and dispatch._TRACED_AUTO == {"auto": False}


def test_a_triton_older_than_the_kernels_floor_counts_as_absent(monkeypatch):
    """PyPI's torch 2.3.1 pins triton 2.3.1, which cannot compile the kernels ("arange's arguments must be of type
    tl.constexpr"): impl='auto' tried them, warned and fell back on every run, and impl='triton' failed at compile.
    An older triton is now absent: 'auto' takes the torch path silently, 'triton' names the version and the fix."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "2.3.1")
    monkeypatch.setattr(dispatch, "_ONCE", {})
    monkeypatch.setattr(dispatch, "_TOO_OLD", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)
    x = torch.zeros(2, 3)
    assert resolve_impl("auto", x) == "torch" and not dispatch.triton_available()
    with pytest.raises(KernelUnavailableError, match=r"triton 2\.3\.1 is older than 3\.0.*pip install -U torch"):
        resolve_impl("triton", x)
    with pytest.raises(KernelUnavailableError, match=r"triton 2\.3\.1 is older than 3\.0"):
        dispatch.require_triton()


def test_release_reads_major_and_minor():
    assert dispatch._release("2.3.1") == (2, 3) and dispatch._release("3.9.0+git1a2b") == (3, 9)
    assert dispatch._release("3") == (3, 0) and dispatch._release("dev") == (0, 0)


def test_resolve_impl_traces_from_a_cold_cache_under_torch_compile_fullgraph(monkeypatch):
    """Dynamo of torch 2.3 could not trace ``os.environ.get`` of an unset variable (``InternalTorchDynamoError:
    b'ENTROTRAIN_IMPL'``) nor ``importlib.util.find_spec`` (a skipped function): every compiled call of a dispatched
    function failed there (measured on 2.3.1). The readers are constants under compile; the answer is eager's."""
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_ONCE", {})  # the first find_spec("triton") / import is traced too

    def run(x):
        return x * (2.0 if resolve_impl("auto", x) == "torch" else 3.0)

    torch._dynamo.reset()
    x = torch.ones(3)
    assert torch.equal(torch.compile(run, backend="eager", fullgraph=True)(x), run(x))


def test_the_compile_constants_carry_what_assume_constant_result_sets():
    """dispatch marks its environment / triton readers as torch.compiler.assume_constant_result does, without importing
    torch._dynamo at import time: the marker must stay the one torch reads."""

    def probe() -> int:
        return 0

    assert torch.compiler.assume_constant_result(probe) is probe and vars(probe)
    for fn in (dispatch._env, dispatch._triton_installed, dispatch.triton_available):
        assert {k: getattr(fn, k, None) for k in vars(probe)} == vars(probe), fn.__name__


@needs_torch(2, 4, "dynamo 2.3 cannot trace the chunked autograd.Function's forward whole (Unsupported method)")
def test_default_impl_entry_points_trace_under_torch_compile_without_a_graph_break(monkeypatch):
    """entropy_from_logits, linear_entropy_and_logprobs and attention_entropy with impl='auto' (the default) inside
    torch.compile(fullgraph=True) on CPU: resolve_impl, the ENTROTRAIN_IMPL read and the once-per-process triton
    lookup trace (the torch path runs here; on CUDA the kernels' call_kernel does, see the test above). Same values
    as eager. attention_entropy's path='auto' picks 'fused' on CPU, which reads float(k.sum()) to route non-finite
    keys (a data-dependent graph break of its own), so the chunked path is named here."""
    from entrotrain.functional import attention_entropy, entropy_from_logits, linear_entropy_and_logprobs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)
    monkeypatch.setattr(dispatch, "_ONCE", {})  # the first call's find_spec("triton") is traced too
    g = torch.Generator().manual_seed(0)
    z, h, w = torch.randn(4, 10, generator=g), torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    q, k = torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g)
    calls = [
        (lambda z: entropy_from_logits(z), (z,)),
        (lambda h, w: linear_entropy_and_logprobs(h, w).entropy, (h, w)),
        (lambda q, k: attention_entropy(q, k, path="chunked"), (q, k)),
    ]
    for fn, args in calls:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, backend="eager", fullgraph=True)(*args), fn(*args))


def test_a_graph_break_inside_an_auto_kernel_call_under_torch_compile_keeps_the_backward_fallback(monkeypatch):
    """A graph break inside call_kernel's try block (here a forced one in the kernel) makes dynamo run call_kernel
    eagerly and compile the kernel's forward on its own: there fallback_allowed() read the traced flag, which only a
    traced call_kernel set (False), so a backward that failed raised instead of falling back. The backward now sees
    the caller's impl: 'auto' falls back (one warning), 'triton' still raises."""
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.fallback = dispatch.fallback_allowed()
            return x * 2.0

        @staticmethod
        def backward(ctx, g):
            def launch():
                raise RuntimeError("launch failed")

            return dispatch.kernel_backward("twice-gb", ctx.fallback, launch, lambda: g * 7.0)

    def kernel(x):
        torch._dynamo.graph_break()
        return Twice.apply(x)

    def run(x, impl):
        return dispatch.call_kernel("twice-gb", impl, lambda: kernel(x), lambda: x * 11.0)

    torch._dynamo.reset()
    compiled = torch.compile(run, backend="eager")
    for impl in ("auto", "triton"):
        monkeypatch.setattr(dispatch, "_FAILED", {})
        x = torch.ones(3, requires_grad=True)
        y = compiled(x, impl)
        assert torch.equal(y, torch.full((3,), 2.0))
        if impl == "auto":
            with pytest.warns(RuntimeWarning, match="twice-gb kernel failed in backward"):
                y.sum().backward()
            assert torch.equal(x.grad, torch.full((3,), 7.0))
        else:
            with pytest.raises(KernelUnavailableError, match="twice-gb kernel failed in backward"):
                y.sum().backward()
    assert not dispatch.fallback_allowed() and dispatch._TRACED_AUTO == {"auto": False}
