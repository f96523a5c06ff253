"""The parsed copy of a large run record (entrotrain.dashboards.run_cache): a read that starts from it equals a full
read of the record, whatever happened to the record since it was written."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrotrain.dashboards import run_cache
from entrotrain.dashboards.run_reader import RunFollower, load_run
from entrotrain.dashboards.run_record_format import RECORD_FORMAT
from tests.helpers.run_reads import follow_seen, read_seen

KEYS = ["entropy/a", "entropy/b", "loss", "epoch"]
values = st.one_of(st.floats(width=32), st.integers(-5, 5), st.none(), st.just("text"))
metric_rows = st.fixed_dictionaries({"step": st.one_of(st.none(), st.integers(0, 12)),
                                     "values": st.dictionaries(st.sampled_from(KEYS), values, max_size=3)})
markers = st.builds(lambda s: {"resume": {"step": s}}, st.one_of(st.none(), st.integers(0, 12)))
bad = st.sampled_from(['{"step": 3, "val', "not json", "[1, 2]", "", "  "])
metric_lines = st.lists(st.one_of(metric_rows.map(json.dumps), markers.map(json.dumps), bad), max_size=12)
media_rows = st.builds(lambda s, i, m: {"key": "entropy/h", "step": s, "kind": "heatmap", "file": "media/h.bin",
                                        "offset": 8 * i, "shape": [1], "dtype": "<f8", "meta": {"vmax": m}},
                       st.one_of(st.none(), st.integers(-1, 12)), st.integers(0, 5), st.integers(0, 2))
media_lines = st.lists(st.one_of(media_rows.map(json.dumps), markers.map(json.dumps), bad), max_size=8)


@pytest.fixture
def cached(tmp_path_factory, monkeypatch) -> Path:
    """Every record is cached (no size threshold), into a fresh folder; returns that folder."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ENTROTRAIN_CACHE_DIR", str(folder))
    monkeypatch.setattr(run_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(run_cache, "SAVE_AFTER_BYTES", 0)
    return folder


@contextlib.contextmanager
def _no_cache():
    before = os.environ.get("ENTROTRAIN_CACHE_DIR")
    os.environ["ENTROTRAIN_CACHE_DIR"] = "off"
    try:
        yield
    finally:
        os.environ["ENTROTRAIN_CACHE_DIR"] = before if before is not None else ""


def _full(run: Path) -> dict | str:
    """A read of the record alone (no cache)."""
    with _no_cache():
        return read_seen(run)


def _meta(run: Path) -> None:
    (run / "meta.json").write_text(json.dumps({"format": RECORD_FORMAT, "name": "cached", "status": "finished"}))


def _row(step: int, loss: float = 2.0) -> str:
    return json.dumps({"step": step, "values": {"entropy/a": 1.0 / (step + 1), "loss": loss}}) + "\n"


def _record(run: Path, rows: int = 6) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    _meta(run)
    (run / "metrics.jsonl").write_text("".join(_row(s) for s in range(rows)))
    return run


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.tuples(metric_lines, media_lines), ends=st.tuples(st.booleans(), st.booleans()), data=st.data())
def test_a_read_from_the_cache_equals_a_full_read_of_the_grown_record(tmp_path_factory, cached, texts, ends,
                                                                      data) -> None:
    """Random metrics.jsonl and media/index.jsonl (resume markers, nulls, values of other types, bad lines, media
    items missing their bytes), cut at random bytes (mid-line: a killed or still-writing writer) when the cache is
    written; then they grow to their end, and the .bin file with them. A fresh reader (from the cache, then the
    appended bytes) equals a full read, and so does the reader that wrote the cache."""
    run = tmp_path_factory.mktemp("run")
    (run / "media").mkdir()
    _meta(run)
    blobs = [("\n".join(lines) + ("\n" if end and lines else "")).encode() for lines, end in zip(texts, ends)]
    names = ("metrics.jsonl", "media/index.jsonl")
    cuts = [data.draw(st.integers(0, len(b))) for b in blobs]
    for name, blob, cut in zip(names, blobs, cuts):
        (run / name).write_bytes(blob[:cut])
    (run / "media" / "h.bin").write_bytes(np.arange(3, dtype="<f8").tobytes())
    first = RunFollower(run)
    assert follow_seen(first) == _full(run)
    for name, blob, cut in zip(names, blobs, cuts):
        with open(run / name, "ab") as f:
            f.write(blob[cut:])
    (run / "media" / "h.bin").write_bytes(np.arange(6, dtype="<f8").tobytes())
    assert read_seen(run) == _full(run)  # a new reader: the cache, then what was appended
    assert follow_seen(first) == _full(run)


