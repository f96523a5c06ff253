"""Reading a run record (written by :class:`~entrotrain.dashboards.RunRecordLogger`) back into memory.

The reader is forgiving where a run was cut short and strict where the folder is not a run at all:

- a torn last line (the writer was killed mid-line) is skipped and reported in ``RunData.warnings`` (the report shows
  it on its page and on stderr), unless the writer is still alive and simply writing it;
- a media item whose bytes were never completely written is skipped with a warning;
- both media layouts are read: ``media/<key>.bin`` + ``offset`` rows (now), one ``.npy`` per step (earlier versions);
- a resume marker ``{"resume": {"step": S}}`` drops what was written before it at steps after ``S``; for each
  (key, step) the last value written wins: curves and tables show the final trajectory, never the abandoned attempt,
  and a note (``RunData.notes``, on the report and status pages) says how many rows (which steps) it superseded;
- the same key and step written twice with no resume in between (two processes writing one record) is warned about;
- a value stored as ``null`` (NaN or Inf when logged) or that is not a number (a key that changed type) has no point;
  a warning names the keys and counts;
- ``metrics.jsonl`` is read in blocks of 1 MiB, one line at a time into float64 columns (one per key set), so time
  and memory grow linearly with the record (50 000 rows x 296 keys: see ``benchmarks/run_record_scale.py``);
- a record read again while its run appends to it (:class:`RunFollower`, ``entrotrain status --follow``) reads only
  the bytes appended since the last read, and gives what a full read of the same bytes gives;
- a large record (``metrics.jsonl`` of 16 MiB or more) is read from the parsed copy the last reader left outside it
  (:mod:`~entrotrain.dashboards.run_cache`, under ``~/.cache/entrotrain``; ``ENTROTRAIN_CACHE_DIR=off`` turns it
  off) plus the bytes appended since, when that copy still matches the record's files; else in full;
- a record of a newer format raises an :class:`~entrotrain.errors.EntrotrainError` naming the upgrade;
- the run's status is decided in one place, :func:`run_status`, and every page and message uses it;
- a folder that is not a run record raises an :class:`~entrotrain.errors.EntrotrainError` naming what was expected.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from entrotrain.dashboards import run_cache
from entrotrain.dashboards.run_record_format import RECORD_FORMAT, process_start_time
from entrotrain.errors import EntrotrainError

__all__ = [
    "GUARD_ACTIONS", "MONITOR_PREFIXES", "STALE_AFTER_S", "MediaItem", "RunData", "RunFollower", "RunStatus",
    "find_records",
    "load_run", "missing_path", "natural_order", "run_status", "short_value",
]

#: Keys written by entrotrain monitors; a run with none of them (and no media) has "no monitor output".
MONITOR_PREFIXES = ("entropy/", "sigma_reparam/", "info/")
#: Event levels of a guard firing: ``EntropyCollapseGuard``'s actions (its own ``_ACTIONS``; this reader stays free
#: of lightning, so it does not import the guard).
GUARD_ACTIONS = ("warn", "alert", "stop", "reduce_lr", "rollback")
#: The state a rollback firing's message says it went back to (``EntropyCollapseGuard._roll_back``'s sentence).
_ROLLED_TO = re.compile(r"Rolled back the model and optimizer state to step (\d+)")
#: A "running" record on another host (whose pid cannot be checked) not updated for this long is reported as stale.
STALE_AFTER_S = 30 * 60.0


@dataclass
class MediaItem:
    """One stored array: ``key`` at ``step`` of ``kind``, loaded lazily from ``path`` (at ``offset`` with ``shape``
    and ``dtype`` in a ``.bin`` file, or a whole ``.npy`` file when ``offset`` is ``None``)."""

    key: str
    step: int | None
    kind: str
    path: Path
    meta: dict[str, Any]
    offset: int | None = None
    shape: tuple[int, ...] = ()
    dtype: str = "<f8"

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))

    def load(self) -> np.ndarray:
        """The array (float64).

        Raises:
            EntrotrainError: the file ends before the array does (the writer was killed while writing it).
        """
        if self.offset is None:
            return np.load(self.path)
        with self.path.open("rb") as f:
            f.seek(self.offset)
            raw = f.read(self.nbytes)
        if len(raw) < self.nbytes:
            raise EntrotrainError(
                f"{self.path.name} ends inside the array of {self.key} at step {self.step} ({len(raw)} of "
                f"{self.nbytes} bytes) — the run was killed while writing it."
            )
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape).astype(np.float64)


@dataclass(frozen=True)
class RunStatus:
    """What a run record says about its run, decided once by :func:`run_status`.

    ``state``: ``"running"``, ``"finished"``, ``"failed"``, ``"interrupted"``, ``"killed"`` (marked running, its
    process is gone), ``"stale"`` (marked running on another host, not updated for :data:`STALE_AFTER_S`) or
    ``"unknown"``; ``label``: the short text of the status column; ``message``: the banner sentence, ``None`` for a
    finished run; ``last_update``: when the record was last written (seconds since the epoch)."""

    state: str
    label: str
    message: str | None
    last_update: float | None


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "an unknown time"


def _pid_alive(meta: dict[str, Any]) -> bool | None:
    """Whether the process that wrote ``meta`` still runs (``None`` if it cannot be told: another host, no pid).

    A live pid whose start time differs from ``meta["pid_start"]`` is another process that reuses the pid."""
    pid = meta.get("pid")
    if meta.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return None
    started = meta.get("pid_start")
    now_started = process_start_time(pid)
    if isinstance(started, int) and now_started is not None and now_started != started:
        return False
    return True


def _last_update(meta: dict[str, Any], path: Path | None) -> float | None:
    """The latest of ``meta["last_write"]`` and the modification times of the record's appended files."""
    times = [float(meta["last_write"])] if isinstance(meta.get("last_write"), (int, float)) else []
    if path is not None:
        for name in ("metrics.jsonl", "events.jsonl", "media/index.jsonl", "meta.json"):
            try:
                times.append((path / name).stat().st_mtime)
            except OSError:
                continue
    if not times and isinstance(meta.get("start_time"), (int, float)):
        times.append(float(meta["start_time"]))
    return max(times) if times else None


