"""PredictionEntropyMonitor on HF causal LMs outside Lightning (the driver shared by ``EntropyTrainerCallback`` and
``EntropyMonitors``): unshifted ``labels = input_ids`` with ``shift_labels=False`` is warned about (it scored each
position against its own token, silently), and TRL's fused-LM-head forward (``fused_lm_head=True``, TRL 1.16's
SFT / GRPO / RLOO / DPO trainers)
is refused with one error naming it (before: source='output' said "use source='head'" and source='head' said "use
source='output'")."""

from __future__ import annotations

import warnings

import pytest
import torch

from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
from entrotrain.errors import TapError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.tiny_hf_lms import padded_rows, stack_rows, tiny_gpt2_lm

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _one_step(model: torch.nn.Module, monitor: PredictionEntropyMonitor, **extra) -> dict[str, float]:
    batch = stack_rows(padded_rows(4, 16, 8))
    monitors = EntropyMonitors([monitor], every_n_steps=1)
    with monitors.watch(model):
        with monitors.step(0):
            model(**batch, **extra).loss.backward()
    return monitors.logs


def test_unshifted_causal_lm_labels_are_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel is a causal LM .*shift_labels=True"):
        _one_step(tiny_gpt2_lm(16, 8), PredictionEntropyMonitor(print_summary=False))


def test_unshifted_labels_warning_names_the_compiled_models_class() -> None:
    """Under ``TrainingArguments(torch_compile=True)`` the model the callback sees is an ``OptimizedModule``: the
    warning names the model inside (it read "OptimizedModule is a causal LM")."""
    model = torch.compile(tiny_gpt2_lm(16, 8), backend="eager")
    with pytest.warns(UserWarning, match=r": GPT2LMHeadModel is a causal LM"):
        _one_step(model, PredictionEntropyMonitor(print_summary=False))


def test_shifted_labels_no_warning_and_nll_is_the_models_loss() -> None:
    model = tiny_gpt2_lm(16, 8)
    batch = stack_rows(padded_rows(4, 16, 8))
    with torch.no_grad():
        loss = float(model(**batch).loss)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*shift_labels.*")
        logs = _one_step(model, PredictionEntropyMonitor(shift_labels=True, print_summary=False))
    assert logs["entropy/pred/train/nll"] == pytest.approx(loss, rel=1e-6)


def test_fused_lm_head_forward_is_refused_by_name() -> None:
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    for source in ("output", "head"):
        model = tiny_gpt2_lm(16, 8)
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        monitor = PredictionEntropyMonitor(source=source, head="lm_head", shift_labels=True, print_summary=False)
        with pytest.raises(TapError, match=r"fused_lm_head=True .* neither source='output' nor source='head'"):
            _one_step(model, monitor, fused_lm_head=True)
