"""``LastGoodCheckpoints``: several guards keeping checkpoints in one folder share their pins (one link per
checkpoint file, one manifest, a pin deleted once no guard needs it); what a crash leaves half written (a frozen pin's
copy, a folder pin, a manifest) is cleaned up once its run is gone; a resumed run adopts only the pins of its own
lineage."""

from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks import checkpoint_keeper as ck
from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER, LastGoodCheckpoints, list_pins, release_abandoned
from tests.callbacks.test_checkpoint_keeper_crashes import _die, _manifests, _save, _states
from tests.callbacks.test_guard_scenarios import KEY, Lin, Script, loader
from tests.helpers.lightning_models import quiet_trainer


class _Disk(L.Callback):
    """At each batch start: the names in the keep folder, its manifests, and whether every guard's pins are there."""

    def __init__(self, keep: Path, guards: list[EntropyCollapseGuard]) -> None:
        self.keep, self.guards = keep, guards
        self.names: set[str] = set()
        self.most_manifests = 0
        self.missing: list[Path] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.keep.exists():
            self.names |= {p.name for p in self.keep.iterdir()  # (a frozen pin's copy may be under way)
                           if not p.name.startswith(".") and not p.name.endswith(".entrotrain-copy")}
            self.most_manifests = max(self.most_manifests, len(list(self.keep.glob(".entrotrain-pins.*"))))
        self.missing += [p for g in self.guards for p in g.keeper.pins if not p.exists()]


def test_two_guards_in_one_folder_share_one_link_per_checkpoint(tmp_path: Path) -> None:
    """The first guard is good until step 9 and fires at 10 (freezes ``step=9``); the second's key is bad from step
    4 (patience 100: it never fires), so it holds ``step=3`` while the first lets it go. Each guard made its own
    links (``step=9`` and ``step=9-v1``) and its own manifest; now one link per checkpoint, one manifest, and a pin
    one guard lets go stays while the other needs it."""
    first = EntropyCollapseGuard(KEY, threshold=0.05)
    second = EntropyCollapseGuard(KEY + "/b", threshold=0.05, patience=100)
    values = [{KEY: a, KEY + "/b": b} for a, b in zip([0.5] * 10 + [0.01] * 6, [0.5] * 4 + [0.01] * 12)]
    disk = _Disk(tmp_path / KEEP_FOLDER, [first, second])
    trainer = quiet_trainer(callbacks=[Script(values), first, second, disk,
                                       ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)],
                            max_steps=15, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lin(), loader())
    assert first.times_fired == 1 and second.times_fired == 0
    assert disk.names == {f"epoch=0-step={s}.ckpt" for s in (3, 6, 9, 12)}  # no -v1: one link each
    assert disk.most_manifests == 1 and disk.missing == []
    kept = tmp_path / KEEP_FOLDER
    assert first.rollback_checkpoint == kept / "epoch=0-step=9.ckpt"
    assert sorted(kept.iterdir()) == [first.rollback_checkpoint]  # the second's normal end left the frozen pin
    assert torch.load(first.rollback_checkpoint, weights_only=True)["global_step"] == 9


def test_a_pin_stays_while_another_guard_needs_it(tmp_path: Path) -> None:
    first, second = LastGoodCheckpoints(), LastGoodCheckpoints()
    for step in (10, 20):
        path = _save(tmp_path, step)
        assert first.saved(path) == second.saved(path) == tmp_path / KEEP_FOLDER / path.name
    first.judged(20, 20)  # lets 10 go; the second still holds it (no observation yet)
    assert (tmp_path / KEEP_FOLDER / "step_10.pt").exists()
    second.judged(20, 10)
    assert second.freeze(10) == tmp_path / KEEP_FOLDER / "step_10.pt"
    (manifest,) = _manifests(tmp_path)
    assert [r["name"] for r in json.loads(manifest.read_text())["pins"]] == ["step_20.pt"]  # frozen: not listed
    first.release()
    second.release()
    assert _states(tmp_path) == {"step_10.pt": "kept"} and _manifests(tmp_path) == []


def test_every_guard_of_a_resumed_run_adopts_the_killed_runs_pins(tmp_path: Path) -> None:
    """The first guard to open the folder took the killed run's manifest over; the second got nothing, so it could not
    name the killed run's pin when its restored judgement fired before the resumed run's first save."""
    dead = LastGoodCheckpoints()
    for step in (10, 20):
        dead.saved(_save(tmp_path, step))
    dead.judged(20, 10)
    resume = _save(tmp_path, 30)
    _die(dead)
    keepers = [LastGoodCheckpoints(), LastGoodCheckpoints()]
    for keeper in keepers:
        keeper.start([tmp_path], resumed_from=resume)
    pins = [tmp_path / KEEP_FOLDER / f"step_{step}.pt" for step in (10, 20)]
    assert [k.pins for k in keepers] == [pins, pins]
    assert keepers[1].freeze(15) == tmp_path / KEEP_FOLDER / "step_10.pt"
    keepers[0].release()
    keepers[1].release()
    assert _states(tmp_path) == {"step_10.pt": "kept"}


