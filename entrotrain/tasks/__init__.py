"""LightningModules and LightningDataModules for entrotrain recipes."""

from entrotrain.tasks.char_corpus import CharCorpusDataModule
from entrotrain.tasks.image_classification import DigitsDataModule, DigitsViTTask
from entrotrain.tasks.language_modeling import LanguageModelingTask

__all__ = ["CharCorpusDataModule", "DigitsDataModule", "DigitsViTTask", "LanguageModelingTask"]
