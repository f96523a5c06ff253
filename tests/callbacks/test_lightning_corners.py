"""entrotrain callbacks under the Lightning Trainer features the recipes do not use: datamodules with shuffled or
several loaders, manual optimisation, precision plugins, validate / test / predict alone, and the like. What must
hold in each: training bit for bit the same with and without the monitors, keys at the right step, hooks removed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from entrotrain.callbacks import (
    AttentionEntropyMonitor,
    EntropyCollapseGuard,
    InformationPlaneMonitor,
    PolicyEntropyMonitor,
    PredictionEntropyMonitor,
    RepresentationEntropyMonitor,
    SigmaReparamMonitor,
    policy_entropy_summary,
)
from entrotrain.errors import EntrotrainError
from tests.callbacks.test_monitor_lifecycle import (
    ORIGINAL_SDPA,
    SEQ,
    VOCAB,
    AllLM,
    hooks_left,
    loader,
    monitors,
    same_weights,
)
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import LossRecorder
from tests.helpers.spy_logger import SpyLogger


def tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


class TokenData(L.LightningDataModule):
    """Shuffled training batches of ``SEQ + 1`` tokens; validation ``(x, x)`` pairs of ``SEQ`` tokens, one loader or
    several (the first's tokens differ from the others')."""

    def __init__(self, val_loaders: int = 1) -> None:
        super().__init__()
        self.val_loaders = val_loaders

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(tokens(32, SEQ + 1, 0)), batch_size=4, shuffle=True)

    def val_dataloader(self):
        data = [tokens(8, SEQ, 1 + i) for i in range(self.val_loaders)]
        loaders = [DataLoader(TensorDataset(x, x), batch_size=4) for x in data]
        return loaders[0] if self.val_loaders == 1 else loaders


def prediction_monitor(**kwargs) -> PredictionEntropyMonitor:
    kwargs = {"every_n_steps": 1, "source": "head", "head": "**.lm_head", "log_media": False, "print_summary": False,
              **kwargs}
    return PredictionEntropyMonitor(**kwargs)


def fit_on(datamodule: L.LightningDataModule, callbacks: list[L.Callback], **kwargs) -> L.LightningModule:
    L.seed_everything(0)
    model = AllLM()
    kwargs = {"max_steps": 3, "limit_val_batches": 0, **kwargs}
    quiet_trainer(callbacks=callbacks, **kwargs).fit(model, datamodule=datamodule)
    return model


# ------------------------------------------------------------------------------------------ datamodule probe


def test_taking_the_probe_from_a_datamodule_leaves_the_shuffled_training_order_alone():
    # iterating the validation loader draws its base seed from the global RNG: the training loader then shuffled
    # differently with the monitor than without it
    plain = fit_on(TokenData(), [])
    monitored = fit_on(TokenData(), [prediction_monitor(probe_batches=1)])
    assert same_weights(plain, monitored)
    assert hooks_left(monitored) == []


def test_a_datamodule_with_several_validation_loaders_gives_the_probe_of_the_first():
    monitor = prediction_monitor(probe_batches=1)
    fit_on(TokenData(val_loaders=2), [monitor], max_steps=1)  # was: "a probe batch must be a tensor ... DataLoader"
    (inputs, labels, _), = monitor._probe_set
    assert torch.equal(inputs, tokens(8, SEQ, 1)[:4]) and torch.equal(labels, inputs)
    assert "entropy/pred/probe/mean" in monitor.history[-1][1]


# ------------------------------------------------------------------------------------------ manual optimisation


class TwoOptimizers(AllLM):
    """Manual optimisation, GAN style: two optimizers stepped in every batch (``global_step`` moves by 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(out["loss"])
        for optimizer in optimizers:
            optimizer.step()
        return out

    def configure_optimizers(self):
        params = list(self.parameters())
        half = len(params) // 2
        return [torch.optim.SGD(params[:half], lr=self.lr), torch.optim.SGD(params[half:], lr=self.lr)]


def logged_steps(spy: SpyLogger, prefix: str) -> list[int]:
    return sorted({step for step, row in spy.rows if any(k.startswith(prefix) for k in row)})


@pytest.mark.parametrize("every", [2, 3, 4])
def test_with_two_optimizers_sigma_reparam_logs_at_the_steps_of_the_other_monitors(every):
    # sigma logged after steps with (global_step - 1) % n == 0: with two optimizers global_step is even after every
    # batch, so with n = 2 it never logged, and with n = 3 it logged at other batches than the attention monitor
    runs = []
    for callbacks in ([], [AttentionEntropyMonitor(every_n_steps=every, log_media=False, print_summary=False),
                           SigmaReparamMonitor(every_n_steps=every)]):
        L.seed_everything(0)
        model, spy = TwoOptimizers(), SpyLogger()
        quiet_trainer(callbacks=callbacks, logger=spy, max_steps=8).fit(model, loader())
        runs.append((model, spy))
    (plain, _), (monitored, spy) = runs
    assert same_weights(plain, monitored)
    attention = logged_steps(spy, "entropy/attn/")
    # batches whose first step is a multiple of n: every lcm(n, 2) optimizer steps, as the monitors' docstrings say
    assert attention == {2: [0, 1, 2, 3], 3: [0, 3], 4: [0, 2]}[every]
    assert logged_steps(spy, "sigma_reparam/") == attention


# ------------------------------------------------------------------------------------------ no validation data


class Classifier(L.LightningModule):
    """12 → 6 (tanh) → 2 on 32 random rows; no validation hooks (Lightning's default val_dataloader() raises)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rows(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 2, (n,), generator=g)), 8)


def info_monitor(**kwargs) -> InformationPlaneMonitor:
    return InformationPlaneMonitor(every_n_steps=1, estimators=["binning"], log_table=False, print_summary=False,
                                   **kwargs)


def test_information_plane_default_probe_without_validation_data_is_the_training_set():
    # probe="all" (the default) called the LightningModule's val_dataloader(), whose Lightning default raises
    # MisconfigurationException("`val_dataloader` must be implemented ...")
    monitor = info_monitor()
    quiet_trainer(callbacks=[monitor], max_steps=1).fit(Classifier(), rows())
    x, _ = monitor._probe_data
    assert len(x) == 32 and monitor.history


def test_information_plane_probe_val_without_validation_data_names_the_fix():
    with pytest.raises(EntrotrainError, match=r"probe='val'.*no validation data.*val_dataloaders.*probe='train'"):
        quiet_trainer(callbacks=[info_monitor(probe="val")], max_steps=1).fit(Classifier(), rows())


# ------------------------------------------------------------------------------------------ gradient accumulation


class Outputs(L.Callback):
    """What ``training_step`` returned, batch by batch."""

    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outputs.append({k: v.detach().clone() for k, v in outputs.items() if k != "loss"})


def test_policy_monitor_under_gradient_accumulation_logs_each_step_once_pooling_its_micro_batches():
    # it logged every micro-batch at the step Lightning logs the optimizer step at: two rows for step 0, the
    # run reader warned "Two processes are writing this record", the curve kept only the last micro-batch and a guard
    # saw one of the two values
    monitor, seen, spy = PolicyEntropyMonitor(log_media=False, print_summary=False), Outputs(), SpyLogger()
    L.seed_everything(0)
    quiet_trainer(callbacks=[seen, monitor], logger=spy, max_steps=3, accumulate_grad_batches=2).fit(AllLM(), loader())
    rows = [(step, row) for step, row in spy.rows if "entropy/policy/mean" in row]
    assert [step for step, _ in rows] == [0, 1, 2]
    for step, row in rows:
        pair = seen.outputs[2 * step: 2 * step + 2]
        expected = policy_entropy_summary(
            *(torch.cat([o[k] for o in pair]) for k in ("token_entropy", "logprobs", "advantages", "response_mask"))
        )
        assert row["entropy/policy/mean"] == pytest.approx(expected["mean"], rel=1e-12)
        assert row["entropy/policy/cov_mean"] == pytest.approx(expected["cov_mean"], rel=1e-9)
    assert len(monitor.history["entropy"]) == 3 and monitor.last_logged["batch"] == 2  # batch = the optimizer step


def test_pooled_micro_batches_of_different_lengths_score_every_real_token_once():
    from entrotrain.callbacks.policy_monitor import _pooled

    g = torch.Generator().manual_seed(0)
    parts = []
    for batch, length in ((2, 3), (3, 5)):
        parts.append({
            "entropy": torch.rand(batch, length, generator=g), "logprobs": -torch.rand(batch, length, generator=g),
            "advantages": torch.randn(batch, generator=g), "mask": torch.rand(batch, length, generator=g) > 0.3,
            "rewards": None, "post_entropy": None, "phase_ids": None, "temperature": 0.7,
        })
    pooled = _pooled(parts)
    assert pooled["entropy"].shape == (5, 5) and pooled["rewards"] is None and pooled["temperature"] == 0.7
    assert not pooled["mask"][:2, 3:].any()  # padding is not data
    real = torch.cat([p["entropy"][p["mask"]] for p in parts])
    got = policy_entropy_summary(pooled["entropy"], pooled["logprobs"], pooled["advantages"], pooled["mask"])
    assert got["mean"] == pytest.approx(float(real.double().mean()), rel=1e-6)


def test_prediction_monitor_with_a_datamodule_without_validation_data_warns_and_trains():
    # the default probe read datamodule.val_dataloader(), whose Lightning default raises MisconfigurationException

    class TrainOnly(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(tokens(8, SEQ + 1, 0)), batch_size=4)

    monitor = prediction_monitor()
    with pytest.warns(UserWarning, match="no probe set"):
        fit_on(TrainOnly(), [monitor], max_steps=1)
    assert monitor._probe_set == [] and "entropy/pred/train/mean" in monitor.history[-1][1]


def test_information_plane_probe_of_several_validation_loaders_is_the_first():
    # it raised "found no single val DataLoader" for a list of two validation loaders

    class WithValidation(Classifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            pass

    monitor = info_monitor(probe="val")
    quiet_trainer(callbacks=[monitor], max_steps=1).fit(WithValidation(), rows(), [rows(24), rows(40)])
    x, _ = monitor._probe_data
    assert torch.equal(x, rows(24).dataset.tensors[0])


# ------------------------------------------------------------------------------------------ bit for bit, setup by setup


class Validated(AllLM):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self.training_step(batch, batch_idx)["loss"]


class Stream(torch.utils.data.IterableDataset):
    """Training tokens without ``__len__``."""

    def __iter__(self):
        yield from ((row,) for row in tokens(32, SEQ + 1, 0))


def every_monitor() -> list[L.Callback]:
    return [
        *monitors(),
        RepresentationEntropyMonitor(include=["*.blocks.*.mlp"], measures=["rankme"], stage="validation",
                                     probe_batches=1, log_spectrum=False, print_summary=False, prefix="val"),
        prediction_monitor(),
        EntropyCollapseGuard(action="rollback", threshold=1e-3),
    ]


SETUPS = {
    "accumulate 2": dict(accumulate_grad_batches=2),
    "bf16-mixed": dict(precision="bf16-mixed"),  # ("16-mixed" on CPU: Lightning runs bf16-mixed)
    "iterable, validation every 2 batches on 2 loaders": dict(stream=True, val_check_interval=2),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_monitor_leaves_training_bit_for_bit_the_same(setup):
    kwargs = {"max_steps": 3, **SETUPS[setup]}
    stream = kwargs.pop("stream", False)
    runs = []
    for callbacks in ([], every_monitor()):
        L.seed_everything(0)
        model, losses = Validated(), LossRecorder()
        train = DataLoader(Stream(), batch_size=4) if stream else loader()
        val = [loader(4), loader(4)] if stream else loader(4)
        quiet_trainer(callbacks=[losses, *callbacks], num_sanity_val_steps=1, **kwargs).fit(model, train, val)
        runs.append((model, losses.losses))
    (plain, l0), (monitored, l1) = runs
    assert len(l0) == len(l1) > 0 and all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert same_weights(plain, monitored)
    assert hooks_left(monitored) == [] and torch.nn.functional.scaled_dot_product_attention is ORIGINAL_SDPA
