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

What a stamp does not show: a blob's content changed in place without a change of the folder
(a file truncated or overwritten where it lies). ``POST /status`` of one model and ``verify``
read the files themselves; a list shows it after the next change of the folder. Kept in memory
(about 2 KB per model), for the folders present at the last list: a folder gone is forgotten."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from api.models.backend import CachedRevision, CacheState

RACY_SECONDS = 2.0

Stamp = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class _Entry:
    paths: tuple[str, ...]
    stamp: Stamp
    revisions: tuple[CachedRevision, ...]


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
    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self._root = str(root)
        self._locks = os.path.join(self._root, ".locks")
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.walks = 0  # folders walked (for the tests and the benchmark)

    def revisions(
        self, folder: str, walk: Callable[[], list[CachedRevision]]
    ) -> list[CachedRevision]:
        """The revisions of the model folder ``folder`` (a name under the root): the last walk's
        when nothing it depends on changed since, else ``walk()``'s (an error it raises is the
        caller's, and the entry is dropped)."""
        with self._lock:
            entry = self._entries.get(folder)
        if entry is not None and _stamps(entry.paths) == entry.stamp:
            return list(entry.revisions)
        started = self._clock()
        paths = self._paths(folder)
        stamp = _stamps(paths)  # before the walk: a change during it makes the next one differ
        with self._lock:
            self._entries.pop(folder, None)
        self.walks += 1
        revisions = walk()
        if self._keeps(stamp, started, revisions) and not _links_a_store(
            os.path.join(self._root, folder, "blobs")
        ):
            with self._lock:
                self._entries[folder] = _Entry(paths, stamp, tuple(revisions))
        return revisions

    def keep_only(self, folders: set[str]) -> None:
        """Forget the folders that are not in the cache any more."""
        with self._lock:
            for gone in self._entries.keys() - folders:
                del self._entries[gone]

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
