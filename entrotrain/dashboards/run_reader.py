"""Reading a run record (written by :class:`~entrotrain.dashboards.RunRecordLogger`) back into memory.

The reader is forgiving where a run is still being written (a torn last line is skipped) and strict where the folder
is not a run at all: every problem is an :class:`~entrotrain.errors.EntrotrainError` that names what was expected.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from entrotrain.dashboards.run_record import RECORD_FORMAT
from entrotrain.errors import EntrotrainError

__all__ = ["MONITOR_PREFIXES", "MediaItem", "RunData", "find_records", "load_run"]

#: Keys written by entrotrain monitors; a run with none of them (and no media) has "no monitor output".
MONITOR_PREFIXES = ("entropy/", "sigma_reparam/")


@dataclass
class MediaItem:
    """One stored array: ``key`` at ``step`` of ``kind``, loaded lazily from ``path``."""

    key: str
    step: int | None
    kind: str
    path: Path
    meta: dict[str, Any]

    def load(self) -> np.ndarray:
        """The array (float64)."""
        return np.load(self.path)


@dataclass
class RunData:
    """Everything a run record holds, in memory (see :func:`load_run`)."""

    path: Path
    meta: dict[str, Any]
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values), sorted by step
    hparams: dict[str, Any] = field(default_factory=dict)
    config_text: str | None = None
    thresholds: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    media: dict[str, list[MediaItem]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """A short name for legends: the recipe's stem, else the folder name."""
        return str(self.meta.get("name") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def last_step(self) -> int | None:
        steps = [int(s[-1]) for s, _ in self.scalars.values() if len(s)]
        return max(steps) if steps else None

    def first_last(self, key: str) -> tuple[float, float] | None:
        """First and last logged value of ``key`` (``None`` if never logged)."""
        if key not in self.scalars or not len(self.scalars[key][1]):
            return None
        values = self.scalars[key][1]
        return float(values[0]), float(values[-1])


def find_records(folder: Path, limit: int = 5) -> list[Path]:
    """Run record folders (holding ``meta.json``) under ``folder``, newest first."""
    found = sorted(folder.glob("**/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.parent for p in found[:limit]]


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # being written right now
                continue
            warnings.append(f"{path.name}: line {i + 1} is not valid JSON and was skipped.")
    return rows


def _not_a_run(path: Path) -> EntrotrainError:
    hint = ""
    if path.is_dir():
        records = find_records(path)
        if records:
            hint = " Run records found below it: " + ", ".join(str(r) for r in records) + "."
        elif path.name.startswith(("offline-run-", "run-")) and (path / "files").is_dir():
            hint = (
                " This looks like a wandb run folder; entrotrain report reads the run record that entrotrain writes "
                "beside it, under <default_root_dir>/records/ (e.g. runs/records/<recipe>-<time>)."
            )
    return EntrotrainError(
        f"{path} is not an entrotrain run record: expected a folder holding meta.json and metrics.jsonl, written "
        "by RunRecordLogger (every `entrotrain fit` run adds one and prints its folder at the end; outside the CLI "
        f"add RunRecordLogger('runs') to Trainer(logger=[...]))." + hint
    )


def _pid_alive(meta: dict[str, Any]) -> bool | None:
    """Whether the process that wrote ``meta`` still runs (``None`` if it cannot be told: another host)."""
    if meta.get("host") != socket.gethostname() or not isinstance(meta.get("pid"), int):
        return None
    try:
        os.kill(meta["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Read the run record at ``path``.

    Raises:
        EntrotrainError: ``path`` does not exist or is not a run record (names what was expected and lists records
            found below it), or the run logged no monitor output (names the monitors to add).
    """
    path = Path(path)
    if not path.exists():
        raise EntrotrainError(f"{path} does not exist. Pass the run record folder printed at the end of the run.")
    meta_path = path / "meta.json"
    if not path.is_dir() or not meta_path.is_file():
        raise _not_a_run(path)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise EntrotrainError(f"{meta_path} is not valid JSON ({err}); the run record is damaged.") from err
    if not isinstance(meta, dict) or meta.get("format") != RECORD_FORMAT:
        raise EntrotrainError(
            f"{meta_path} is not an entrotrain run record (its format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {RECORD_FORMAT!r})."
        )
    warnings: list[str] = []
    series: dict[str, list[tuple[int, float]]] = {}
    for i, row in enumerate(_read_jsonl(path / "metrics.jsonl", warnings)):
        step = row.get("step")
        step = i if step is None else int(step)
        for key, value in (row.get("values") or {}).items():
            if value is None or key == "epoch":
                continue
            series.setdefault(key, []).append((step, float(value)))
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, points in series.items():
        points.sort(key=lambda p: p[0])
        dedup: dict[int, float] = {}
        for step, value in points:  # a key logged twice at one step (train + val hooks): keep the last
            dedup[step] = value
        scalars[key] = (np.array(list(dedup), dtype=np.int64), np.array(list(dedup.values()), dtype=np.float64))

    media: dict[str, list[MediaItem]] = {}
    for row in _read_jsonl(path / "media" / "index.jsonl", warnings):
        file = path / str(row.get("file", ""))
        if not file.is_file():
            warnings.append(f"media file {row.get('file')} listed in media/index.jsonl is missing; skipped.")
            continue
        item = MediaItem(str(row["key"]), row.get("step"), str(row.get("kind", "values")), file, dict(row.get("meta") or {}))
        media.setdefault(item.key, []).append(item)
    for items in media.values():
        items.sort(key=lambda m: -1 if m.step is None else m.step)

    run = RunData(
        path=path,
        meta=meta,
        scalars=scalars,
        hparams=json.loads((path / "hparams.json").read_text()) if (path / "hparams.json").is_file() else {},
        config_text=(path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None,
        thresholds=json.loads((path / "thresholds.json").read_text()) if (path / "thresholds.json").is_file() else [],
        events=_read_jsonl(path / "events.jsonl", warnings),
        media=media,
        warnings=warnings,
    )
    if not any(k.startswith(MONITOR_PREFIXES) for k in scalars) and not media:
        logged = sorted(scalars)[:12]
        raise EntrotrainError(
            f"run {path} has no monitor output (no entropy/* or sigma_reparam/* keys; logged: {logged or 'nothing'}). "
            "Add a monitor (AttentionEntropyMonitor, PolicyEntropyMonitor, RepresentationEntropyMonitor, "
            "SigmaReparamMonitor) to the trainer's callbacks, and train past its first logging step."
        )
    if run.status == "running":
        alive = _pid_alive(meta)
        since = time.time() - float(meta.get("start_time") or time.time())
        if alive is False:
            run.warnings.insert(
                0,
                f"The run never finished: its process (pid {meta.get('pid')}) is gone without closing the record "
                f"(killed?). This report shows what was logged, up to step {run.last_step}.",
            )
        else:
            run.warnings.insert(
                0,
                f"The run is still in progress (started {since / 60:.1f} min ago); this report shows what was logged "
                f"so far, up to step {run.last_step}. Run `entrotrain report` again when it ends.",
            )
    elif run.status == "failed":
        run.warnings.insert(0, f"The run failed (stopped by an exception) at step {run.last_step}; this report shows what was logged.")
    return run
