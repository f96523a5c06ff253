"""A parsed copy of a large run record, kept outside it, so that ``entrotrain status`` / ``report`` skip the JSON.

Reading ``metrics.jsonl`` is ``json.loads`` of every line (a three-week run: 50 000 lines, 660 MiB, ~10 CPU s). The
reader (:class:`~entrotrain.dashboards.run_reader.RunFollower`) keeps what it parsed as float64 columns; this module
saves that state (the columns, the resume markers, the counts behind the warnings, and the offsets of
``metrics.jsonl`` and ``media/index.jsonl`` with the bytes read there) to one ``.npz`` file, and the next reader
starts from it and parses only the bytes appended since — what ``status --follow`` does between two redraws, across
processes.

Contract:

- **The record wins.** A cache is used only when it was written for this record folder by this cache format, and
  ``metrics.jsonl`` (and ``media/index.jsonl``) is the same file (device and inode) at least as long as the cache's
  offset, with the same bytes at its start, just before the offset and at 64 places spread over what was read, and
  — when its size is the size seen when the cache was written — the same modification time (a rewrite in place at
  the same size). A ``.bin`` media file shorter than an array the cache points into, or missing, makes the media
  part be read again. Anything else (a new run in the folder, a truncated or edited file) and the record is read
  in full, and the cache written again. What is read from a cache equals a full read of the same bytes
  (``tests/dashboards/test_run_cache.py``).
- **A killed writer** (of the record: a torn last line) is handled as a full read handles it: the bytes after the
  last newline are not cached as a row; they are read again with what follows them. **A killed reader** (while
  writing the cache) leaves a temporary file, never a cache: the cache is written beside it and renamed over it
  (atomic), and a cache that does not load (truncated, its zip checksums wrong) is ignored.
- **Only for large records**: ``metrics.jsonl`` of at least :data:`MIN_BYTES`; it is written again once
  :data:`SAVE_AFTER_BYTES` more were parsed (a run still logging). Nothing is written into the run's folder (it may
  be read-only, or another user's): the cache lives under ``$ENTROTRAIN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/entrotrain/runs``, else ``~/.cache/entrotrain/runs``, one file per record folder (named by the
  SHA-256 of its resolved path). ``ENTROTRAIN_CACHE_DIR=off`` turns it off; a folder that cannot be written is
  skipped silently (the read is the same, only slower).
- **Bounded**: after each write the folder keeps the most recently used copies (a copy read is touched) within
  :data:`MAX_TOTAL_BYTES` (the copy just written always stays), and temporary files a killed reader left behind over
  an hour ago are removed; nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from entrotrain.dashboards.run_reader import _JsonlTail, _MediaRows, _ScalarRows

__all__ = [
    "CACHE_FORMAT", "MAX_TOTAL_BYTES", "MIN_BYTES", "SAVE_AFTER_BYTES", "cache_dir", "cache_file", "prune", "restore",
    "save",
]

#: The layout of a cache file; another value is not read.
CACHE_FORMAT = "entrotrain-run-cache/1"
#: The copies in the cache folder are kept within this many bytes, least recently used removed first.
MAX_TOTAL_BYTES = 2 << 30
#: A temporary file (of a reader killed while writing its copy) older than this many seconds is removed.
STALE_TEMPORARY_S = 3600
#: A ``metrics.jsonl`` smaller than this is read without a cache (parsing it costs less than a second).
MIN_BYTES = 16 << 20
#: A cache is written again once this many bytes of ``metrics.jsonl`` were parsed beyond it.
SAVE_AFTER_BYTES = 4 << 20
_SAMPLES = 64  # places of 64 bytes compared between the cache and the file
_SAMPLE_BYTES = 64
_NO_INT = np.iinfo(np.int64).min  # a media item's step or offset that is None


def cache_dir() -> Path | None:
    """The folder holding the caches, ``None`` when ``ENTROTRAIN_CACHE_DIR`` is ``off`` (or ``0``, ``none``)."""
    chosen = os.environ.get("ENTROTRAIN_CACHE_DIR", "").strip()
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "entrotrain" / "runs"


def cache_file(record: Path) -> Path | None:
    """The cache of the record folder ``record`` (whether or not it exists), ``None`` when caching is off."""
    folder = cache_dir()
    if folder is None:
        return None
    name = hashlib.sha256(str(Path(record).resolve()).encode()).hexdigest()[:32]
    return folder / f"{name}.npz"


def _bytes(text: str) -> bytes:
    return text.encode("latin-1")


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("latin-1")


def _sample_offsets(end: int) -> list[int]:
    if end <= _SAMPLE_BYTES:
        return [0]
    return sorted({int(x) for x in np.linspace(0, end - _SAMPLE_BYTES, _SAMPLES)})


def _samples(path: Path, offsets: list[int]) -> list[bytes]:
    with path.open("rb") as f:
        out = []
        for offset in offsets:
            f.seek(offset)
            out.append(f.read(_SAMPLE_BYTES))
        return out


def _tail_state(tail: _JsonlTail) -> dict[str, Any]:
    """What a :class:`_JsonlTail` read, and what the file looked like: enough to tell it is the same file later."""
    st = tail.path.stat()
    offsets = _sample_offsets(tail.end)
    return {
        "end": tail.end, "lines": tail.lines, "tail": _text(tail.tail), "ident": list(tail.ident or (0, 0)),
        "head": _text(tail.head), "mark": _text(tail.mark), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "samples": [[o, _text(b)] for o, b in zip(offsets, _samples(tail.path, offsets))],
    }


def _same_file(tail: _JsonlTail, state: dict[str, Any]) -> bool:
    """Whether ``tail``'s file is still the one ``state`` describes, with the same bytes where they were compared."""
    try:
        st = tail.path.stat()
        if [st.st_dev, st.st_ino] != state["ident"] or st.st_size < state["end"]:
            return False
        if st.st_size == state["size"] and st.st_mtime_ns != state["mtime_ns"]:
            return False  # rewritten in place at the same size
        offsets = [o for o, _ in state["samples"]]
        return _samples(tail.path, offsets) == [_bytes(b) for _, b in state["samples"]]
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _set_tail(tail: _JsonlTail, state: dict[str, Any]) -> None:
    tail.end, tail.lines, tail.tail = int(state["end"]), int(state["lines"]), bytearray(_bytes(state["tail"]))
    tail.ident = (int(state["ident"][0]), int(state["ident"][1]))
    tail.head, tail.mark = _bytes(state["head"]), _bytes(state["mark"])


