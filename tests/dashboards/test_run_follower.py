"""RunFollower (``entrotrain status --follow``): each read of a growing record equals a full read of its bytes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrotrain.dashboards.run_reader import RunFollower, _scalars
from entrotrain.dashboards.run_record_format import RECORD_FORMAT, process_start_time
from tests.helpers.run_reads import follow_seen, read_seen, seen

KEYS = ["entropy/a", "entropy/b", "loss", "epoch"]
values = st.one_of(st.floats(width=32), st.integers(-5, 5), st.none(), st.just("text"))
metric_rows = st.fixed_dictionaries({"step": st.one_of(st.none(), st.integers(0, 12)),
                                     "values": st.dictionaries(st.sampled_from(KEYS), values, max_size=3)})
markers = st.builds(lambda s: {"resume": {"step": s}}, st.one_of(st.none(), st.integers(0, 12)))
bad = st.sampled_from(['{"step": 3, "val', "not json", "[1, 2]", "", "  "])
metric_lines = st.lists(st.one_of(metric_rows.map(json.dumps), markers.map(json.dumps), bad), max_size=10)
event_rows = st.builds(lambda s, level: {"step": s, "key": "entropy/a", "level": level, "message": f"at {s}"},
                       st.integers(0, 12), st.sampled_from(["warn", "rollback", "info"]))
event_lines = st.lists(st.one_of(event_rows.map(json.dumps), markers.map(json.dumps), bad), max_size=6)
media_rows = st.builds(lambda s, i: {"key": "entropy/h", "step": s, "kind": "heatmap", "file": "media/h.bin",
                                     "offset": 8 * i, "shape": [1], "dtype": "<f8"},
                       st.integers(0, 12), st.integers(0, 5))  # offset 40 + 8 > the 40-byte file: skipped
media_lines = st.lists(st.one_of(media_rows.map(json.dumps), markers.map(json.dumps), bad), max_size=6)
FILES = ("metrics.jsonl", "events.jsonl", "media/index.jsonl")


def _write_meta(run: Path, writing: bool) -> None:
    meta = {"format": RECORD_FORMAT, "name": "follow", "status": "finished"}
    if writing:  # the live writer: this process
        meta.update(status="running", pid=os.getpid(), pid_start=process_start_time(os.getpid()),
                    host=socket.gethostname())
    (run / "meta.json").write_text(json.dumps(meta))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.tuples(metric_lines, event_lines, media_lines), ends=st.tuples(st.booleans(), st.booleans(),
       st.booleans()), reads=st.integers(0, 6), writing=st.booleans(), data=st.data())
def test_each_read_of_a_growing_record_equals_a_full_read(tmp_path_factory, texts, ends, reads, writing, data) -> None:
    """Random appends to metrics.jsonl, events.jsonl and media/index.jsonl, cut at random bytes (mid-line, and just
    before a newline: a whole line not yet ended), while the media file grows: after each, the follower's read equals
    load_run of the same bytes (rows, resume markers, bad and torn lines, skipped media, warnings, notes, status)."""
    run = tmp_path_factory.mktemp("run")
    (run / "media").mkdir()
    media = np.arange(6, dtype="<f8").tobytes()
    _write_meta(run, writing)
    blobs = [("\n".join(lines) + ("\n" if end and lines else "")).encode() for lines, end in zip(texts, ends)]
    follower = RunFollower(run)
    written = [0, 0, 0]
    for k in range(reads + 1):
        for i, (name, blob) in enumerate(zip(FILES, blobs)):
            ends_of_lines = [j for j in range(len(blob)) if blob[j:j + 1] == b"\n"]
            cut = len(blob) if k == reads else data.draw(st.one_of(
                st.integers(0, len(blob)), st.sampled_from(ends_of_lines or [0])))
            upto = max(written[i], cut)
            with open(run / name, "ab") as f:
                f.write(blob[written[i]:upto])
            written[i] = upto
        (run / "media" / "h.bin").write_bytes(media[:8 * (k + 1 if k < reads else 6)])  # 8 bytes more each time
        assert follow_seen(follower) == read_seen(run)
    assert follower.full_reads == 1


def _row(step: int) -> str:
    return json.dumps({"step": step, "values": {"entropy/a": 1.0 / (step + 1), "loss": 2.0}}) + "\n"


def test_a_torn_last_line_is_read_again_with_its_end(tmp_path: Path) -> None:
    """A line the writer has not ended is not parsed into the columns: the next read reads it whole."""
    _write_meta(tmp_path, writing=True)
    text = "".join(_row(s) for s in range(4))
    (tmp_path / "metrics.jsonl").write_text(text[:-10])
    follower = RunFollower(tmp_path)
    assert follower.read().scalars["loss"][0].tolist() == [0, 1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(text[-10:] + _row(4))
    first = follower.read()
    assert first.scalars["loss"][0].tolist() == [0, 1, 2, 3, 4] and not any("torn" in w for w in first.warnings)
    assert follower.full_reads == 1


@pytest.mark.parametrize("how", ["truncated", "replaced"])
def test_a_shrunk_or_replaced_file_is_read_again_in_full(tmp_path: Path, how: str) -> None:
    """A new run in the folder (metrics.jsonl replaced) or a truncation: the next read starts from the beginning."""
    _write_meta(tmp_path, writing=True)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(_row(s) for s in range(6)))
    follower = RunFollower(tmp_path)
    assert follower.read().last_step == 5
    if how == "truncated":
        metrics.write_text(_row(10))
    else:  # the same size, another file: a new run's record
        other = tmp_path / "new.jsonl"
        other.write_text("".join(_row(s + 20) for s in range(6)))
        other.replace(metrics)
    again = follower.read()
    assert follower.full_reads == 2
    assert seen(again) == read_seen(tmp_path)


def test_scalars_of_rows_added_after_a_result_equal_one_pass() -> None:
    """_ScalarRows.result leaves the columns as they were: rows added after it count as if read in one pass, across
    the 1024-row chunks."""
    from entrotrain.dashboards.run_reader import _ScalarRows

    rows = [{"step": s % 1500, "values": {"a": float(s), "b": s % 7}} for s in range(3000)]
    rows.insert(2000, {"resume": {"step": 900}})
    gathered, warnings = _ScalarRows([]), []
    for i, row in enumerate(rows):
        gathered.add(row)
        if i in (10, 1023, 1024, 2500):
            gathered.result([], [])
    got = gathered.result(warnings, [])
    want = _scalars(rows, [], [])
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key][0], want[key][0]) and np.array_equal(got[key][1], want[key][1])


def test_status_follow_keeps_a_reader_per_listed_run_only(tmp_path: Path) -> None:
    """`status --follow` on a folder: one follower per run listed; a run pushed out of the list (-n) lets its go."""
    from entrotrain.dashboards.terminal_status import _collect

    older, newer = tmp_path / "older", tmp_path / "newer"
    for run in (older, newer):
        run.mkdir()
        _write_meta(run, writing=True)
        (run / "metrics.jsonl").write_text(_row(0))
    os.utime(older / "meta.json", (1, 1))
    followers: dict = {}
    _collect([str(tmp_path)], 2, followers)
    assert set(followers) == {older, newer}
    kept = followers[newer]
    _collect([str(tmp_path)], 1, followers)
    assert set(followers) == {newer} and followers[newer] is kept


def test_a_file_replaced_between_the_check_and_the_read_is_not_read_at_the_old_offset(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """The new run's file replaces metrics.jsonl after the follower checked it: the read does not take the new
    file's bytes from the old file's offset (rows cut mid-line, a mixed record); the next read reads it in full."""
    import entrotrain.dashboards.run_reader as run_reader

    _write_meta(tmp_path, writing=True)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(_row(s) for s in range(3)))
    follower = RunFollower(tmp_path)
    follower.read()
    other = tmp_path / "new.jsonl"
    other.write_text("".join(_row(s + 100) for s in range(8)))
    other.replace(metrics)
    with monkeypatch.context() as patch:
        patch.setattr(run_reader._JsonlTail, "replaced", lambda self: False)  # it was checked just before the swap
        follower.read()
    assert seen(follower.read()) == read_seen(tmp_path)
    assert follower.full_reads == 2


@pytest.mark.parametrize("grow", [False, True])
def test_a_file_rewritten_in_place_on_the_same_inode_is_read_again_in_full(tmp_path: Path, grow: bool) -> None:
    """metrics.jsonl rewritten in place (same inode, same size or larger: a tool that rewrites it, a restarted writer
    opening it without O_APPEND): before, the follower went on at its old offset and mixed the two contents; now the
    first bytes and the bytes just before the offset are compared, and a change makes the read a full one."""
    _write_meta(tmp_path, writing=False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(_row(s) for s in range(6)))
    follower = RunFollower(tmp_path)
    assert follower.read(require_monitors=False).last_step == 5
    text = "".join(_row(s) for s in range(6))
    if grow:
        text = _row(7) + text + _row(8)  # other first bytes too, and larger
    text = text.replace('"loss": 2.0', '"loss": 3.0')  # (the same size otherwise)
    with open(metrics, "r+b") as f:  # in place: the same inode
        f.write(text.encode())
    again = follower.read(require_monitors=False)
    assert follower.full_reads == 2
    assert seen(again) == read_seen(tmp_path)
    assert set(again.scalars["loss"][1].tolist()) == {3.0}
