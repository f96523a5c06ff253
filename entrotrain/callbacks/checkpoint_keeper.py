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
  flapping around its threshold fires again and again: the first firing's pin and the newest ones stay). A frozen pin
  gets its own copy of the files it still shares with its original, in a background thread (training does not wait;
  the interpreter waits for it at exit): a save under the same name may rewrite files in place
  (``transformers.Trainer`` run again in the same ``output_dir`` rewrites ``checkpoint-N/optimizer.pt``,
  ``trainer_state.json``, ...; Lightning's and ``torch.save``'s writes to an existing path truncate the same inode),
  which would change a hard link with them. The copy is a copy-on-write clone where the file system makes one (btrfs,
  XFS, ZFS, APFS-like reflinks: no disk until either file changes), else a full copy: a frozen pin costs one
  checkpoint of disk even while its original exists. Skipping the copy when nothing rotates (``save_top_k=-1``,
  ``save_total_limit=None``) is not safe: the write in place that changes a hard link comes from a *later* run in the
  same folder (or any ``torch.save`` to that name), which this run cannot see or stop, and that is exactly the case
  where nothing rotates (the original stays, and gets rewritten);
- when training **ends normally**, the pins that are not frozen go (the run needed none of them), and the folder too
  when it is empty. After a crash or a kill every pin stays: that is when you roll back.

So at most four checkpoints' worth of disk are held beyond your rotation between firings (two judged, two saved
since the last observation), and one per firing (at most :data:`MAX_FROZEN`) after. A pin whose file changed since
it was pinned (a checkpoint rewritten in place under the same name: Lightning's ``last.ckpt`` is never pinned, it
has no step in its name) is dropped with a warning instead of being named. A file system that refuses hard links
(some network and object-store mounts) is warned about once; nothing is pinned then.

**Several guards.** The keepers of one process (one a guard) share their pins in a folder: a checkpoint is linked
once however many guards keep it, and deleted once none of them needs it (a pin one guard froze stays whatever the
others judge, and once that guard is gone). The provisional pins of a keeper garbage collected while others live (a
guard reused for a new fit after a crash) stay listed; the next keeper that opens the folder takes them over as a
dead run's (below).

**Pins across crashes.** The keepers of a process list the pins they may still delete (their *provisional* pins: not
frozen) in one manifest per keep folder, ``.entrotrain-pins.<machine>.<pid>.<start>.<id>.json``, rewritten atomically
(a temporary file, then ``os.replace``) whenever that set changes and deleted when it is empty. A frozen pin leaves
the manifest before :meth:`LastGoodCheckpoints.freeze` returns it. What a keeper writes in several steps (a folder
pin's links, a manifest, a frozen pin's copy) it writes aside, as
``<name>.<machine>.<pid>.<start>.<id>.entrotrain-copy``, and renames into place: what a crash leaves aside is deleted
by the next keeper that opens the folder, or by :func:`release_abandoned`, once its process is gone, and a frozen pin
whose copy it cut short gets its copy then. What no manifest lists is never deleted by a keeper: frozen pins, pins of
entrotrain versions before manifests, your own files. When a keeper first looks at a keep folder
(:meth:`LastGoodCheckpoints.start` at the start of a fit, else lazily at its first :meth:`saved` there) it takes over
the manifests of runs that are *not running any more*: made on this machine (same host name, boot and process
namespace) by a process that is gone (no such pid, a zombie, or a pid since reused: its start time differs; in this
process: keepers all garbage collected). It claims one by renaming it to a name of its own (a rename is atomic: of two
runs starting together, one gets it), and then, for each pin listed that is still the file it linked (same inodes,
same files):

- the pin the run resumes from (``start(resumed_from=...)``) is kept for good (it leaves every manifest and gets its
  own copy, like a frozen pin): deleting what you resumed from, or a rerun's ``ckpt_path``, is never right;