def run_status(
    meta: dict[str, Any], path: Path | None = None, last_step: int | None = None, now: float | None = None
) -> RunStatus:
    """The status of the run whose record holds ``meta`` (at ``path``): the one place that decides it.

    ``meta["status"]`` says running / finished / failed / interrupted; a "running" record is checked against its
    writer: on the same host, a process that is gone means the run was killed; on another host, a record not updated
    for :data:`STALE_AFTER_S` is stale (stopped, or between two very distant logging steps)."""
    now = time.time() if now is None else now
    last = _last_update(meta, path)
    upto = f"up to step {last_step}" if last_step is not None else "nothing: no logging step was reached"
    reason = meta.get("reason")
    status = meta.get("status")
    if status == "finished":
        return RunStatus("finished", "finished", None, last)
    if status == "failed":
        why = f" ({reason})" if reason else ""
        return RunStatus("failed", "failed", f"The run failed{why}; this report shows what was logged, {upto}.", last)
    if status == "interrupted":
        why = f" ({reason})" if reason else ""
        return RunStatus("interrupted", "interrupted", f"The run was interrupted{why}; this report shows what was logged, {upto}.", last)
    if status != "running":
        return RunStatus("unknown", f"unknown ({status})", f"meta.json has an unknown status {status!r}; showing what was logged, {upto}.", last)
    alive = _pid_alive(meta)
    since = f"no update since {_clock(last)}"
    if alive is False:
        return RunStatus(
            "killed",
            f"killed ({since})",
            f"The run stopped without finishing: its process (pid {meta.get('pid')} on {meta.get('host')}) is gone "
            f"and the record has had {since} (killed?). This report shows what was logged, {upto}.",
            last,
        )
    if alive is None and last is not None and now - last > STALE_AFTER_S:
        return RunStatus(
            "stale",
            f"stale ({since})",
            f"The record says the run is in progress on {meta.get('host')}, but it has had {since} "
            f"({(now - last) / 60:.0f} min ago): it stopped without finishing, or is still running there between "
            f"two distant logging steps. This report shows what was logged, {upto}.",
            last,
        )
    started = meta.get("start_time")
    ago = f" (started {(now - float(started)) / 60:.1f} min ago)" if isinstance(started, (int, float)) else ""
    return RunStatus(
        "running",
        "running",
        f"The run is still in progress{ago}; this report shows what was logged so far, {upto}. Run `entrotrain "
        "report` again when it ends.",
        last,
    )


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
    run_status: RunStatus | None = None
    #: What the reader did that is not damage (rows a resume from an older checkpoint superseded), for the page.
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """A short name for legends: the recipe's stem, else the folder name."""
        return str(self.meta.get("name") or self.path.name)

    @property
    def status(self) -> str:
        """The run's state as :func:`run_status` decided it (``"finished"``, ``"killed"``, ...)."""
        return self.decided_status.state

    @property
    def decided_status(self) -> RunStatus:
        if self.run_status is None:
            self.run_status = run_status(self.meta, self.path, self.last_step)
        return self.run_status

    @property
    def last_step(self) -> int | None:
        """The last step any scalar or media item was logged at."""
        steps = [int(s[-1]) for s, _ in self.scalars.values() if len(s)]
        steps += [m.step for items in self.media.values() for m in items[-1:] if m.step is not None]
        return max(steps) if steps else None

    @property
    def guard_firings(self) -> list[dict[str, Any]]:
        """The events an :class:`~entrotrain.callbacks.EntropyCollapseGuard` firing recorded (level = its action),
        in order."""
        return [e for e in self.events if e.get("level") in GUARD_ACTIONS]

    @property
    def rollbacks(self) -> list[tuple[int, int]]:
        """``(step, to_step)`` of each rollback a guard made (``EntropyCollapseGuard(action="rollback")``), in
        order: the step it fired at and the step whose state it went back to, as its message says."""
        found = [(e.get("step"), _ROLLED_TO.search(str(e.get("message") or ""))) for e in self.guard_firings
                 if e.get("level") == "rollback"]
        return [(int(step), int(match.group(1))) for step, match in found if step is not None and match]

    @property
    def forked_from(self) -> str | None:
        """For a run resumed from a checkpoint with a changed configuration (``meta["forked_from"]``, written by
        ``entrotrain fit``): ``forked from PARENT after step S (CKPT); changed: key: old → new; ...``, else ``None``."""
        fork = self.meta.get("forked_from")
        if not isinstance(fork, dict):
            return None
        parent = Path(str(fork["run_dir"])).name if fork.get("run_dir") else "a checkpoint"
        changes = [c for c in fork.get("changes") or [] if isinstance(c, list) and len(c) == 3]
        listed = "; ".join(f"{key}: {short_value(old)} → {short_value(new)}" for key, old, new in changes[:4])
        listed += f"; … {len(changes) - 4} more" if len(changes) > 4 else ""
        where = f" after step {fork['step']}" if fork.get("step") is not None else ""
        return f"forked from {parent}{where} ({fork.get('ckpt_path')}); changed: {listed or 'nothing recorded'}"

    def first_last(self, key: str) -> tuple[float, float] | None:
        """First and last logged value of ``key`` (``None`` if never logged)."""
        if key not in self.scalars or not len(self.scalars[key][1]):
            return None
        values = self.scalars[key][1]
        return float(values[0]), float(values[-1])


