"""Deleting from the cache: a plan computed and checked first, then executed.

``plan_delete`` lists every path a delete will remove and checks each one before anything is
removed (huggingface_hub's ``DeleteCacheStrategy`` is the model): a link that leads out of the
model's folder (other than the library's own link into its shared blob store), a revision that a
download holds (here or in another process sharing the cache) or a cache that is not writable
refuses the delete with nothing removed. ``DeletePlan.execute`` only removes what the plan lists.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils._shared_blobs import shared_blob_target, sweep_shared_blob

from api.models.errors import CacheNotWritable, RevisionBusy, UnsafeCachePath
from api.models.hub.cache import (
    ModelCache,
    _iter_dirs,
    _iter_files,
    _iter_stats,
    _relative_files,
    blob_name,
)
from api.models.hub.guard import COMMIT_ID


@dataclass(frozen=True)
class DeletePlan:
    """What a delete removes, and how many bytes that frees (before the shared store's sweep)."""

    root: Path  # the cache
    repo_id: str
    commit: str | None  # None: the whole model
    trees: tuple[Path, ...]  # folders removed whole (links in them removed, never followed)
    files: tuple[Path, ...]  # files and links removed one by one
    own_folders: tuple[Path, ...]  # the cache's own folders, removed only where no link leads
    shared: tuple[Path, ...]  # shared-store blobs to collect when nothing links them any more
    freed_bytes: int

    def execute(self) -> int:
        """Remove what the plan lists; return the bytes freed (the shared store's included)."""
        for tree in self.trees:
            shutil.rmtree(tree)  # rmtree removes links, never what they point to
        for path in self.files:
            path.unlink(missing_ok=True)
        for folder in self.own_folders:
            remove_inside(self.root, folder)
        swept = sum(sweep_shared_blob(target, cache_dir=self.root) for target in self.shared)
        return self.freed_bytes + swept


def delete(cache: ModelCache, repo_id: str, revision: str | None) -> int | None:
    """Delete one revision, or the whole model when ``revision`` is None: plan, then execute.
    Returns the bytes freed, or None when nothing of it was cached."""
    plan = plan_delete(cache, repo_id, revision)
    if plan is None:
        return None
    try:
        return plan.execute()
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise CacheNotWritable(repo_id, partly=True) from None
        raise


def plan_delete(cache: ModelCache, repo_id: str, revision: str | None) -> DeletePlan | None:
    """The plan to delete one revision, or the whole model when ``revision`` is None; None when
    nothing of it is cached. Raises ``RevisionBusy``, ``UnsafeCachePath`` or
    ``CacheNotWritable``, having removed nothing."""
    folder = cache.folder(repo_id)
    if not folder.is_dir() or folder.is_symlink():
        return None
    if not os.access(cache.root, os.W_OK) or not os.access(folder, os.W_OK):
        raise CacheNotWritable(repo_id)
    busy = [
        blob_name(p.name)
        for p in _iter_files(cache.locks_folder(repo_id))
        if p.name.endswith(".download.lock") and cache.revision_busy(repo_id, blob_name(p.name))
    ]
    if busy and (revision is None or cache.resolve_commit(repo_id, revision) in busy):
        raise RevisionBusy(repo_id, busy[0])
    if revision is None:
        return _whole_model(cache, repo_id)
    commit = cache.resolve_commit(repo_id, revision)
    if commit is None:
        return None
    return _one_revision(cache, repo_id, commit)


def _whole_model(cache: ModelCache, repo_id: str) -> DeletePlan:
    folder = cache.folder(repo_id)
    shared = {
        target
        for path, _ in _iter_stats(folder / "blobs", links_too=True)
        if (target := shared_blob_target(path, cache.root)) is not None
    }
    return DeletePlan(
        root=cache.root,
        repo_id=repo_id,
        commit=None,
        trees=(folder,),
        files=(),
        own_folders=(cache.locks_folder(repo_id),),
        shared=tuple(sorted(shared)),
        freed_bytes=sum(st.st_size for _, st in _iter_stats(folder)),
    )


def _one_revision(cache: ModelCache, repo_id: str, commit: str) -> DeletePlan | None:
    folder = cache.folder(repo_id)
    snapshots = folder / "snapshots"
    snapshot = snapshots / commit
    tree_file = folder / "trees" / f"{commit}.json"
    if snapshot.is_symlink():
        raise UnsafeCachePath(repo_id)  # a planted link in place of the revision's folder
    if not snapshot.is_dir() and not tree_file.exists():
        return None
    doomed = _blobs_of(cache, repo_id, snapshot) if snapshot.is_dir() else set()
    others = [p for p in _iter_dirs(snapshots) if p.name != commit]
    for other in others:
        doomed -= _blobs_of(cache, repo_id, other)
    # Another revision may be between its start and its first file: its file list (and its lock)
    # is all there is of it yet, and taking the whole folder would remove them.
    starting = [
        p
        for p in _iter_files(folder / "trees")
        if p.suffix == ".json" and p.stem != commit and COMMIT_ID.fullmatch(p.stem)
    ]
    if not others and not starting:
        return _whole_model(cache, repo_id)  # the last revision: the whole model
    refs = [
        folder / "refs" / ref for ref, target in cache.refs(repo_id).items() if target == commit
    ]
    blobs = sorted(doomed)
    return DeletePlan(
        root=cache.root,
        repo_id=repo_id,
        commit=commit,
        trees=(snapshot,) if snapshot.is_dir() else (),
        files=(
            *blobs,
            tree_file,
            cache.records.unverified_marker(repo_id, commit),
            cache.records.selection_record(repo_id, commit),
            cache.records.selection_record(repo_id, commit).with_suffix(".lock"),
            *refs,
        ),
        own_folders=(folder / ".no_exist" / commit,),
        shared=tuple(
            sorted({t for p in blobs if (t := shared_blob_target(p, cache.root)) is not None})
        ),
        freed_bytes=sum(p.lstat().st_size for p in blobs if p.exists() and not p.is_symlink()),
    )


def _blobs_of(cache: ModelCache, repo_id: str, snapshot: Path) -> set[Path]:
    """The blobs (``<folder>/blobs/<name>``) a snapshot's links use; raises ``UnsafeCachePath``
    for a link that leads anywhere but into the model's folder or, through the model's own
    ``blobs/`` entry, into the library's shared store."""
    folder = cache.folder(repo_id)
    real_folder = folder.resolve()
    blobs_dir = (folder / "blobs").resolve()
    found = set()
    for rel in _relative_files(snapshot):
        target = (snapshot / rel).resolve()
        if target.is_relative_to(real_folder):
            if target.parent == blobs_dir:
                found.add(folder / "blobs" / target.name)
            continue
        blob = cache.blob_behind(repo_id, snapshot / rel)
        shared = shared_blob_target(blob, cache.root) if blob is not None else None
        if blob is None or shared is None or shared.resolve() != target:
            raise UnsafeCachePath(repo_id)
        found.add(blob)
    return found


def remove_inside(root: Path, path: Path) -> None:
    """Remove a folder of the cache's own (a model's locks, a revision's ``.no_exist``) only where
    it really is inside the cache: a link planted on the way (``.locks`` itself, or ``.no_exist``,
    linked elsewhere) is removed, never followed."""
    try:
        real_parent = path.parent.resolve()
    except OSError:
        return
    if real_parent != root.resolve() / path.parent.relative_to(root):
        # A link among the parents leads elsewhere: remove that link, nothing behind it.
        for parent in [path.parent, *path.parent.parents]:
            if parent == root:
                break
            if parent.is_symlink():
                parent.unlink(missing_ok=True)
                break
        return
    if path.is_symlink():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
