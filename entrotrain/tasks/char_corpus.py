"""Character-level corpus built at run time from the Python standard library.

No network and no downloads: the text is the concatenation of the standard
library's own ``*.py`` source files (found via ``sysconfig``), visited in a
sorted, deterministic order until ``max_chars`` characters have been read.

The vocabulary is fixed 7-bit ASCII (``vocab_size == 128``) so that it is known
without reading any files, which lets LightningCLI link ``data.vocab_size`` into
``model.vocab_size``. Non-ASCII characters map to :data:`UNK_ID` (``0``, NUL,
which never occurs in source code).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler

__all__ = ["VOCAB_SIZE", "UNK_ID", "encode", "decode", "load_stdlib_text", "CharCorpusDataModule"]

VOCAB_SIZE = 128
UNK_ID = 0

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def encode(text: str) -> torch.Tensor:
    """Encode ``text`` to an int64 tensor of ASCII ids; non-ASCII -> ``UNK_ID``."""
    ids = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids[ids >= VOCAB_SIZE] = UNK_ID
    return torch.from_numpy(ids)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Decode ASCII ids back to a string (``UNK_ID`` renders as ``'?'``)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return "".join("?" if i == UNK_ID else chr(i) for i in ids)


def _stdlib_py_files(root: Path) -> list[Path]:
    """Sorted ``*.py`` files: top-level modules first, then packages (sorted walk)."""
    top = sorted(p for p in root.glob("*.py") if p.is_file())
    nested: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        if Path(dirpath) == root:
            continue
        nested.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return top + nested


def load_stdlib_text(max_chars: int = 1_000_000) -> str:
    """Concatenate standard-library sources until ``max_chars`` characters are read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in _stdlib_py_files(root):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    if len(text) < 10_000:
        raise RuntimeError(f"could not find enough Python standard-library source under {root}")
    return text


class _Windows(Dataset):
    """``(x, y)`` windows of length ``block_size`` starting at any valid offset."""

    def __init__(self, data: torch.Tensor, block_size: int, offsets: torch.Tensor | None = None) -> None:
        self.data = data
        self.block_size = block_size
        self.offsets = offsets  # None -> every offset is an item

    def __len__(self) -> int:
        if self.offsets is not None:
            return len(self.offsets)
        return len(self.data) - self.block_size - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.offsets[i]) if self.offsets is not None else i
        chunk = self.data[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharCorpusDataModule(LightningDataModule):
    """Next-character prediction on Python standard-library source code.

    Batches are ``(x, y)`` with ``x, y`` of shape ``(batch_size, block_size)``,
    int64 ids in ``[0, vocab_size)``; ``y`` is ``x`` shifted left by one.

    Args:
        block_size: context length ``T`` of each window.
        batch_size: windows per batch.
        max_chars: characters of source to read (first 90 % train, last 10 % val).
        seed: seeds the training sampler's ``torch.Generator`` (random offsets).
        num_workers: DataLoader workers.
        steps_per_epoch: training batches per epoch (windows are drawn with
            replacement, so the stream is effectively infinite across epochs).
        val_windows: number of fixed, evenly spaced validation windows.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        max_chars: int = 1_000_000,
        seed: int = 0,
        num_workers: int = 0,
        steps_per_epoch: int = 100,
        val_windows: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.seed = seed
        self.num_workers = num_workers
        self.steps_per_epoch = steps_per_epoch
        self.val_windows = val_windows
        self.vocab_size: int = VOCAB_SIZE
        self.train_data: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and encode the corpus once (deterministic, ~0.2 s for 1M chars)."""
        if self.train_data is not None:
            return
        data = encode(load_stdlib_text(self.max_chars))
        n_train = int(0.9 * len(data))
        self.train_data, self.val_data = data[:n_train], data[n_train:]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        dataset = _Windows(self.train_data, self.block_size)
        sampler = RandomSampler(
            dataset,
            replacement=True,
            num_samples=self.steps_per_epoch * self.batch_size,
            generator=generator,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        last = len(self.val_data) - self.block_size - 1
        offsets = torch.linspace(0, last, self.val_windows).long()
        dataset = _Windows(self.val_data, self.block_size, offsets)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
