"""The local run record: what every entrotrain run writes to disk, whatever else it logs to.

:class:`RunRecordLogger` is a Lightning logger that keeps, in one folder per run (``RUN_DIR``)::

    meta.json          status (running → finished | failed), start/end time, recipe, command line, versions
    metrics.jsonl      one line per logging call: {"step": s, "time": t, "values": {key: float}}
    hparams.json       the hyperparameters loggers were given (merged)
    config.yaml        the LightningCLI config, when the run came from ``entrotrain fit``
    thresholds.json    reference lines monitors declared (collapse thresholds, guard thresholds)
    events.jsonl       alerts (e.g. an entropy collapse the guard saw): {"step", "key", "level", "message", "time"}
    media/index.jsonl  one line per array: {"key", "step", "kind", "file", "meta"}; arrays in media/<key>/<step>.npy

``entrotrain report RUN_DIR`` reads this folder only (never wandb's files), so reports work for any logger, offline,
and while the run is still going (every line is flushed when written). The logger writes on global rank zero only,
consumes no random numbers and never synchronises ranks, so adding it cannot change training.

Callbacks add arrays, thresholds and events in one line each, a no-op when no record is attached::

    record_media(trainer, "entropy/repr/layer3/spectrum", eigenvalues, kind="spectrum")
    record_threshold(trainer, "entropy/attn_norm/min", 0.05, label="guard")
    record_event(trainer, "entropy/attn_norm/min", "fell below 0.05", level="alert")
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from entrotrain.errors import EntrotrainError

__all__ = [
    "RECORD_FORMAT",
    "MediaKind",
    "RunRecordLogger",
    "find_run_record",
    "record_event",
    "record_media",
    "record_threshold",
]

#: Written into ``meta.json`` so that a reader can tell a run record from any other folder.
RECORD_FORMAT = "entrotrain-run-record/1"

MediaKind = Literal["heatmap", "spectrum", "histogram", "values"]
_MEDIA_KINDS = ("heatmap", "spectrum", "histogram", "values")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe_name(key: str) -> str:
    """A key as a folder name: ``entropy/attn_norm/heatmap`` → ``entropy__attn_norm__heatmap``."""
    return _UNSAFE.sub("_", key.replace("/", "__")).strip("_") or "media"


def _json_safe(value: Any) -> Any:
    """``value`` as something :func:`json.dumps` accepts (tensors and arrays become lists, the rest ``str``)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, Namespace):
        return _json_safe(vars(value))
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.tolist())
    if hasattr(value, "numel") and value.numel() <= 64:  # small tensors
        return _json_safe(value.tolist())
    return str(value)


def _finite_or_none(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _recipe_description(recipe: str | None) -> str | None:
    """The leading comment block of a recipe file (what it shows and what to compare it with), if readable."""
    if not recipe or not Path(recipe).is_file():
        return None
    lines: list[str] = []
    for line in Path(recipe).read_text(errors="replace").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines) or None


