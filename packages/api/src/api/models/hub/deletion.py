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
import stat
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils._shared_blobs import (
    expected_shared_blob_freed_size,
    shared_blob_target,
    sweep_shared_blob,
)

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
    freed_bytes: int  # by what the plan removes itself (the shared store's sweep comes on top)
    links: tuple[Path, ...] = ()  # the model's blobs removed (those that link the shared store)
    by_revision: tuple[tuple[str, int], ...] = ()  # (commit, bytes of the files only it held)

    def expected_freed(self) -> int:
        """The bytes ``execute`` would free, the shared store's blobs that nothing else would
        link any more included (the library's own prediction), without changing anything."""
        doomed = set(self.links)
        return self.freed_bytes + sum(
            expected_shared_blob_freed_size(t, blob_paths_to_delete=doomed, cache_dir=self.root)
            for t in self.shared
        )

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
    return execute(plan) if plan is not None else None


def execute(plan: DeletePlan) -> int:
    """Execute a plan; raises ``CacheNotWritable`` when the cache refuses a removal."""
    try:
        return plan.execute()
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise CacheNotWritable(plan.repo_id, partly=True) from None
        raise


def plan_delete(cache: ModelCache, repo_id: str, revision: str | None) -> DeletePlan | None:
    """The plan to delete one revision, or the whole model when ``revision`` is None; None when
    nothing of it is cached. Raises ``RevisionBusy``, ``UnsafeCachePath`` or
    ``CacheNotWritable``, having removed nothing."""
    if not _may_change(cache, repo_id):
        return None
    if revision is None:
        _refuse_busy(cache, repo_id, None)
        return _whole_model(cache, repo_id)
    commit = cache.resolve_commit(repo_id, revision)
    _refuse_busy(cache, repo_id, {commit} if commit is not None else set())
    if commit is None:
        return None
    return _one_revision(cache, repo_id, commit)


def plan_prune(
    cache: ModelCache, repo_id: str, commits: frozenset[str] | None
) -> DeletePlan | None:
    """The plan to delete some revisions of a model (``commits``), or its folder whole when
    ``commits`` is None (what a download left before its first revision); the same checks as
    ``plan_delete``."""
    if not _may_change(cache, repo_id):
        return None
    _refuse_busy(cache, repo_id, commits)
    if commits is None:
        return _whole_model(cache, repo_id)
    return plan_revisions(cache, repo_id, commits)


def _may_change(cache: ModelCache, repo_id: str) -> bool:
    """Whether the model has a folder (a real one, not a link); raises ``CacheNotWritable`` when
    it cannot be changed."""
    folder = cache.folder(repo_id)
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not os.access(cache.root, os.W_OK) or not os.access(folder, os.W_OK):
        raise CacheNotWritable(repo_id)
    return True


def _refuse_busy(
    cache: ModelCache, repo_id: str, commits: set[str] | frozenset[str] | None
) -> None:
    """Raise ``RevisionBusy`` when a download worker (of any process sharing the cache) holds one
    of ``commits`` (None: any revision of the model)."""
    busy = [
        blob_name(p.name)
        for p in _iter_files(cache.locks_folder(repo_id))
        if p.name.endswith(".download.lock") and cache.revision_busy(repo_id, blob_name(p.name))
    ]
    hit = busy if commits is None else [c for c in busy if c in commits]
    if hit:
        raise RevisionBusy(repo_id, hit[0])


def _whole_model(
    cache: ModelCache, repo_id: str, by_revision: tuple[tuple[str, int], ...] = ()
) -> DeletePlan:
    folder = cache.folder(repo_id)
    blobs = [path for path, _ in _iter_stats(folder / "blobs", links_too=True)]
    shared = {t for path in blobs if (t := shared_blob_target(path, cache.root)) is not None}
    return DeletePlan(
        root=cache.root,
        repo_id=repo_id,
        commit=None,
        trees=(folder,),
        files=(),
        own_folders=(cache.locks_folder(repo_id),),
        shared=tuple(sorted(shared)),
        freed_bytes=sum(st.st_size for _, st in _iter_stats(folder)),
        links=tuple(blobs),
        by_revision=by_revision,
    )


