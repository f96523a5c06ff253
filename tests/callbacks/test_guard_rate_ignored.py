"""A rate action on an optimizer that never reads ``lr`` (``transformers.Adafactor(relative_step=True)``): warned
about once when the guard first sees the optimizers (Lightning, the HF callback, a plain loop), never a crash at the
firing (its ``lr`` is ``None``); an optimizer whose ``lr`` scales the step (Prodigy's ``d · lr``, Adafactor with an
explicit rate) is not warned about, and lowering its ``lr`` does lower the step."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard

transformers = pytest.importorskip("transformers")
from transformers import Adafactor, Trainer, TrainingArguments  # noqa: E402
from transformers.optimization import AdafactorSchedule  # noqa: E402

from entrotrain.integrations.loop import EntropyMonitors  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402
from tests.helpers.torch_release import needs_torch  # noqa: E402

IGNORED = "Adafactor\\(relative_step=True\\).*never reads lr.*relative_step=False"


def _caught(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("action", ["reduce_lr", "rollback"])
def test_warned_once_at_the_start_for_a_rate_action_only(action: str) -> None:
    model = nn.Linear(4, 3)
    optimizer = Adafactor(model.parameters())  # relative_step=True, lr=None: its defaults
    guard = EntropyCollapseGuard("k", threshold=0.5, action=action, keep_last_good=False)
    first = _caught(lambda: guard.track(model, [optimizer]))
    assert len([m for m in first if "never reads lr" in m]) == 1
    assert any(re.search(IGNORED, m) for m in first)
    assert not [m for m in _caught(lambda: guard.track(model, [optimizer])) if "never reads lr" in m]  # once
    for quiet, opt in (("warn", optimizer), (action, Adafactor(model.parameters(), lr=1e-3, relative_step=False))):
        other = EntropyCollapseGuard("k", threshold=0.5, action=quiet, keep_last_good=False)
        assert not [m for m in _caught(lambda: other.track(model, [opt])) if "never reads lr" in m]


@pytest.mark.parametrize("action", ["reduce_lr", "rollback"])
def test_a_firing_with_lr_none_says_so_and_does_not_crash(action: str) -> None:
    """``lr`` is ``None`` in its groups: a reduction used to raise ``TypeError`` in the middle of training."""
    model = nn.Linear(4, 3)
    optimizer = Adafactor(model.parameters())
    guard = EntropyCollapseGuard("k", threshold=0.5, action=action, keep_last_good=False)
    with pytest.warns(UserWarning, match="never reads lr"):
        guard.track(model, [optimizer])
    assert guard.observe(0.9, 1) is None
    message = guard.fire(guard.observe(0.1, 2), 2, [optimizer])
    assert "o learning rate to lower (the optimizer sets its own step size: lr is None)" in message
    assert optimizer.param_groups[0]["lr"] is None and guard.lr_reductions == 0


def test_a_loop_is_warned_at_watch() -> None:
    model = nn.Linear(4, 3)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="reduce_lr", keep_last_good=False)
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    with pytest.warns(UserWarning, match=IGNORED):
        monitors.watch(model, optimizer=Adafactor(model.parameters()))
    monitors.close()


def test_hf_trainer_is_warned_at_train_begin(tmp_path: Path) -> None:
    """The HF callback tracked the optimizer for ``rollback`` only: a ``reduce_lr`` guard there lowered the rate
    an ``AdafactorSchedule`` writes for logging, silently."""
    model = tiny_gpt2_lm(48, 12, 0)
    optimizer = Adafactor(model.parameters())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=lm_rows(4, 48, 12, 1),
                      optimizers=(optimizer, AdafactorSchedule(optimizer)))
    guard = EntropyCollapseGuard("loss", threshold=1e9, mode="max", action="reduce_lr")
    EntropyTrainerCallback(guards=[guard]).attach(trainer)
    with pytest.warns(UserWarning, match=IGNORED):
        trainer.train()


def test_lightning_is_warned_at_train_start(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return Adafactor(self.parameters())

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="reduce_lr", keep_last_good=False)
    trainer = pl.Trainer(max_steps=1, callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=IGNORED):
        trainer.fit(Module(), data)


def test_prodigy_lr_scales_its_step() -> None:
    """Prodigy's step is ``d · lr``: halving ``lr`` halves the first step (same ``d``), so the guard's reduction
    works there and is not warned about."""
    prodigyopt = pytest.importorskip("prodigyopt")
    steps = []
    for lr in (1.0, 0.5):
        torch.manual_seed(0)
        model = nn.Linear(4, 1).double()  # (float32 weights would blur a 3e-5 step at 1e-3 relative)
        optimizer = prodigyopt.Prodigy(model.parameters(), lr=lr, betas=(0.0, 0.999))  # no momentum: one step shows
        guard = EntropyCollapseGuard("k", threshold=0.5, action="reduce_lr", keep_last_good=False)
        assert not [m for m in _caught(lambda: guard.track(model, [optimizer])) if "never reads lr" in m]
        before = model.weight.detach().clone()
        model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
        optimizer.step()
        steps.append(model.weight.detach() - before)
    assert torch.allclose(steps[1], steps[0] * 0.5, rtol=1e-9, atol=0)


@needs_torch(2, 5, "torch.optim.Adafactor is new in torch 2.5")
@pytest.mark.parametrize("steps, unchanged", [(100, False), (10_000, True)])
def test_torch_adafactor_says_when_the_lowered_lr_is_above_its_cap(steps: int, unchanged: bool) -> None:
    """``torch.optim.Adafactor`` steps by ``min(lr, 1/sqrt(step))``: at step 10000 (cap 0.01) the rate 0.02 lowered to
    0.01 changes nothing, and the message says so; at step 100 (cap 0.1) it halves the step, and nothing is said."""
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adafactor(model.parameters(), lr=0.02)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    for state in optimizer.state.values():
        state["step"].fill_(steps)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="reduce_lr", keep_last_good=False)
    guard.track(model, [optimizer])
    guard.observe(0.9, 1)
    message = guard.fire(guard.observe(0.1, 2), 2, [optimizer])
    assert optimizer.param_groups[0]["lr"] == 0.01
    note = "1/sqrt(step) = 0.01 is not above the lowered lr, so its step size is unchanged"
    assert (note in message) is unchanged, message