def save(record: Path, metrics: _JsonlTail, rows: _ScalarRows, index: _JsonlTail | None = None,
         media: _MediaRows | None = None) -> bool:
    """Write the cache of ``record``: the state of ``metrics.jsonl`` as read (``metrics``, ``rows``) and, when
    given and nothing was skipped, of ``media/index.jsonl`` (``index``, ``media``). Each key set's chunks become one
    (in ``rows`` too: the same values, less memory). Returns whether it was written; never raises for a folder that
    cannot be written."""
    target = cache_file(record)
    if target is None:
        return False
    arrays: dict[str, np.ndarray] = {}
    blocks = []
    for i, block in enumerate(rows.columns.values()):
        parts = block.parts()
        if parts:
            merged = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2] for p in parts], axis=1))
        else:
            merged = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((len(block.keys), 0)))
        block.chunks, block.rows, block.steps, block.orders = [merged], [], [], []
        arrays[f"o{i}"], arrays[f"s{i}"], arrays[f"v{i}"] = merged
        blocks.append(list(block.keys))
    try:
        header: dict[str, Any] = {
            "format": CACHE_FORMAT, "record": str(Path(record).resolve()), "metrics": _tail_state(metrics),
            "blocks": blocks, "markers": rows.markers, "odd": rows.odd, "nulls": rows.nulls, "count": rows.count,
            "warnings": rows.warnings,
        }
        if index is not None and media is not None and not media.skipped and index.ident is not None:
            header["index"], header["media"] = _tail_state(index), _media_state(record, media, arrays)
    except (OSError, ValueError):
        return False
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError:
        return False
    prune(target.parent, keep=target)
    return True


def _is_copy_name(name: str) -> bool:
    stem, dot, ext = name.partition(".")
    return len(stem) == 32 and all(c in "0123456789abcdef" for c in stem) and dot == "." and ext.startswith("npz")


def prune(folder: Path, keep: Path | None = None) -> None:
    """Keep ``folder``'s copies within :data:`MAX_TOTAL_BYTES`, removing the least recently used first (never
    ``keep``), and remove temporary files older than :data:`STALE_TEMPORARY_S`. Only files named as this module
    names them are touched; a file that cannot be read or removed is left as it is."""
    copies = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not _is_copy_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.name.endswith(".tmp"):
            if time.time() - st.st_mtime > STALE_TEMPORARY_S:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        elif entry.name.endswith(".npz"):
            copies.append((st.st_mtime_ns, st.st_size, entry.path))
    total = sum(size for _, size, _ in copies)
    kept = None if keep is None else os.path.abspath(keep)
    for _, size, path in sorted(copies):  # oldest use first
        if total <= MAX_TOTAL_BYTES:
            break
        if os.path.abspath(path) == kept:
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            total -= size


