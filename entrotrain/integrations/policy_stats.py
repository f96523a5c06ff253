r"""PolicyEntropyMonitor's statistics for trainers that are not Lightning (TRL's GRPOTrainer, a custom loop).

Glue only (DESIGN.md §8, one implementation per statistic): the statistics, the ΔH prediction and the
``R = -a·e^H + b`` fit are computed by :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`'s own code,
on the union of the micro-batches of one logging step over all ranks, under the same keys (``entropy/policy/...``).
Imports neither TRL nor transformers.

::

    stats = PolicyStatsRecorder(agg="seq-mean-token-mean")
    for micro_batch in step:                      # on a step that logs
        stats.add(entropy, logprobs, advantages, mask, rewards=rewards, temperature=1.0)
    logs.update(stats.compute(step_index))        # every rank calls it (under DDP: one small exchange, one
                                                  # all_gather per tensor)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_tensor, token_mask
from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor, _cat_padded, gather_union
from entrotrain.dashboards.run_record import RecordArray
from entrotrain.errors import EntrotrainError
from entrotrain.functional._dist import world

__all__ = ["PolicyStatsRecorder"]


class PolicyStatsRecorder:
    r"""PolicyEntropyMonitor's statistics for a trainer that is not Lightning: glue around the monitor's own code.

    Holds a :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor` (its ΔH pairs, fit points, non-finite
    counter and first/last values) and feeds it the per-token tensors of one logging step. :meth:`add` keeps a
    micro-batch (detached); :meth:`compute` gathers the step's micro-batches over ranks (a collective: every rank
    calls it) and returns the prefixed, finite statistics.

    Args:
        agg, top_fraction, cov_top_fraction, fit_min_points, prefix, window, window_align, hwe_threshold,
            entropy_length_corr, agg_max_length: as :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`.
    """

    _FILL = {"entropy": 0.0, "logprobs": 0.0, "advantages": 0.0, "mask": False}

    def __init__(
        self,
        agg: str = "token-mean",
        top_fraction: float = 0.2,
        cov_top_fraction: float = 0.02,
        fit_min_points: int = 5,
        prefix: str = "entropy/policy/",
        window: int | None = None,
        window_align: str = "forward",
        hwe_threshold: float = 1.5,
        entropy_length_corr: bool = False,
        agg_max_length: int | None = None,
    ) -> None:
        self._feed(PolicyEntropyMonitor(
            every_n_batches=1, agg=agg, top_fraction=top_fraction, cov_top_fraction=cov_top_fraction,
            fit_min_points=fit_min_points, log_media=False, prefix=prefix, print_summary=False, window=window,
            window_align=window_align, hwe_threshold=hwe_threshold, entropy_length_corr=entropy_length_corr,
            agg_max_length=agg_max_length,
        ))  # fmt: skip

    def _feed(self, monitor: PolicyEntropyMonitor) -> None:
        """Feed ``monitor``, with nothing captured yet (the one initialiser of :meth:`__init__` and :meth:`of`)."""
        self.monitor = monitor
        self._parts: list[dict[str, Tensor]] = []
        self._added = 0  # add() calls since the last compute / clear (micro-batches of the step, refused ones too)
        self._refusal: str | None = None  # the first add() of the step refused under torch.distributed (2+ ranks)
        self.temperature: float | None = None
        #: The run record's arrays of the last :meth:`compute` (the token-entropy histogram), as the monitor stores.
        self.last_arrays: list[RecordArray] = []
        #: How the tensors come in, and where, for the error of ranks that did not hand the same tensors over.
        self.handed_with, self.where = "PolicyStatsRecorder.add()", ""

    @classmethod
    def of(cls, monitor: PolicyEntropyMonitor) -> PolicyStatsRecorder:
        """A recorder feeding ``monitor`` itself (its settings, history, summary and ``state_dict``), e.g. a monitor
        configured for Lightning and driven from a plain loop."""
        if not isinstance(monitor, PolicyEntropyMonitor):
            raise EntrotrainError(f"PolicyStatsRecorder.of needs a PolicyEntropyMonitor, got {type(monitor).__name__}.")
        recorder = cls.__new__(cls)
        recorder._feed(monitor)
        return recorder

    @property
    def prefix(self) -> str:
        return self.monitor.prefix

    def reset(self) -> None:
        """Forget the history and any captured micro-batch (a new training run)."""
        self.monitor._reset_fit_state()
        self.clear()

    def clear(self) -> None:
        """Drop the captured micro-batches, and a refusal of one of them waiting for :meth:`compute` (keep the
        history)."""
        self._parts, self._added, self._refusal = [], 0, None

    @property
    def pending(self) -> bool:
        """Whether a micro-batch was kept (or refused) since the last :meth:`compute` / :meth:`clear`."""
        return bool(self._parts) or self._refusal is not None

    def add(
        self,
        entropy: Tensor,
        logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        rewards: Tensor | None = None,
        temperature: float | None = None,
    ) -> None:
        """Keep one micro-batch: ``(B, T)`` entropy, log-probs, mask; advantages ``(B,)``/``(B, 1)``/``(B, T)``;
        rewards ``(B,)`` (optional; give it for every micro-batch of a step or for none).

        Raises:
            EntrotrainError: a tensor of the wrong shape, a mask that is neither bool nor 0/1, rewards not one per
                sequence, a temperature that is not a number. With one process here; under ``torch.distributed``
                with 2+ ranks at the step's :meth:`compute`, on every rank alike, naming the rank and the
                micro-batch: raised here, inside one rank's training step, it would leave the other ranks waiting in
                their next collective (the gradient all-reduce, the gather of :meth:`compute`). No collective is
                added: the refusal travels with :meth:`compute`'s exchange.
        """
        self._added += 1
        try:
            part = self._part(entropy, logprobs, advantages, mask, rewards)
            temperature = _temperature(temperature)
        except EntrotrainError as error:
            if world()[1] < 2:
                raise
            if self._refusal is None:  # the step's first refusal is the one every rank reports
                self._refusal = f"micro-batch {self._added - 1} of the step (0-based): {error}"
            return
        self._parts.append(part)
        if temperature is not None:
            self.temperature = temperature

    def _part(
        self, entropy: Tensor, logprobs: Tensor, advantages: Tensor, mask: Tensor, rewards: Tensor | None
    ) -> dict[str, Tensor]:
        """:meth:`add`'s micro-batch, checked and detached (advantages broadcast to ``(B, T)``)."""
        for name, value in (("entropy", entropy), ("logprobs", logprobs), ("advantages", advantages)):
            check_tensor(value, name)
        entropy = entropy.detach()
        if entropy.dim() != 2:
            raise EntrotrainError(f"entropy must be (B, T), got shape {tuple(entropy.shape)}.")
        adv = advantages.detach()
        if adv.dim() == 2 and adv.shape[1] == 1:
            adv = adv[:, 0]
        if adv.dim() == 1 and adv.shape[0] == entropy.shape[0]:
            adv = adv[:, None].expand_as(entropy)
        part = {
            "entropy": entropy,
            "logprobs": logprobs.detach(),
            "advantages": adv,
            # the policy code's one rule; values of a non-bool mask read here, on a logging step only
            "mask": token_mask(mask.detach(), entropy.shape, "mask", like="the entropy"),
        }
        for name, value in part.items():
            if value.shape != entropy.shape:
                b, expected = entropy.shape[0], tuple(entropy.shape)
                expected = f"({b},), ({b}, 1) or {expected}" if name == "advantages" else str(expected)
                raise EntrotrainError(f"{name} has shape {tuple(value.shape)}, expected {expected} like the entropy.")
        if rewards is not None:
            try:
                part["rewards"] = torch.as_tensor(rewards).detach().reshape(-1)
            except (TypeError, ValueError, RuntimeError) as err:
                raise EntrotrainError(
                    f"rewards must be a (B,) tensor (one reward per sequence), got {type(rewards).__name__} ({err})."
                ) from err
            if part["rewards"].numel() != entropy.shape[0]:
                raise EntrotrainError(
                    f"rewards needs one reward per sequence ({entropy.shape[0]}, the rows of the entropy), got "
                    f"{part['rewards'].numel()} values."
                )
        return part

    def compute(self, index: int) -> dict[str, float]:
        """The statistics of the captured micro-batches (all ranks' union), prefixed; finite values only; ``{}`` when
        no rank captured any. Under ``torch.distributed`` every rank calls it at the same steps, one that captured
        nothing too: the ranks exchange what each captured first
        (:func:`~entrotrain.callbacks.policy_monitor.gather_union`), and a rank that captured nothing, or no rewards,
        while another did, or whose :meth:`add` refused a micro-batch, is the same
        :class:`~entrotrain.errors.EntrotrainError` on every rank (naming the rank), not a hang.

        The monitor's own :meth:`~entrotrain.callbacks.PolicyEntropyMonitor.summarise`, as the Lightning callback
        calls it: summary, non-finite count, temperature, reward mean, ΔH, shaping statistics, the entropy–reward fit,
        first/last values."""
        parts, refused = self._parts, self._refusal
        self.clear()
        self.last_arrays = []
        if not parts and world()[1] == 1:
            return {}
        m = self.monitor
        via = self.handed_with
        with torch.no_grad():
            tensors = {k: _cat_padded([p[k] for p in parts], fill) for k, fill in self._FILL.items()} if parts else {}
            held = [i for i, p in enumerate(parts) if "rewards" in p]
            if refused is None and 0 < len(held) < len(parts):  # a reward mean and fit of part of the step: refused,
                refused = (  # never dropped
                    f"micro-batch(es) {held} of the step handed rewards= over with {via} and micro-batch(es) "
                    f"{[i for i in range(len(parts)) if i not in held]} did not; give rewards for every micro-batch "
                    "of a step or for none."
                )
            elif held:
                tensors["rewards"] = torch.cat([p["rewards"] for p in parts])

        def given(name: str) -> str:
            return f"handed tensors over with {via}" if name == "entropy" else f"handed {name}= over with {via}"

        where = f"{self.where} at step {index}"
        refusal = None
        if refused is not None:  # raised here with one process, on every rank (through the exchange) with 2+
            tensors = {}
            refusal = EntrotrainError(refused if world()[1] > 1 else f"PolicyEntropyMonitor{where}: {refused}")
        tensors = gather_union(tensors, self.temperature, given, where, refusal=refusal,
                               refused=f"refused the tensors handed over with {via}")
        if not tensors:  # no rank handed anything over
            return {}
        summary, self.last_arrays = m._summary_and_arrays(tensors, index, temperature=self.temperature, unit="step")
        return {m.prefix + k: float(v) for k, v in summary.items() if math.isfinite(float(v))}

    def summary_table(self) -> str:
        """First and last logged values and the latest fit (the Lightning monitor's table)."""
        if self.monitor.first_logged is None:
            return "policy entropy: nothing logged"
        return self.monitor.summary_table().replace("  batch ", "  step  ", 1)

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)


def _temperature(temperature: Any) -> float | None:
    """``temperature`` as a float (``None`` stays ``None``), or an :class:`~entrotrain.errors.EntrotrainError`."""
    if temperature is None:
        return None
    try:
        return float(temperature)
    except (TypeError, ValueError, RuntimeError) as err:
        got = f"a tensor of shape {tuple(temperature.shape)}" if isinstance(temperature, Tensor) else repr(temperature)
        raise EntrotrainError(f"temperature must be a number (the sampling temperature), got {got}.") from err
