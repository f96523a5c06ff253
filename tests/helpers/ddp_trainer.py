"""Lightning DDP on 2 CPU ranks (gloo) for the run scripts (``tests/**/*_ddp_run.py``): the trainer, each rank's
shard of a dataset, and the ``torch.distributed`` collectives a monitor issues."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tests.helpers.lightning_models import quiet_trainer

#: the collectives :func:`count_collectives` records unless told otherwise (``all_gather_object``: the small exchanges
#: of what each rank holds, which the monitors make before their reduce; torch's own calls inside it are not counted)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce")


def ddp_trainer(**kwargs) -> L.Trainer:
    """:func:`quiet_trainer` on 2 CPU processes with ``strategy="ddp"``, ``deterministic=False``; ``kwargs`` add
    to or override these (e.g. ``use_distributed_sampler=False`` with :func:`rank_loader`)."""
    return quiet_trainer(**{"devices": 2, "strategy": "ddp", "deterministic": False, **kwargs})


def rank_loader(trainer: L.Trainer, dataset: Dataset, batch_size: int, world: int = 2) -> DataLoader:
    """This process's shard of ``dataset`` (``DistributedSampler`` without shuffling: rank ``r`` takes samples
    ``r, r + world, ...``) in batches of ``batch_size``. The rank comes from the cluster environment, so it is known
    before ``fit``; pair it with ``use_distributed_sampler=False``."""
    rank = trainer.strategy.cluster_environment.global_rank()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def count_collectives(obj: object, method: str, names: Sequence[str] = COLLECTIVES) -> list[str]:
    """Replace ``obj.method`` by a wrapper that records, in order, the name of every ``torch.distributed``
    collective in ``names`` issued while it runs (the originals are restored after each call); returns the list
    the names go to."""
    calls: list[str] = []
    inner = getattr(obj, method)

    def counted(*args, **kwargs):
        originals = {n: getattr(torch.distributed, n) for n in names}
        for n, fn in originals.items():
            setattr(torch.distributed, n, lambda *a, _n=n, _fn=fn, **k: (calls.append(_n), _fn(*a, **k))[1])
        try:
            return inner(*args, **kwargs)
        finally:
            for n, fn in originals.items():
                setattr(torch.distributed, n, fn)

    setattr(obj, method, counted)
    return calls