def _media_state(record: Path, media: _MediaRows, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The media items as arrays (steps, offsets, an index into ``protos``: what the items of a key share)."""
    protos: dict[tuple[Any, ...], int] = {}  # (kind, path, repr of meta, shape, dtype) -> its place in `shared`
    shared: list[list[Any]] = []
    names: dict[Path, str] = {}
    keys = []
    for j, (key, items) in enumerate(media.items.items()):
        steps, offsets, which = [], [], []
        for step, item in items.items():
            steps.append(_NO_INT if step is None else step)
            offsets.append(_NO_INT if item.offset is None else item.offset)
            proto = (item.kind, item.path, repr(item.meta) if item.meta else "", item.shape, item.dtype)
            at = protos.get(proto)
            if at is None:  # (a JSON value's repr names it: 1, 1.0 and True differ, as in JSON)
                name = names.get(item.path)
                if name is None:
                    name = names[item.path] = item.path.relative_to(record).as_posix()
                at = protos[proto] = len(shared)
                shared.append([item.kind, name, item.meta, list(item.shape), item.dtype])
            which.append(at)
        arrays[f"ms{j}"] = np.array(steps, dtype=np.int64)
        arrays[f"mo{j}"] = np.array(offsets, dtype=np.int64)
        arrays[f"mp{j}"] = np.array(which, dtype=np.int64)
        keys.append(key)
    return {"keys": keys, "protos": shared, "warnings": media.warnings}


def restore(record: Path, metrics: _JsonlTail, rows: _ScalarRows, index: _JsonlTail | None = None,
            media: _MediaRows | None = None) -> tuple[bool, bool]:
    """Fill the fresh ``metrics`` / ``rows`` (and ``index`` / ``media``) from the cache of ``record`` when it is
    valid for the files as they are now (see the module's contract). Returns whether the metrics part and the media
    part were restored (the media part only with the metrics part)."""
    try:
        if metrics.path.stat().st_size < MIN_BYTES:
            return False, False
    except OSError:
        return False, False
    target = cache_file(record)
    if target is None or not target.is_file():
        return False, False
    try:
        with np.load(target, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("format") != CACHE_FORMAT or header.get("record") != str(Path(record).resolve()):
                return False, False
            if not _same_file(metrics, header["metrics"]):
                return False, False
            from entrotrain.dashboards.run_reader import _Columns

            columns = {}
            for i, keys in enumerate(header["blocks"]):
                block = _Columns(tuple(keys))
                block.chunks = [(data[f"o{i}"], data[f"s{i}"], data[f"v{i}"])]
                columns[block.keys] = block
            restored_media = None
            if index is not None and media is not None and "media" in header and _same_file(index, header["index"]):
                restored_media = _media_items(record, header["media"], data)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        return False, False
    with contextlib.suppress(OSError):
        os.utime(target)  # used now: the pruning keeps the most recently used copies
    _set_tail(metrics, header["metrics"])
    rows.columns = columns
    rows.markers = [(int(o), int(s)) for o, s in header["markers"]]
    rows.odd = header["odd"]
    rows.nulls = {k: (int(n), int(s)) for k, (n, s) in header["nulls"].items()}
    rows.count = int(header["count"])
    rows.warnings[:] = header["warnings"]
    if restored_media is None or index is None or media is None:
        return True, False
    _set_tail(index, header["index"])
    media.items = restored_media
    media.warnings[:] = header["media"]["warnings"]
    return True, True


def _media_items(record: Path, state: dict[str, Any], data: Any) -> dict[str, dict[int | None, Any]] | None:
    """The media items the cache holds, ``None`` when a file they point into is missing or shorter than they
    need (then the index is read again)."""
    from entrotrain.dashboards.run_reader import MediaItem

    protos = [(kind, record / name, meta, tuple(shape), dtype) for kind, name, meta, shape, dtype in state["protos"]]
    sizes = [int(np.dtype(dtype).itemsize * int(np.prod(shape))) for _, _, _, shape, dtype in protos]
    needed: dict[Path, int] = {}
    items: dict[str, dict[int | None, Any]] = {}
    for j, key in enumerate(state["keys"]):
        steps, offsets, which = data[f"ms{j}"], data[f"mo{j}"], data[f"mp{j}"]
        for p in np.unique(which):
            at = offsets[(which == p) & (offsets != _NO_INT)]
            path = protos[int(p)][1]
            end = int(at.max()) + sizes[int(p)] if at.size else 0
            needed[path] = max(needed.get(path, 0), end)
        by_step: dict[int | None, Any] = {}
        for step, offset, p in zip(steps.tolist(), offsets.tolist(), which.tolist()):
            kind, path, meta, shape, dtype = protos[p]
            step = None if step == _NO_INT else step
            if offset == _NO_INT:  # a .npy per step: shape and dtype are not read from the index
                by_step[step] = MediaItem(key, step, kind, path, dict(meta))
            else:
                by_step[step] = MediaItem(key, step, kind, path, dict(meta), offset, shape, dtype)
        items[key] = by_step
    for path, end in needed.items():
        if not path.is_file() or path.stat().st_size < end:
            return None
    return items
