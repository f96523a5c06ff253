"""Keep the checkpoint to roll back to: hard links that a checkpoint rotation cannot delete.

A guard that fires names the newest checkpoint saved at or before the last observation it judged good. By then a
checkpoint rotation may have deleted it: Lightning's ``ModelCheckpoint`` keeps only its newest checkpoint by default
(``save_top_k=1``), ``transformers.Trainer`` its newest ``save_total_limit``. Saving every 1000 steps with the
defaults, the run that collapsed at step 40 500 has only ``step=41000.ckpt`` left, saved mid-collapse.

:class:`LastGoodCheckpoints` pins checkpoints as they are saved: a hard link (a folder of hard links for a checkpoint
folder) in ``entrotrain-last-good/`` beside it. A hard link costs no disk space while the original exists; once a
rotation deletes the original, the pin holds the data (one checkpoint's worth). Which pins stay, given the guard's
judgements (a checkpoint is dated by the step in its name, :func:`~entrotrain.callbacks.collapse_guard.saved_at`):

- after an **observation** at step ``s``, of the pins saved at or before ``s``: the newest at or before the last
  good step (the one a firing now would name) and the newest of all (the one a firing would name if the next good
  observation comes later: observations come in step order, so no other can ever be named); the others go. Pins
  saved after ``s`` wait for the next observation, all but the two newest steps of them: an observation comes at a
  step no older than the save before the newest (Lightning judges a monitor that runs after the guard at the next
  batch start, after the next save), so no older one can be named (a key never published, or published once an
  epoch, would otherwise pin every save of the run);
- at a **firing**: the newest pin at or before the last good step is *frozen*: kept until you delete it, whatever
  rotation, later judgements or later runs do. One frozen pin per firing, at most :data:`MAX_FROZEN` per fit (a key
  flapping around its threshold fires again and again: the first firing's pin and the newest ones stay). A frozen
  pin gets its own copy of the files it still shares with its original, in a background thread (training does not
  wait; the interpreter waits for it at exit): a save under the same name may rewrite files in place
  (``transformers.Trainer`` run again in the same ``output_dir`` rewrites ``checkpoint-N/optimizer.pt``,
  ``trainer_state.json``, ...; ``torch.save`` to an existing path), which would change a hard link with them. So a
  frozen pin costs one checkpoint of disk even while its original exists;
- when training **ends normally**, the pins that are not frozen go (the run needed none of them), and the folder too
  when it is empty. After a crash or a kill every pin stays: that is when you roll back.

So at most four checkpoints' worth of disk are held beyond your rotation between firings (two judged, two saved
since the last observation), and one per firing (at most :data:`MAX_FROZEN`) after. A pin whose file changed since
it was pinned (a checkpoint rewritten in place under the same name: Lightning's ``last.ckpt`` is never pinned, it
has no step in its name) is dropped with a warning instead of being named. A file system that refuses hard links
(some network and object-store mounts) is warned about once; nothing is pinned then.

Pin a checkpoint once it is complete: a folder written by several processes or asynchronously (torch's async
distributed checkpoint) is linked as it is when :meth:`LastGoodCheckpoints.saved` runs, so call
``checkpoint_saved`` when the save has finished. Pins left by a process that crashed are not tracked by the run
that resumes: after a preemption they stay until you delete them.

The keeper does file work only where it is told of a save: the glue calls :meth:`saved` on the process that writes
checkpoints (rank zero). A pin made by an earlier process (a run killed and resumed) is not tracked: it is never
deleted by a later run.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KEEP_FOLDER", "MAX_FROZEN", "LastGoodCheckpoints"]

#: The folder, beside the checkpoints, that holds the pins.
KEEP_FOLDER = "entrotrain-last-good"
#: Frozen pins kept per fit: the first firing's and the newest ones.
MAX_FROZEN = 3

_Stamp = tuple[tuple[str, int, int], ...]


@dataclass
class _Pin:
    step: int
    path: Path  # the pin (in KEEP_FOLDER)
    source: Path  # the checkpoint as saved
    stamp: _Stamp  # (file, size, mtime_ns) of every file when pinned: a rewrite in place changes it
    frozen: bool = False


def _files(path: Path) -> list[tuple[str, Path]]:
    """The files of a checkpoint (itself, or every file in its folder), each with its name in the checkpoint (``""``
    for a file checkpoint)."""
    if path.is_file():
        return [("", path)]
    return [(str(file.relative_to(path)), file) for file in sorted(path.rglob("*")) if file.is_file()]


def _stamp(path: Path) -> _Stamp:
    return tuple((name, (stat := file.stat()).st_size, stat.st_mtime_ns) for name, file in _files(path))


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (frozen pins, an earlier run's), or gone
        pass


def _remove(path: Path) -> None:
    """Delete a pin (file or folder); one that cannot be deleted (gone, read-only) is left: never an error in
    training."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass


