"""Which training batches a monitor captures: every micro-batch of the optimizer steps ``0, n, 2n, ...``."""

from __future__ import annotations

__all__ = ["LoggingWindow"]


class LoggingWindow:
    """The gradient-accumulation window of one logging optimizer step.

    A monitor calls :meth:`begin` at each training batch start and :meth:`end` at each batch end; captures of all the
    micro-batches of a logging step add up, and the step is flushed once the optimizer has stepped.

    Steps are optimizer steps (``trainer.global_step``, which Lightning advances once per optimizer stepped). With
    ``k`` optimizers stepped in each batch (manual optimisation, GAN style) a batch spans steps ``s .. s + k - 1`` and
    logs when its first step ``s`` is a multiple of ``n``: every lcm(n, k) optimizer steps, i.e. every lcm(n, k) / k
    batches (two optimizers: every batch for n = 2, every 3rd batch for n = 3, every 2nd for n = 4).
    :class:`~entrotrain.callbacks.SigmaReparamMonitor` follows the same rule, so monitors with the same ``n`` log at
    the same batches; Lightning's logger step is the batch count.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self.step: int | None = None  # the logging step whose micro-batches are being captured

    def begin(self, global_step: int) -> bool | None:
        """``None``: not a logging step (capture nothing); ``True``: its first micro-batch (reset the capture);
        ``False``: a later micro-batch of the same step (keep adding)."""
        if global_step % self.every_n_steps:
            return None
        first = self.step != global_step
        self.step = global_step
        return first

    def end(self, global_step: int) -> int | None:
        """The completed logging step once the optimizer has stepped past it (the window closes), else ``None``."""
        if self.step is None or global_step <= self.step:
            return None
        step, self.step = self.step, None
        return step

    @property
    def open(self) -> bool:
        return self.step is not None

    def close(self) -> None:
        self.step = None
