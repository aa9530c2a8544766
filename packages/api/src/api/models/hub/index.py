"""``CacheIndex``: what the last walk of each model folder found, reused while nothing under the
folder changed, so that a list of 10,000 cached models does not walk 10,000 folders (issue 29).

A model's entry is the revisions its walk found (``ModelCache._revisions_of``: the one rule of
status and list) and the stamp of every folder the walk depends on, read *before* the walk:
``lstat`` (change time, inode, size, type) of the model's ``refs/`` (each ref file too: the
library rewrites ``refs/main`` in place), ``blobs/``, ``trees/``, ``snapshots/`` and every folder
below it, and its folder under ``.locks/`` (the records). Creating, removing or renaming anything
in a folder changes that folder's change time (which no one can set back, unlike the modification
time), whoever does it (``hf download``, an
``rm -rf``, a ``hf cache rm``, another service): the next call sees a stamp that differs, and
walks the folder again. The stamp is only the key of a memo; what is listed always comes from a
walk through descriptors.

An entry is not kept (the next call walks again) when:
- a stamped time is within ``RACY_SECONDS`` of the walk (a file system's clock ticks coarsely:
  two changes within one tick leave the same time, the second unseen; git's "racy clean" rule);
- a revision was being downloaded (BUSY: a worker's lock, which no folder time shows; the
  service's own workers touch the locks folder when they take and let go of it, see
  ``ModelCache.hold_revision``);
- the model's blobs link the shared store (the store's files are not stamped);
- the walk failed (the folder is listed as unreadable until it reads).

With the kernel's events, a whole list is reused too (``answer``): the cache's root is watched by
name (a model folder created, removed or renamed is an event), and a list that found every model
folder watched and kept is the answer of the next one while no event came in between (a
*generation*: ``begin`` counts the calls that learned of a change). At 10,000 models that is no
Python loop over 10,000 folders at each list (bench/scale.py: about 20 ms of the GIL each).

What a stamp does not show: a blob's content changed in place without a change of the folder
(a file truncated or overwritten where it lies). ``POST /status`` of one model and ``verify``
read the files themselves; a list shows it after the next change of the folder. Kept in memory
(about 2 KB per model), for the folders present at the last list: a folder gone is forgotten."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from api.models.backend import CachedRevision, CacheState
from api.models.hub.watch import Watch

RACY_SECONDS = 2.0

Stamp = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class _Entry:
    paths: tuple[str, ...]
    stamp: Stamp
    revisions: tuple[CachedRevision, ...]
    watched: bool  # every folder of ``paths`` is watched (``Watch``): no stamp to compare


def _stamps(paths: Iterable[str]) -> Stamp:
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ctime_ns, st.st_ino, st.st_size, st.st_mode))
    return tuple(out)


def _folders_below(path: str, files_too: bool = False) -> list[str]:
    """Every folder below ``path`` (never through a link), and its files when ``files_too``."""
    found: list[str] = []
    try:
        with os.scandir(path) as entries:
            listed = list(entries)
    except OSError:
        return found
    for entry in listed:
        if entry.is_dir(follow_symlinks=False):
            found.append(entry.path)
            found += _folders_below(entry.path, files_too)
        elif files_too:
            found.append(entry.path)
    return found


def _links_a_store(blobs: str) -> bool:
    """Whether ``blobs/`` holds a link (the library's shared store of Xet blobs)."""
    try:
        with os.scandir(blobs) as entries:
            return any(e.is_symlink() for e in entries)
    except OSError:
        return False


class CacheIndex:
    def __init__(
        self, root: Path, clock: Callable[[], float] = time.time, watch: bool = True
    ) -> None:
        self._root = str(root)
        self._locks = os.path.join(self._root, ".locks")
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._want_watch = watch  # opened at the first list (a worker's cache never lists)
        self._watch: Watch | None = None
        self._changed: set[str] = set()  # folders the kernel said changed, not walked since
        self._verify: set[str] = set()  # folders whose stamps must be compared (events lost)
        # Bumped at each ``begin`` that learned of a change, or could not know (events lost, the
        # root not watched): a list kept with the generation it began in is valid while it holds.
        self._generation = 0
        self._answer: tuple[int, tuple[CachedRevision, ...]] | None = None
        self.walks = 0  # folders walked (for the tests and the benchmark)
        self.reused = 0  # whole lists answered from the last one (for the tests)
        self.stamped = 0  # entries whose stamps were compared (without a watch, every entry)

    @property
    def watching(self) -> bool:
        return self._watch is not None

    def begin(self) -> int:
        """Take what the kernel reported since the last call (a list calls this first); the
        generation the list begins in (see ``answer``)."""
        if self._want_watch:
            with self._lock:
                if self._want_watch:
                    self._want_watch = False
                    self._watch = Watch.open(Path(self._root))
        if self._watch is None:
            with self._lock:
                self._generation += 1  # nothing tells of a change: no list is reused
                return self._generation
        # Before the list reads the root: a model folder created or removed after it is an event.
        root = self._watch.add_by_name(self._root)
        started = self._watch.add_by_name(self._locks)
        changed = self._watch.changed()
        with self._lock:
            if changed is None or started or (started is None and os.path.lexists(self._locks)):
                # Events were lost (a full queue), or the records' folder was not watched: what
                # is kept is checked against its stamps once more.
                self._verify |= self._entries.keys()
                self._generation += 1
            elif changed or root is not False:
                self._generation += 1  # a change, or the root's events were not all seen
            self._changed |= changed or set()
            return self._generation

    def answer(self, generation: int) -> tuple[CachedRevision, ...] | None:
        """The last whole list, when it was kept (``keep_answer``) in this very generation: the
        kernel reported no change since it began, and it found every model folder watched."""
        with self._lock:
            if self._answer is None or self._answer[0] != generation:
                return None
            self.reused += 1
            return self._answer[1]

    def keep_answer(self, generation: int, revisions: Sequence[CachedRevision]) -> None:
        """Keep a whole list made in ``generation`` whose every folder was ``watched``."""
        with self._lock:
            self._answer = (generation, tuple(revisions))

    def revisions(
        self, folder: str, walk: Callable[[], list[CachedRevision]]
    ) -> tuple[Sequence[CachedRevision], bool]:
        """The revisions of the model folder ``folder`` (a name under the root): the last walk's
        when nothing it depends on changed since, else ``walk()``'s (an error it raises is the
        caller's, and the entry is dropped); and whether they are kept with every folder watched
        (a change is then an event)."""
        with self._lock:
            entry = self._entries.get(folder)
            changed = folder in self._changed
            verify = folder in self._verify
        if entry is not None and not changed:
            if entry.watched and not verify:
                # The kept tuple itself: no list per model and per call (10,000 of them lived
                # through a list's young collections, and made the full ones frequent).
                return entry.revisions, True  # the kernel reported no change
            self.stamped += 1
            if _stamps(entry.paths) == entry.stamp:
                with self._lock:
                    self._verify.discard(folder)
                return entry.revisions, entry.watched
        started = self._clock()
        with self._lock:
            self._entries.pop(folder, None)
            self._changed.discard(folder)
            self._verify.discard(folder)
        # Watched before the walk (and the stamps): a change after it is reported, one before
        # it is in what the walk reads.
        watched = self._watch is not None and self._watch_fixed(folder)
        paths = self._paths(folder)
        if self._watch is not None:
            watched = watched and all(self._watch.add(folder, p) for p in paths[5:])
        stamp = _stamps(paths)  # before the walk: a change during it makes the next one differ
        self.walks += 1
        revisions = walk()
        if self._keeps(stamp, started, revisions) and not _links_a_store(
            os.path.join(self._root, folder, "blobs")
        ):
            with self._lock:
                self._entries[folder] = _Entry(paths, stamp, tuple(revisions), watched)
            return revisions, watched
        return revisions, False

    def _watch_fixed(self, folder: str) -> bool:
        """Watch the model's folder and the folders every model has (``refs/``, ``snapshots/``,
        ``blobs/``, ``trees/``, its records' folder): whether all are watched (or absent)."""
        assert self._watch is not None
        self._watch.forget(folder)
        base = os.path.join(self._root, folder)
        return all(
            self._watch.add(folder, p)
            for p in (
                base,
                *(os.path.join(base, n) for n in ("refs", "snapshots", "blobs", "trees")),
                os.path.join(self._locks, folder),
            )
        )

    def keep_only(self, folders: set[str]) -> None:
        """Forget the folders that are not in the cache any more."""
        with self._lock:
            gone = self._entries.keys() - folders
            for name in gone:
                del self._entries[name]
            self._changed -= gone
            self._verify -= gone
        if self._watch is not None:
            for name in gone:
                self._watch.forget(name)

    def _paths(self, folder: str) -> tuple[str, ...]:
        """What a walk of the model depends on."""
        base = os.path.join(self._root, folder)
        refs = os.path.join(base, "refs")
        snapshots = os.path.join(base, "snapshots")
        return (
            refs,
            snapshots,
            os.path.join(self._locks, folder),
            os.path.join(base, "blobs"),
            os.path.join(base, "trees"),
            *_folders_below(refs, files_too=True),
            *_folders_below(snapshots),
        )

    @staticmethod
    def _keeps(stamp: Stamp, started: float, revisions: list[CachedRevision]) -> bool:
        if any(r.state is CacheState.BUSY for r in revisions):
            return False
        racy = int((started - RACY_SECONDS) * 1e9)
        return all(s is None or s[0] < racy for s in stamp)
