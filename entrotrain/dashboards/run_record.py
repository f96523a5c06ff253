"""The local run record: what every entrotrain run writes to disk, whatever else it logs to.

:class:`RunRecordLogger` is a Lightning logger that keeps, in one folder per run (``RUN_DIR``)::

    meta.json          status (running → finished | failed | interrupted, with the reason), start/end time, the
                       writer's pid, host and process start, a heartbeat ``last_write`` (rewritten at most every
                       HEARTBEAT_S seconds while logging), resumes; always replaced atomically (tmp + os.replace)
    metrics.jsonl      one line per logging call: {"step": s, "time": t, "values": {key: float}}
    hparams.json       the hyperparameters loggers were given (merged)
    config.yaml        the LightningCLI config, when the run came from ``entrotrain fit``
    thresholds.json    reference lines monitors declared (collapse thresholds, guard thresholds)
    events.jsonl       alerts (e.g. an entropy collapse the guard saw): {"step", "key", "level", "message", "time"}
    media/index.jsonl  one line per array: {"key", "step", "kind", "file", "offset", "nbytes", "shape", "dtype", "meta"}
    media/<key>.bin    the arrays of one key, appended one after another (raw little-endian float64, C order)

The number of files is bounded for any run length: one ``.bin`` per media key plus one index, never one file per
step (records of earlier versions, with ``media/<key>/<step>.npy`` files and index rows without ``offset``, are
still read). Disk use grows by the arrays' own bytes per logging step (a 4 × 4 heatmap is 128 bytes, a 768-value
spectrum 6 KiB) plus ~200 bytes of index; ``"histogram"`` arrays longer than ``MAX_HISTOGRAM_VALUES`` are stored as
that many evenly spaced quantiles of their values (the histogram the report draws keeps its shape; the count is kept
as ``meta["n_values"]``).

Resuming (``Trainer.fit(ckpt_path=...)``, ``entrotrain fit --ckpt_path ...``) continues the same record: every
checkpoint carries the record's folder and step (``checkpoint["entrotrain_run_record"]``), and a resumed fit appends
to that folder with a marker line ``{"resume": {"step": S}}`` in each ``.jsonl``: readers drop what was written
before the marker at steps after ``S`` (logged after the checkpoint by the abandoned run) and keep the last value
written for each (key, step), so ``entrotrain report`` and ``status`` show the final trajectory and warn how many
rows of the abandoned attempt were superseded (they stay in the file).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from entrotrain.dashboards.run_record_format import RECORD_FORMAT, process_start_time  # shared with the reader
from entrotrain.errors import EntrotrainError

__all__ = [
    "CHECKPOINT_KEY",
    "HEARTBEAT_S",
    "MAX_HISTOGRAM_VALUES",
    "RECORD_FORMAT",
    "MediaKind",
    "RecordArray",
    "RecordThreshold",
    "RunRecordLogger",
    "find_run_record",
    "json_safe",
    "process_start_time",
    "record_arrays",
    "record_event",
    "record_media",
    "record_threshold",
    "record_thresholds",
    "unique_version",
]

#: The key a checkpoint carries the record's folder and step under (see "Resuming" above).
CHECKPOINT_KEY = "entrotrain_run_record"
#: ``meta["last_write"]`` is rewritten at most this often (seconds) while the run logs.
HEARTBEAT_S = 30.0
#: ``"histogram"`` media longer than this are stored as this many quantiles of their values.
MAX_HISTOGRAM_VALUES = 4096

MediaKind = Literal["heatmap", "spectrum", "histogram", "values"]
_MEDIA_KINDS = ("heatmap", "spectrum", "histogram", "values")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class RecordArray(NamedTuple):
    """One array a monitor stores in the run record at a logging step (its heatmap, spectrum, histogram, profile).

    Monitors build these once (``monitor.record_arrays(...)``) and every integration stores the same ones: Lightning
    through :func:`record_arrays`, a plain loop and ``transformers.Trainer`` through
    :meth:`RunRecordLogger.log_arrays`."""

    key: str
    array: Any
    kind: MediaKind = "values"
    meta: Mapping[str, Any] | None = None


class RecordThreshold(NamedTuple):
    """A reference line a monitor or guard declares for a key (``monitor.record_thresholds()``), drawn by the
    report on that key's curve."""

    key: str
    value: float
    label: str = "threshold"