def _one_revision(cache: ModelCache, repo_id: str, commit: str) -> DeletePlan | None:
    return plan_revisions(cache, repo_id, frozenset({commit}))


def plan_revisions(cache: ModelCache, repo_id: str, commits: frozenset[str]) -> DeletePlan | None:
    """The plan to delete some revisions of a model, keeping the blobs the others use (the whole
    model when no other is left); None when none of them is cached. Checks no lock: the caller
    (``plan_delete``, ``plan_prune``) has."""
    folder = cache.folder(repo_id)
    snapshots = folder / "snapshots"
    if any((snapshots / c).is_symlink() for c in commits):
        raise UnsafeCachePath(repo_id)  # a planted link in place of a revision's folder
    present = sorted(
        c for c in commits if (snapshots / c).is_dir() or (folder / "trees" / f"{c}.json").exists()
    )
    if not present:
        return None
    used = {
        c: _blobs_of(cache, repo_id, snapshots / c) for c in present if (snapshots / c).is_dir()
    }
    others = [p for p in _iter_dirs(snapshots) if p.name not in commits]
    kept: set[Path] = set()
    for other in others:
        kept |= _blobs_of(cache, repo_id, other)
    # Another revision may be between its start and its first file: its file list (and its lock)
    # is all there is of it yet, and taking the whole folder would remove them.
    starting = [
        p
        for p in _iter_files(folder / "trees")
        if p.suffix == ".json" and p.stem not in commits and COMMIT_ID.fullmatch(p.stem)
    ]
    if not others and not starting:
        return _whole_model(cache, repo_id, _attributed(used, set()))  # the last revisions
    refs = [
        folder / "refs" / ref for ref, target in cache.refs(repo_id).items() if target in commits
    ]
    blobs = sorted(set().union(*used.values()) - kept)
    records = cache.records
    return DeletePlan(
        root=cache.root,
        repo_id=repo_id,
        commit=present[0] if len(present) == 1 else None,
        trees=tuple(snapshots / c for c in present if c in used),
        files=(
            *blobs,
            *(
                path
                for c in present
                for path in (
                    folder / "trees" / f"{c}.json",
                    records.unverified_marker(repo_id, c),
                    records.selection_record(repo_id, c),
                    records.selection_record(repo_id, c).with_suffix(".lock"),
                )
            ),
            *refs,
        ),
        own_folders=tuple(folder / ".no_exist" / c for c in present),
        shared=tuple(
            sorted({t for p in blobs if (t := shared_blob_target(p, cache.root)) is not None})
        ),
        freed_bytes=sum(_own_size(p) for p in blobs),
        links=tuple(blobs),
        by_revision=_attributed(used, kept),
    )


def _content_size(blob: Path) -> int:
    """Bytes of a blob's content (through a link into the shared store)."""
    try:
        return blob.stat().st_size
    except OSError:
        return 0


def _own_size(blob: Path) -> int:
    """Bytes a blob of the model's folder holds itself (a link into the shared store: none)."""
    try:
        st = blob.lstat()
    except FileNotFoundError:
        return 0
    return 0 if stat.S_ISLNK(st.st_mode) else st.st_size


def _attributed(used: dict[str, set[Path]], kept: set[Path]) -> tuple[tuple[str, int], ...]:
    """Bytes of the files only the removed revisions held, by revision: the blobs each uses that
    no kept revision does, each counted once, for the first revision (in commit order) using it."""
    counted = set(kept)
    out = []
    for commit in sorted(used):
        mine = used[commit] - counted
        counted |= mine
        out.append((commit, sum(_content_size(p) for p in mine)))
    return tuple(out)


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
