"""functional._dist.gather_padded_dict in one process: the tensors as given (detached), no collective; the 2-rank
behaviour (one layout exchange, a key some ranks lack not gathered) runs in tests/callbacks/monitor_rank_join_run.py
and tests/integrations/guard_ranks_ddp_run.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from entrotrain.functional._dist import gather_padded_dict


def test_one_process_hands_the_tensors_back_without_a_collective(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a collective in one process")

    for name in ("all_gather", "all_gather_object", "all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, refuse)
    x = torch.randn(3, 4, requires_grad=True)
    seen = []
    got = gather_padded_dict({"x": x, "absent": None, "m": x > 0}, {"m": False}, extra=0.5,
                             check=lambda held, extra: seen.append((held, extra)))
    assert seen == [([frozenset({"x", "m"})], [0.5])]  # the caller's check sees this one rank
    assert got.held == [frozenset({"x", "m"})] and got.extra == [0.5]
    assert list(got.tensors) == ["x", "m"]
    assert torch.equal(got.tensors["x"], x) and not got.tensors["x"].requires_grad
    assert got.tensors["m"].dtype == torch.bool
