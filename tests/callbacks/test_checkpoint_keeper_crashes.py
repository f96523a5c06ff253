"""``LastGoodCheckpoints`` across crashes: the pins a killed run leaves are taken over by the next run in the folder
(adopted when it resumes, held until its normal end otherwise) instead of piling up; a frozen pin, a pin a running
process holds, the pin a run resumes from and anything that is not a pin we made are never deleted."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks import checkpoint_keeper as ck
from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER, LastGoodCheckpoints, list_pins, release_abandoned


def _save(folder: Path, step: int, tag: str = "") -> Path:
    path = folder / f"{tag}step_{step}.pt"
    path.write_bytes(f"{tag}weights at {step}".encode())
    return path


def _die(keeper: LastGoodCheckpoints) -> None:
    """The keeper's process is gone without a normal end: for this process's keepers, what garbage collection of
    the keeper does (:func:`test_a_keeper_garbage_collected_is_not_running`); the caller uses it no more."""
    keeper.wait()
    for shelf in keeper._folders.values():
        ck._LIVE.discard(shelf.owner.id)


def test_a_keeper_garbage_collected_is_not_running(tmp_path) -> None:
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 1))
    assert _states(tmp_path) == {"step_1.pt": "running"}
    del keeper
    gc.collect()
    assert _states(tmp_path) == {"step_1.pt": "abandoned"}


def _manifests(folder: Path) -> list[Path]:
    keep = folder / KEEP_FOLDER
    return sorted(p for p in keep.iterdir() if p.name.startswith(".entrotrain-pins")) if keep.exists() else []


def _states(folder: Path) -> dict[str, str]:
    return {pin.path.name: pin.state for pin in list_pins(folder)}


# ---------------------------------------------------------------- the manifest
def test_the_manifest_lists_the_provisional_pins_and_a_frozen_one_leaves_it_before_it_is_named(tmp_path) -> None:
    keeper = LastGoodCheckpoints()
    for step in (10, 20):
        keeper.saved(_save(tmp_path, step))
    keeper.judged(20, 10)
    (manifest,) = _manifests(tmp_path)
    assert [r["name"] for r in json.loads(manifest.read_text())["pins"]] == ["step_10.pt", "step_20.pt"]
    assert _states(tmp_path) == {"step_10.pt": "running", "step_20.pt": "running"}
    named = keeper.freeze(10)
    assert [r["name"] for r in json.loads(manifest.read_text())["pins"]] == ["step_20.pt"]  # before it returned
    assert _states(tmp_path) == {"step_10.pt": "kept", "step_20.pt": "running"}
    keeper.release()
    assert _manifests(tmp_path) == [] and sorted((tmp_path / KEEP_FOLDER).iterdir()) == [named]


def test_a_manifest_that_cannot_be_rewritten_when_a_pin_is_frozen_is_deleted(tmp_path, monkeypatch) -> None:
    """A frozen pin must never stay listed as provisional (a later run would delete it): when the rewrite fails, the
    manifest goes (its other pins are then never deleted by a later run: a leak, not a loss)."""
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 10))
    keeper.saved(_save(tmp_path, 20))
    keeper.judged(20, 10)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.warns(UserWarning) as record:
        named = keeper.freeze(10)
        keeper.wait()  # its copy fails too (the same disk), in its thread
    said = " ".join(str(w.message) for w in record)
    assert "cannot write" in said and "cannot give the kept checkpoint" in said
    assert named is not None and _manifests(tmp_path) == []
    assert _states(tmp_path) == {"step_10.pt": "kept", "step_20.pt": "kept"}


# ---------------------------------------------------------------- an earlier run's pins
def test_a_dead_runs_pins_are_held_by_the_next_run_and_released_at_its_normal_end(tmp_path) -> None:
    first = LastGoodCheckpoints()
    for step in (10, 20):
        first.saved(_save(tmp_path, step))
    first.judged(20, 20)
    first.saved(_save(tmp_path, 25))
    first.judged(30, 20)
    frozen = first.freeze(20)
    first.saved(_save(tmp_path, 35))
    (tmp_path / "step_20.pt").unlink()  # rotated away: the frozen pin holds the data
    _die(first)
    assert _states(tmp_path) == {"step_20.pt": "kept", "step_25.pt": "abandoned", "step_35.pt": "abandoned"}
    second = LastGoodCheckpoints()
    second.saved(_save(tmp_path, 5, "b"))  # a fresh run (or one that cannot tell a resume): holds them
    assert _states(tmp_path) == {"bstep_5.pt": "running", "step_20.pt": "kept", "step_25.pt": "running",
                                 "step_35.pt": "running"}
    second.judged(40, 40)
    assert second.freeze(40) == tmp_path / KEEP_FOLDER / "bstep_5.pt"  # held pins are never named
    _die(second)
    third = LastGoodCheckpoints()  # again, without a firing
    third.saved(_save(tmp_path, 7, "c"))
    third.release()
    assert sorted(p.name for p in (tmp_path / KEEP_FOLDER).iterdir()) == ["bstep_5.pt", "step_20.pt"]
    assert frozen.read_bytes() == b"weights at 20"


def test_held_pins_stay_when_the_run_that_holds_them_fires(tmp_path) -> None:
    first = LastGoodCheckpoints()
    first.saved(_save(tmp_path, 10))
    _die(first)
    second = LastGoodCheckpoints()
    second.saved(_save(tmp_path, 3, "b"))
    second.freeze(None)  # a firing: you may roll back to the earlier run's pins
    second.release()
    assert _states(tmp_path) == {"step_10.pt": "kept"}
    assert _manifests(tmp_path) == []


def test_a_resumed_run_adopts_the_pins_up_to_its_step_and_can_name_them(tmp_path) -> None:
    """Killed after a good observation at 20 and a bad one at 30 (pins 20: named, 35: newest); resumed from the
    save at 30 (``start(resumed_from=...)``): its restored guard fires before its next save and names the adopted
    pin of step 20; the pin of step 35 (a future the resumed run replaces) is deleted at the start."""
    first = LastGoodCheckpoints()
    for step in (10, 20):
        first.saved(_save(tmp_path, step))
    first.judged(20, 20)
    resume = _save(tmp_path, 30)  # e.g. last.ckpt's step, or an original the rotation kept
    first.judged(30, 20)
    first.saved(_save(tmp_path, 35))
    for step in (10, 20, 35):
        (tmp_path / f"step_{step}.pt").unlink()
    _die(first)
    second = LastGoodCheckpoints()
    second.start([tmp_path], resumed_from=resume)
    assert _states(tmp_path) == {"step_20.pt": "running"}
    second.judged(31, 20)
    assert second.freeze(20) == tmp_path / KEEP_FOLDER / "step_20.pt"
    second.wait()
    assert (tmp_path / KEEP_FOLDER / "step_20.pt").read_bytes() == b"weights at 20"
    second.release()
    assert _states(tmp_path) == {"step_20.pt": "kept"}


def test_the_pin_a_run_resumes_from_is_kept_for_good(tmp_path) -> None:
    first = LastGoodCheckpoints()
    for step in (10, 20):
        first.saved(_save(tmp_path, step))
    first.judged(20, 10)
    _die(first)
    pin = tmp_path / KEEP_FOLDER / "step_10.pt"
    second = LastGoodCheckpoints()
    second.start(tmp_path / "elsewhere", resumed_from=pin)  # one folder; the pin's folder is looked at too
    second.wait()
    assert _states(tmp_path) == {"step_10.pt": "kept"}  # 20: after the step resumed from, deleted
    assert pin.stat().st_nlink == 1 and pin.read_bytes() == b"weights at 10"  # its own copy
    second.release()
    assert pin.exists()


def test_the_pin_of_the_original_a_run_resumes_from_is_kept_for_good(tmp_path) -> None:
    """Resumed from the original file (not the pin's path): the pin is a hard link of it, the same checkpoint, so it
    is kept for good too; a rotation that deletes the original later cannot take the checkpoint with it (before,
    paths were compared: the pin was adopted and freed at the run's normal end, after the rotation)."""
    first = LastGoodCheckpoints()
    for step in (10, 20):
        first.saved(_save(tmp_path, step))
    first.judged(20, 20)
    _die(first)
    second = LastGoodCheckpoints()
    second.start([tmp_path], resumed_from=tmp_path / "step_20.pt")
    second.wait()
    assert _states(tmp_path)["step_20.pt"] == "kept"
    (tmp_path / "step_20.pt").unlink()  # the loop's own rotation
    second.release()
    assert (tmp_path / KEEP_FOLDER / "step_20.pt").read_bytes() == b"weights at 20"


def test_a_running_keepers_pins_are_never_touched(tmp_path) -> None:
    """Two runs sharing a checkpoint folder: the second's start, judgements and normal end leave the first's pins."""
    first = LastGoodCheckpoints(group="first")  # the keepers of two processes
    pins = [first.saved(_save(tmp_path, step, "a")) for step in (10, 20)]
    second = LastGoodCheckpoints(group="second")
    second.start([tmp_path], resumed_from=tmp_path / "astep_20.pt")
    second.saved(_save(tmp_path, 30, "b"))
    second.judged(40, 40)
    second.release()
    assert all(p.exists() for p in pins) and set(first.pins) == set(pins)
    assert release_abandoned(tmp_path, elsewhere=True) == []


def _rename_owner(manifest: Path, **owner) -> Path:
    parsed, tail = ck._Owner.parse(manifest.name)
    fields = {**parsed.__dict__, **owner}
    target = manifest.with_name(f"{ck._Owner(**fields).prefix}.{tail}")
    manifest.rename(target)
    return target


def test_which_manifests_belong_to_runs_that_are_not_running(tmp_path) -> None:
    """On this machine: a pid reused by another process (its start time differs) and a zombie are not running;
    a manifest from another machine (or process namespace) is never taken over but by ``release_abandoned``."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while ck._proc(zombie.pid) is not None and ck._proc(zombie.pid)[0] != "Z":
        time.sleep(0.05)
    folders = {}
    for case in ("reused", "zombie", "elsewhere"):
        folders[case] = tmp_path / case
        folders[case].mkdir()
        keeper = LastGoodCheckpoints()
        keeper.saved(_save(folders[case], 1))
        (manifest,) = _manifests(folders[case])
        owner = {"reused": {"pid": os.getppid(), "start": "1"}, "zombie": {"pid": zombie.pid, "start": "0"},
                 "elsewhere": {"machine": "0123456789ab"}}[case]
        _rename_owner(manifest, **owner)
        _die(keeper)
    states = {case: _states(folder)["step_1.pt"] for case, folder in folders.items()}
    assert states == {"reused": "abandoned", "zombie": "abandoned", "elsewhere": "elsewhere"}
    zombie.wait()
    for case, folder in folders.items():
        keeper = LastGoodCheckpoints()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            keeper.saved(_save(folder, 2, "b"))
        said = [str(w.message) for w in record]
        if case == "elsewhere":  # most likely a run preempted and restarted elsewhere: say how to free them
            assert len(said) == 1 and "another machine" in said[0] and "elsewhere=True" in said[0]
        else:
            assert said == []
        keeper.release()
        assert _states(folder) == ({"step_1.pt": "elsewhere"} if case == "elsewhere" else {})
    assert release_abandoned(folders["elsewhere"]) == []
    assert release_abandoned(folders["elsewhere"], elsewhere=True) == [folders["elsewhere"] / KEEP_FOLDER / "step_1.pt"]
    assert not (folders["elsewhere"] / KEEP_FOLDER).exists()


@pytest.mark.parametrize("by", ["release_abandoned", "the next run"])
def test_nothing_but_a_pin_we_made_is_deleted(tmp_path, by: str) -> None:
    """A manifest names a pin replaced since by another file (a new inode), and a path out of the folder: both
    stay."""
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 1))
    keeper.saved(_save(tmp_path, 2))
    (manifest,) = _manifests(tmp_path)
    data = json.loads(manifest.read_text())
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"mine")
    data["pins"].append({**data["pins"][0], "name": "../precious.pt"})
    manifest.write_text(json.dumps(data))
    _die(keeper)
    replaced = tmp_path / KEEP_FOLDER / "step_1.pt"
    replaced.unlink()
    replaced.write_bytes(b"a file of yours, under the pin's name")
    (tmp_path / KEEP_FOLDER / "notes.txt").write_text("yours")
    if by == "release_abandoned":
        assert release_abandoned(tmp_path) == [tmp_path / KEEP_FOLDER / "step_2.pt"]
    else:
        second = LastGoodCheckpoints()
        second.saved(_save(tmp_path, 3, "b"))
        assert second.pins == [tmp_path / KEEP_FOLDER / "step_2.pt", tmp_path / KEEP_FOLDER / "bstep_3.pt"]
        second.release()
        assert not (tmp_path / KEEP_FOLDER / "step_2.pt").exists()
    assert outside.read_bytes() == b"mine" and replaced.exists() and (tmp_path / KEEP_FOLDER / "notes.txt").exists()
    assert _manifests(tmp_path) == []


def test_a_manifest_is_claimed_once(tmp_path) -> None:
    manifest = tmp_path / ".entrotrain-pins.0123456789ab.1.0.abc.json"
    manifest.write_text("{}")
    owner, _ = ck._Owner.parse(manifest.name)
    first = ck._claim(manifest, owner, f"{ck._MANIFEST}.0123456789ab.2.0.def")
    assert first is not None and first.exists()
    assert ck._claim(manifest, owner, f"{ck._MANIFEST}.0123456789ab.3.0.ghi") is None


def test_a_folder_that_cannot_be_changed_is_left_as_it_is(tmp_path, monkeypatch) -> None:
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 1))
    _die(keeper)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)  # the claim (root ignores a read-only mode: refused by hand)
    second = LastGoodCheckpoints()
    second.start([tmp_path])
    assert _states(tmp_path) == {"step_1.pt": "abandoned"}


def test_a_pin_name_taken_by_another_run_meanwhile_is_not_overwritten(tmp_path, monkeypatch) -> None:
    real_link = os.link
    other = tmp_path / KEEP_FOLDER / "step_1.pt"

    def race(src, dst, **kwargs):
        if Path(dst) == other and not other.exists():
            other.write_bytes(b"the other run's pin")  # it linked that name first
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", race)
    (tmp_path / KEEP_FOLDER).mkdir()
    pin = LastGoodCheckpoints().saved(_save(tmp_path, 1))
    assert pin == tmp_path / KEEP_FOLDER / "step_1-v1.pt"
    assert other.read_bytes() == b"the other run's pin" and pin.read_bytes() == b"weights at 1"


def test_start_does_nothing_on_another_rank(tmp_path, monkeypatch) -> None:
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 1))
    _die(keeper)
    monkeypatch.setattr(ck, "_other_rank", lambda: True)
    LastGoodCheckpoints().start([tmp_path])
    assert _states(tmp_path) == {"step_1.pt": "abandoned"}


@pytest.mark.parametrize("clone", [True, False])
def test_a_frozen_pins_copy_never_changes_with_its_original(tmp_path, monkeypatch, clone: bool) -> None:
    """The copy is a clone where the file system makes one, else a full copy (``clone=False``: refused)."""
    if not clone:
        import fcntl

        def refuse(*args):
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(fcntl, "ioctl", refuse)
    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    src.write_bytes(b"x" * 10_000)
    os.utime(src, ns=(1, 123_456_789))
    ck._copy(src, dst)
    assert dst.read_bytes() == b"x" * 10_000 and dst.stat().st_mtime_ns == 123_456_789
    with open(src, "r+b") as f:  # rewritten in place: the same inode
        f.write(b"y" * 10)
    assert dst.read_bytes() == b"x" * 10_000


# ---------------------------------------------------------------- any order of runs, saves, judgements, crashes
_ops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["save", "fire", "crash", "end"]), st.integers(0, 1)),
        st.tuples(st.just("judge"), st.integers(0, 1), st.booleans()),
        st.tuples(st.just("start"), st.integers(0, 1), st.sampled_from(["lazy", "fresh", "resume", "resume_pin"])),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops=_ops)
def test_any_order_of_runs_keeps_every_promise(tmp_path_factory, ops) -> None:
    """Two slots for runs sharing one checkpoint folder (each run its own names, ``save_top_k=1``); runs start
    (fresh, lazily, or resumed from the newest checkpoint or pin left by runs not running), save, are judged, fire,
    crash or end normally, in any order. After every operation: what a firing named is there, unchanged; every pin
    a running keeper holds is there; your files are there; every pin on disk is either kept for a reason (named, a
    run resumed from it, held by a run that fired) or listed in a manifest (so a later run frees it). At the end,
    once a last run ends normally, only the kept ones are left, and no manifest."""
    folder = tmp_path_factory.mktemp("shared")
    keep = folder / KEEP_FOLDER
    keep.mkdir()
    (keep / "notes.txt").write_text("yours")
    (keep / "old_step_1.pt").write_bytes(b"a pin of an entrotrain without manifests")
    kept = {keep / "notes.txt", keep / "old_step_1.pt"}
    named: dict[Path, bytes] = {}
    runs: dict[int, dict] = {}
    started = 0

    def check() -> None:
        for path, content in named.items():
            assert path.read_bytes() == content
        for run in runs.values():
            assert all(p.exists() for p in run["keeper"].pins)
        assert all(p.exists() for p in kept)
        for pin in list_pins(folder):
            assert pin.state != "kept" or pin.path in kept or pin.path in named, pin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op, slot, *arg in ops:
            run = runs.get(slot)
            if op == "start" and run is None:
                started += 1
                keeper = LastGoodCheckpoints(group=started)  # a process of its own
                run = runs[slot] = {"keeper": keeper, "tag": f"r{started}_", "step": 0, "good": None, "fired": 0}
                live = {r["tag"] for r in runs.values()}
                left = [p for p in [*([] if arg[0] == "resume_pin" else folder.glob("r*_step_*.pt")),
                                    *keep.glob("r*_step_*.pt")] if p.name.split("_")[0] + "_" not in live]
                if arg[0].startswith("resume") and left:
                    resumed = max(left, key=lambda p: (int(p.stem.split("_")[-1].split("-")[0]), p.name))
                    run["step"] = int(resumed.stem.split("_")[-1].split("-")[0])
                    provisional = {p.path for p in list_pins(folder) if p.state == "abandoned"}
                    keeper.start([folder], resumed_from=resumed)
                    if resumed in provisional:
                        kept.add(resumed)  # resumed from: kept for good
                elif arg[0] == "fresh":
                    keeper.start([folder])
            elif run is None or op == "start":
                continue
            elif op == "save":
                run["step"] += 1
                run["keeper"].saved(_save(folder, run["step"], run["tag"]))
                for old in folder.glob(f"{run['tag']}step_*.pt"):  # save_top_k=1
                    if old.name != f"{run['tag']}step_{run['step']}.pt":
                        old.unlink()
            elif op == "judge":
                run["step"] += 1
                run["good"] = run["step"] if arg[0] else run["good"]
                run["keeper"].judged(run["step"], run["good"])
            elif op == "fire" and run["fired"] < ck.MAX_FROZEN:
                run["fired"] += 1
                path = run["keeper"].freeze(run["good"])
                if path is not None:
                    run["keeper"].wait()
                    named[path] = path.read_bytes()
            elif op == "crash":
                _die(runs.pop(slot)["keeper"])
            elif op == "end":
                keeper = runs.pop(slot)["keeper"]
                if keeper._fired:
                    kept.update(p.path for p in keeper._pins if p.held)  # held by a run that fired: yours
                keeper.release()
            check()
        for run in runs.values():
            run["keeper"].release()
        last = LastGoodCheckpoints()
        last.start([folder])
        last.release()
    check()
    assert set(keep.iterdir()) == kept | set(named)


def test_a_checkpoint_saved_again_under_its_name_is_listed_with_its_new_files(tmp_path) -> None:
    """Saved again under the same name (a new file: torch's atomic save, a rotation and a new save): the pin is made
    again under the same name, and the manifest lists its new inode, so a later run still frees it."""
    keeper = LastGoodCheckpoints()
    path = _save(tmp_path, 1)
    keeper.saved(path)
    path.unlink()
    keeper.saved(_save(tmp_path, 1))
    (manifest,) = _manifests(tmp_path)
    (record,) = json.loads(manifest.read_text())["pins"]
    assert record["inodes"] == [["", (tmp_path / KEEP_FOLDER / "step_1.pt").stat().st_ino]]
    _die(keeper)
    assert release_abandoned(tmp_path) == [tmp_path / KEEP_FOLDER / "step_1.pt"]


def test_a_run_killed_while_taking_over_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    """Killed between listing the pins it took over and deleting the claimed manifest: two manifests list them; the
    next run takes both over once."""
    first = LastGoodCheckpoints()
    first.saved(_save(tmp_path, 1))
    first.saved(_save(tmp_path, 2))
    _die(first)
    remove = ck._remove
    monkeypatch.setattr(ck, "_remove", lambda path: None if path.name.startswith(".entrotrain-pins") else remove(path))
    second = LastGoodCheckpoints()
    second.start([tmp_path])
    _die(second)
    monkeypatch.setattr(ck, "_remove", remove)
    assert len(_manifests(tmp_path)) == 2
    third = LastGoodCheckpoints()
    third.start([tmp_path], resumed_from=tmp_path / KEEP_FOLDER / "step_1.pt")
    assert third.pins == []  # step 1: resumed from, kept for good; step 2: after it, deleted
    assert not (tmp_path / KEEP_FOLDER / "step_2.pt").exists()
    third.release()
    assert _states(tmp_path) == {"step_1.pt": "kept"} and _manifests(tmp_path) == []


def test_list_pins_and_release_abandoned_refuse_what_is_not_a_folder() -> None:
    from entrotrain.errors import EntrotrainError

    with pytest.raises(EntrotrainError, match=r"list_pins\(folder\) needs the checkpoint folder"):
        list_pins(None)
    with pytest.raises(EntrotrainError, match=r"release_abandoned\(folder\) needs the checkpoint folder"):
        release_abandoned(3)


def test_a_folder_that_does_not_exist_is_named_not_listed_as_empty(tmp_path, monkeypatch) -> None:
    """A typo (``ckpt`` for ``ckpts``) listed nothing, as if nothing were kept; an emptied keep folder still lists
    nothing."""
    from entrotrain.errors import EntrotrainError

    (tmp_path / "ckpts").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EntrotrainError, match=r"list_pins: ckpt does not exist \(did you mean ckpts\?\)"):
        list_pins("ckpt")
    with pytest.raises(EntrotrainError, match=r"release_abandoned: ckpt does not exist"):
        release_abandoned("ckpt")
    assert list_pins("ckpts") == [] and list_pins(f"ckpts/{KEEP_FOLDER}") == []


def test_a_checkpoint_pinned_by_a_killed_run_is_not_pinned_twice(tmp_path) -> None:
    """A run that resumed without saying so (a loop's ``checkpoint_dir`` scan finds the killed run's checkpoints
    again) saves nothing new at first: the taken-over pin of the same files becomes its pin, not a second link
    ``step_20-v1.pt`` beside it; freed at its normal end like its own."""
    first = LastGoodCheckpoints()
    first.saved(_save(tmp_path, 20))
    _die(first)
    second = LastGoodCheckpoints()
    second.start([tmp_path])
    assert _states(tmp_path) == {"step_20.pt": "running"}  # held by the second run
    assert second.saved(tmp_path / "step_20.pt") == tmp_path / KEEP_FOLDER / "step_20.pt"
    assert sorted(p.name for p in (tmp_path / KEEP_FOLDER).iterdir() if not p.name.startswith(".")) == ["step_20.pt"]
    second.judged(25, 25)
    assert second.freeze(25) == tmp_path / KEEP_FOLDER / "step_20.pt"  # its own: judged, named, kept
    second.wait()
