"""A real wandb run in offline mode for tests (no login, no network) and its history read back from the ``.wandb``
file, wandb's record log (32 KiB blocks of CRC-framed chunks holding ``wandb_internal_pb2.Record`` messages)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7  # b":W&B", a 2-byte magic, a 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_wandb(monkeypatch: Any, tmp_path: Path) -> Any:
    """Import wandb with every folder it writes under ``tmp_path`` and ``WANDB_MODE=offline``; skips without wandb."""
    import pytest

    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        folder = tmp_path / var.lower()
        folder.mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb


def records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb record log (header {data[:7]!r})")
    out, pos, chunks = [], _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        chunks = chunk if kind in (_FULL, _FIRST) else chunks + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def history_rows(run_files_dir: str | Path, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The history rows of a finished offline run (``run.dir``, its ``files`` folder), each ``{key: value}`` with
    media as nested keys joined by ``/``. Waits for the run's ``exit`` record: ``wandb.finish()`` may return before
    wandb-core has written the whole log."""
    run_dir = Path(run_files_dir).parent
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(run_dir.glob("*.wandb"))
        recs = records(found[0]) if found else []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


class SteppedRun:
    """A stand-in for ``wandb.run`` that keeps wandb's step rules (wandb 0.19 - 0.31): ``log(data, step=s)`` with
    ``s`` below :attr:`step` is dropped (wandb warns and ignores it); ``s`` above it commits the pending row and opens
    row ``s``; ``s`` equal to it merges into the pending row; without ``step`` the data merges into the pending row,
    which is committed and the step moves on. :attr:`rows` holds the committed rows (``_step`` included) and
    :attr:`dropped` what wandb would have ignored."""

    def __init__(self, run_id: str = "stepped") -> None:
        self.id = run_id
        self.step = 0
        self.rows: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.defined: list[tuple[str, dict]] = []
        self._pending: dict[str, Any] = {}

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        if step is not None and step < self.step:
            self.dropped.append(dict(data))
            return
        if step is not None and step > self.step:
            self._commit()
            self.step = step
        self._pending.update(data)
        if step is None and commit is not False:
            self._commit()
            self.step += 1

    def _commit(self) -> None:
        if self._pending:
            self.rows.append({**self._pending, "_step": self.step})
            self._pending = {}

    def define_metric(self, name: str, **kwargs: Any) -> None:
        self.defined.append((name, kwargs))

    def alert(self, **kwargs: Any) -> None:
        pass

    def finish(self, **kwargs: Any) -> None:
        self._commit()
