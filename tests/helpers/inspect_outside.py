"""Classes outside the ``entrotrain`` package that a Lightning checkpoint can name: ``entrotrain inspect`` imports
this module only when told to (``--import tests.helpers.inspect_outside``). The tests never import it themselves,
so whether inspect did is seen in ``sys.modules``."""

from __future__ import annotations

import torch.nn.functional as F
from lightning.pytorch import LightningDataModule

from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask


class OutsideTask(LanguageModelingTask):
    """The language-modelling task under another module's name."""


class TrainOnlyData(LightningDataModule):
    """A datamodule with training batches only (no ``val_dataloader``)."""

    def __init__(self, block_size: int = 16, batch_size: int = 4, max_chars: int = 20000, **_: object) -> None:
        super().__init__()
        self.inner = CharCorpusDataModule(block_size=block_size, batch_size=batch_size, max_chars=max_chars)

    def train_dataloader(self):  # noqa: ANN201
        return self.inner.train_dataloader()


class ListValData(CharCorpusDataModule):
    """``val_dataloader`` returns a list of two loaders (Lightning's multiple validation sets)."""

    def val_dataloader(self):  # noqa: ANN201
        return [super().val_dataloader(), super().val_dataloader()]


class NoAttentionTask(LanguageModelingTask):
    """The language-modelling task with its attention replaced by the identity (an attention-free model, as an MLP
    encoder of a self-supervised run): only the representation and prediction monitors see anything."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        for block in self.model.blocks:
            block.attn.forward = lambda x: x  # qkv / proj kept (the state dict loads), never called


class FitStageOnlyData(CharCorpusDataModule):
    """Builds its data in ``setup("fit")`` only, as Lightning's own examples do (fit validates on it too)."""

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            super().setup(stage)

    def val_dataloader(self):  # noqa: ANN201
        if self.val_data is None:
            raise RuntimeError("FitStageOnlyData: setup('fit') was not called")
        return super().val_dataloader()


class SelfCallingTask(LanguageModelingTask):
    """``validation_step`` calls ``self(x)``, Lightning's usual idiom (the language-modelling task calls
    ``self.model``)."""

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


class EpochStateTask(LanguageModelingTask):
    """``validation_step`` accumulates into state that ``on_validation_epoch_start`` creates (as the MoE task's
    expert counts)."""

    def on_validation_epoch_start(self) -> None:
        self.rows_seen = 0

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.rows_seen += len(batch[0])  # AttributeError unless the epoch started
        return super().validation_step(batch, batch_idx)
