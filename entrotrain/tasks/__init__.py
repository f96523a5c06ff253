"""LightningModules and LightningDataModules for entrotrain recipes."""

from entrotrain.tasks.char_corpus import CharCorpusDataModule
from entrotrain.tasks.image_classification import DigitsDataModule, DigitsViTTask
from entrotrain.tasks.language_modeling import LanguageModelingTask
from entrotrain.tasks.multiple_instance import DigitsMILDataModule, DigitsMILTask

__all__ = [
    "CharCorpusDataModule",
    "DigitsDataModule",
    "DigitsMILDataModule",
    "DigitsMILTask",
    "DigitsViTTask",
    "LanguageModelingTask",
]
