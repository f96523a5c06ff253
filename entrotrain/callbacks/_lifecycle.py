"""The per-fit lifecycle every entrotrain callback keeps (DESIGN.md §8): fresh state at each ``fit``, restored state
on resume."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from entrotrain.callbacks._publish import reset_ledger

__all__ = ["PerFitCallback"]


class PerFitCallback(Callback):
    """A callback whose per-fit state is reset at the start of every ``fit``.

    The reset runs in ``setup(stage="fit")``, not in ``on_fit_start``: on a resume from ``ckpt_path`` Lightning calls
    ``load_state_dict`` between the two, so a reset in ``on_fit_start`` would wipe the restored state. The trainer's
    metric ledger is cleared at the same point (the previous fit's publications are not this fit's). Subclasses
    implement :meth:`_reset_fit_state` and, for what a resume needs, ``state_dict`` / ``load_state_dict``; one that
    overrides ``setup`` calls ``super().setup(...)`` first.
    """

    def _reset_fit_state(self) -> None:
        raise NotImplementedError

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset_fit_state()
            reset_ledger(trainer)
