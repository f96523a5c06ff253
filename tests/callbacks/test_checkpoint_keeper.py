"""``EntropyCollapseGuard(keep_last_good=True)``: the checkpoint a firing names survives checkpoint rotation.

The property: whatever the order of saves, rotations and judgements, a firing names a checkpoint whose content is the
one saved at the newest step at or before the last good observation (among this run's saves), and it still exists
after every later rotation; at most the pins a firing could still name are held; a normal end leaves only frozen pins.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.checkpoint_keeper import KEEP_FOLDER, MAX_FROZEN, LastGoodCheckpoints, list_pins
from entrotrain.integrations.checkpoint_sources import find_checkpoints
from tests.callbacks.test_guard_scenarios import KEY, Lin, Script, loader
from tests.helpers.lightning_models import quiet_trainer


def _save(folder: Path, step: int) -> Path:
    path = folder / f"step_{step}.pt"
    path.write_bytes(f"weights at {step}".encode())
    return path


def _rotate(folder: Path, keep: int) -> None:
    """What ``save_top_k=keep`` / ``save_total_limit=keep`` does: delete all but the newest ``keep`` saves."""
    saved = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for path in saved[: max(len(saved) - keep, 0)]:
        path.unlink()


# one training step: (save a checkpoint?, observe the key? and its value: True = good)
_steps = st.lists(st.tuples(st.booleans(), st.sampled_from([None, True, False])), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps=_steps, keep=st.integers(1, 3), patience=st.integers(1, 2))
def test_a_firing_names_the_newest_good_save_whatever_rotation_did(tmp_path_factory, steps, keep, patience) -> None:
    folder = tmp_path_factory.mktemp("ckpts")
    guard = EntropyCollapseGuard(KEY, threshold=0.5, patience=patience)
    saves: list[int] = []
    named: dict[Path, bytes] = {}  # every firing's checkpoint, with the content it must keep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, (save, observed) in enumerate(steps):
            if observed is not None:
                reason = guard.observe(0.9 if observed else 0.1, step)
                if reason is not None:
                    guard.fire(reason, step, checkpoints=list(folder.glob("step_*.pt")))
                    good = [s for s in saves if guard.last_good_step is not None and s <= guard.last_good_step]
                    if good:
                        assert guard.rollback_checkpoint is not None
                        named[guard.rollback_checkpoint] = f"weights at {max(good)}".encode()
                    else:
                        assert guard.rollback_checkpoint is None or step == 0
            if save:
                saves.append(step)
                guard.checkpoint_saved(_save(folder, step))
                _rotate(folder, keep)
            loose = [p for p in guard.keeper.pins if p not in guard.keeper.frozen]
            assert len(loose) <= 2 + sum(1 for s in saves if guard.last_seen_step is None or s >= guard.last_seen_step)
            firings = list(named)  # first named first; a flapping key keeps the first and the newest ones
            for path in firings[:1] + firings[1:][-(MAX_FROZEN - 1):]:  # what a firing named is there, unchanged
                assert path.read_bytes() == named[path]
        guard.keeper.release()
    kept = folder / KEEP_FOLDER
    left = sorted(kept.iterdir()) if kept.exists() else []
    firings = list(named)
    assert left == sorted(p for p in firings[:1] + firings[1:][-(MAX_FROZEN - 1):] if p.parent == kept)  # frozen only


def test_the_judgements_keep_only_what_a_firing_could_name(tmp_path: Path) -> None:
    keeper = LastGoodCheckpoints()
    pin = {s: keeper.saved(_save(tmp_path, s)) for s in (10, 20, 30)}
    keeper.judged(30, 30)  # good at 30
    assert keeper.pins == [pin[30]]  # 10 and 20: older than the newest good save
    pin[40] = keeper.saved(_save(tmp_path, 40))
    pin[45] = keeper.saved(_save(tmp_path, 45))
    keeper.judged(50, 30)  # bad at 50
    assert keeper.pins == [pin[30], pin[45]]  # 45: named if the next good observation comes (40 never is)
    assert keeper.freeze(30) == pin[30]
    pin[60] = keeper.saved(_save(tmp_path, 60))
    keeper.judged(70, 70)
    assert keeper.pins == [pin[30], pin[60]] and keeper.frozen == [pin[30]]
    assert pin[60].stat().st_ino == (tmp_path / "step_60.pt").stat().st_ino  # a hard link: no disk space
    keeper.release()
    assert sorted((tmp_path / KEEP_FOLDER).iterdir()) == [pin[30]]
    assert pin[30].stat().st_nlink == 1 and pin[30].read_bytes() == b"weights at 30"  # frozen: its own copy


def test_a_checkpoint_without_a_step_or_already_a_pin_is_not_kept(tmp_path: Path) -> None:
    keeper = LastGoodCheckpoints()
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert keeper.saved(tmp_path / "last.ckpt") is None  # rewritten in place at every save: never a pin
    assert keeper.saved(tmp_path / "missing_step_3.pt") is None
    pin = keeper.saved(_save(tmp_path, 3))
    assert keeper.saved(pin) is None and keeper.pins == [pin]


def test_a_pin_rewritten_in_place_is_not_named(tmp_path: Path) -> None:
    keeper = LastGoodCheckpoints()
    original = _save(tmp_path, 10)
    keeper.saved(original)
    keeper.judged(10, 10)
    os.utime(original, ns=(0, 0))  # the same inode rewritten (in place: the pin shares it)
    with pytest.warns(UserWarning, match="changed or vanished since it was pinned"):
        assert keeper.freeze(10) is None
    assert keeper.pins == [] and not (tmp_path / KEEP_FOLDER / original.name).exists()


def test_a_folder_checkpoint_is_kept_as_hard_links_that_outlive_its_deletion(tmp_path: Path) -> None:
    import shutil

    original = tmp_path / "checkpoint-8"
    (original / "sub").mkdir(parents=True)
    (original / "model.bin").write_bytes(b"model")
    (original / "sub" / "optimizer.pt").write_bytes(b"adam")
    keeper = LastGoodCheckpoints()
    pin = keeper.saved(original)
    assert (pin / "model.bin").stat().st_ino == (original / "model.bin").stat().st_ino
    shutil.rmtree(original)  # transformers' rotation
    assert keeper.freeze(8) == pin
    assert (pin / "sub" / "optimizer.pt").read_bytes() == b"adam"


def test_a_file_system_without_hard_links_is_warned_about_once(tmp_path: Path, monkeypatch) -> None:
    def refuse(src, dst, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    guard = EntropyCollapseGuard(KEY, threshold=0.5)
    with pytest.warns(UserWarning, match="cannot hard-link") as record:
        guard.checkpoint_saved(_save(tmp_path, 1))
        guard.checkpoint_saved(_save(tmp_path, 2))
    assert len([w for w in record if "cannot hard-link" in str(w.message)]) == 1
    assert not (tmp_path / KEEP_FOLDER).exists()
    guard.observe(0.9, 2)
    message = guard.fire(guard.observe(0.1, 3), 3, checkpoints=list(tmp_path.glob("step_*.pt")))
    assert message.endswith(f"Newest checkpoint at or before step 2: {tmp_path / 'step_2.pt'}.")  # the original


def test_an_earlier_runs_pin_is_never_overwritten(tmp_path: Path) -> None:
    original = _save(tmp_path, 5)
    (tmp_path / KEEP_FOLDER).mkdir()
    (tmp_path / KEEP_FOLDER / original.name).write_bytes(b"an earlier run's collapse")
    pin = LastGoodCheckpoints().saved(original)
    assert pin == tmp_path / KEEP_FOLDER / "step_5-v1.pt"
    assert (tmp_path / KEEP_FOLDER / original.name).read_bytes() == b"an earlier run's collapse"


# ---------------------------------------------------------------- Lightning
def _fit(tmp_path: Path, values, keep: bool = True, raise_at: int | None = None, max_steps: int = 15):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == raise_at:
                raise RuntimeError("the node went away")

    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)  # Lightning's default save_top_k=1
    guard = EntropyCollapseGuard(KEY, threshold=0.05, keep_last_good=keep)
    model = Lin()
    trainer = quiet_trainer(callbacks=[Script(values), guard, saver, Crash()], max_steps=max_steps,
                            enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    return guard, model


def test_lightning_keeps_the_checkpoint_that_save_top_k_1_deleted(tmp_path: Path) -> None:
    """Saves every 3 steps keeping one (Lightning's default): good until step 9, collapsed from step 10. At the end
    only ``step=15`` is left in the folder; the guard's ``step=9`` pin is a whole checkpoint of step 9, and training
    is bit-identical with and without keeping."""
    values = [0.5] * 10 + [0.01] * 6
    guard, model = _fit(tmp_path / "kept", values)
    assert sorted(p.name for p in (tmp_path / "kept").glob("*.ckpt")) == ["epoch=0-step=15.ckpt"]
    pin = tmp_path / "kept" / KEEP_FOLDER / "epoch=0-step=9.ckpt"
    assert guard.rollback_checkpoint == pin
    assert sorted(pin.parent.iterdir()) == [pin]
    assert torch.load(pin, weights_only=True)["global_step"] == 9
    _, plain = _fit(tmp_path / "plain", values, keep=False)
    assert not (tmp_path / "plain" / KEEP_FOLDER).exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_lightning_leaves_nothing_after_a_normal_end_without_firing(tmp_path: Path) -> None:
    guard, _ = _fit(tmp_path, [0.5] * 16)
    assert guard.times_fired == 0
    assert not (tmp_path / KEEP_FOLDER).exists()


def test_lightning_keeps_the_pins_when_training_fails(tmp_path: Path) -> None:
    """A crash (or a kill) is when you roll back: the pin of the newest good save stays."""
    with pytest.raises(RuntimeError, match="the node went away"):
        _fit(tmp_path, [0.5] * 16, raise_at=8)
    (pin,) = list_pins(tmp_path)
    assert pin.path.name == "epoch=0-step=6.ckpt" and pin.step == 6
    assert pin.state == "running"  # its keeper (this process's guard) is still referenced: not taken over
    assert [p.name for p in (tmp_path / KEEP_FOLDER).iterdir() if not p.name.startswith(".")] == [pin.path.name]


# ---------------------------------------------------------------- inspect
def test_inspect_reads_a_kept_checkpoint_once_and_only_where_its_original_is_gone(tmp_path: Path) -> None:
    keeper = LastGoodCheckpoints()
    for step in (3, 6):
        path = tmp_path / f"epoch=0-step={step}.ckpt"
        path.write_bytes(b"")
        keeper.saved(path)
    assert [c.path for c in find_checkpoints([tmp_path])] == [tmp_path / "epoch=0-step=3.ckpt",
                                                             tmp_path / "epoch=0-step=6.ckpt"]
    (tmp_path / "epoch=0-step=3.ckpt").unlink()  # rotated away: the pin stands in for it
    assert [c.path for c in find_checkpoints([tmp_path])] == [tmp_path / KEEP_FOLDER / "epoch=0-step=3.ckpt",
                                                             tmp_path / "epoch=0-step=6.ckpt"]


def test_a_flapping_key_keeps_the_first_and_the_newest_firings_checkpoints(tmp_path: Path) -> None:
    guard = EntropyCollapseGuard(KEY, threshold=0.5)
    named = []
    with pytest.warns(UserWarning, match=f"more than {MAX_FROZEN} firings in this fit") as record:
        for step in range(0, 50, 10):  # good, save, bad: five episodes
            guard.observe(0.9, step)
            guard.checkpoint_saved(_save(tmp_path, step))
            guard.fire(guard.observe(0.1, step + 5), step + 5)
            named.append(guard.rollback_checkpoint)
    assert len([w for w in record if "firings in this fit" in str(w.message)]) == 1
    guard.keeper.release()
    assert sorted((tmp_path / KEEP_FOLDER).iterdir()) == sorted([named[0], *named[-(MAX_FROZEN - 1):]])
    assert all(p.read_bytes() == f"weights at {10 * i}".encode() for i, p in enumerate(named) if p.exists())


def test_inspect_reads_one_kept_checkpoint_per_step(tmp_path: Path) -> None:
    """Two guards keep the same checkpoint (``step=3.ckpt`` and ``step=3-v1.ckpt``): once the original is gone,
    inspect reads it once."""
    path = tmp_path / "epoch=0-step=3.ckpt"
    path.write_bytes(b"")
    LastGoodCheckpoints().saved(path)
    LastGoodCheckpoints().saved(path)
    path.unlink()
    assert [c.path for c in find_checkpoints([tmp_path])] == [tmp_path / KEEP_FOLDER / "epoch=0-step=3.ckpt"]


def test_a_checkpoint_gone_before_it_is_pinned_does_not_turn_keeping_off(tmp_path: Path, monkeypatch) -> None:
    keeper = LastGoodCheckpoints()
    real_link = os.link

    def vanished(src, dst, **kwargs):
        Path(src).unlink()  # deleted by a rotation right then
        raise FileNotFoundError(2, "No such file or directory", str(src))

    monkeypatch.setattr(os, "link", vanished)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot hard-link" warning: the file system is fine
        assert keeper.saved(_save(tmp_path, 1)) is None
    monkeypatch.setattr(os, "link", real_link)
    assert keeper.saved(_save(tmp_path, 2)) == tmp_path / KEEP_FOLDER / "step_2.pt"


def test_a_pin_that_cannot_be_deleted_never_raises_into_training(tmp_path: Path, monkeypatch) -> None:
    keeper = LastGoodCheckpoints()
    keeper.saved(_save(tmp_path, 1))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)
    keeper.saved(_save(tmp_path, 2))
    keeper.judged(2, 2)  # drops step 1's pin: its file cannot be deleted, training goes on
    assert keeper.pins == [tmp_path / KEEP_FOLDER / "step_2.pt"]
