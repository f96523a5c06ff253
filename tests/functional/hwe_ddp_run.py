"""Run by test_token_shaping.py as a script: 2 gloo CPU ranks build the HWE mask (quantile mode) on their own rows
(3 + 5 sequences) and write ``OUT/rank{r}.pt``; the test compares with one process on the whole batch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.functional.token_shaping import high_window_entropy_mask, window_entropy  # noqa: E402

SPLIT = (3, 5)
B, T = sum(SPLIT), 10


def make_batch():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return h, mask


def hwe(h, mask):
    w = window_entropy(h, mask, 3, return_counts=True)
    return high_window_entropy_mask(w.mean, w.count > 0, quantile=0.8)


def worker(rank: int, world: int, port: str, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    h, mask = make_batch()
    lo = sum(SPLIT[:rank])
    rows = slice(lo, lo + SPLIT[rank])
    torch.save(hwe(h[rows], mask[rows]), out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, port = Path(sys.argv[1]), sys.argv[2]
    mp.spawn(worker, args=(2, port, out_dir), nprocs=2, join=True)