def missing_path(path: Path, fix: str) -> str:
    """The message for a ``path`` that does not exist: the closest name beside it (``ckpts`` for ``ckpt``), if any,
    then ``fix``."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    meant = f" (did you mean {parent / close[0]}?)" if close else ""
    return f"{path} does not exist{meant}. {fix}"


def natural_order(text: str) -> list[object]:
    """Sort key putting ``H2`` before ``H10`` and ``step=2`` before ``step=10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def short_value(value: Any) -> str:
    """A configuration value in a line of text: a list of classes by name (``[EntropyFloorRegularizer]``), a class
    with its arguments (``ClipCovLoss(clip_ratio=0.2, ...)``), anything else as JSON, cut to a line."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
        return "[" + ", ".join(str(v["class_path"]).rpartition(".")[2] for v in value) + "]"
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in (value.get("init_args") or {}).items())
        text = f"{str(value['class_path']).rpartition('.')[2]}({args})"
        return text if len(text) <= 80 else text[:77] + "..."
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def find_records(folder: Path, limit: int = 5) -> list[Path]:
    """Run record folders (holding ``meta.json``) under ``folder``, newest first."""
    found = sorted(folder.glob("**/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.parent for p in found[:limit]]


_READ_BYTES = 1 << 20  # a .jsonl file is read in blocks of this many bytes
_MARK_BYTES = 64  # bytes kept at a followed file's start and before its offset, to notice a rewrite in place


class _JsonlTail:
    """A ``.jsonl`` file read from where the last read stopped: :meth:`new_rows` yields the JSON objects of the
    complete lines appended since, in blocks of :data:`_READ_BYTES` (memory holds a block and one line, whatever the
    file's size); the bytes after the last newline (a line being written, or torn) are kept in ``tail`` and read again
    with what follows them. :meth:`ending` says what a full read makes of that last line. Bad lines inside are reported;
    :meth:`replaced` tells a file that shrank or was replaced (then it must be read again from the start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.relative_to(path.parent.parent).as_posix() if path.parent.name == "media" else path.name
        self.end = 0  # bytes read: the complete lines and the tail
        self.lines = 0  # complete lines read
        self.tail = bytearray()  # the bytes after the last newline
        self.ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read
        self.head = b""  # its first _MARK_BYTES bytes, as read
        self.mark = b""  # the _MARK_BYTES bytes just before `end`, as read

    def replaced(self) -> bool:
        """Whether the file shrank, was replaced (another inode: a new run), rewritten in place (its first bytes or
        the bytes just before the offset read to differ from what was read: two short reads) or removed since it
        was read."""
        try:
            st = self.path.stat()
        except OSError:
            return self.end > 0 or self.ident is not None
        if st.st_size < self.end or (self.ident is not None and self.ident != (st.st_dev, st.st_ino)):
            return True
        return self.end > 0 and not self._same_bytes()

    def _same_bytes(self) -> bool:
        """Whether the file still holds the bytes read at its start and just before ``end``."""
        try:
            with self.path.open("rb") as f:
                if f.read(len(self.head)) != self.head:
                    return False
                f.seek(self.end - len(self.mark))
                return f.read(len(self.mark)) == self.mark
        except OSError:
            return False

    def new_rows(self, warnings: list[str]) -> Iterator[dict[str, Any]]:
        """The objects of the complete lines appended since the last read (read it to its end: it moves the
        offset as it goes)."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            st = os.fstat(f.fileno())
            if self.ident is None:
                self.ident = (st.st_dev, st.st_ino)
            elif self.ident != (st.st_dev, st.st_ino) or st.st_size < self.end:
                return  # replaced since replaced() looked: not read at the old offset; the next read starts over
            f.seek(self.end)
            while True:
                block = f.read(_READ_BYTES)
                if not block:
                    break
                if len(self.head) < _MARK_BYTES and self.end == len(self.head):  # (still reading the first bytes)
                    self.head += block[:_MARK_BYTES - len(self.head)]
                self.mark = block[-_MARK_BYTES:] if len(block) >= _MARK_BYTES else (self.mark + block)[-_MARK_BYTES:]
                self.end += len(block)
                pieces = block.split(b"\n")
                if len(pieces) == 1:
                    self.tail += block
                    continue
                pieces[0] = bytes(self.tail) + pieces[0] if self.tail else pieces[0]
                self.tail = bytearray(pieces.pop())
                for line in pieces:
                    row = self._row(line, warnings)
                    if row is not None:
                        yield row

    def _row(self, line: bytes, warnings: list[str]) -> dict[str, Any] | None:
        number = self.lines = self.lines + 1
        if not line or line.isspace():  # (not .strip(): that copies a 10 kB line to look at its ends)
            return None
        row = _parse(line)
        if row is None:
            warnings.append(
                f"{self.name}: line {number} is not a JSON object ({len(line)} bytes; a line torn when an earlier "
                "process was killed while writing?) and was skipped."
            )
        return row

    def ending(self, warnings: list[str], writing: bool) -> dict[str, Any] | None:
        """The file's last line when it has no newline (yet): its object if it parses as one (a complete line
        whose newline is not written yet), else ``None`` — a torn line, reported unless ``writing`` (the live writer
        is in the middle of it). Nothing is kept: the next read reads the line again, with what follows it."""
        line = bytes(self.tail)
        if not line or line.isspace():
            return None
        row = _parse(line)
        if row is None and not writing:
            warnings.append(f"{self.name} ends with a torn line ({len(line)} bytes) — the run was killed while "
                            "writing; it was skipped.")
        return row


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _iter_jsonl(path: Path, warnings: list[str], writing: bool = False) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, one per line (:class:`_JsonlTail` read once). A last line without its
    newline that does not parse is a torn line: reported (unless ``writing``: the live writer is in the middle of
    it); bad lines inside are reported."""
    reader = _JsonlTail(path)
    yield from reader.new_rows(warnings)
    last = reader.ending(warnings, writing)
    if last is not None:
        yield last


def _read_jsonl(path: Path, warnings: list[str], writing: bool = False) -> list[dict[str, Any]]:
    """:func:`_iter_jsonl` as a list."""
    return list(_iter_jsonl(path, warnings, writing))


def _resume_step(row: dict[str, Any]) -> int | None | bool:
    """``S`` for a resume marker row (``None`` when it has no step), ``False`` for any other row."""
    marker = row.get("resume")
    if not isinstance(marker, dict):
        return False
    step = marker.get("step")
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


#: Steps at or beyond this are not steps (they would not fit the int64 arrays the reader keeps steps in).
_MAX_STEP = 2**62


def _as_step(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if abs(value) < _MAX_STEP else None


def _as_float(value: Any) -> float:
    """``float(value)`` for a value of the JSON number types; an integer beyond float's range is ±inf."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


_NUMBERS = frozenset({float, int})  # what a value is (the writer writes null for a NaN or Inf)
_CHUNK_ROWS = 1024  # rows of one key set held as Python objects before they become one float64 array


class _Columns:
    """The rows of ``metrics.jsonl`` that log one set of keys, as float64 arrays: ``values[key, row]`` (NaN where
    the logged value was ``null`` or non-finite; one key's values lie together), with each row's step and position in
    the file."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.rows: list[list[Any]] = []
        self.steps: list[int] = []
        self.orders: list[int] = []
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (orders, steps, values[key, row])

    def add(self, order: int, step: int, values: list[Any]) -> None:
        self.rows.append(values)
        self.steps.append(step)
        self.orders.append(order)
        if len(self.rows) >= _CHUNK_ROWS:
            self.chunks.append(self._pending())
            self.rows, self.steps, self.orders = [], [], []

    def _pending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            values = np.array(self.rows, dtype=np.float64)
        except OverflowError:  # an integer literal beyond float's range (another tool's writer)
            values = np.array([[_as_float(v) for v in row] for row in self.rows], dtype=np.float64)
        values = np.ascontiguousarray(values.reshape(len(self.rows), len(self.keys)).T)
        return np.array(self.orders, dtype=np.int64), np.array(self.steps, dtype=np.int64), values

    def parts(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The chunks and the rows not yet in one, as arrays (the block itself is left as it is: more rows may
        follow)."""
        return self.chunks + [self._pending()] if self.rows else list(self.chunks)

    def copy(self) -> _Columns:
        twin = _Columns(self.keys)
        twin.rows, twin.steps, twin.orders, twin.chunks = list(self.rows), list(self.steps), list(self.orders), list(
            self.chunks)
        return twin


class _ScalarRows:
    """The rows of ``metrics.jsonl`` read so far (:meth:`add` one at a time, in file order), gathered into
    :class:`_Columns` per key set; :meth:`result` gives the scalars of the rows added so far, and more rows may be
    added after it (``entrotrain status --follow`` adds the rows appended since its last redraw)."""

    def __init__(self, warnings: list[str]) -> None:
        self.warnings = warnings  # bad rows, in file order
        self.columns: dict[tuple[str, ...], _Columns] = {}
        self.markers: list[tuple[int, int]] = []  # (order, S) of each resume marker with a step
        self.odd: dict[str, dict[str, int]] = {}  # key -> {type name: values skipped}
        self.nulls: dict[str, tuple[int, int]] = {}  # key -> (values stored as null, first step)
        self.count = 0  # rows added

    def copy(self, warnings: list[str]) -> _ScalarRows:
        """A twin that more rows can be added to without changing this one; it reports into ``warnings``."""
        twin = _ScalarRows(warnings)
        twin.columns = {keys: block.copy() for keys, block in self.columns.items()}
        twin.markers = list(self.markers)
        twin.odd = {key: dict(counts) for key, counts in self.odd.items()}
        twin.nulls = dict(self.nulls)
        twin.count = self.count
        return twin

    def add(self, row: dict[str, Any]) -> None:
        order = self.count
        self.count += 1
        resume = _resume_step(row)
        if resume is not False:
            if resume is not None:
                self.markers.append((order, resume))
            return
        step = order if row.get("step") is None else _as_step(row.get("step"))
        values = row.get("values")
        if step is None or not isinstance(values, dict):
            self.warnings.append(f"metrics.jsonl: line {order + 1} has no valid step/values and was skipped.")
            return
        if not _NUMBERS.issuperset(map(type, values.values())):  # null, bool, str, list ...: keep the numbers
            for key, value in values.items():
                if value is None:  # NaN or Inf when logged (the writer stores null): no value at this step
                    n, first = self.nulls.get(key, (0, step))
                    self.nulls[key] = (n + 1, min(first, step))
                elif type(value) not in _NUMBERS and key != "epoch":
                    counts = self.odd.setdefault(key, {})
                    counts[type(value).__name__] = counts.get(type(value).__name__, 0) + 1
            values = {k: v for k, v in values.items() if type(v) in _NUMBERS}
        keys = tuple(values)
        block = self.columns.get(keys)
        if block is None:
            block = self.columns[keys] = _Columns(keys)
        block.add(order, step, list(values.values()))

    def result(
        self, warnings: list[str], notes: list[str] | None = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """key -> (steps, values) of the rows added so far (see :func:`_scalars`); what the whole record says
        (values logged twice, nulls, values that are not numbers) is appended to ``warnings``."""
        columns, markers, odd, nulls = self.columns, self.markers, self.odd, self.nulls
        marker_orders = np.array([m[0] for m in markers], dtype=np.int64)
        # a point written before a marker at a step after the marker's S was logged by the abandoned run: the least S of
        # the markers after each point is the last step it may hold
        limits = np.minimum.accumulate(np.array([m[1] for m in markers], dtype=np.float64)[::-1])[::-1]
        limits = np.append(limits, np.inf)
        # (orders, steps, the block's parts, its live rows or None for all, increasing)
        live_blocks: list[tuple[np.ndarray, np.ndarray, list[Any], np.ndarray | None, bool]] = []
        where: dict[str, list[tuple[int, int]]] = {}  # key -> [(block, column)]
        superseded: list[np.ndarray] = []  # steps of the rows an abandoned attempt logged
        for block in columns.values():
            parts = block.parts()
            if not parts:
                continue
            orders = np.concatenate([c[0] for c in parts])
            steps = np.concatenate([c[1] for c in parts])
            live = steps <= limits[np.searchsorted(marker_orders, orders, side="right")]
            superseded.append(steps[~live])
            kept = None if live.all() else live
            if kept is not None:
                orders, steps = orders[live], steps[live]
            increasing = bool(np.all(steps[1:] > steps[:-1]))
            for j, key in enumerate(block.keys):
                if key != "epoch":
                    where.setdefault(key, []).append((len(live_blocks), j))
            live_blocks.append((orders, steps, parts, kept, increasing))

        def column(b: int, j: int) -> np.ndarray:
            """Column ``j`` of block ``b``'s live rows: a new array (the parts stay as they are)."""
            _, _, parts, kept, _ = live_blocks[b]
            values = np.concatenate([c[2][j] for c in parts])
            return values if kept is None else values[kept]

        scalars: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        twice: dict[str, tuple[int, int]] = {}  # key -> (values logged again for a step, first such step)
        for key, places in where.items():
            if len(places) == 1 and live_blocks[places[0][0]][4]:  # the usual case: one key set, steps increasing
                b, j = places[0]
                if len(live_blocks[b][1]):  # every key of the block shares its steps array
                    scalars[key] = (live_blocks[b][1], column(b, j))
                continue
            orders = np.concatenate([live_blocks[b][0] for b, _ in places])
            steps = np.concatenate([live_blocks[b][1] for b, _ in places])
            values = np.concatenate([column(b, j) for b, j in places])
            if not len(steps):
                continue
            by = np.lexsort((orders, steps))  # by step, then by when it was written
            steps, values, orders = steps[by], values[by], orders[by]
            last = np.append(steps[1:] != steps[:-1], True)  # the last write of each step wins
            scalars[key] = (steps[last], values[last])
            if not last.all():  # written twice between the same two resume markers: one process never does that
                segment = np.searchsorted(marker_orders, orders, side="right")
                again = (steps[1:] == steps[:-1]) & (segment[1:] == segment[:-1])
                if again.any():
                    twice[key] = (int(again.sum()), int(steps[1:][again][0]))
        dropped = np.concatenate(superseded) if superseded else np.zeros(0, dtype=np.int64)
        if dropped.size and notes is not None:
            resumed = ", ".join(str(m[1]) for m in markers[:5]) + (" …" if len(markers) > 5 else "")
            notes.append(
                f"The run was resumed from an earlier checkpoint (at step {resumed}): {dropped.size} logged row(s) of "
                f"the abandoned attempt, steps {int(dropped.min())}–{int(dropped.max())}, were logged again by the "
                "resumed run. Curves and tables show the final trajectory only (the resumed run's values from each "
                "resume step on); the abandoned rows stay in metrics.jsonl."
            )
        if twice:
            warnings.append(
                f"metrics.jsonl: {sum(n for n, _ in twice.values())} value(s) were logged again for a key and step "
                f"already logged, with no resume in between: {_first_steps(twice, 3, ' key(s)')}. Two processes are writing this record "
                "(two runs given the same folder?); each (key, step) shows the last value written, which may come from "
                "either. Give each run its own RunRecordLogger version (folder)."
            )
        if nulls:
            warnings.append(
                f"metrics.jsonl: {sum(n for n, _ in nulls.values())} logged value(s) were NaN or Inf (stored as null) "
                f"and have no point in the curves and tables: {_first_steps(nulls, 5)}."
            )
        if odd:
            listed = ", ".join(
                f"{k} ({', '.join(f'{n} {t}' for t, n in c.items())})" for k, c in sorted(odd.items())[:5])
            more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
            changed = [k for k in odd if k in scalars]
            what = f"; {', '.join(changed[:5])} changed type during the run" if changed else ""
            warnings.append(
                f"metrics.jsonl: values that are not numbers were skipped: {listed}{more}{what}. Log numbers (floats) "
                "under a key; put text in hyperparameters or events."
            )
        return scalars


def _first_steps(counts: dict[str, tuple[int, int]], shown: int, unit: str = "") -> str:
    """``key (n, first at step s), ...`` for the first ``shown`` keys of ``counts`` (key -> (n, first step)), in key
    order, and `` and N more{unit}`` for the others."""
    listed = ", ".join(f"{k} ({n}, first at step {s})" for k, (n, s) in sorted(counts.items())[:shown])
    return listed + (f" and {len(counts) - shown} more{unit}" if len(counts) > shown else "")


def _scalars(
    rows: Iterable[dict[str, Any]], warnings: list[str], notes: list[str] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values) sorted by step; for each (key, step) the last value written, after resume markers.

    Columnar (:class:`_ScalarRows`): rows that log the same keys are gathered into float64 arrays as they are read
    (a 300-key row costs one list, not 300 dictionary entries), so time and memory are linear in the record's size. A
    value that is ``null`` (NaN or Inf when it was logged) is left out, as is one that is not a number (a key that
    changed type); each is counted and named in ``warnings``. A ``NaN`` / ``Infinity`` token (another tool's writer)
    is kept as it is. What a resume from an older checkpoint superseded goes to ``notes`` (not damage: how resuming
    works)."""
    gathered = _ScalarRows(warnings)
    for row in rows:
        gathered.add(row)
    return gathered.result(warnings, notes)


def _media_item(
    row: dict[str, Any], files: Callable[[str], tuple[Path, int]], warnings: list[str]
) -> MediaItem | None:
    """The item an index row describes, or ``None`` (with a warning) when its file or bytes are missing."""
    file, size = files(str(row.get("file", "")))
    if size == -2:
        warnings.append(
            f"media file {row.get('file')!r} listed in media/index.jsonl is outside the run's folder (an absolute path "
            "or one through '..': the index was edited or damaged); skipped, not read."
        )
        return None
    if "key" not in row or size < 0:
        warnings.append(f"media file {row.get('file')} listed in media/index.jsonl is missing; skipped.")
        return None
    step = _as_step(row.get("step"))
    item = MediaItem(str(row["key"]), step, str(row.get("kind", "values")), file, dict(row.get("meta") or {}))
    if row.get("offset") is None:
        return item  # a .npy per step (records written before the .bin layout)
    try:
        item.offset, item.shape, item.dtype = int(row["offset"]), tuple(int(n) for n in row["shape"]), str(row.get("dtype", "<f8"))
        np.dtype(item.dtype)
    except (KeyError, TypeError, ValueError):
        warnings.append(f"media/index.jsonl: the row for {row['key']} at step {step} is malformed; skipped.")
        return None
    if item.offset + item.nbytes > size:
        warnings.append(
            f"{row.get('file')} ends inside the array of {item.key} at step {step} — the run was killed while "
            "writing it; skipped."
        )
        return None
    return item


class _MediaRows:
    """The rows of ``media/index.jsonl`` read so far (:meth:`add` in file order): for each (key, step) the last item
    written, after resume markers. ``skipped``: a row was skipped (its file or bytes missing), so that a later read
    of a grown file may decide it otherwise (``entrotrain status --follow`` then reads the index again in full)."""

    def __init__(self, path: Path, warnings: list[str]) -> None:
        self.path = path
        self.warnings = warnings
        self.items: dict[str, dict[int | None, MediaItem]] = {}
        self.sizes: dict[str, tuple[Path, int]] = {}  # file name -> (path, size): looked up once per file and read
        self.skipped = False

    def copy(self, warnings: list[str]) -> _MediaRows:
        """A twin that more rows can be added to without changing this one; it reports into ``warnings``."""
        twin = _MediaRows(self.path, warnings)
        twin.items = {key: dict(items) for key, items in self.items.items()}
        twin.sizes, twin.skipped = self.sizes, self.skipped
        return twin

    def _file(self, name: str) -> tuple[Path, int]:
        """The path and size of the record's file ``name`` (-1: not a file; -2: not inside the record's folder, an
        absolute path or one through ``..``, never read), looked up once per file, not per row."""
        if name not in self.sizes:
            file = self.path / name
            parts = Path(name.replace("\\", "/")).parts
            if Path(name).is_absolute() or ".." in parts:
                self.sizes[name] = file, -2
            else:
                self.sizes[name] = file, file.stat().st_size if file.is_file() else -1
        return self.sizes[name]

    def add(self, row: dict[str, Any]) -> None:
        resume = _resume_step(row)
        if resume is not False:
            if resume is not None:
                for items in self.items.values():
                    for step in [s for s in items if s is not None and s > resume]:
                        del items[step]
            return
        item = _media_item(row, self._file, self.warnings)
        if item is None:
            self.skipped = True
            return
        items = self.items.setdefault(item.key, {})
        items.pop(item.step, None)
        items[item.step] = item  # the last one written for a (key, step) wins

    def result(self) -> dict[str, list[MediaItem]]:
        return {
            key: sorted(items.values(), key=lambda m: -1 if m.step is None else m.step)
            for key, items in self.items.items() if items
        }


def _media(path: Path, rows: Iterable[dict[str, Any]], warnings: list[str]) -> dict[str, list[MediaItem]]:
    gathered = _MediaRows(path, warnings)
    for row in rows:
        gathered.add(row)
    return gathered.result()


class _EventRows:
    """The rows of ``events.jsonl`` read so far (:meth:`add` in file order), less those a resume marker dropped."""

    def __init__(self, warnings: list[str]) -> None:
        self.warnings = warnings
        self.events: list[dict[str, Any]] = []

    def copy(self, warnings: list[str]) -> _EventRows:
        twin = _EventRows(warnings)
        twin.events = list(self.events)
        return twin

    def add(self, row: dict[str, Any]) -> None:
        resume = _resume_step(row)
        if resume is False:
            self.events.append(row)
        elif resume is not None:
            self.events = [e for e in self.events if not (isinstance(e.get("step"), int) and e["step"] > resume)]


def _events(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    gathered = _EventRows([])
    for row in rows:
        gathered.add(row)
    return gathered.events


def _newer_format(meta: Any) -> str | None:
    """``meta["format"]`` when it names a run record format newer than :data:`RECORD_FORMAT`, else ``None``."""
    name, _, version = RECORD_FORMAT.rpartition("/")
    found = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(found, str) or not found.startswith(name + "/"):
        return None
    theirs = found[len(name) + 1:].split(".")[0]
    return found if theirs.isdigit() and int(theirs) > int(version) else None


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


def _read_json(path: Path, default: Any, warnings: list[str]) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.append(f"{path.name} is not valid JSON and was ignored.")
        return default


def _existing_files(path: Path) -> list[str]:
    """The record's files (not the reports written into it), relative to ``path``."""
    files = (p.relative_to(path) for p in path.rglob("*") if p.is_file())
    return sorted(f.as_posix() for f in files if f.parts[0] != "report" and not f.parts[0].startswith("compare-"))


def load_run(path: str | os.PathLike[str], require_monitors: bool = True) -> RunData:
    """Read the run record at ``path``.

    A run that did not finish and logged no monitor output (it stopped, or has not yet reached, its first logging
    step) is returned with a warning that says so and lists what exists.

    Args:
        path: the run record folder.
        require_monitors: refuse a *finished* run without monitor output (a report would be empty); ``False``
            returns it with a warning (``entrotrain status`` lists such runs too).

    Raises:
        EntrotrainError: ``path`` does not exist or is not a run record (names what was expected and lists records
            found below it), or, with ``require_monitors``, a *finished* run logged no monitor output (names the
            monitors to add).
    """
    return RunFollower(path).read(require_monitors)


def _read_meta(path: Path) -> tuple[dict[str, Any], str | None]:
    """The record's ``meta.json`` and, when it is damaged, the warning that says so (then ``meta`` is a stand-in).

    Raises:
        EntrotrainError: as :func:`load_run`.
    """
    path = Path(path)
    if not path.exists():
        raise EntrotrainError(missing_path(path, "Pass the run record folder printed at the end of the run."))
    meta_path = path / "meta.json"
    if not path.is_dir() or not meta_path.is_file():
        raise _not_a_run(path)
    damaged = None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if not (path / "metrics.jsonl").is_file():
            raise EntrotrainError(
                f"{meta_path} is not valid JSON ({err}) and there is no metrics.jsonl beside it: nothing of the run "
                "can be read. Restore the folder from where the run wrote it (a copy cut short?)."
            ) from err
        # the writer replaces meta.json atomically: something else damaged it (a copy cut short, a full disk)
        meta = {"format": RECORD_FORMAT, "name": path.name, "status": "damaged"}
        damaged = (f"meta.json is not valid JSON ({err}): the run's status, start time and command are unknown; "
                   "this shows what metrics.jsonl and the other files hold.")
    newer = _newer_format(meta)
    if newer is not None:
        from entrotrain import __version__

        raise EntrotrainError(
            f"{meta_path} was written by a newer entrotrain (record format {newer!r}; entrotrain {__version__} reads "
            f"{RECORD_FORMAT!r}). Upgrade entrotrain where you read it (`pip install -U entrotrain`), or read it "
            "with the entrotrain that wrote it (meta.json's entrotrain_version)."
        )
    if not isinstance(meta, dict) or meta.get("format") != RECORD_FORMAT:
        raise EntrotrainError(
            f"{meta_path} is not an entrotrain run record (its format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {RECORD_FORMAT!r})."
        )
    return meta, damaged


class RunFollower:
    """A run record read again and again while its run appends to it (``entrotrain status --follow``).

    The first :meth:`read` reads the whole record; each later one reads only the bytes appended since to
    ``metrics.jsonl``, ``media/index.jsonl`` and ``events.jsonl`` (their offsets are kept; a line without its newline
    yet is kept and read again with what follows it) and the small files (``meta.json``, ``hparams.json``,
    ``thresholds.json``, ``config.yaml``) again. A file that shrank, was replaced, rewritten in place (its first 64
    bytes or the 64 before the offset read differ) or removed (a new run in the folder, a truncation) makes that read
    a full one. Each read returns what :func:`load_run` returns for the same bytes:
    ``load_run`` is a follower's first read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.full_reads = 0  # reads that started from the beginning (the first, and one per replaced file)
        self._start()

    def _start(self) -> None:
        self._metrics = _JsonlTail(self.path / "metrics.jsonl")
        self._scalar_rows = _ScalarRows([])
        self._media_start()
        self._events = _JsonlTail(self.path / "events.jsonl")
        self._event_rows = _EventRows([])
        self._last: tuple[tuple[int, bool], dict[str, tuple[np.ndarray, np.ndarray]], list[str], list[str]] | None
        self._last = None  # (what it was read from, scalars, their warnings, notes) of the last read
        self.full_reads += 1
        # a large record's parsed state from the last reader's cache, when it is valid for the files as they are
        self._cached_end, self._cached_media = 0, False
        metrics_restored, self._cached_media = run_cache.restore(
            self.path, self._metrics, self._scalar_rows, self._index, self._media_rows)
        if metrics_restored:
            self._cached_end = self._metrics.end

    def _media_start(self) -> None:
        self._index = _JsonlTail(self.path / "media" / "index.jsonl")
        self._media_rows = _MediaRows(self.path, [])
        self._cached_media = False

    def read(self, require_monitors: bool = True) -> RunData:
        """The run record as it is now (see :func:`load_run`, whose arguments and errors these are)."""
        path = self.path
        meta, damaged = _read_meta(path)
        if any(f.replaced() for f in (self._metrics, self._index, self._events)):
            self._start()
        elif self._media_rows.skipped:  # a file missing (or short) then may be there now: decide every row again
            self._media_start()
        writing = meta.get("status") == "running" and _pid_alive(meta) is True  # a live writer may be mid-line
        for row in self._metrics.new_rows(self._scalar_rows.warnings):
            self._scalar_rows.add(row)
        self._media_rows.sizes.clear()  # the .bin files grow: look their sizes up again
        for row in self._index.new_rows(self._media_rows.warnings):
            self._media_rows.add(row)
        for row in self._events.new_rows(self._event_rows.warnings):
            self._event_rows.add(row)
        self._save_cache()
        scalars, warnings, notes = self._read_scalars(writing)
        warnings = list(warnings)
        media_rows = self._media_rows
        warnings += media_rows.warnings
        last = self._index.ending(warnings, writing)  # (a line the writer has not ended yet counts, as in a full read)
        if last is not None:
            media_rows = media_rows.copy(warnings)
            media_rows.add(last)
        event_warnings = list(self._event_rows.warnings)
        event_rows = self._event_rows
        last = self._events.ending(event_warnings, writing)
        if last is not None:
            event_rows = event_rows.copy(event_warnings)
            event_rows.add(last)
        run = RunData(
            path=path,
            meta=meta,
            scalars=dict(scalars),  # (the arrays are shared with the next read's: nothing writes to them)
            media=media_rows.result(),
            hparams=_read_json(path / "hparams.json", {}, warnings),
            config_text=(path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None,
            thresholds=_read_json(path / "thresholds.json", [], warnings),
            events=list(event_rows.events),
            warnings=warnings + event_warnings,
            notes=list(notes),
        )
        return _finish(run, damaged, require_monitors)

    def _save_cache(self) -> None:
        """Write the parsed state to the cache (:mod:`~entrotrain.dashboards.run_cache`) when the record is large
        and :data:`~entrotrain.dashboards.run_cache.SAVE_AFTER_BYTES` were parsed beyond the cache read, or the
        cache lacked the media index."""
        end = self._metrics.end
        if end < run_cache.MIN_BYTES:
            return
        grown = end - self._cached_end >= run_cache.SAVE_AFTER_BYTES
        if not grown and (self._cached_media or self._media_rows.skipped):
            return
        run_cache.save(self.path, self._metrics, self._scalar_rows, self._index, self._media_rows)
        self._cached_end, self._cached_media = end, True  # (a cache that could not be written: not tried again)

    def _read_scalars(
        self, writing: bool
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], list[str]]:
        """The scalars of ``metrics.jsonl`` as read so far, with their warnings and notes; the last read's when
        nothing was appended since."""
        read_from = (self._metrics.end, writing)
        if self._last is not None and self._last[0] == read_from:
            return self._last[1], self._last[2], self._last[3]
        warnings = list(self._scalar_rows.warnings)
        rows = self._scalar_rows
        last = self._metrics.ending(warnings, writing)
        if last is not None:  # a complete line whose newline is not written yet: counted, and read again next time
            rows = rows.copy(warnings)
            rows.add(last)
        notes: list[str] = []
        scalars = rows.result(warnings, notes)
        self._last = (read_from, scalars, warnings, notes)
        return scalars, warnings, notes


def _finish(run: RunData, damaged: str | None, require_monitors: bool) -> RunData:
    """``run`` with the status, monitor-output and damage sentences at the head of its warnings (see
    :func:`load_run`)."""
    path, scalars, media, warnings = run.path, run.scalars, run.media, run.warnings
    status = run.decided_status
    has_monitor_output = any(k.startswith(MONITOR_PREFIXES) for k in scalars) or bool(media)
    metrics_file = path / "metrics.jsonl"
    if not scalars and metrics_file.is_file() and metrics_file.stat().st_size == 0 and status.state == "finished":
        # the writer creates metrics.jsonl with its first line: an empty one was cut short after the run
        raise EntrotrainError(
            f"{metrics_file} is empty (0 bytes) although the run finished: the record was truncated after it was "
            "written (a copy cut short, a full disk?). Copy the run's folder again from where it ran."
        )
    if not has_monitor_output and status.state == "finished" and require_monitors:
        logged = sorted(scalars)[:12]
        raise EntrotrainError(
            f"run {path} has no monitor output (no entropy/*, sigma_reparam/* or info/* keys; logged: {logged or 'nothing'}). "
            "Add a monitor (AttentionEntropyMonitor, PolicyEntropyMonitor, RepresentationEntropyMonitor, "
            "SigmaReparamMonitor) to the trainer's callbacks, and train past its first logging step."
        )
    if not has_monitor_output:
        what = "nothing was logged" if not scalars else f"only {', '.join(sorted(scalars)[:8])} were logged"
        if status.state == "finished":
            said = f"The run finished without monitor output (no entropy/*, sigma_reparam/* or info/* keys): {what}."
        else:
            stopped = "has not reached" if status.state == "running" else "stopped before"
            said = f"The run {stopped} its monitors' first logging step ({status.label}): {what}."
        warnings.insert(0, f"{said} What exists: {', '.join(_existing_files(path)) or 'nothing'}.")
    if status.message:
        warnings.insert(0, status.message)
    if damaged:
        warnings.insert(0, damaged)
    return run
