"""``LastGoodCheckpoints``, review of the shared pins: a frozen pin outlives the keeper that froze it, the pin a run
resumes from is kept for good whoever held it."""

from __future__ import annotations

import gc
import os
import shutil
import warnings
from pathlib import Path

import pytest

from entrotrain.callbacks import checkpoint_keeper as ck
from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER, LastGoodCheckpoints
from tests.callbacks.test_checkpoint_keeper_crashes import _die, _save, _states


def test_a_frozen_pin_stays_when_the_keeper_that_froze_it_is_gone(tmp_path: Path) -> None:
    """Two guards keep ``step_10``; the first fires (freezes it) and is reused for a new fit after a crash (a new
    keeper: the old one is garbage collected) while the second lives. The second's provisional pin of the same file
    went to the shelf's orphans, was listed again as held and deleted at the next keeper's normal end: the checkpoint
    the firing named, kept "for good", was gone."""
    first, second, third = LastGoodCheckpoints(), LastGoodCheckpoints(), LastGoodCheckpoints()
    third.start([tmp_path])  # keeps the shelf alive
    pin = first.saved(_save(tmp_path, 10))
    assert second.saved(tmp_path / "step_10.pt") == pin
    first.judged(10, 10)
    assert first.freeze(10) == pin
    first.wait()
    del first, second
    gc.collect()
    new = LastGoodCheckpoints()
    new.start([tmp_path])
    new.release()
    third.release()
    assert pin.exists() and _states(tmp_path) == {"step_10.pt": "kept"}


def test_the_pin_a_run_resumes_from_is_kept_for_good_when_a_keeper_of_this_process_left_it(tmp_path: Path) -> None:
    """A guard reused after a crash gets a new keeper; the old one's pins go to the shelf while another guard lives.
    The new fit resumes from one of them: it was held only, and deleted at the normal end."""
    other, old = LastGoodCheckpoints(), LastGoodCheckpoints()
    other.start([tmp_path])
    for step in (10, 20):
        old.saved(_save(tmp_path, step))
    old.judged(20, 10)
    del old
    gc.collect()
    pin = tmp_path / KEEP_FOLDER / "step_10.pt"
    new = LastGoodCheckpoints()
    new.start([tmp_path], resumed_from=pin)
    new.wait()
    assert not (tmp_path / KEEP_FOLDER / "step_20.pt").exists()  # after the step resumed from, as a dead run's
    new.release()
    other.release()
    assert pin.exists() and _states(tmp_path) == {"step_10.pt": "kept"}
    assert pin.stat().st_nlink == 1  # its own copy, like a frozen pin