def _safe_name(key: str) -> str:
    """A key as a folder name: ``entropy/attn_norm/heatmap`` → ``entropy__attn_norm__heatmap``."""
    return _UNSAFE.sub("_", key.replace("/", "__")).strip("_") or "media"


def json_safe(value: Any) -> Any:
    """``value`` as something :func:`json.dumps` accepts (tensors and arrays become lists, the rest ``str``)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, Namespace):
        return json_safe(vars(value))
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 0:
        return json_safe(value.tolist())
    if hasattr(value, "numel") and value.numel() <= 64:  # small tensors
        return json_safe(value.tolist())
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


def _histogram_summary(data: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced quantiles of ``data`` (non-finite values kept at the ends), sorted."""
    flat = np.sort(data.ravel())
    if flat.size <= limit:
        return data
    index = np.round(np.linspace(0, flat.size - 1, limit)).astype(np.int64)
    return flat[index]


class _RecordCheckpoint(Callback):
    """Puts the record's folder and step into every checkpoint (``checkpoint["entrotrain_run_record"]``) and, when
    a fit restores a checkpoint, points the record at the folder it names (the logger adds it to the trainer)."""

    def __init__(self, record: RunRecordLogger) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        entry = self.record.checkpoint_entry(_current_step(trainer))
        if entry is not None:
            checkpoint[CHECKPOINT_KEY] = entry

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validate/test from a checkpoint do not resume the run
            self.record._warn_if_superseded(trainer, checkpoint)
            self.record._resume_from(checkpoint, trainer.ckpt_path)