def test_a_copy_left_half_written_by_a_crash_is_deleted_once_its_run_is_gone(tmp_path: Path, monkeypatch) -> None:
    """Killed while a frozen pin got its own copy: ``step_10.pt.<run>.entrotrain-copy`` stayed forever (a whole
    checkpoint of disk, in no manifest), and the frozen pin still shared its file with the original (a save in place
    under that name changed it). The next run in the folder deletes those of runs gone and makes the copy again, never
    one a running run is writing; so does ``release_abandoned``."""
    crashing = [True]
    remove, copy = ck._remove, ck._copy

    def killed_mid_copy(src: Path, dst: Path) -> None:
        dst.write_bytes(b"half")
        raise OSError("killed")

    monkeypatch.setattr(ck, "_copy", killed_mid_copy)
    monkeypatch.setattr(ck, "_remove", lambda path: None if crashing[0] else remove(path))  # the process is gone
    runs, copies = {}, {}
    for folder in ("dead", "running", "released"):
        keeper = runs[folder] = LastGoodCheckpoints(group=folder)  # a process each
        (tmp_path / folder).mkdir()
        keeper.saved(_save(tmp_path / folder, 10))
        keeper.judged(10, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keeper.freeze(10)
            keeper.wait()
        (copies[folder],) = (tmp_path / folder / KEEP_FOLDER).glob("*.entrotrain-copy")
    crashing[0] = False
    monkeypatch.setattr(ck, "_copy", copy)
    _die(runs["dead"])
    _die(runs["released"])
    LastGoodCheckpoints().start([tmp_path / "dead", tmp_path / "running"])
    assert not copies["dead"].exists() and copies["running"].exists()
    assert release_abandoned(tmp_path / "released") == [] and not copies["released"].exists()
    for folder in ("dead", "released"):
        pin = tmp_path / folder / KEEP_FOLDER / "step_10.pt"
        assert pin.stat().st_nlink == 1 and pin.read_bytes() == b"weights at 10"  # its own copy, whole
        assert _states(tmp_path / folder) == {"step_10.pt": "kept"}


def test_a_resumed_run_does_not_adopt_pins_off_its_lineage(tmp_path: Path) -> None:
    """A fresh run holds the pin an unrelated earlier run left (step 10), and is killed; a run resumed from the fresh
    run's step 30 adopted that pin as its own (it sits before step 30) and could name it: a checkpoint of another
    training. It stays held (never named; freed at a normal end), the fresh run's own pins are adopted."""
    unrelated = LastGoodCheckpoints()
    unrelated.saved(_save(tmp_path, 10, "z"))
    _die(unrelated)
    fresh = LastGoodCheckpoints()
    fresh.start([tmp_path])
    fresh.saved(_save(tmp_path, 20))
    resume = _save(tmp_path, 30)
    fresh.judged(30, 20)
    _die(fresh)
    resumed = LastGoodCheckpoints()
    resumed.start([tmp_path], resumed_from=resume)
    assert resumed.freeze(15) is None  # the unrelated step 10 is not named
    assert resumed.freeze(25) == tmp_path / KEEP_FOLDER / "step_20.pt"


class _Killed(BaseException):
    """SIGKILL at this point: nothing of the keeper runs after it."""


def test_a_folder_pin_a_crash_cut_short_is_never_listed_as_kept(tmp_path: Path, monkeypatch) -> None:
    """Killed while it hard-linked a folder checkpoint (HF ``checkpoint-10``) file by file: the pin was a folder of
    some of the files, in no manifest, so ``list_pins`` called it kept for good and a resume from it loaded part of a
    checkpoint. It is linked aside and renamed into place now; what a crash leaves aside goes once its run is gone."""
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (checkpoint / name).write_text(name)
    real_link = os.link

    def link(src, dst, **kwargs):
        if Path(dst).name != "model.safetensors":
            raise _Killed
        return real_link(src, dst, **kwargs)

    keeper = LastGoodCheckpoints()
    monkeypatch.setattr(os, "link", link)
    with pytest.raises(_Killed):
        keeper.saved(checkpoint)
    monkeypatch.undo()
    _die(keeper)
    assert list_pins(tmp_path) == []
    LastGoodCheckpoints().start([tmp_path])
    assert list((tmp_path / KEEP_FOLDER).iterdir()) == []


def test_a_manifest_a_crash_cut_short_is_deleted_once_its_run_is_gone(tmp_path: Path, monkeypatch) -> None:
    """Killed while it wrote its manifest aside (before ``os.replace``): ``.entrotrain-pins.<run>.json.<k>.tmp``
    stayed forever."""
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 1))

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(_Killed):
        keeper.saved(_save(tmp_path, 2))
    monkeypatch.undo()
    _die(keeper)
    LastGoodCheckpoints().start([tmp_path])
    assert [p.name for p in (tmp_path / KEEP_FOLDER).iterdir() if p.name.startswith(".")] == [m.name for m in
                                                                                              _manifests(tmp_path)]