def test_a_large_record_is_read_from_its_cache_and_a_small_one_is_not_cached(tmp_path: Path, monkeypatch) -> None:
    """Over MIN_BYTES the first read writes the cache and the next starts from it (no line parsed again); under it,
    nothing is written."""
    import entrotrain.dashboards.run_reader as run_reader

    monkeypatch.setenv("ENTROTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    run = _record(tmp_path / "run", rows=200)
    load_run(run, require_monitors=False)
    assert not (tmp_path / "cache").exists()  # (7 kB < 16 MiB)
    monkeypatch.setattr(run_cache, "MIN_BYTES", 1000)
    want = read_seen(run)
    assert run_cache.cache_file(run).is_file()
    parsed = []
    monkeypatch.setattr(run_reader, "_parse", lambda line: parsed.append(line) or json.loads(line))
    assert read_seen(run) == want and parsed == []
    with open(run / "metrics.jsonl", "a") as f:
        f.write(_row(200))
    got = read_seen(run)
    assert len(parsed) == 1  # the appended line only (a full read parses 201)
    assert got == _full(run)


@pytest.mark.parametrize("change", ["same size, in place", "larger, in place", "replaced", "truncated", "removed"])
def test_a_cache_is_never_trusted_over_a_changed_record(tmp_path: Path, cached: Path, change: str) -> None:
    """The record changed after its cache was written (edited in place at the same size, rewritten and grown, a new
    run's file, cut short, gone): the read equals a full read of the record as it is, and the cache is written
    again."""
    run = _record(tmp_path / "run")
    metrics = run / "metrics.jsonl"
    read_seen(run)
    written = run_cache.cache_file(run).stat().st_mtime_ns
    text = metrics.read_text()
    if change == "same size, in place":  # one digit in the middle, at none of the compared places' bytes
        with open(metrics, "r+b") as f:
            f.write(text.replace('"loss": 2.0}}\n{"step": 3', '"loss": 7.0}}\n{"step": 3').encode())
        os.utime(metrics, ns=(1, 1))
    elif change == "larger, in place":
        with open(metrics, "r+b") as f:
            f.write((text.replace('"loss": 2.0', '"loss": 3.0') + _row(9)).encode())
    elif change == "replaced":
        (run / "new.jsonl").write_text(text.replace('"loss": 2.0', '"loss": 4.0'))
        (run / "new.jsonl").replace(metrics)
    elif change == "truncated":
        metrics.write_text(_row(0))
    else:
        metrics.unlink()
    assert read_seen(run) == _full(run)
    if change != "removed":
        assert run_cache.cache_file(run).stat().st_mtime_ns != written


def test_an_edit_at_the_same_size_between_the_compared_bytes_is_seen_by_its_modification_time(
        tmp_path: Path, cached: Path) -> None:
    """A same-size rewrite the compared bytes do not catch (one value in a line none of them covers): the
    modification time differs from the cache's, so the record is read in full."""
    run = _record(tmp_path / "run", rows=400)
    metrics = run / "metrics.jsonl"
    read_seen(run)
    text = metrics.read_bytes()
    state = json.loads(bytes(np.load(run_cache.cache_file(run))["header"]).decode())["metrics"]
    covered = np.zeros(len(text), dtype=bool)
    for offset, _ in state["samples"]:
        covered[offset:offset + 64] = True
    line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == 10][:-1]
    start = next(s for s in line_starts[1:] if not covered[s:text.index(b"\n", s)].any())
    at = text.index(b'"loss": 2.0', start)
    with open(metrics, "r+b") as f:
        f.seek(at)
        f.write(b'"loss": 5.0')
    assert read_seen(run) == _full(run)
    assert 5.0 in read_seen(run)["scalars"]["loss"][1]


def test_a_torn_line_left_by_a_killed_writer_is_read_again_with_what_follows(tmp_path: Path, cached: Path) -> None:
    """The cache is written while metrics.jsonl ends inside a line (the writer was killed there); the resumed
    writer appends after it: the torn bytes and the next line make one bad line, as in a full read."""
    run = _record(tmp_path / "run")
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write(_row(6)[:15])
    torn = read_seen(run)
    assert any("torn line" in w for w in torn["warnings"])
    with open(metrics, "a") as f:
        f.write(_row(7) + json.dumps({"resume": {"step": 5}}) + "\n" + _row(6))
    assert read_seen(run) == _full(run)