class LastGoodCheckpoints:
    """The pins of one guard (module docstring). ``owner`` names it in warnings."""

    def __init__(self, owner: str = "EntropyCollapseGuard") -> None:
        self.owner = owner
        self._pins: list[_Pin] = []
        self._refused = False  # the file system refused a hard link: keep nothing more
        self._copying: list[threading.Thread] = []  # frozen pins getting their own copy of shared files
        self._capped_warned = False
        self._judged: int | None = None  # the newest step an observation judged

    @property
    def pins(self) -> list[Path]:
        """The pins held now (frozen or not), oldest first."""
        return [pin.path for pin in sorted(self._pins, key=lambda p: p.step)]

    @property
    def frozen(self) -> list[Path]:
        """The pins kept for firings."""
        return [pin.path for pin in self._pins if pin.frozen]

    def saved(self, path: str | os.PathLike[str], step: int | None = None) -> Path | None:
        """Pin the checkpoint just saved at ``path`` (a file or a folder), saved at ``step`` (default: the step in its
        name; a checkpoint without one is not pinned). Returns the pin, or ``None`` when nothing was pinned."""
        from entrotrain.callbacks.collapse_guard import saved_at

        source = Path(path)
        step = saved_at(source) if step is None else step
        if self._refused or step is None or source.parent.name == KEEP_FOLDER or not source.exists():
            return None
        for pin in [p for p in self._pins if p.source == source and not p.frozen]:  # saved again under its name
            self._drop(pin)
        if any(p.source == source and p.frozen and p.stamp == _stamp(source) for p in self._pins):
            return None  # already kept, unchanged
        target = self._free_name(source)
        try:
            target.parent.mkdir(exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, copy_function=os.link)
            else:
                os.link(source, target)
        except OSError as err:
            _remove(target)
            _rmdir_if_empty(target.parent)  # made for this pin: leave no empty folder
            if isinstance(err, FileNotFoundError):  # the checkpoint went away meanwhile: this one is not kept
                return None
            self._refused = True
            warnings.warn(
                f"{self.owner}(keep_last_good=True): cannot hard-link {source} into {target.parent} "
                f"({type(err).__name__}: {err}); the checkpoint to roll back to is not protected from checkpoint "
                "rotation in this run. Keep more checkpoints (ModelCheckpoint(save_top_k=-1), "
                "TrainingArguments(save_total_limit=None)) or pass keep_last_good=False to silence this.",
                stacklevel=2,
            )
            return None
        self._pins.append(_Pin(step, target, source, _stamp(target)))
        self._drop_unjudged_but_two()
        return target

    def _drop_unjudged_but_two(self) -> None:
        """Of the pins no observation judged yet, keep those of the two newest steps (module docstring)."""
        waiting = [pin for pin in self._pins if not pin.frozen and (self._judged is None or pin.step > self._judged)]
        newest = sorted({pin.step for pin in waiting})[-2:]
        for pin in waiting:
            if pin.step not in newest:
                self._drop(pin)

    def _free_name(self, source: Path) -> Path:
        """``KEEP_FOLDER/<name>``, or ``<stem>-v1<suffix>``, ... when an earlier pin (of an earlier run) holds it."""
        folder = source.parent / KEEP_FOLDER
        target = folder / source.name
        version = 0
        while target.exists() or target.is_symlink():
            version += 1
            target = folder / (f"{source.stem}-v{version}{source.suffix}" if source.is_file()
                               else f"{source.name}-v{version}")
        return target

    def judged(self, step: int, last_good_step: int | None) -> None:
        """After an observation at ``step`` (good or bad; ``last_good_step`` the last good one, this one when it is
        good): keep what a firing could ever name (module docstring)."""
        self._judged = step if self._judged is None else max(self._judged, step)
        before = [pin for pin in self._pins if not pin.frozen and pin.step <= step]
        newest = max(before, key=lambda p: p.step, default=None)
        good = [pin for pin in before if last_good_step is not None and pin.step <= last_good_step]
        named = max(good, key=lambda p: p.step, default=None)
        for pin in before:
            if pin is not newest and pin is not named:
                self._drop(pin)

    def freeze(self, last_good_step: int | None) -> Path | None:
        """At a firing: keep the newest pin saved at or before ``last_good_step`` for good and return it (``None``:
        none, or it changed since it was pinned)."""
        if last_good_step is None:
            return None
        candidates = [pin for pin in self._pins if pin.step <= last_good_step]
        while candidates:
            pin = max(candidates, key=lambda p: (p.step, not p.frozen))
            if pin.frozen:
                self.wait()  # a pin being copied holds a temporary file (and swaps files): checked once copied
            if self._intact(pin):
                if not pin.frozen:
                    pin.frozen = True
                    self._cap_frozen()
                    self._copying.append(threading.Thread(target=self._unshare, args=(pin,), name="entrotrain-keep"))
                    self._copying[-1].start()
                return pin.path
            candidates.remove(pin)
        return None

    def _cap_frozen(self) -> None:
        """At most :data:`MAX_FROZEN` frozen pins: the first firing's and the newest (a flapping key)."""
        frozen = sorted((pin for pin in self._pins if pin.frozen), key=lambda p: p.step)  # in firing order
        if len(frozen) <= MAX_FROZEN:
            return
        self.wait()  # a pin being copied is not dropped under its copy
        for pin in frozen[1:-(MAX_FROZEN - 1)]:
            self._drop(pin)
        if not self._capped_warned:
            self._capped_warned = True
            warnings.warn(
                f"{self.owner}(keep_last_good=True): more than {MAX_FROZEN} firings in this fit; only the first "
                f"firing's checkpoint and the {MAX_FROZEN - 1} newest are kept. A guard that fires again and again "
                "watches a key hovering at its threshold: raise patience, or lower the threshold.",
                stacklevel=4,
            )

    def _unshare(self, pin: _Pin) -> None:
        """Give a frozen pin its own copy of each file it still shares with its original (module docstring); runs in
        a background thread. A file that changes while it is copied (rewritten in place meanwhile) is warned about."""
        pinned = {name: (size, mtime) for name, size, mtime in pin.stamp}
        for name, file in _files(pin.path):
            copy = file.with_name(file.name + ".entrotrain-copy")
            try:
                before = file.stat()
                if before.st_nlink < 2:
                    continue
                if pinned.get(name) != (before.st_size, before.st_mtime_ns):
                    raise OSError(f"{file} changed since it was pinned")
                shutil.copy2(file, copy)  # keeps the mtime: the pin's stamp is unchanged
                after = file.stat()
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    raise OSError(f"{file} changed while it was copied")
                os.replace(copy, file)
            except OSError as err:
                _remove(copy)
                warnings.warn(
                    f"{self.owner}(keep_last_good=True): cannot give the kept checkpoint {pin.path} its own copy of "
                    f"{file.name} ({type(err).__name__}: {err}); it shares that file with {pin.source}, so a save in "
                    "place under that name would change it.",
                    stacklevel=2,
                )
                return

    def wait(self) -> None:
        """Wait for the frozen pins' copies under way."""
        threads, self._copying = self._copying, []
        for thread in threads:
            thread.join()

    def _intact(self, pin: _Pin) -> bool:
        try:
            if _stamp(pin.path) == pin.stamp:
                return True
        except OSError:
            pass
        warnings.warn(
            f"{self.owner}(keep_last_good=True): the kept checkpoint {pin.path} changed or vanished since it was "
            f"pinned (its original {pin.source} was rewritten in place under the same name?); it is not named as the "
            "checkpoint to roll back to.",
            stacklevel=3,
        )
        self._drop(pin)
        return False

    def release(self) -> None:
        """Training ended normally: drop the pins that are not frozen, and the folder when it is empty; wait for the
        frozen pins' copies."""
        self.wait()
        folders = {pin.path.parent for pin in self._pins}
        for pin in [p for p in self._pins if not p.frozen]:
            self._drop(pin)
        for folder in folders:
            _rmdir_if_empty(folder)

    def _drop(self, pin: _Pin) -> None:
        self._pins.remove(pin)
        _remove(pin.path)