def test_a_folder_checkpoint_deleted_while_it_is_linked_does_not_turn_keeping_off(tmp_path: Path, monkeypatch) -> None:
    """A rotation deletes a checkpoint folder while its files are linked (a file checkpoint gone is passed over):
    ``shutil.copytree`` folded the FileNotFoundError into ``shutil.Error``, so the keeper warned that the file system
    refuses hard links and kept nothing more in the run."""
    real_link = os.link

    def rotated(src, dst, **kwargs):
        shutil.rmtree(tmp_path / "checkpoint-1", ignore_errors=True)  # the rotation, right then
        return real_link(src, dst, **kwargs)

    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("model.bin", "optimizer.pt"):
            (tmp_path / f"checkpoint-{step}" / name).write_bytes(b"weights")
    keeper = LastGoodCheckpoints()
    monkeypatch.setattr(os, "link", rotated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot hard-link" warning: the file system is fine
        assert keeper.saved(tmp_path / "checkpoint-1") is None
    monkeypatch.setattr(os, "link", real_link)
    assert keeper.saved(tmp_path / "checkpoint-2") == tmp_path / KEEP_FOLDER / "checkpoint-2"
    assert [p.name for p in (tmp_path / KEEP_FOLDER).iterdir() if p.name[0] != "."] == ["checkpoint-2"]  # no half


def test_a_killed_runs_pin_rewritten_in_place_by_the_next_runs_save_is_named(tmp_path: Path) -> None:
    """A run rerun in the same folder saves ``step_10.pt`` again, in place (the killed run's pin shares its inode:
    HF ``Trainer`` and ``torch.save`` truncate the same file). The keeper took the held pin as this save's but kept
    the stamp of the killed run's save, so the firing found it "changed since it was pinned" and named nothing."""
    dead = LastGoodCheckpoints()
    path = _save(tmp_path, 10)
    dead.saved(path)
    _die(dead)
    rerun = LastGoodCheckpoints()
    rerun.start([tmp_path])
    with open(path, "r+b") as file:  # the rerun's save, in place
        file.write(b"the rerun's weights at 10")
    assert rerun.saved(path) == tmp_path / KEEP_FOLDER / "step_10.pt"
    rerun.judged(10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "changed or vanished since it was pinned"
        assert rerun.freeze(10) == tmp_path / KEEP_FOLDER / "step_10.pt"
    rerun.release()


def test_a_run_resumed_while_the_crashed_fits_keeper_is_garbage_in_a_cycle_keeps_its_pin(tmp_path: Path) -> None:
    """A notebook: a fit crashes, the cell runs again with new guards and resumes from the kept pin. The old keeper
    is garbage in a reference cycle (an old Trainer) until a collection: its manifest looked running, so the resumed
    run took nothing over, and the pin it resumed from stayed provisional (deleted by a later run's normal end)."""
    old = LastGoodCheckpoints()
    for step in (10, 20):
        old.saved(_save(tmp_path, step))
    old.judged(20, 10)
    pin = tmp_path / KEEP_FOLDER / "step_10.pt"
    gc.disable()  # no automatic collection meanwhile: the cycle stays
    try:
        cycle: list = [old]
        cycle.append(cycle)  # the old Trainer and its callbacks
        del old, cycle
        resumed = LastGoodCheckpoints()
        resumed.start([tmp_path], resumed_from=pin)
    finally:
        gc.enable()
    resumed.wait()
    assert _states(tmp_path) == {"step_10.pt": "kept"}  # 20: after the step resumed from
    resumed.release()
    assert pin.exists()


def test_a_keep_folder_that_cannot_be_searched_never_raises_into_training(tmp_path: Path, monkeypatch) -> None:
    """``entrotrain-last-good/`` made by another user's run (mode 0700, a shared project folder): looking for a free
    name in it raised PermissionError out of ``saved`` into training."""
    exists = Path.exists

    def denied(self: Path) -> bool:
        if self.parent.name == KEEP_FOLDER:
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self)

    (tmp_path / KEEP_FOLDER).mkdir()
    monkeypatch.setattr(Path, "exists", denied)
    keeper = LastGoodCheckpoints()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert keeper.saved(_save(tmp_path, 10)) is None
    assert any("cannot hard-link" in str(w.message) for w in caught)


def test_a_dot_files_copy_a_crash_cut_short_in_a_frozen_folder_pin_is_made_again(tmp_path: Path) -> None:
    """torch's distributed checkpoint folder holds ``.metadata``. A crash cut its copy short in a frozen folder pin:
    the leftover was deleted as if it were a manifest being written, and the pin kept sharing ``.metadata`` with the
    original (a save in place under that name changed the kept checkpoint)."""
    original = tmp_path / "checkpoint-10"
    original.mkdir()
    for name in (".metadata", "__0_0.distcp"):
        (original / name).write_bytes(b"saved at 10")
    keeper = LastGoodCheckpoints()
    pin = keeper.saved(original)
    keeper.judged(10, 10)
    assert keeper.freeze(10) == pin
    _die(keeper)
    (pin / ".metadata").unlink()  # the crash: .metadata not copied yet, its copy half written
    os.link(original / ".metadata", pin / ".metadata")
    dead = f"{ck._machine()}.{os.getpid()}.1.0123456789ab"  # this pid, another start: a process gone
    (pin / f".metadata.{dead}.entrotrain-copy").write_bytes(b"sa")
    LastGoodCheckpoints().start([tmp_path])
    assert sorted(p.name for p in pin.iterdir()) == [".metadata", "__0_0.distcp"]
    assert (pin / ".metadata").stat().st_nlink == 1 and (pin / ".metadata").read_bytes() == b"saved at 10"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_keeps_its_pins_under_its_own_name(tmp_path: Path) -> None:
    """``strategy="ddp_notebook"`` forks the ranks from a kernel where an earlier fit's keeper lives: the child's
    keepers joined the inherited shelf and listed their pins in a manifest named for the parent (alive: never taken
    over; rewritten by the parent's keepers without them: kept forever)."""
    parent = LastGoodCheckpoints()
    parent.saved(_save(tmp_path, 10))
    pid = os.fork()
    if pid == 0:  # the child: pin a save, and die without a normal end (never back into pytest)
        try:
            LastGoodCheckpoints().saved(_save(tmp_path, 20))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    owners = {p.name.split(".")[3] for p in (tmp_path / KEEP_FOLDER).glob(".entrotrain-pins.*")}
    assert owners == {str(os.getpid()), str(pid)}
    parent.release()


def test_a_keep_folder_another_run_removes_meanwhile_is_made_again(tmp_path: Path, monkeypatch) -> None:
    """Another run in the folder ends normally and removes the emptied keep folder between this keeper's ``mkdir``
    and its link: the FileNotFoundError was taken for the checkpoint gone, and the save was not kept."""
    real_link = os.link
    removed = []

    def raced(src, dst, **kwargs):
        if not removed:
            removed.append(Path(dst).parent)
            Path(dst).parent.rmdir()  # the other run's _rmdir_if_empty, right then
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", raced)
    keeper = LastGoodCheckpoints()
    assert keeper.saved(_save(tmp_path, 10)) == tmp_path / KEEP_FOLDER / "step_10.pt"
    assert removed == [tmp_path / KEEP_FOLDER]
