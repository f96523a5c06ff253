"""Which loader a monitor reads its probe data from when Lightning holds several."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["first_loader"]


def first_loader(loaders: Any) -> Any:
    """The first dataloader (``dataloader_idx=0``, in Lightning's order) of what a ``*_dataloader()`` hook returns or
    ``trainer.val_dataloaders`` holds: one loader, a list / tuple / dict of loaders or a ``CombinedLoader``; ``None``
    when there is none. The validation batch hooks see that loader's batches with ``dataloader_idx=0``."""
    from lightning.pytorch.utilities import CombinedLoader

    if isinstance(loaders, (list, tuple, Mapping)):
        loaders = CombinedLoader(loaders, "sequential")
    if isinstance(loaders, CombinedLoader):
        flat = loaders.flattened
        return flat[0] if flat else None
    return loaders
