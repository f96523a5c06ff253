"""Finding (session 27): a ``reduce_lr`` / ``rollback`` guard's lowered rate faded away under a cosine schedule with a
floor. ``CosineAnnealingLR`` and ``CosineAnnealingWarmRestarts`` decay towards ``eta_min``, which was not lowered: the
halved rate went back up to the unhalved one as the cosine approached its floor (ratio 0.5 right after the firing,
0.985 at the end of the schedule). Now ``eta_min`` is lowered with the rates, as ``OneCycleLR``'s ``min_lr``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, SequentialLR, LinearLR

from entrotrain.callbacks import EntropyCollapseGuard


def _rates(make, reduce_at: int | None, steps: int = 30) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make(optimizer)
    guard = EntropyCollapseGuard("k", threshold=0.1, action="reduce_lr", lr_factor=0.5)
    rates = []
    for step in range(steps):
        if step == reduce_at:
            assert guard.reduce_lr([optimizer], [scheduler])
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("make", [
    lambda opt: CosineAnnealingLR(opt, T_max=20, eta_min=0.2),
    lambda opt: CosineAnnealingWarmRestarts(opt, 10, eta_min=0.2),
    lambda opt: SequentialLR(opt, [LinearLR(opt, 0.5, 1.0, total_iters=2), CosineAnnealingLR(opt, 20, eta_min=0.2)],
                             milestones=[2]),
], ids=["cosine", "warm_restarts", "sequential_cosine"])
def test_a_lowered_rate_stays_lowered_down_to_the_cosine_floor(make) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, reduced = _rates(make, None), _rates(make, 3)
    assert reduced[:3] == plain[:3]
    assert reduced[3:] == pytest.approx([0.5 * rate for rate in plain[3:]], rel=1e-9)


def test_a_cosine_floor_a_collapse_guard_lowered_is_not_a_change(tmp_path, capsys, monkeypatch) -> None:
    """The lowered ``eta_min`` is saved with the scheduler: a resume with :class:`ResumeWithChanges` must not take
    it for a changed setting (a fork that would put the configured floor back and undo the guard's action)."""
    from entrotrain.callbacks.resume_with_changes import ResumeWithChanges
    from tests.callbacks.resume_changes_run import Net
    from tests.callbacks.test_resume_with_changes_findings import _fit_guarded, _guard_lowered_parent

    def cosine(self, optimizer):
        return {"scheduler": CosineAnnealingLR(optimizer, T_max=8, eta_min=0.002), "interval": "step"}

    monkeypatch.setattr(Net, "scheduler", cosine)
    ckpt = _guard_lowered_parent(tmp_path / "parent")
    assert torch.load(ckpt, weights_only=False)["lr_schedulers"][0]["eta_min"] == pytest.approx(0.001)
    callback = ResumeWithChanges()
    _fit_guarded(tmp_path / "again", Net(), callback, ckpt=ckpt, max_steps=6)
    assert callback.plan is None and "changed configuration" not in capsys.readouterr().out
