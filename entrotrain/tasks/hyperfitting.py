"""Two-phase character data for the hyperfitting recipe: pre-train on the corpus, then fit a few fixed sequences.

Carlsson et al. (2025, "The Hyperfitting Phenomenon", arXiv 2412.04318) fine-tune a *pre-trained* LM to near-zero
training loss on a small fixed set (2000 sequences of 256 tokens, 20 epochs; good results with as few as 8) and
observe collapsed next-token entropy and less repetitive greedy generation. The toy version here, in one
``Trainer.fit``: ``pretrain_steps`` batches of random windows of the standard-library corpus (exactly
:class:`~entrotrain.tasks.char_corpus.CharCorpusDataModule`'s stream), then ``hyperfit_steps`` batches that each hold
the same ``hyperfit_sequences`` fixed training windows (seeded offsets into the training split, disjoint from the
held-out validation split). Validation data is unchanged, so the held-out probe is the corpus' last 10 %.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from entrotrain._validation import check_int
from entrotrain.tasks.char_corpus import CharCorpusDataModule, _Windows

__all__ = ["HyperfittingDataModule"]


class _TwoPhaseBatches(Sampler[list[int]]):
    """``pretrain`` batches of ``batch_size`` random offsets (with replacement), then ``hyperfit`` copies of the
    fixed offsets."""

    def __init__(self, n: int, batch_size: int, pretrain: int, hyperfit: int, fixed: list[int], seed: int) -> None:
        self.n, self.batch_size, self.pretrain, self.hyperfit, self.fixed, self.seed = (
            n, batch_size, pretrain, hyperfit, fixed, seed
        )

    def __len__(self) -> int:
        return self.pretrain + self.hyperfit

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.pretrain):
            yield torch.randint(self.n, (self.batch_size,), generator=generator).tolist()
        for _ in range(self.hyperfit):
            yield list(self.fixed)


class HyperfittingDataModule(CharCorpusDataModule):
    """:class:`CharCorpusDataModule` whose training stream switches to a few fixed sequences after pre-training.

    Args:
        pretrain_steps: training batches of random corpus windows (``batch_size`` each) before the switch.
        hyperfit_steps: training batches after it, each holding all ``hyperfit_sequences`` fixed windows.
        hyperfit_sequences: how many fixed training windows are hyper-fitted (16 as in the recipe; the paper's
            smallest set was 8).
        hyperfit_seed: seeds the choice of the fixed windows (offsets uniform over the training split).
        block_size, batch_size, max_chars, seed, num_workers, val_windows: as :class:`CharCorpusDataModule`
            (``steps_per_epoch`` is ``pretrain_steps + hyperfit_steps``: one epoch is the whole schedule; set
            ``trainer.max_steps`` to that sum, a longer run starts the schedule again).
    """

    def __init__(
        self,
        pretrain_steps: int = 300,
        hyperfit_steps: int = 300,
        hyperfit_sequences: int = 16,
        hyperfit_seed: int = 1,
        block_size: int = 64,
        batch_size: int = 32,
        max_chars: int = 1_000_000,
        seed: int = 0,
        num_workers: int = 0,
        val_windows: int = 256,
    ) -> None:
        check_int(pretrain_steps, "pretrain_steps", low=0)
        check_int(hyperfit_steps, "hyperfit_steps", low=0)
        check_int(hyperfit_sequences, "hyperfit_sequences", low=1)
        check_int(hyperfit_seed, "hyperfit_seed")
        super().__init__(
            block_size=block_size,
            batch_size=batch_size,
            max_chars=max_chars,
            seed=seed,
            num_workers=num_workers,
            steps_per_epoch=max(1, pretrain_steps + hyperfit_steps),
            val_windows=val_windows,
        )
        self.save_hyperparameters()
        self.pretrain_steps = pretrain_steps
        self.hyperfit_steps = hyperfit_steps
        self.hyperfit_sequences = hyperfit_sequences
        self.hyperfit_seed = hyperfit_seed

    def hyperfit_offsets(self) -> list[int]:
        """The fixed training windows' start offsets (seeded by ``hyperfit_seed``)."""
        self.setup()
        n = len(self.train_data) - self.block_size - 1
        generator = torch.Generator().manual_seed(self.hyperfit_seed)
        return torch.randperm(n, generator=generator)[: self.hyperfit_sequences].tolist()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = _Windows(self.train_data, self.block_size)
        sampler = _TwoPhaseBatches(
            len(dataset), self.batch_size, self.pretrain_steps, self.hyperfit_steps, self.hyperfit_offsets(), self.seed
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