def _folder_name(value: Any, arg: str) -> str:
    """``value`` (an int as its digits) when it is one folder name: a non-empty string without ``/``, ``\\`` (or the
    OS's separators) or NUL, other than ``.`` and ``..``; else :class:`~entrotrain.errors.EntrotrainError` naming one
    that is."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # Lightning's loggers take version=3
    if not isinstance(value, str):
        raise EntrotrainError(
            f"RunRecordLogger: {arg} must be a string (a folder name), got {type(value).__name__} {value!r}; "
            f"e.g. {arg}={str(value)!r}."
        )
    seps = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if value in ("", ".", "..") or any(sep in value for sep in seps):
        fixed = "".join("-" if ch in seps else ch for ch in value).strip(".-") or "run"
        raise EntrotrainError(
            f"RunRecordLogger: {arg}={value!r} is not one folder name: the record goes to save_dir/name/version, and "
            f"a '/' or '\\' would nest folders, '..' leave save_dir. Pass a plain name, e.g. {arg}={fixed!r} (or put "
            "the grouping into save_dir)."
        )
    return value


def unique_version(parent: Path, stem: str) -> str:
    """A record folder name under ``parent``: ``<stem>-YYYYmmdd-HHMMSS`` (local time), made unique with ``-2``, ..."""
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    version, n = base, 1
    while (parent / version).exists():
        n += 1
        version = f"{base}-{n}"
    return version


class RunRecordLogger(Logger):
    """Writes the local run record (see the module docstring) that ``entrotrain report`` turns into HTML.

    ``entrotrain fit`` adds one to every run; outside the CLI add it beside any other logger::

        Trainer(logger=[WandbLogger(...), RunRecordLogger("runs")])

    A fit resumed from a checkpoint this record's run saved continues the same folder (set ``resume=False`` to
    start a new one).

    Args:
        save_dir: parent folder; the run goes to ``save_dir/name/version``.
        name: sub-folder grouping runs (default ``"records"``).
        version: the run's folder name; default ``run-YYYYmmdd-HHMMSS`` (local time, made unique with ``-2``, ...).
        recipe: the recipe or config file the run came from (shown in the report header).
        run_name: a short label for the run in reports (default: the recipe's file stem, else ``version``).
        resume: continue the record named by a restored checkpoint (default ``True``).

    Raises:
        EntrotrainError: when ``save_dir`` exists and is not a folder, or ``name`` / ``version`` is not one folder name
            (a ``/`` or ``\\`` in it would nest folders, ``..`` leave ``save_dir``).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] = "runs",
        name: str = "records",
        version: str | None = None,
        recipe: str | None = None,
        run_name: str | None = None,
        resume: bool = True,
    ) -> None:
        super().__init__()
        root = Path(save_dir)
        if root.exists() and not root.is_dir():
            raise EntrotrainError(f"RunRecordLogger: save_dir {root} exists and is not a folder; pass a folder path.")
        self._save_dir = root
        self._name = _folder_name(name, "name")
        self._version = None if version is None else _folder_name(version, "version")
        self.recipe = recipe
        self.run_name = run_name
        self.resume = bool(resume)
        self._meta: dict[str, Any] | None = None
        self._hparams: dict[str, Any] = {}
        self._config_text: str | None = None
        self._files: dict[str, Any] = {}
        self._last_heartbeat = 0.0
        self._resume_info: dict[str, Any] | None = None  # {"step", "ckpt_path"} until _start writes the markers
        self._resume_checked = False
        self._trainer_id: int | None = None

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
        return unique_version(self._save_dir / self._name, "run")

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Merge ``params`` into ``hparams.json`` (a ``config`` string goes to ``config.yaml``). Before the record
        starts (the CLI saves its config before a checkpoint is restored) they are kept until it does."""
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        config = params.pop("config", None)
        if isinstance(config, str):  # the LightningCLI config as YAML (see entrotrain.cli)
            self._config_text = config
        self._hparams.update(json_safe(params))
        if self._meta is not None:
            self._write_hparams()

    @rank_zero_only
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Lightning calls this once per fit after restoring a checkpoint: the record starts here (in the folder a
        restored checkpoint names, when resuming)."""
        trainer = getattr(model, "_trainer", None)
        if trainer is not None:
            self._attach(trainer)
        self._start()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._start()
        values = {k: _finite_or_none(v) for k, v in metrics.items()}
        row = {"step": None if step is None else int(step), "time": round(time.time(), 3), "values": values}
        self._append("metrics.jsonl", row)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._heartbeat(force=True)

    @rank_zero_only
    def finalize(self, status: str, exc: BaseException | None = None) -> None:
        """Close the record: ``finished`` on success; on an exception ``failed`` or, for ``KeyboardInterrupt`` and
        Lightning's SIGTERM exit, ``interrupted``, with the exception as ``meta["reason"]``: ``exc``, else the one
        being handled (Lightning calls this inside its ``except`` block, where :func:`sys.exc_info` holds it)."""
        if self._meta is None:  # nothing was ever logged: still leave a record that says so
            self._start()
        assert self._meta is not None
        if self._meta.get("status") != "running":
            return  # finalize runs once per trainer.fit; a second call (test after fit) keeps the first status
        state, reason = _final_state(status, exc if exc is not None else sys.exc_info()[1])
        self._meta["status"] = state
        self._meta["reason"] = reason
        self._meta["end_time"] = self._meta["last_write"] = time.time()
        self._write_json("meta.json", self._meta)
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    # ------------------------------------------------------------------ record extras
    @rank_zero_only
    def log_media(
        self, key: str, array: Any, step: int | None, kind: MediaKind = "values", meta: Mapping[str, Any] | None = None
    ) -> None:
        """Append ``array`` (a tensor or array of any shape, stored as float64) to ``media/<key>.bin`` with an index
        line in ``media/index.jsonl`` (its offset, byte count, shape and dtype)."""
        if kind not in _MEDIA_KINDS:
            raise EntrotrainError(f"record_media: kind must be one of {_MEDIA_KINDS}, got {kind!r}.")
        self._start()
        data = array.detach().to("cpu").double().numpy() if hasattr(array, "detach") else np.asarray(array, dtype=float)
        meta = json_safe(dict(meta or {}))
        if kind == "histogram" and data.size > MAX_HISTOGRAM_VALUES:
            meta["n_values"] = int(data.size)
            data = _histogram_summary(data, MAX_HISTOGRAM_VALUES)
        data = np.ascontiguousarray(data, dtype="<f8")
        file = f"media/{_safe_name(key)}.bin"
        handle = self._handle(file, binary=True)
        handle.seek(0, os.SEEK_END)
        offset = handle.tell()
        handle.write(data.tobytes())
        handle.flush()  # the bytes land before the index line that points at them
        row = {
            "key": key,
            "step": None if step is None else int(step),
            "kind": kind,
            "file": file,
            "offset": offset,
            "nbytes": int(data.nbytes),
            "shape": list(data.shape),
            "dtype": "<f8",
            "time": round(time.time(), 3),
            "meta": meta,
        }
        self._append("media/index.jsonl", row)

    @rank_zero_only
    def log_arrays(self, arrays: Sequence[RecordArray], step: int | None) -> None:
        """Store a monitor's :meth:`record_arrays` output at ``step`` (each through :meth:`log_media`)."""
        for item in arrays:
            self.log_media(item.key, item.array, step, kind=item.kind, meta=item.meta)

    @rank_zero_only
    def log_thresholds(self, thresholds: Sequence[RecordThreshold]) -> None:
        """Declare a monitor's or guard's :meth:`record_thresholds` (each through :meth:`log_threshold`)."""
        for line in thresholds:
            self.log_threshold(line.key, line.value, line.label)

    @property
    def started(self) -> bool:
        """Whether the record's folder exists: something was written (hyperparameters alone wait for the start)."""
        return self._meta is not None

    @property
    def closed(self) -> bool:
        """Whether :meth:`finalize` has closed this record (a record holds one run: a closed one takes no new run)."""
        return self._meta is not None and self._meta.get("status") != "running"

    def checkpoint_entry(self, step: int) -> dict[str, Any] | None:
        """What a checkpoint saved at ``step`` carries so that a resumed run continues this record (``None`` before the
        record starts): ``{"run_dir", "step"}``, as ``checkpoint["entrotrain_run_record"]``."""
        if self._meta is None:
            return None
        return {"run_dir": str(self.run_dir.resolve()), "step": int(step)}

    def resume_from_entry(self, entry: Mapping[str, Any] | None, ckpt_path: Any = None) -> None:
        """Continue the record a checkpoint's :meth:`checkpoint_entry` names (if ``resume`` and it still exists), as a
        Lightning fit resumed from that checkpoint does; call it before the first write. ``None``: a fresh record."""
        if entry is not None:
            self._resume_from({CHECKPOINT_KEY: entry}, ckpt_path)

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

    # ------------------------------------------------------------------ resume
    def _attach(self, trainer: Trainer) -> None:
        """Once per trainer: add the checkpoint callback that carries this record's folder, and pick up a
        checkpoint the trainer has just restored (its ``on_load_checkpoint`` never ran: it was not there yet)."""
        if self._trainer_id == id(trainer):
            return
        self._trainer_id = id(trainer)
        if not any(isinstance(cb, _RecordCheckpoint) and cb.record is self for cb in trainer.callbacks):
            trainer.callbacks.append(_RecordCheckpoint(self))
        connector = getattr(trainer, "_checkpoint_connector", None)
        loaded = getattr(connector, "_loaded_checkpoint", None)  # kept until resume_end(), after log_graph
        if isinstance(loaded, dict) and loaded and trainer.state.fn == TrainerFn.FITTING:
            self._warn_if_superseded(trainer, loaded)
            self._resume_from(loaded, trainer.ckpt_path)

    def _warn_if_superseded(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        """Before continuing the record a checkpoint names: warn (rank zero) when the module's or datamodule's
        hyperparameters differ from the checkpoint's, as the changed run would supersede the record's history after
        the checkpoint, and Lightning restores the saved optimizer state over the changed settings. Not when a
        ``ResumeWithChanges`` callback is there (it forks the record instead)."""
        from lightning.pytorch.utilities import rank_zero_warn

        from entrotrain.callbacks.resume_with_changes import ResumeWithChanges, hyperparameter_changes

        info = checkpoint.get(CHECKPOINT_KEY)
        if (not self.resume or self._resume_checked or not isinstance(info, Mapping)
                or not (Path(str(info.get("run_dir"))) / "meta.json").is_file()
                or any(isinstance(cb, ResumeWithChanges) for cb in trainer.callbacks)):
            return
        changes = hyperparameter_changes(trainer.lightning_module, trainer.datamodule, checkpoint)
        if not changes:
            return
        listed = ", ".join(f"{key}: {json.dumps(old)} → {json.dumps(new)}" for key, old, new in changes[:4])
        more = f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""
        rank_zero_warn(
            f"RunRecordLogger: resuming from {trainer.ckpt_path} with hyperparameters that differ from the "
            f"checkpoint's ({listed}{more}): the record {info.get('run_dir')} is continued, its steps after "
            f"{info.get('step')} are superseded, and Lightning restores the checkpoint's optimizer state (its learning "
            "rate, betas and weight decay win). To use the changed settings and record a new run beside it, add "
            "entrotrain.callbacks.resume_with_changes.ResumeWithChanges() to the Trainer's callbacks."
        )

    def _resume_from(self, checkpoint: Mapping[str, Any], ckpt_path: Any) -> None:
        """Continue the record ``checkpoint`` names (if ``resume`` and it still exists)."""
        info = checkpoint.get(CHECKPOINT_KEY)
        if not self.resume or self._resume_checked or not isinstance(info, Mapping):
            return
        self._resume_checked = True
        target = Path(str(info.get("run_dir")))
        if not (target / "meta.json").is_file():
            self._resume_info = {
                "step": info.get("step"), "ckpt_path": _path_or_none(ckpt_path), "missing_record": str(target)
            }
            return
        if self._meta is not None and self.run_dir.resolve() != target.resolve():
            if not self.discard_if_empty():
                return  # this process already logged into its own folder: keep it (meta names the checkpoint)
        self._save_dir, self._name, self._version = target.parent.parent, target.parent.name, target.name
        self._resume_info = {"step": info.get("step"), "ckpt_path": _path_or_none(ckpt_path)}
        if self._meta is not None:  # the same folder, already open in this process: just mark the resume
            self._meta = None
            self._start()

    def discard_if_empty(self) -> bool:
        """Remove this record's folder if it holds no logged data yet (a folder started before the process learned it
        resumes another record, or a run refused before its first step); whether it was removed."""
        run_dir = self.run_dir
        if any((run_dir / name).exists() for name in ("metrics.jsonl", "events.jsonl", "media")):
            return False
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        for name in ("meta.json", "hparams.json", "config.yaml", "thresholds.json"):
            (run_dir / name).unlink(missing_ok=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass
        self._meta = None
        return True

    # ------------------------------------------------------------------ files
    def _start(self) -> None:
        if self._meta is not None:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        from entrotrain import __version__ as entrotrain_version  # local: entrotrain/__init__ imports this package

        now = time.time()
        writer = {
            "status": "running",
            "reason": None,
            "argv": list(sys.argv),
            "end_time": None,
            "last_write": now,
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "host": socket.gethostname(),
            "entrotrain_version": entrotrain_version,
        }
        previous = self._read_previous_meta(run_dir) if self._resume_info else None
        if previous is not None:
            resumes = list(previous.get("resumes") or [])
            resumes.append({"time": now, "step": self._resume_info.get("step"), "ckpt_path": self._resume_info.get("ckpt_path")})
            self._meta = {**previous, **writer, "resumes": resumes}
            old = run_dir / "hparams.json"
            if old.is_file():
                self._hparams = {**json.loads(old.read_text()), **self._hparams}
        else:
            recipe = self.recipe
            self._meta = {
                "format": RECORD_FORMAT,
                "name": self.run_name or (Path(recipe).stem if recipe else self.version),
                "recipe": recipe,
                "start_time": now,
                **writer,
                "description": _recipe_description(recipe),
            }
            if self._resume_info:  # resumed from a checkpoint whose record is gone: say so
                self._meta["resumed_from"] = self._resume_info
        self._last_heartbeat = now
        self._write_json("meta.json", self._meta)
        if previous is not None:
            marker = {"resume": {"step": self._resume_info.get("step"), "time": round(now, 3)}}
            for name in ("metrics.jsonl", "events.jsonl", "media/index.jsonl"):
                if (run_dir / name).is_file():
                    self._append(name, marker)
        self._resume_info = None
        if self._config_text is not None:
            (run_dir / "config.yaml").write_text(self._config_text)
        if self._hparams:
            self._write_hparams()

    @staticmethod
    def _read_previous_meta(run_dir: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((run_dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == RECORD_FORMAT else None

    def set_meta(self, **fields: Any) -> None:
        """Add fields to ``meta.json`` (e.g. ``wandb_dir``); rank zero only."""
        if not rank_zero_only.rank == 0:
            return
        self._start()
        assert self._meta is not None
        self._meta.update(json_safe(fields))
        self._write_json("meta.json", self._meta)

    def _write_hparams(self) -> None:
        if self._config_text is not None:
            (self.run_dir / "config.yaml").write_text(self._config_text)
        self._write_json("hparams.json", self._hparams)

    def _write_json(self, name: str, data: Any) -> None:
        path = self.run_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
        os.replace(tmp, path)  # a reader never sees half a file, a kill never leaves one

    def _heartbeat(self, force: bool = False) -> None:
        """Rewrite ``meta["last_write"]`` at most every ``HEARTBEAT_S`` seconds (readers tell a stalled run by it)."""
        now = time.time()
        if self._meta is None or (not force and now - self._last_heartbeat < HEARTBEAT_S):
            return
        self._last_heartbeat = self._meta["last_write"] = now
        self._write_json("meta.json", self._meta)

    def _handle(self, name: str, binary: bool = False) -> Any:
        handle = self._files.get(name)
        if handle is None or handle.closed:
            path = self.run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._files[name] = path.open("ab") if binary else path.open("a", encoding="utf-8")
            if not binary and _ends_inside_a_line(path):  # a killed writer's torn line: end it, keep ours whole
                handle.write("\n")
        return handle

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        handle = self._handle(name)
        handle.write(json.dumps(row, allow_nan=False) + "\n")
        handle.flush()
        self._heartbeat()

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-based DDP: open files do not travel
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


def _path_or_none(path: Any) -> str | None:
    return None if path is None else str(path)


def _ends_inside_a_line(path: Path) -> bool:
    """Whether the file at ``path`` is non-empty and does not end with a newline."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def _final_state(status: str, exc: BaseException | None) -> tuple[str, str | None]:
    """``(status, reason)`` for ``meta.json`` from Lightning's finalize status and the exception being handled."""
    if status == "success":
        return "finished", None
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "KeyboardInterrupt (Ctrl+C)"
    if exc is not None and type(exc).__name__ == "SIGTERMException":
        return "interrupted", "SIGTERM"
    if exc is None:
        return "failed", None
    text = f"{type(exc).__name__}: {exc}".strip()
    return "failed", text if len(text) <= 500 else text[:499] + "…"


# ---------------------------------------------------------------------- one-line helpers for callbacks
def find_run_record(trainer: Trainer) -> RunRecordLogger | None:
    """The :class:`RunRecordLogger` among ``trainer.loggers`` on global rank zero, else ``None``."""
    if not trainer.is_global_zero:
        return None
    record = next((lg for lg in trainer.loggers if isinstance(lg, RunRecordLogger)), None)
    if record is not None:
        record._attach(trainer)
    return record


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


def record_arrays(trainer: Trainer, arrays: Sequence[RecordArray], step: int | None = None) -> None:
    """Store a monitor's :class:`RecordArray` s (no-op without a :class:`RunRecordLogger` or off rank zero)."""
    for item in arrays:
        record_media(trainer, item.key, item.array, step, kind=item.kind, **dict(item.meta or {}))


def record_thresholds(trainer: Trainer, thresholds: Sequence[RecordThreshold]) -> None:
    """Declare a monitor's or guard's :class:`RecordThreshold` s (no-op without a :class:`RunRecordLogger`)."""
    for line in thresholds:
        record_threshold(trainer, line.key, line.value, line.label)


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
