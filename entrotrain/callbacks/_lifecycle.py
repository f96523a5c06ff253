"""The per-fit lifecycle every entrotrain callback keeps (DESIGN.md §8): fresh state at each ``fit``, restored state
on resume."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from entrotrain.callbacks._publish import reset_ledger

__all__ = ["HookedMonitor", "PerFitCallback"]


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


class HookedMonitor(PerFitCallback):
    """A monitor that installs hooks or taps: :meth:`_release` (remove them, close the logging window) runs at fit
    end, at ``teardown`` and on an exception in any code, so no hook outlives the fit on any exit path. At fit end
    rank zero prints :meth:`summary_table` when ``print_summary`` is set and :meth:`_has_summary` says there is one.
    """

    print_summary: bool = False

    def _release(self) -> None:
        raise NotImplementedError

    def _has_summary(self) -> bool:
        """Whether anything was logged this fit (default: a non-empty ``history``)."""
        return bool(getattr(self, "history", None))

    def summary_table(self) -> str:
        raise NotImplementedError

    def _printed_summary(self) -> str | None:
        """What rank zero prints at fit end: :meth:`summary_table` when ``print_summary`` is set and
        :meth:`_has_summary`, else ``None`` (here and under the HF Trainer / loop integrations)."""
        return self.summary_table() if self.print_summary and self._has_summary() else None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()
        if trainer.is_global_zero and (table := self._printed_summary()) is not None:
            print(table)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()