- a run that resumes (``start(resumed_from=...)``) *adopts* the pins saved at or before the step it resumes from,
  as its own (not those the dead run only held: an earlier run's, of another lineage, stay held): its restored guard
  can name them (a run killed after its last good save, resumed from a later one, that collapses before its next
  save names the killed run's pin), and its judgements bound them like its own saves; pins saved after that step
  (a future the resumed run replaces) are deleted;
- otherwise (a fresh run, or no :meth:`start` call: the keeper cannot tell a resume) the pins are *held*: listed in
  this run's manifest as held, never named and never deleted while it trains (it may have resumed from one), and
  deleted when it ends normally, unless one of its guards fired (then they stay: you may roll back to them).

A manifest made on another machine or container (a shared file system; a preempted job restarted on another node:
warned about when a keeper opens the folder), or one whose process is still running (two runs sharing a checkpoint
folder; a pin such a run holds is not kept for a run that resumes from it), is never touched: :func:`list_pins`
shows every pin in a folder with its state, and :func:`release_abandoned` deletes the provisional pins of runs that
are not running (``elsewhere=True``: also those made on other machines, when you know none runs there).

Pin a checkpoint once it is complete: a folder written by several processes or asynchronously (torch's async
distributed checkpoint) is linked as it is when :meth:`LastGoodCheckpoints.saved` runs, so call
``checkpoint_saved`` when the save has finished. The keeper does file work only where it is told of a save (or
:meth:`~LastGoodCheckpoints.start`): the glue calls them on the process that writes checkpoints (rank zero);
:meth:`~LastGoodCheckpoints.start` does nothing on another rank of an initialised process group.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
import warnings
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from entrotrain.errors import EntrotrainError

__all__ = ["KEEP_FOLDER", "MAX_FROZEN", "KeptPin", "LastGoodCheckpoints", "list_pins", "release_abandoned"]

#: The folder, beside the checkpoints, that holds the pins.
KEEP_FOLDER = "entrotrain-last-good"
#: Frozen pins kept per fit: the first firing's and the newest ones.
MAX_FROZEN = 3

_MANIFEST = ".entrotrain-pins"  # .entrotrain-pins.<machine>.<pid>.<start>.<id>[.<k>].json
_COPY_SUFFIX = ".entrotrain-copy"  # a file or folder being written: a pin's copy, a folder pin, a manifest

_Stamp = tuple[tuple[str, int, int], ...]
_Inodes = tuple[tuple[str, int], ...]


@dataclass(eq=False)
class _Pin:
    step: int
    path: Path  # the pin (in KEEP_FOLDER)
    source: Path  # the checkpoint as saved
    stamp: _Stamp  # (file, size, mtime_ns) of every file when pinned: a rewrite in place changes it
    inodes: _Inodes = ()  # (file, inode) of every file when pinned: which files are the ones linked
    frozen: bool = False
    held: bool = False  # an earlier run's, taken over without a resume or off its lineage (module docstring)


def _files(path: Path) -> list[tuple[str, Path]]:
    """The files of a checkpoint (itself, or every file in its folder but a frozen pin's copy under way or left by a
    crash), each with its name in the checkpoint (``""`` for a file checkpoint)."""
    if path.is_file():
        return [("", path)]
    return [(str(file.relative_to(path)), file) for file in sorted(path.rglob("*"))
            if file.is_file() and not file.name.endswith(_COPY_SUFFIX)]


def _stamp(path: Path) -> _Stamp:
    return tuple((name, (stat := file.stat()).st_size, stat.st_mtime_ns) for name, file in _files(path))


def _inodes(path: Path) -> _Inodes:
    return tuple((name, file.stat().st_ino) for name, file in _files(path))


def _being_written(path: Path, owner: _Owner) -> Path:
    """Where ``owner`` writes ``path`` before renaming it into place: ``<name>.<owner's tag>.entrotrain-copy``. One a
    crash leaves is deleted once its process is gone (:func:`_clear_leftovers`)."""
    return path.with_name(f"{path.name}.{owner.tag}{_COPY_SUFFIX}")


def _link_files(source: Path, target: Path) -> None:
    """Hard-link the files of checkpoint folder ``source`` into a new folder ``target``. Raises FileNotFoundError
    when ``source`` or one of its files is gone meanwhile (a rotation: not kept), another OSError when a link is
    refused (``shutil.copytree`` folds both into one ``shutil.Error``)."""
    files = _files(source)
    if not files:
        raise FileNotFoundError(2, "no checkpoint files", str(source))
    for name, file in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(file, target / name)


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


_FICLONE = 0x40049409  # linux/fs.h: a copy-on-write clone of a whole file


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` with its modification time: a copy-on-write clone where the file system makes one (no
    disk until either file changes; the clone never changes with ``src``), else a full copy."""
    try:
        import fcntl

        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
    except (ImportError, OSError):
        shutil.copyfile(src, dst)
    shutil.copystat(src, dst)


# ---------------------------------------------------------------- who made a manifest, and is it still running
_LIVE: set[str] = set()  # the ids of this process's shelves (:class:`_Shelf`) not yet garbage collected


def _proc(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of process ``pid`` from ``/proc``; ``None``: no such
    process. Raises OSError where ``/proc`` cannot tell (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        raise
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _machine() -> str:
    """This machine and process namespace: host name, boot, pid namespace (pids compare only within one)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    key = "|".join([socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), namespace])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _start(pid: int) -> str:
    try:
        found = _proc(pid)
    except (OSError, IndexError, ValueError):
        return "0"
    return found[1] if found else "0"


@dataclass(frozen=True)
class _Owner:
    machine: str
    pid: int
    start: str  # "0": unknown
    id: str

    @classmethod
    def me(cls) -> _Owner:
        """A new owner in this process."""
        return cls(_machine(), os.getpid(), _start(os.getpid()), uuid.uuid4().hex[:12])

    @classmethod
    def of(cls, machine: str, pid: str, start: str, id_: str) -> _Owner | None:
        """The owner these parts of a name make (``None``: not an owner's)."""
        if not (pid.isdigit() and start.isdigit() and machine.isalnum() and id_.isalnum()):
            return None
        return cls(machine, int(pid), start, id_)

    @classmethod
    def parse(cls, name: str) -> tuple[_Owner, str] | None:
        """The owner a manifest's file name carries, and the name's tail (``json`` or ``<k>.json``)."""
        parts = name.split(".")
        if len(parts) < 7 or "." + parts[1] != _MANIFEST or parts[0] or parts[-1] != "json":
            return None
        owner = cls.of(*parts[2:6])
        return None if owner is None else (owner, ".".join(parts[6:]))

    @classmethod
    def of_copy(cls, name: str) -> _Owner | None:
        """The owner a frozen pin's copy under way carries (``<file>.<tag>.entrotrain-copy``)."""
        parts = name[: -len(_COPY_SUFFIX)].split(".")
        return cls.of(*parts[-4:]) if name.endswith(_COPY_SUFFIX) and len(parts) >= 5 else None

    @property
    def tag(self) -> str:
        return f"{self.machine}.{self.pid}.{self.start}.{self.id}"

    @property
    def prefix(self) -> str:
        return f"{_MANIFEST}.{self.tag}"

    def running(self) -> bool | None:
        """Whether the process that made the manifest runs: ``None`` where this machine cannot tell (made on another
        machine or in another process namespace, or no way to ask the system)."""
        if self.machine != _machine():
            return None
        if self.pid == os.getpid() and self.start == _start(self.pid):
            return self.id in _LIVE
        if os.name != "posix":  # os.kill(pid, 0) ends a process on Windows
            return None
        try:
            found = _proc(self.pid)
        except (OSError, IndexError, ValueError):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except OSError:  # someone else's process
                return True
            return True
        if found is None or found[0] in ("Z", "X"):  # gone, or a zombie not yet reaped
            return False
        return self.start == "0" or found[1] == self.start  # a pid reused by a later process: not it


# ---------------------------------------------------------------- manifests
def _entries(keep: Path) -> list[Path]:
    """What ``keep`` holds, by name; ``[]`` when it cannot be read (none)."""
    try:
        return sorted(keep.iterdir())
    except OSError:
        return []


def _manifests(keep: Path) -> list[tuple[Path, _Owner]]:
    return [(path, parsed[0]) for path in _entries(keep) if (parsed := _Owner.parse(path.name)) is not None]


def _records(manifest: Path) -> list[_Pin]:
    """The pins a manifest lists (those well formed: a plain name in its folder, a step, a source, stamps);
    ``[]`` for a manifest that cannot be read."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return []
    records = data.get("pins") if isinstance(data, dict) else None
    good = []
    for record in records if isinstance(records, list) else []:
        try:
            name, step, source = record["name"], record["step"], record["source"]
            stamp = tuple((str(n), int(s), int(m)) for n, s, m in record["stamp"])
            inodes = tuple((str(n), int(i)) for n, i in record["inodes"])
        except (KeyError, TypeError, ValueError):
            continue
        if (isinstance(name, str) and isinstance(step, int) and isinstance(source, str) and name
                and Path(name).name == name and not name.startswith(".") and name not in (".", "..")):
            held = record.get("held") is True
            good.append(_Pin(step, manifest.parent / name, Path(source), stamp, inodes, held=held))
    return good


def _is_ours(path: Path, inodes: _Inodes) -> bool:
    """Whether ``path`` is still the pin a manifest listed with ``inodes``: the same files, the same inodes (a file
    put there since, by anyone, is not)."""
    try:
        return _inodes(path) == inodes and not path.is_symlink()
    except OSError:
        return False


def _own_copies(pin: Path, stamp: _Stamp | None, owner: _Owner, who: str) -> None:
    """Give the pin ``pin`` its own copy of each file it still shares with its original (module docstring), written
    aside as ``owner``; ``stamp``: the files as pinned (``None``: unknown). A file that changed since it was pinned,
    or changes while it is copied (rewritten in place meanwhile), is warned about (``who`` names the caller)."""
    pinned = {name: (size, mtime) for name, size, mtime in stamp or ()}
    for name, file in _files(pin):
        copy = _being_written(file, owner)
        try:
            before = file.stat()
            if before.st_nlink < 2:
                continue
            if stamp is not None and pinned.get(name) != (before.st_size, before.st_mtime_ns):
                raise OSError(f"{file} changed since it was pinned")
            _copy(file, copy)  # keeps the mtime: the pin's stamp is unchanged
            after = file.stat()
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise OSError(f"{file} changed while it was copied")
            os.replace(copy, file)
        except OSError as err:
            _remove(copy)
            warnings.warn(
                f"{who}: cannot give the kept checkpoint {pin} its own copy of {file.name} ({type(err).__name__}: "
                f"{err}); it shares that file with its original, so a save in place under that name would change it.",
                stacklevel=2,
            )
            return


def _clear_leftovers(keep: Path, me: _Owner, who: str, elsewhere: bool = False) -> None:
    """Delete what a crash left half written in ``keep`` (:func:`_being_written`: a frozen pin's copy, a folder pin
    being linked, a manifest) where the process that wrote it does not run any more (``elsewhere``: or runs on
    another machine), and give a pin whose copy a crash cut short its own copies, as ``me`` (``who``: for warnings);
    this waits for the copies (after a crash only)."""
    cut_short = set()
    for root, folders, names in os.walk(keep):
        for name in [*folders, *names]:
            owner = _Owner.of_copy(name)
            running = owner.running() if owner is not None else True  # an untagged one (before tags): left
            if running is False or (running is None and elsewhere):
                _remove(Path(root, name))
                if name in folders:
                    folders.remove(name)
                elif Path(root) != keep or not name.startswith("."):  # a frozen pin, or a file in one (.metadata)
                    rel = Path(root, name[: -len(_COPY_SUFFIX)].rsplit(".", 4)[0]).relative_to(keep)
                    cut_short.add(keep / rel.parts[0])
    for pin in cut_short:
        if pin.exists():
            _own_copies(pin, None, me, who)


def _claim_gone(keep: Path, me: _Owner, elsewhere: bool = False) -> tuple[list[Path], list[Path]]:
    """Claim, as ``me``, the manifests in ``keep`` of processes that do not run any more (``elsewhere``: or run on
    another machine). Returns the claimed manifests, and the pins listed by the manifests made elsewhere and left."""
    claimed, left = [], []
    for manifest, owner in _manifests(keep):
        running = owner.running()
        if running is None and not elsewhere:
            left += [pin.path for pin in _records(manifest)]
        elif not running and (path := _claim(manifest, owner, me.prefix)) is not None:
            claimed.append(path)
    return claimed, left


def _claim(manifest: Path, owner: _Owner, claimer_prefix: str) -> Path | None:
    """Rename a manifest to ``claimer_prefix.<k>.json``: of two processes claiming it, one gets it."""
    target = manifest.with_name(f"{claimer_prefix}.{uuid.uuid4().hex[:8]}.json")
    try:
        os.rename(manifest, target)
    except OSError:  # claimed by another run meanwhile, or a read-only folder
        return None
    return target


def _keep_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    return path if path.name == KEEP_FOLDER else path / KEEP_FOLDER


def _folder_arg(folder: Any, where: str) -> str | os.PathLike[str]:
    """``folder`` as given to a public function, refused when it is not a path or does not exist (a typo would
    read as 'nothing kept')."""
    if not isinstance(folder, (str, os.PathLike)):
        raise EntrotrainError(
            f"{where}(folder) needs the checkpoint folder (a path, e.g. 'ckpts'), got {type(folder).__name__} "
            f"{folder!r}."
        )
    path = Path(folder)
    if not path.exists() and not (path.name == KEEP_FOLDER and path.parent.is_dir()):  # (a keep folder emptied)
        from entrotrain.dashboards.run_reader import missing_path

        raise EntrotrainError(f"{where}: " + missing_path(path, "Pass the folder the checkpoints are saved in "
                                                          "(ModelCheckpoint's dirpath, HF's output_dir)."))
    return folder


# ---------------------------------------------------------------- listing and cleaning by hand
@dataclass(frozen=True)
class KeptPin:
    """One pin in a keep folder (:func:`list_pins`).

    ``state``: ``"kept"`` (no manifest lists it: frozen by a firing, resumed from, made before manifests, or not a
    pin: never deleted by a keeper), ``"running"`` (provisional, of a process that runs on this machine),
    ``"abandoned"`` (provisional, of a process on this machine that does not run any more: the next run in this
    folder takes it over), ``"elsewhere"`` (provisional, made on another machine or process namespace: never
    touched but by :func:`release_abandoned` with ``elsewhere=True``). ``owner``: the manifest that lists it.
    """

    path: Path
    step: int | None
    state: Literal["kept", "running", "abandoned", "elsewhere"]
    owner: Path | None = None


def list_pins(folder: str | os.PathLike[str]) -> list[KeptPin]:
    """Every pin in the keep folder of checkpoint folder ``folder`` (or in ``folder``, when it is the keep folder),
    by name, with its state (:class:`KeptPin`); ``[]`` when there is none."""
    from entrotrain.callbacks.collapse_guard import saved_at

    keep = _keep_folder(_folder_arg(folder, "list_pins"))
    listed: dict[str, KeptPin] = {}
    for manifest, owner in _manifests(keep):
        running = owner.running()
        state = "elsewhere" if running is None else "running" if running else "abandoned"
        for pin in _records(manifest):
            listed.setdefault(pin.path.name, KeptPin(pin.path, pin.step, state, manifest))
    return [listed.get(path.name) or KeptPin(path, saved_at(path), "kept") for path in _entries(keep)
            if not path.name.startswith(".") and not path.name.endswith(_COPY_SUFFIX)]


def release_abandoned(folder: str | os.PathLike[str], *, elsewhere: bool = False) -> list[Path]:
    """Delete the provisional pins of runs that do not run any more (``abandoned`` in :func:`list_pins`) in the
    keep folder of checkpoint folder ``folder``, and their manifests; with ``elsewhere=True`` also those made on
    other machines (a preempted job restarted on another node: say so only when no run in this folder is running
    on another machine). Frozen and resumed-from pins, and anything no manifest lists, stay. Returns the deleted
    pins."""
    keep = _keep_folder(_folder_arg(folder, "release_abandoned"))
    me = _Owner.me()
    deleted = []
    for claimed in _claim_gone(keep, me, elsewhere)[0]:
        for pin in _records(claimed):
            if _is_ours(pin.path, pin.inodes):
                _remove(pin.path)
                deleted.append(pin.path)
        _remove(claimed)
    _clear_leftovers(keep, me, "release_abandoned", elsewhere)
    _rmdir_if_empty(keep)
    return deleted


# ---------------------------------------------------------------- the keeper
class _Shelf:
    """The pins that the keepers of one process (of one ``group``) hold in one keep folder, one keeper a guard: a
    checkpoint file that several guards keep is linked once, copied once when frozen, and deleted once none of them
    needs it, and one manifest lists them."""

    def __init__(self, keep: Path) -> None:
        self.keep = keep
        self.owner = _Owner.me()
        self.manifest = keep / f"{self.owner.prefix}.json"
        self.listed: frozenset[tuple[str, _Inodes, bool]] = frozenset()  # what the manifest lists now
        self.keepers: weakref.WeakSet[LastGoodCheckpoints] = weakref.WeakSet()
        self.kept: set[Path] = set()  # frozen pins, held pins a run that fired left at its normal end: yours
        self.taken: list[_Pin] = []  # what its keepers took over from runs gone: held by the others too
        self.orphans: list[_Pin] = []  # the provisional pins of keepers garbage collected: held by the next to open
        self.copies: dict[Path, threading.Thread] = {}  # the frozen pins' copies (two guards freezing one pin: one)
        _LIVE.add(self.owner.id)
        weakref.finalize(self, _LIVE.discard, self.owner.id)

    @classmethod
    def of(cls, keep: Path, group: Hashable) -> _Shelf:
        shelf = _SHELVES.get((keep, group))
        if shelf is None or shelf.owner.id not in _LIVE or shelf.owner.pid != os.getpid():  # (or a forked parent's)
            shelf = _SHELVES[(keep, group)] = cls(keep)
        return shelf

    def join(self, keeper: LastGoodCheckpoints) -> None:
        """``keeper`` keeps pins here; once it is garbage collected (a guard reused for a new fit after a crash), its
        provisional pins stay listed for the next keeper that opens the folder, which takes them over as a dead
        run's."""
        self.keepers.add(keeper)
        weakref.finalize(keeper, self._orphan, keeper._pins)

    def _orphan(self, pins: list[_Pin]) -> None:
        """A keeper's ``pins`` when it is garbage collected: its provisional ones here stay (:meth:`join`), but those
        another keeper froze (that keeper may be gone too)."""
        self.orphans += [replace(pin) for pin in pins
                         if not pin.frozen and pin.path.parent == self.keep and pin.path not in self.kept]

    def pins(self, but: LastGoodCheckpoints | None = None) -> list[_Pin]:
        """The pins its keepers (``but`` one) hold, and its orphans."""
        return [pin for keeper in list(self.keepers) if keeper is not but for pin in keeper._pins
                if pin.path.parent == self.keep] + self.orphans

    def needed(self, path: Path) -> bool:
        """Whether a keeper holds the pin ``path``, or a run that fired left it."""
        return path in self.kept or any(pin.path == path for pin in self.pins())


_SHELVES: weakref.WeakValueDictionary[tuple[Path, Hashable], _Shelf] = weakref.WeakValueDictionary()


class LastGoodCheckpoints:
    """The pins of one guard (module docstring). ``owner`` names it in warnings. The keepers of one ``group`` (by
    default: all of this process) share their pins, one a checkpoint file, and one manifest a folder."""

    def __init__(self, owner: str = "EntropyCollapseGuard", group: Hashable = None) -> None:
        self.owner = owner
        self._who = f"{owner}(keep_last_good=True)"  # in warnings
        self._group = group
        self._pins: list[_Pin] = []
        self._refused = False  # the file system refused a hard link: keep nothing more
        self._copying: list[threading.Thread] = []  # frozen pins getting their own copy of shared files
        self._capped_warned = False
        self._manifest_warned = False
        self._judged: int | None = None  # the newest step an observation judged
        self._fired = False  # freeze was called in this fit: held pins stay at a normal end
        self._folders: dict[Path, _Shelf] = {}

    @property
    def pins(self) -> list[Path]:
        """The pins held now (frozen or not; an earlier run's taken over too), oldest first."""
        return [pin.path for pin in sorted(self._pins, key=lambda p: p.step)]

    @property
    def frozen(self) -> list[Path]:
        """The pins kept for firings."""
        return [pin.path for pin in self._pins if pin.frozen]

    # ------------------------------------------------------------------ earlier runs' pins
    def start(
        self,
        folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str] | None],
        resumed_from: str | os.PathLike[str] | None = None,
        step: int | None = None,
        resumed_from_protected: bool = False,
    ) -> None:
        """A fit starts, saving checkpoints into ``folders`` (a folder or several) and resuming from ``resumed_from``
        (a checkpoint, or ``None`` for a fresh run; ``step``: the step it resumes at, default the step in its name):
        take over the pins that runs no longer running left in their keep folders (module docstring). The pin of
        the checkpoint resumed from (its path, or a hard link of its files: resumed from the original) is kept for
        good, unless ``resumed_from_protected``: the trainer never deletes what it resumed from (Lightning's
        ``ModelCheckpoint`` keeps its ``ckpt_path``), so only a resume from the pin's own path keeps it. Call it before
        the first :meth:`saved`, on the process that writes checkpoints; a folder already looked at is not looked at
        again. Never raises for the file system: a folder that cannot be read or written is left as it is."""
        if _other_rank():
            return
        from entrotrain.callbacks.collapse_guard import saved_at

        resumed = Path(resumed_from) if resumed_from is not None else None
        if resumed is not None and step is None:
            step = saved_at(resumed)
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        keeps = [_keep_folder(folder) for folder in folders if folder is not None]
        if resumed is not None and resumed.parent.name == KEEP_FOLDER:
            keeps.append(resumed.parent)  # resumed from a pin: its folder is where it is listed
        for keep in dict.fromkeys(keeps):
            self._open(keep, resumed, step, adopt=resumed is not None, same_files=not resumed_from_protected)

    def _open(
        self, keep: Path, resumed: Path | None = None, step: int | None = None, adopt: bool = False,
        same_files: bool = True,
    ) -> None:
        """Look at ``keep`` once: take over the manifests of runs that are not running any more there, and hold
        what another keeper of this process (another guard) took over there too."""
        if keep in self._folders:
            return
        if adopt and (keep, self._group) in _SHELVES:  # the keeper of a crashed fit may be garbage in a cycle (an
            gc.collect()  # old Trainer): its pins are taken over as a dead run's, not left to it as running
        shelf = self._folders[keep] = _Shelf.of(keep, self._group)
        shelf.join(self)
        shared = [replace(pin) for pin in shelf.taken if shelf.needed(pin.path)]
        for pin in shared:  # adopted by this keeper too only where it resumes at or after the pin's step
            pin.held = pin.held or not adopt or (step is not None and pin.step > step)
        self._pins += shared
        orphans, shelf.orphans = [pin for pin in shelf.orphans if pin.path not in {p.path for p in shared}], []
        taken = self._take_over(shelf, orphans, resumed, step, adopt, same_files)
        shelf.taken += taken
        if adopt and (adopted := [pin.step for pin in shared + taken if not pin.held]):
            newest = max(adopted) if step is None else step
            self._judged = newest if self._judged is None else max(self._judged, newest)

    def _take_over(
        self, shelf: _Shelf, orphans: list[_Pin], resumed: Path | None, step: int | None, adopt: bool,
        same_files: bool,
    ) -> list[_Pin]:
        """Claim the manifests of runs gone in ``shelf``'s folder and keep, adopt, hold or delete their pins and the
        ``orphans`` (module docstring); delete the copies they left half written. Returns the pins taken."""
        keep = shelf.keep
        claimed, elsewhere = _claim_gone(keep, shelf.owner)
        _clear_leftovers(keep, shelf.owner, self._who)
        if elsewhere:
            warnings.warn(
                f"{self._who}: {len(elsewhere)} kept checkpoint(s) in {keep} were pinned by "
                f"runs on another machine or in another container ({', '.join(p.name for p in elsewhere[:4])}"
                f"{', ...' if len(elsewhere) > 4 else ''}); whether those runs still run cannot be told from here, "
                "so they are left. If none does (a job preempted and restarted elsewhere), free them with "
                f"entrotrain.callbacks.checkpoint_keeper.release_abandoned({str(keep.parent)!r}, elsewhere=True).",
                stacklevel=5,
            )
        taken, seen = [], {pin.path for pin in shelf.pins()}
        for pin in orphans + [pin for path in claimed for pin in _records(path)]:
            if pin.path in seen or not _is_ours(pin.path, pin.inodes):
                continue  # listed twice (a claim of a run that died while claiming), or not our file any more
            seen.add(pin.path)
            if resumed is not None and _same(pin.path, resumed, files=same_files):
                self._keep_for_good(pin)  # resumed from (module docstring)
                self._start_copy(pin)
            elif adopt and step is not None and pin.step > step:
                _remove(pin.path)  # a future the resumed run replaces
            else:
                pin.held = pin.held or not adopt  # held by the dead run too: not of the resumed run's lineage
                self._pins.append(pin)
                taken.append(pin)
        self._sync()  # the adopted and held pins are listed in this run's manifest before the claims go
        for path in claimed:
            _remove(path)
        return taken

    # ------------------------------------------------------------------ saves
    def saved(self, path: str | os.PathLike[str], step: int | None = None) -> Path | None:
        """Pin the checkpoint just saved at ``path`` (a file or a folder), saved at ``step`` (default: the step in its
        name; a checkpoint without one is not pinned). Returns the pin, or ``None`` when nothing was pinned."""
        from entrotrain.callbacks.collapse_guard import saved_at

        source = Path(path)
        step = saved_at(source) if step is None else step
        if self._refused or step is None or source.parent.name == KEEP_FOLDER or not source.exists():
            return None
        self._open(source.parent / KEEP_FOLDER)
        for pin in [p for p in self._pins if p.source == source and not p.frozen and not p.held]:  # saved again
            self._drop(pin)
        if any(p.source == source and p.frozen and p.stamp == _stamp(source) for p in self._pins):
            self._sync()
            return None  # already kept, unchanged
        same = self._pinned_already(source)
        if same is not None:  # an earlier run's pin of these very files (taken over): this save's pin, not a second
            if not any(pin is same for pin in self._pins):  # another guard's: one link for both
                same = replace(same)
                self._pins.append(same)
            same.step, same.source, same.held = step, source, False
            same.stamp = _stamp(same.path)  # as saved now (in place: an earlier run's stamp is not this save's)
            self._drop_unjudged_but_two()
            self._sync()
            return same.path
        target = self._link(source)
        if target is not None:
            self._pins.append(_Pin(step, target, source, _stamp(target), _inodes(target)))
            self._drop_unjudged_but_two()
        self._sync()
        return target

    def _pinned_already(self, source: Path) -> _Pin | None:
        """A pin (not frozen) this keeper, else another keeper of its shelf, holds whose files are ``source``'s very
        files (same inodes): a run that resumed without saying so pins the checkpoints it finds again, a killed run's
        pin of the same save was taken over at :meth:`start`, or another guard pinned this save."""
        try:
            inodes = _inodes(source)
        except OSError:
            return None
        for pin in [*self._pins, *self._folders[source.parent / KEEP_FOLDER].pins(but=self)]:
            if not pin.frozen and pin.inodes == inodes and _is_ours(pin.path, inodes):
                return pin
        return None

    def _link(self, source: Path) -> Path | None:
        """Hard-link ``source`` under a free name in its keep folder; ``None``: not linked (gone, or refused: warned
        once). A name another run takes meanwhile (two runs in one folder) is passed over, never overwritten."""
        folder, again = source.parent / KEEP_FOLDER, True
        for _ in range(1000):
            try:
                folder.mkdir(exist_ok=True)
                target = self._free_name(source)  # (a folder another user made may refuse even a look)
                if source.is_dir():  # linked aside, then renamed: a crash leaves no partial pin
                    building = _being_written(target, self._folders[folder].owner)
                    try:
                        _link_files(source, building)
                        if target.exists() or target.is_symlink():
                            raise FileExistsError(target)
                        os.rename(building, target)
                    except OSError:
                        _remove(building)
                        raise
                else:
                    os.link(source, target)
                self._folders[folder].kept.discard(target)  # a kept pin deleted since, by you: this name is new
                self._folders[folder].copies.pop(target, None)
                return target
            except FileExistsError:
                continue  # taken by another run since _free_name looked
            except OSError as err:
                _rmdir_if_empty(folder)  # made for this pin: leave no empty folder
                if isinstance(err, FileNotFoundError) and not source.exists():
                    return None  # the checkpoint went away meanwhile: this one is not kept
                if isinstance(err, FileNotFoundError) and again:  # the keep folder went meanwhile (another run's
                    again = False  # normal end removed it emptied): once more
                    continue
                self._refused = True
                warnings.warn(
                    f"{self._who}: cannot hard-link {source} into {folder} "
                    f"({type(err).__name__}: {err}); the checkpoint to roll back to is not protected from checkpoint "
                    "rotation in this run. Keep more checkpoints (ModelCheckpoint(save_top_k=-1), "
                    "TrainingArguments(save_total_limit=None)) or pass keep_last_good=False to silence this.",
                    stacklevel=3,
                )
                return None
        return None

    def _drop_unjudged_but_two(self) -> None:
        """Of the pins no observation judged yet, keep those of the two newest steps (module docstring)."""
        waiting = [pin for pin in self._pins if not pin.frozen and not pin.held
                   and (self._judged is None or pin.step > self._judged)]
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

    # ------------------------------------------------------------------ judgements
    def judged(self, step: int, last_good_step: int | None) -> None:
        """After an observation at ``step`` (good or bad; ``last_good_step`` the last good one, this one when it is
        good): keep what a firing could ever name (module docstring)."""
        self._judged = step if self._judged is None else max(self._judged, step)
        before = [pin for pin in self._pins if not pin.frozen and not pin.held and pin.step <= step]
        newest = max(before, key=lambda p: p.step, default=None)
        good = [pin for pin in before if last_good_step is not None and pin.step <= last_good_step]
        named = max(good, key=lambda p: p.step, default=None)
        for pin in before:
            if pin is not newest and pin is not named:
                self._drop(pin)
        self._sync()

    def freeze(self, last_good_step: int | None) -> Path | None:
        """At a firing: keep the newest pin saved at or before ``last_good_step`` for good and return it (``None``:
        none, or it changed since it was pinned). A pin returned is in no manifest any more: no later run deletes
        it."""
        self._fired = True
        if last_good_step is None:
            return None
        candidates = [pin for pin in self._pins if pin.step <= last_good_step and not pin.held]
        while candidates:
            pin = max(candidates, key=lambda p: (p.step, not p.frozen))
            if pin.frozen:
                self.wait()  # a pin being copied holds a temporary file (and swaps files): checked once copied
            if self._intact(pin):
                if not pin.frozen:
                    self._keep_for_good(pin)
                    self._cap_frozen()
                    self._sync()
                    self._start_copy(pin)
                return pin.path
            candidates.remove(pin)
        self._sync()
        return None

    def _keep_for_good(self, pin: _Pin) -> None:
        """Freeze ``pin``: its shelf keeps it whatever becomes of this keeper (another keeper's pin of the same file,
        left when this one is gone, is not deleted nor listed)."""
        pin.frozen = True
        self._folders[pin.path.parent].kept.add(pin.path)

    def _start_copy(self, pin: _Pin) -> None:
        """Give a frozen pin its own copy in a background thread, once: another guard's freezing of the same pin
        waits for the same copy (two copies of one file at once swap a half-written file in)."""
        copies = self._folders[pin.path.parent].copies
        if pin.path not in copies:
            copies[pin.path] = threading.Thread(target=self._unshare, args=(pin,), name="entrotrain-keep")
            copies[pin.path].start()
        self._copying.append(copies[pin.path])

    def _cap_frozen(self) -> None:
        """At most :data:`MAX_FROZEN` frozen pins: the first firing's and the newest (a flapping key)."""
        frozen = sorted((pin for pin in self._pins if pin.frozen), key=lambda p: p.step)  # in firing order
        if len(frozen) <= MAX_FROZEN:
            return
        self.wait()  # a pin being copied is not dropped under its copy
        for pin in frozen[1:-(MAX_FROZEN - 1)]:
            self._folders[pin.path.parent].kept.discard(pin.path)  # (another keeper's freezing of it keeps it)
            self._drop(pin)
        if not self._capped_warned:
            self._capped_warned = True
            warnings.warn(
                f"{self._who}: more than {MAX_FROZEN} firings in this fit; only the first "
                f"firing's checkpoint and the {MAX_FROZEN - 1} newest are kept. A guard that fires again and again "
                "watches a key hovering at its threshold: raise patience, or lower the threshold.",
                stacklevel=4,
            )

    def _unshare(self, pin: _Pin) -> None:
        """:func:`_own_copies` for a frozen pin, in a background thread; a failure is warned about. (The thread holds
        this keeper, hence its shelf: the copy aside is of a running owner until it is done.)"""
        _own_copies(pin.path, pin.stamp, self._folders[pin.path.parent].owner, self._who)

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
            f"{self._who}: the kept checkpoint {pin.path} changed or vanished since it was "
            f"pinned (its original {pin.source} was rewritten in place under the same name?); it is not named as the "
            "checkpoint to roll back to.",
            stacklevel=3,
        )
        self._drop(pin)
        return False

    def release(self) -> None:
        """Training ended normally: drop the pins that are not frozen (an earlier run's held ones too, unless a
        firing of this fit asked to roll back), and the folder when it is empty; wait for the frozen pins'
        copies."""
        self.wait()
        folders = {pin.path.parent for pin in self._pins} | set(self._folders)
        for pin in [p for p in self._pins if not p.frozen]:
            if pin.held and self._fired:
                self._folders[pin.path.parent].kept.add(pin.path)  # stays on disk, in no manifest: yours
                self._pins.remove(pin)
            else:
                self._drop(pin)
        self._sync()
        for folder in folders:
            _rmdir_if_empty(folder)

    def _drop(self, pin: _Pin) -> None:
        """This keeper needs ``pin`` no more: deleted unless another keeper of its shelf needs it."""
        self._pins.remove(pin)
        if not self._folders[pin.path.parent].needed(pin.path):
            _remove(pin.path)

    # ------------------------------------------------------------------ this keeper's manifests
    def _sync(self) -> None:
        """Write each keep folder's manifest where its provisional pins changed (module docstring): a temporary
        file, then ``os.replace``; deleted when none is left. A manifest that cannot be rewritten where a pin left
        it (frozen) is deleted: a pin listed by no manifest is never deleted, one listed wrongly could be."""
        for keep, shelf in self._folders.items():
            pins = sorted(shelf.pins(), key=lambda p: p.held, reverse=True)  # one held, the other not: not held
            kept = shelf.kept | {pin.path for pin in pins if pin.frozen}
            provisional = list({pin.path: pin for pin in pins if pin.path not in kept}.values())
            names = frozenset((p.path.name, p.inodes, p.held) for p in provisional)  # a name re-pinned: new inodes
            if names == shelf.listed:
                continue
            try:
                if not provisional:
                    shelf.manifest.unlink(missing_ok=True)
                else:
                    records = [{"name": p.path.name, "step": p.step, "source": str(p.source), "held": p.held,
                                "stamp": [list(s) for s in p.stamp], "inodes": [list(i) for i in p.inodes]}
                               for p in sorted(provisional, key=lambda p: p.step)]
                    tmp = _being_written(shelf.manifest, shelf.owner)
                    try:
                        tmp.write_text(json.dumps({"entrotrain_pins": 1, "host": socket.gethostname(),
                                                   "pid": os.getpid(), "pins": records}))
                        os.replace(tmp, shelf.manifest)
                    except OSError:
                        _remove(tmp)
                        raise
                shelf.listed = names
            except OSError as err:
                if shelf.listed - names:  # a pin left it: listed by no manifest is safe
                    try:
                        shelf.manifest.unlink(missing_ok=True)
                        shelf.listed = frozenset()
                    except OSError:
                        pass
                if not self._manifest_warned:
                    self._manifest_warned = True
                    warnings.warn(
                        f"{self._who}: cannot write {shelf.manifest} ({type(err).__name__}: "
                        f"{err}); if this run crashes, the next one will not release its pins in {keep}: delete the "
                        "ones you do not need (entrotrain.callbacks.checkpoint_keeper.list_pins shows them).",
                        stacklevel=3,
                    )


def _same(a: Path, b: Path, files: bool = True) -> bool:
    """Whether ``a`` and ``b`` are the same checkpoint: the same path, or (``files``) the same files (a pin is a hard
    link of its original, so a run resumed from the original resumes from the pin too)."""
    try:
        if a.resolve() == b.resolve() or not files:
            return a.resolve() == b.resolve()
        theirs = dict(_files(b))  # a file checkpoint is one file named "", a folder of hard links its files by name
        ours = _files(a)
        return bool(ours) and all(name in theirs and os.path.samefile(file, theirs[name]) for name, file in ours)
    except OSError:
        return a == b


def _other_rank() -> bool:
    """Whether this process is a rank other than zero of an initialised ``torch.distributed`` group."""
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