def test_the_pins_of_a_keeper_garbage_collected_stay_listed_while_its_process_runs(tmp_path: Path) -> None:
    """A guard reused for a new fit after a crash gets a new keeper; the old one's provisional pins vanished from the
    manifest the other guards' keepers share (kept forever, a whole checkpoint each once rotated). They stay listed,
    held by the next keeper that opens the folder and freed at its normal end."""
    other, old = LastGoodCheckpoints(), LastGoodCheckpoints()
    other.start([tmp_path])
    old.saved(_save(tmp_path, 10))
    del old
    gc.collect()
    other.saved(_save(tmp_path, 20, "b"))
    assert _states(tmp_path) == {"bstep_20.pt": "running", "step_10.pt": "running"}
    new = LastGoodCheckpoints()
    new.start([tmp_path])
    new.release()
    other.release()
    assert not (tmp_path / KEEP_FOLDER).exists()


_guard_ops = st.lists(
    st.one_of(st.just(("save",)), st.tuples(st.just("judge"), st.integers(0, 2), st.booleans()),
              st.tuples(st.just("fire"), st.integers(0, 2))),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ops=_guard_ops)
def test_any_judgements_of_three_guards_keep_every_promise(tmp_path_factory, ops) -> None:
    """Three guards keep the checkpoints of one run (``save_top_k=1``), each judging and firing on its own. After every
    operation: one link per checkpoint, every pin a guard holds is there, what a firing named is there unchanged, and
    the manifest lists exactly the pins some guard holds and none froze. At the normal end only what firings named
    is left."""
    folder = tmp_path_factory.mktemp("guards")
    keep = folder / KEEP_FOLDER
    keepers = [LastGoodCheckpoints() for _ in range(3)]
    good: list[int | None] = [None] * 3
    named: dict[Path, bytes] = {}
    step = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op, *arg in ops:
            step += 1
            if op == "save":
                path = _save(folder, step)
                assert len({k.saved(path) for k in keepers}) == 1  # one link for the three
                for old in folder.glob("step_*.pt"):
                    if old != path:
                        old.unlink()
            elif op == "judge":
                good[arg[0]] = step if arg[1] else good[arg[0]]
                keepers[arg[0]].judged(step, good[arg[0]])
            elif len(keepers[arg[0]].frozen) < ck.MAX_FROZEN and (pin := keepers[arg[0]].freeze(good[arg[0]])):
                keepers[arg[0]].wait()
                named.setdefault(pin, pin.read_bytes())
            held = {p for k in keepers for p in k.pins}
            frozen = {p for k in keepers for p in k.frozen}
            assert all(p.exists() for p in held) and all(p.read_bytes() == b for p, b in named.items())
            assert {p.path for p in list_pins(folder) if p.state == "running"} == held - frozen
            assert len(_manifests(folder)) == (1 if held - frozen else 0)
        for keeper in keepers:
            keeper.release()
    assert set(keep.iterdir() if keep.exists() else []) == set(named)


def test_two_guards_freezing_one_pin_copy_it_once(tmp_path: Path, monkeypatch) -> None:
    """Two guards firing together name the same shared pin: each started a copy of it, into the same file aside, at
    once; one truncated the file the other had just renamed into the pin (a half-written kept checkpoint)."""
    copies = []
    copy = ck._copy
    monkeypatch.setattr(ck, "_copy", lambda src, dst: (copies.append(src), copy(src, dst)))
    first, second = LastGoodCheckpoints(), LastGoodCheckpoints()
    path = _save(tmp_path, 10)
    for keeper in (first, second):
        keeper.saved(path)
        keeper.judged(10, 10)
    assert first.freeze(10) == second.freeze(10) == tmp_path / KEEP_FOLDER / "step_10.pt"
    assert len({*first._copying, *second._copying}) == 1  # one copy thread for the two
    first.wait()
    second.wait()
    assert copies == [tmp_path / KEEP_FOLDER / "step_10.pt"]
    assert (tmp_path / KEEP_FOLDER / "step_10.pt").stat().st_nlink == 1
