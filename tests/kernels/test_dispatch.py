"""``entrotrain.kernels.dispatch``: impl resolution, the environment override, clear errors, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.kernels import dispatch
from entrotrain.kernels.dispatch import KernelUnavailableError, resolve_impl


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
    if dispatch.triton_available():
        assert "CUDA" in message and "TRITON_INTERPRET=1" in message
    else:
        assert "entrotrain[triton]" in message


def test_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
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
