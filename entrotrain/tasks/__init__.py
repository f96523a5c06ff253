"""LightningModules and LightningDataModules for entrotrain recipes."""

from entrotrain.tasks.arithmetic import ArithmeticDataModule, ArithmeticTask
from entrotrain.tasks.char_corpus import CharCorpusDataModule
from entrotrain.tasks.grpo import GRPOTask
from entrotrain.tasks.image_classification import DigitsDataModule, DigitsViTTask
from entrotrain.tasks.language_modeling import LanguageModelingTask
from entrotrain.tasks.multiple_instance import DigitsMILDataModule, DigitsMILTask

__all__ = [
    "ArithmeticDataModule",
    "ArithmeticTask",
    "GRPOTask",
    "CharCorpusDataModule",
    "DigitsDataModule",
    "DigitsMILDataModule",
    "DigitsMILTask",
    "DigitsViTTask",
    "LanguageModelingTask",
]
from entrotrain.tasks.digits_classifier import DigitsMLPTask  # noqa: E402
from entrotrain.tasks.self_supervised import SimSiamTask, augment_digits  # noqa: E402

__all__ += ["DigitsMLPTask", "SimSiamTask", "augment_digits"]
from entrotrain.tasks.mmcr import MMCREncoder, MMCRTask, knn_accuracy  # noqa: E402

__all__ += ["MMCREncoder", "MMCRTask", "knn_accuracy"]
from entrotrain.tasks.moe_classification import MoEDigitsTask, expert_load_stats  # noqa: E402

__all__ += ["MoEDigitsTask", "expert_load_stats"]
from entrotrain.tasks.hyperfitting import HyperfittingDataModule  # noqa: E402

__all__ += ["HyperfittingDataModule"]
from entrotrain.tasks.information_plane import (  # noqa: E402
    InformationPlaneDataModule,
    InformationPlaneTask,
    icosahedron_dataset,
)

__all__ += ["InformationPlaneDataModule", "InformationPlaneTask", "icosahedron_dataset"]
