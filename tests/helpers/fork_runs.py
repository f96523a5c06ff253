"""Run records and checkpoints for the roll-back-and-cure tests (``tests/test_resume_fork*.py``): read a record's
files, copy a record and point a checkpoint at the copy (so a module-scoped parent run stays untouched)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def records(root: Path) -> list[Path]:
    """The run records under ``root/records`` (``[]`` when there is none)."""
    folder = root / "records"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def record_bytes(record: Path) -> dict[str, bytes]:
    """Every file of a record folder, byte for byte: to show it was left as it was."""
    return {p.name: p.read_bytes() for p in sorted(record.iterdir()) if p.is_file()}


def copy_checkpoint(ckpt: Path, to: Path, run_dir: str | None = "keep") -> Path:
    """A copy of ``ckpt`` whose run-record entry names ``run_dir`` (``None``: no entry, as a Trainer outside the CLI
    writes)."""
    checkpoint = torch.load(ckpt, weights_only=False)
    if run_dir is None:
        checkpoint.pop("entrotrain_run_record", None)
    elif run_dir != "keep":
        checkpoint["entrotrain_run_record"]["run_dir"] = run_dir
    to.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, to)
    return to


def copy_record(record: Path, to: Path) -> Path:
    """A copy of the folder holding ``record`` (its ``records/`` parent's parent: the run's root) at ``to``; returns
    the copied record."""
    shutil.copytree(record.parent.parent, to)
    return to / "records" / record.name
