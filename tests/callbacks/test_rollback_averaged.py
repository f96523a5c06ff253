"""A rollback brings back the averaged weights with the model: Lightning's ``EMAWeightAveraging`` (found by the guard)
and an EMA given to a plain loop's ``watch(..., averaged=ema)``. Left at the bad steps' weights, the average would
carry the fall into every evaluation made with it."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.rollback_history import HeldTogether, held_module
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.training_state import model_state, same

BAD_FROM = 3  # the watched value falls at this step


def _guard() -> EntropyCollapseGuard:
    return EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        self.log("k", 0.9 if self.global_step < BAD_FROM else 0.1)
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 4, generator=g)),
                                           batch_size=6)


class _Recorder(Callback):
    """The average's state at the end of each step, after the averaging callback updated it."""

    def __init__(self, averaging: EMAWeightAveraging) -> None:
        self.averaging, self.states = averaging, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states[trainer.global_step - 1] = model_state(self.averaging._average_model)


def test_lightning_ema_weight_averaging_is_rolled_back_with_the_model() -> None:
    ema = EMAWeightAveraging(decay=0.5)
    recorder, guard = _Recorder(ema), _guard()
    trainer = L.Trainer(max_steps=BAD_FROM + 1, callbacks=[ema, recorder, guard], log_every_n_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Module())
    assert guard.rollbacks == 1
    held = BAD_FROM - 1  # the last good observation
    assert not same(recorder.states[BAD_FROM], recorder.states[held])  # the bad step moved the average
    assert same(model_state(ema._average_model), recorder.states[held])


def _loop(averaged: bool) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    monitors = EntropyMonitors(guards=[_guard()], print_summary=False)
    states = {}
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monitors.watch(model, optimizer, averaged=ema if averaged else None):
            for step in range(BAD_FROM + 1):
                with monitors.step(step):
                    optimizer.zero_grad()
                    model(torch.randn(6, 4, generator=g)).pow(2).mean().backward()
                    optimizer.step()
                    ema.update_parameters(model)
                    monitors.observe(k=0.9 if step < BAD_FROM else 0.1)
                    states[step] = model_state(ema)
            assert monitors.rolled_back
    return states, model_state(ema)


def test_a_loop_rolls_back_the_ema_it_is_given() -> None:
    states, final = _loop(averaged=True)
    assert not same(states[BAD_FROM], states[BAD_FROM - 1]) and same(final, states[BAD_FROM - 1])
    states, final = _loop(averaged=False)  # not given: it keeps the bad step's average
    assert same(final, states[BAD_FROM])


def test_an_average_inside_the_model_is_held_once_and_a_non_module_is_refused() -> None:
    model = nn.Linear(2, 2)
    outer = nn.ModuleDict({"net": model, "ema": AveragedModel(model)})
    assert held_module(outer, [outer["ema"]]) is outer  # already in its state_dict
    other = AveragedModel(model)
    together = held_module(model, [other, other])
    assert isinstance(together, HeldTogether) and len(together.averaged) == 1
    assert set(together.state_dict()) == {"model.weight", "model.bias", "averaged.0.n_averaged",
                                          "averaged.0.module.weight", "averaged.0.module.bias"}
    with pytest.raises(EntrotrainError, match="track\\(averaged\\) needs the nn.Module"):
        _guard().track(model, [torch.optim.SGD(model.parameters(), lr=0.1)], averaged=[{"w": 1}])