class RunRecordLogger(Logger):
    """Writes the local run record (see the module docstring) that ``entrotrain report`` turns into HTML.

    ``entrotrain fit`` adds one to every run; outside the CLI add it beside any other logger::

        Trainer(logger=[WandbLogger(...), RunRecordLogger("runs")])

    Args:
        save_dir: parent folder; the run goes to ``save_dir/name/version``.
        name: sub-folder grouping runs (default ``"records"``).
        version: the run's folder name; default ``run-YYYYmmdd-HHMMSS`` (local time, made unique with ``-2``, ...).
        recipe: the recipe or config file the run came from (shown in the report header).
        run_name: a short label for the run in reports (default: the recipe's file stem, else ``version``).

    Raises:
        EntrotrainError: when ``save_dir`` exists and is not a folder.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] = "runs",
        name: str = "records",
        version: str | None = None,
        recipe: str | None = None,
        run_name: str | None = None,
    ) -> None:
        super().__init__()
        root = Path(save_dir)
        if root.exists() and not root.is_dir():
            raise EntrotrainError(f"RunRecordLogger: save_dir {root} exists and is not a folder; pass a folder path.")
        self._save_dir = root
        self._name = name
        self._version = version
        self.recipe = recipe
        self.run_name = run_name
        self._meta: dict[str, Any] | None = None
        self._hparams: dict[str, Any] = {}
        self._files: dict[str, Any] = {}

    # ------------------------------------------------------------------ Logger API
    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = self._new_version()
        return self._version

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def root_dir(self) -> str:
        return str(self._save_dir / self._name)

    @property
    def log_dir(self) -> str:
        """The run record folder (``RUN_DIR`` for ``entrotrain report``)."""
        return str(self._save_dir / self._name / self.version)

    @property
    def run_dir(self) -> Path:
        """The run record folder as a :class:`~pathlib.Path`."""
        return Path(self.log_dir)

    def _new_version(self) -> str:
        base = time.strftime("run-%Y%m%d-%H%M%S")
        parent = self._save_dir / self._name
        version, n = base, 1
        while (parent / version).exists():
            n += 1
            version = f"{base}-{n}"
        return version

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self._start()
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        config = params.pop("config", None)
        if isinstance(config, str):  # the LightningCLI config as YAML (see entrotrain.cli)
            (self.run_dir / "config.yaml").write_text(config)
        self._hparams.update(_json_safe(params))
        self._write_json("hparams.json", self._hparams)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._start()
        values = {k: _finite_or_none(v) for k, v in metrics.items()}
        row = {"step": None if step is None else int(step), "time": round(time.time(), 3), "values": values}
        self._append("metrics.jsonl", row)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._meta is None:  # nothing was ever logged: still leave a record that says so
            self._start()
        assert self._meta is not None
        if self._meta.get("status") != "running":
            return  # finalize runs once per trainer.fit; a second call (test after fit) keeps the first status
        self._meta["status"] = "finished" if status == "success" else "failed"
        self._meta["end_time"] = time.time()
        self._write_json("meta.json", self._meta)
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    # ------------------------------------------------------------------ record extras
    @rank_zero_only
    def log_media(
        self, key: str, array: Any, step: int | None, kind: MediaKind = "values", meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store ``array`` (a tensor or array of any shape) as ``media/<key>/<step>.npy`` with an index line."""
        if kind not in _MEDIA_KINDS:
            raise EntrotrainError(f"record_media: kind must be one of {_MEDIA_KINDS}, got {kind!r}.")
        self._start()
        data = array.detach().to("cpu").double().numpy() if hasattr(array, "detach") else np.asarray(array, dtype=float)
        folder = self.run_dir / "media" / _safe_name(key)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{'none' if step is None else int(step):>08}.npy"
        np.save(folder / name, data)
        row = {
            "key": key,
            "step": None if step is None else int(step),
            "kind": kind,
            "file": f"media/{folder.name}/{name}",
            "shape": list(data.shape),
            "meta": _json_safe(dict(meta or {})),
        }
        self._append("media/index.jsonl", row)

    @rank_zero_only
    def log_threshold(self, key: str, value: float, label: str = "threshold") -> None:
        """Declare a reference line for ``key`` (drawn on its curve in the report)."""
        self._start()
        path = self.run_dir / "thresholds.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        row = {"key": key, "value": float(value), "label": label}
        if row not in rows:
            rows.append(row)
            self._write_json("thresholds.json", rows)

    @rank_zero_only
    def log_event(self, key: str, message: str, step: int | None, level: str = "alert") -> None:
        """Record an event (e.g. a collapse alert) at ``step``."""
        self._start()
        row = {"step": step, "key": key, "level": level, "message": message, "time": round(time.time(), 3)}
        self._append("events.jsonl", row)

    # ------------------------------------------------------------------ files
    def _start(self) -> None:
        if self._meta is not None:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        from entrotrain import __version__ as entrotrain_version  # local: entrotrain/__init__ imports this package

        recipe = self.recipe
        self._meta = {
            "format": RECORD_FORMAT,
            "status": "running",
            "name": self.run_name or (Path(recipe).stem if recipe else self.version),
            "recipe": recipe,
            "argv": list(sys.argv),
            "start_time": time.time(),
            "end_time": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "entrotrain_version": entrotrain_version,
            "description": _recipe_description(recipe),
        }
        self._write_json("meta.json", self._meta)

    def set_meta(self, **fields: Any) -> None:
        """Add fields to ``meta.json`` (e.g. ``wandb_dir``); rank zero only."""
        if not rank_zero_only.rank == 0:
            return
        self._start()
        assert self._meta is not None
        self._meta.update(_json_safe(fields))
        self._write_json("meta.json", self._meta)

    def _write_json(self, name: str, data: Any) -> None:
        path = self.run_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
        os.replace(tmp, path)  # a reader never sees half a file

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        handle = self._files.get(name)
        if handle is None or handle.closed:
            path = self.run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._files[name] = path.open("a", encoding="utf-8")
        handle.write(json.dumps(row, allow_nan=False) + "\n")
        handle.flush()

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-based DDP: open files do not travel
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


# ---------------------------------------------------------------------- one-line helpers for callbacks
def find_run_record(trainer: Trainer) -> RunRecordLogger | None:
    """The :class:`RunRecordLogger` among ``trainer.loggers`` on global rank zero, else ``None``."""
    if not trainer.is_global_zero:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, RunRecordLogger)), None)


def _current_step(trainer: Trainer) -> int:
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def record_media(
    trainer: Trainer,
    key: str,
    array: Any,
    step: int | None = None,
    kind: MediaKind = "values",
    **meta: Any,
) -> None:
    """Store an array in the run record (no-op without a :class:`RunRecordLogger` or off rank zero).

    Args:
        trainer: the running trainer.
        key: metric-style key, e.g. ``"entropy/attn_norm/heatmap"`` or ``"entropy/repr/layer3/spectrum"``.
        array: tensor or array; ``"heatmap"``: ``(rows, cols)``; ``"spectrum"``: 1-D eigenvalues (any order);
            ``"histogram"``: the raw values (the report bins them); ``"values"``: anything.
        step: the step to file it under; default the step Lightning logs this batch at (as ``publish_scalars``).
        kind: how the report draws it.
        meta: JSON-able extras (e.g. ``row_labels=[...]``, ``vmin=0, vmax=1``, ``n=..., d=...``).
    """
    record = find_run_record(trainer)
    if record is not None:
        record.log_media(key, array, _current_step(trainer) if step is None else step, kind=kind, meta=meta)


def record_threshold(trainer: Trainer, key: str, value: float, label: str = "threshold") -> None:
    """Declare a reference line for ``key`` in the run record (a collapse threshold, a guard threshold)."""
    record = find_run_record(trainer)
    if record is not None:
        record.log_threshold(key, value, label)


def record_event(trainer: Trainer, key: str, message: str, level: str = "alert", step: int | None = None) -> None:
    """Record an event (an alert, a learning-rate cut) for ``key`` in the run record."""
    record = find_run_record(trainer)
    if record is not None:
        record.log_event(key, message, _current_step(trainer) if step is None else step, level)
