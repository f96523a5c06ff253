"""``collective_device``: the device a collective's tensors go on, by the group's backend (one function for the
rollback's shard agreement and the loop's value exchange; before, both put tensors on CUDA for ``"nccl"`` only, so an
XCCL / HCCL group got CPU tensors it cannot take)."""

from __future__ import annotations

import types

import pytest
import torch

from entrotrain.functional import _dist
from entrotrain.functional._dist import collective_device
from tests.helpers.gloo import in_one_process_group


@pytest.mark.parametrize("backend", ["gloo", "GLOO", "mpi", "cpu:gloo,cuda:nccl"])
def test_groups_gloo_serves_take_cpu_tensors(monkeypatch, backend):
    monkeypatch.setattr(_dist.dist, "get_backend", lambda group=None: backend)
    assert collective_device() == torch.device("cpu")


@pytest.mark.parametrize("backend, kind, index", [("nccl", "cuda", 1), ("xccl", "xpu", 0), ("hccl", "hpu", 3)])
def test_other_backends_take_the_current_accelerator_device(monkeypatch, backend, kind, index):
    monkeypatch.setattr(_dist.dist, "get_backend", lambda group=None: backend)
    fake = types.SimpleNamespace(current_accelerator=lambda: torch.device(kind), current_device_index=lambda: index)
    monkeypatch.setattr(torch, "accelerator", fake, raising=False)  # torch < 2.6 has none
    assert collective_device() == torch.device(kind, index)


def test_without_torch_accelerator_nccl_takes_the_current_cuda_device(monkeypatch):
    monkeypatch.setattr(_dist.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.delattr(torch, "accelerator", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert collective_device() == torch.device("cuda", 2)


def test_a_real_gloo_group_is_the_cpu():
    seen = []
    in_one_process_group(lambda: seen.append(collective_device()))
    assert seen == [torch.device("cpu")]