def test_a_cache_cut_short_or_for_another_record_is_ignored(tmp_path: Path, cached: Path) -> None:
    """A reader killed while writing the cache leaves its temporary file, never a cache; a cache cut short (a full
    disk), with a changed byte (its zip checksum), or copied from another record's name is not read."""
    run = _record(tmp_path / "run")
    other = _record(tmp_path / "other", rows=9)
    read_seen(run)
    read_seen(other)
    target = run_cache.cache_file(run)
    whole = target.read_bytes()
    (target.parent / (target.name + ".123.tmp")).write_bytes(whole[:100])  # a killed writer's leftover
    assert read_seen(run) == _full(run)
    target.write_bytes(whole[: len(whole) // 2])
    assert read_seen(run) == _full(run)
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0xFF
    target.write_bytes(bytes(flipped))
    assert read_seen(run) == _full(run)
    target.write_bytes(run_cache.cache_file(other).read_bytes())
    assert read_seen(run) == _full(run)


def test_a_media_file_cut_after_the_cache_makes_the_index_be_read_again(tmp_path: Path, cached: Path) -> None:
    """The cache points into media/h.bin; the file is cut short since: the index is read again and the item whose
    bytes are gone is skipped with its warning, as in a full read."""
    run = _record(tmp_path / "run")
    (run / "media").mkdir()
    (run / "media" / "h.bin").write_bytes(np.arange(4, dtype="<f8").tobytes())
    rows = [{"key": "entropy/h", "step": s, "kind": "heatmap", "file": "media/h.bin", "offset": 8 * s, "shape": [1],
             "dtype": "<f8", "meta": {}} for s in range(4)]
    (run / "media" / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_seen(run)["media"]["entropy/h"]) == 4
    (run / "media" / "h.bin").write_bytes(np.arange(2, dtype="<f8").tobytes())
    got = read_seen(run)
    assert got == _full(run) and len(got["media"]["entropy/h"]) == 2


def test_no_cache_when_it_is_off_or_its_folder_cannot_be_written(tmp_path: Path, monkeypatch) -> None:
    """ENTROTRAIN_CACHE_DIR=off writes nothing; a cache folder that cannot be created leaves the read as it is."""
    monkeypatch.setattr(run_cache, "MIN_BYTES", 0)
    run = _record(tmp_path / "run")
    monkeypatch.setenv("ENTROTRAIN_CACHE_DIR", "off")
    assert run_cache.cache_file(run) is None
    want = read_seen(run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ENTROTRAIN_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    assert read_seen(run) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run"]
    assert sorted(p.name for p in run.iterdir()) == ["meta.json", "metrics.jsonl"]  # nothing written into the record



def test_the_cache_folder_keeps_the_most_recently_used_copies_within_its_bound(tmp_path, cached, monkeypatch) -> None:
    """Three records' copies, then a bound that holds two: a write removes the least recently used copy (a read
    counts as a use), never the copy just written; temporary files older than an hour go; other files stay."""
    runs = [_record(tmp_path / f"run{i}", rows=20) for i in range(3)]
    for run in runs:
        read_seen(run)
    copies = [run_cache.cache_file(run) for run in runs]
    assert all(c.is_file() for c in copies)
    for age, copy in zip((300, 200, 100), copies):  # run0's copy used longest ago
        os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns - age * 10**9))
    monkeypatch.setattr(run_cache, "SAVE_AFTER_BYTES", 1 << 30)  # a read that writes no copy
    assert read_seen(runs[0]) == _full(runs[0])  # a read from run0's copy makes it the most recently used
    monkeypatch.setattr(run_cache, "SAVE_AFTER_BYTES", 0)
    stale, fresh, other = cached / (copies[0].name + ".a.tmp"), cached / (copies[1].name + ".b.tmp"), cached / "x.txt"
    for path in (stale, fresh, other):
        path.write_text("x")
    os.utime(stale, (0, 0))
    monkeypatch.setattr(run_cache, "MAX_TOTAL_BYTES", 2 * max(c.stat().st_size for c in copies) + 1000)
    with open(runs[2] / "metrics.jsonl", "a") as f:
        f.write(_row(20))
    assert read_seen(runs[2]) == _full(runs[2])  # writes run2's copy again, then prunes
    assert copies[0].is_file() and copies[2].is_file() and not copies[1].exists()  # run1: the least recently used
    assert not stale.exists() and fresh.exists() and other.exists()
    monkeypatch.setattr(run_cache, "MAX_TOTAL_BYTES", 0)
    run_cache.prune(cached, keep=copies[2])
    assert copies[2].is_file() and not copies[0].exists()
