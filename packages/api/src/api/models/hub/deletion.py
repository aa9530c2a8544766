"""Deleting from the cache: a plan computed and checked first, then executed.

``plan_delete`` lists every entry a delete will remove and checks each one before anything is
removed (huggingface_hub's ``DeleteCacheStrategy`` is the model): a link that leads out of the
model's folder (other than the library's own link into its shared blob store), a revision that a
download holds (here or in another process sharing the cache) or a cache that is not writable
refuses the delete with nothing removed. ``DeletePlan.execute`` only removes what it lists.

The plan names entries as names below the cache's root, never as paths, and ``execute`` reaches
each one from the root's descriptor without following a link (``api.models.anchored``): a folder
swapped for a link between the plan and its execution is removed as a link when it is the entry
to remove, and stops the delete with ``UnsafeCachePath`` naming it when it stands on the way to
one. Links are read by their text (as the library reads its own): nothing is resolved through
the filesystem, so nothing outside the cache is ever looked at, let alone removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from api import logfmt
from api.models.anchored import (
    Folder,
    KeepsChanging,
    LinkInTheWay,
    held,
    resolve_link,
    walk_files,
)
from api.models.errors import CacheNotWritable, ModelError, RevisionBusy, UnsafeCachePath
from api.models.hub.cache import (
    ModelCache,
    _shared_hash,
    blob_name,
    repo_folder_name,
)
from api.models.hub.guard import COMMIT_ID
from api.models.hub.records import selection_lock_name, selection_name, unverified_name

logger = logging.getLogger(__name__)

Names = tuple[str, ...]  # an entry, as the names leading to it from the cache's root

# The library's shared store (huggingface_hub.utils._shared_blobs, layout version 1).
STORE = "blobs"
STORE_MARKER = ".huggingface-shared-blobs"
STORE_LAYOUT = b"1\n"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class DeletePlan:
    """What a delete removes, and how many bytes that frees (before the shared store's sweep).
    Every entry is a tuple of names below the cache's root."""

    root: Path  # the cache (for messages: nothing acts through it)
    repo_id: str
    commit: str | None  # None: the whole model
    trees: tuple[Names, ...]  # folders removed whole (links in them removed, never followed)
    files: tuple[Names, ...]  # files and links removed one by one
    own_folders: tuple[Names, ...]  # the cache's own folders (a model's locks, ``.no_exist``)
    shared: tuple[str, ...]  # Xet hashes of shared-store blobs to collect when nothing links them
    # By what the plan removes itself (the shared store's sweep comes on top); None for a whole
    # model not measured beforehand (a delete: ``execute`` counts what it removes).
    freed_bytes: int | None
    links: tuple[Names, ...] = ()  # the model's blobs removed (those that link the shared store)
    by_revision: tuple[tuple[str, int], ...] = ()  # (commit, bytes of the files only it held)

    def expected_freed(self, cache: ModelCache) -> int:
        """The bytes ``execute`` would free, the shared store's blobs that nothing else would
        link any more included, without changing anything."""
        root = cache.anchor()
        if root is None:
            return self.freed_bytes or 0
        with root:
            doomed = set(self.links)
            own = (
                self.freed_bytes if self.freed_bytes is not None else _model_bytes(root, self.trees)
            )
            return own + sum(
                _shared_size(root, h)
                for h in self.shared
                if (refs := _references(root, h, str(self.root))) is not None
                and refs
                and refs <= doomed
            )

    def execute(self, cache: ModelCache) -> int:
        """Remove what the plan lists; return the bytes freed (the shared store's included).
        Raises ``UnsafeCachePath`` when a link stands on the way to an entry (the delete stops
        there: nothing through it is touched)."""
        root = cache.anchor()
        if root is None:
            return 0
        with root:
            # In an order that a crash at any point leaves a cache the library reads without a
            # warning: a whole model leaves the library's sight in one rename before it is
            # removed; of a revision, the refs that name it go first (a revision no ref names is
            # one the library knows: detached), then its snapshot, then its blobs.
            trees = self.trees
            if self.commit is None and trees == ((repo_folder_name(self.repo_id),),):
                trees = (_set_aside(root, trees[0][0]),)
            refs = [entry for entry in self.files if entry[1:2] == ("refs",)]
            for entry in refs:
                _remove_at(root, entry)
            removed = sum(_remove_at(root, tree) for tree in trees)
            for entry in self.files:
                if entry not in refs:
                    _remove_at(root, entry)
            for folder in self.own_folders:
                _remove_own(root, folder)
            swept = sum(_sweep(root, h, str(self.root)) for h in self.shared)
        # A whole model: every regular file its folder held, counted as it went.
        own = self.freed_bytes if self.freed_bytes is not None else removed
        return own + swept


def delete(cache: ModelCache, repo_id: str, revision: str | None) -> int | None:
    """Delete one revision, or the whole model when ``revision`` is None: plan, then execute.
    Returns the bytes freed, or None when nothing of it was cached."""
    plan = plan_delete(cache, repo_id, revision)
    return execute(cache, plan) if plan is not None else None


def execute(cache: ModelCache, plan: DeletePlan) -> int:
    """Execute a plan. Every failure is a ``ModelError`` (a 409 that says what happened), never
    a crash: ``CacheNotWritable`` when the cache refuses a removal, ``UnsafeCachePath`` when a
    link stands in the way or the cache kept changing under the delete."""
    try:
        return plan.execute(cache)
    except LinkInTheWay as link:
        raise UnsafeCachePath(plan.repo_id, where=link.where, partly=True) from None
    except KeepsChanging as changing:
        raise UnsafeCachePath(plan.repo_id, where=changing.where, partly=True) from None
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise CacheNotWritable(plan.repo_id, partly=True) from None
        logfmt.log(
            logger,
            logging.WARNING,
            "delete_stopped",
            repo=plan.repo_id,
            errno=errno.errorcode.get(error.errno or 0, error.errno),
        )
        raise UnsafeCachePath(plan.repo_id, partly=True) from None


def plan_delete(cache: ModelCache, repo_id: str, revision: str | None) -> DeletePlan | None:
    """The plan to delete one revision, or the whole model when ``revision`` is None; None when
    nothing of it is cached. Raises ``RevisionBusy``, ``UnsafeCachePath`` or
    ``CacheNotWritable``, having removed nothing."""
    with _planning(repo_id):
        if not _may_change(cache, repo_id):
            return None
        if revision is None:
            _refuse_busy(cache, repo_id, None)
            return _whole_model(cache, repo_id, measure=False)
        commit = cache.resolve_commit(repo_id, revision)
        _refuse_busy(cache, repo_id, {commit} if commit is not None else set())
        if commit is None:
            return None
        return plan_revisions(cache, repo_id, frozenset({commit}))


def plan_prune(
    cache: ModelCache, repo_id: str, commits: frozenset[str] | None
) -> DeletePlan | None:
    """The plan to delete some revisions of a model (``commits``), or its folder whole when
    ``commits`` is None (what a download left before its first revision); the same checks as
    ``plan_delete``."""
    with _planning(repo_id):
        if not _may_change(cache, repo_id):
            return None
        _refuse_busy(cache, repo_id, commits)
        if commits is None:
            return _whole_model(cache, repo_id)
        return plan_revisions(cache, repo_id, commits)


@contextlib.contextmanager
def _planning(repo_id: str) -> Iterator[None]:
    """Planning reads the cache through descriptors: a link in the way, or a folder that keeps
    changing, refuses the delete (409 naming it) with nothing removed."""
    try:
        yield
    except (LinkInTheWay, KeepsChanging) as error:
        raise UnsafeCachePath(repo_id, where=error.where) from None


def _may_change(cache: ModelCache, repo_id: str) -> bool:
    """Whether the model has a folder (a real one, not a link); raises ``CacheNotWritable`` when
    it cannot be changed. (A check for a clear answer before anything is removed: the removals
    themselves go through descriptors, whatever this saw.)"""
    root = cache.anchor()
    if root is None:
        return False
    with root:
        info = root.lstat(repo_folder_name(repo_id))
        if info is None or not stat.S_ISDIR(info.st_mode):
            return False
        with held(root.walk(repo_folder_name(repo_id))) as folder:
            assert folder is not None
            if _read_only(root) or _read_only(folder):
                raise CacheNotWritable(repo_id)
    return True


def _read_only(folder: Folder) -> bool:
    """Whether the folder refuses removals in it: a read-only filesystem, or no write access."""
    if os.statvfs(folder.fd).f_flag & os.ST_RDONLY:
        return True
    return (
        not os.access(f"/proc/self/fd/{folder.fd}", os.W_OK)
        if os.path.isdir("/proc/self/fd")
        else False
    )


def _refuse_busy(
    cache: ModelCache, repo_id: str, commits: set[str] | frozenset[str] | None
) -> None:
    """Raise ``RevisionBusy`` when a download worker (of any process sharing the cache) holds one
    of ``commits`` (None: any revision of the model)."""
    with cache.locks_of(repo_id) as locks:
        if locks is None:
            return
        busy = []
        for entry in locks.names():
            if entry.name.endswith(".download.lock") and not locks.lock_free(entry.name):
                busy.append(blob_name(entry.name))
    hit = busy if commits is None else [c for c in busy if c in commits]
    if hit:
        raise RevisionBusy(repo_id, hit[0])


def _whole_model(
    cache: ModelCache,
    repo_id: str,
    by_revision: tuple[tuple[str, int], ...] = (),
    measure: bool = True,
) -> DeletePlan:
    """The plan to remove the model's folder whole. ``measure``: its bytes counted now (a prune
    says what it would free); a delete leaves that to ``execute``, which counts as it removes
    (one walk of the folder instead of two)."""
    folder = repo_folder_name(repo_id)
    freed: int | None = None
    links: list[Names] = []
    shared: set[str] = set()
    if measure:
        root = cache.anchor()
        assert root is not None  # _may_change saw it
        with root:
            freed = _model_bytes(root, ((folder,),))
    with cache.model_folder(repo_id, "blobs") as blobs:
        for entry in blobs.names() if blobs is not None else []:
            found = _shared_hash(blobs, entry.name, folder, str(cache.root)) if blobs else None
            if found is not None:
                shared.add(found)
                links.append((folder, "blobs", entry.name))
    return DeletePlan(
        root=cache.root,
        repo_id=repo_id,
        commit=None,
        trees=((folder,),),
        files=(),
        own_folders=((".locks", folder),),
        shared=tuple(sorted(shared)),
        freed_bytes=freed,
        links=tuple(links),
        by_revision=by_revision,
    )


def plan_revisions(cache: ModelCache, repo_id: str, commits: frozenset[str]) -> DeletePlan | None:
    """The plan to delete some revisions of a model, keeping the blobs the others use (the whole
    model when no other is left); None when none of them is cached. Checks no lock: the caller
    (``plan_delete``, ``plan_prune``) has."""
    folder = repo_folder_name(repo_id)
    commits = frozenset(c for c in commits if COMMIT_ID.fullmatch(c))
    with cache.model_folder(repo_id) as model:
        if model is None:
            return None
        snapshot_names = _subfolders(model, "snapshots")
        tree_names = {e.name for e in _entries(model, "trees")}
        for c in commits:
            info = _lstat_in(model, "snapshots", c)
            if info is not None and not stat.S_ISDIR(info.st_mode):
                # A planted link (or file) in place of a revision's folder.
                raise UnsafeCachePath(repo_id, where=f"{folder}/snapshots/{c}")
        present = sorted(c for c in commits if c in snapshot_names or f"{c}.json" in tree_names)
        if not present:
            return None
        used = {c: _blobs_of(cache, repo_id, c) for c in present if c in snapshot_names}
        others = [name for name in snapshot_names if name not in commits]
        kept: set[str] = set()
        for other in others:
            kept |= _blobs_of(cache, repo_id, other)
        # Another revision may be between its start and its first file: its file list (and its
        # lock) is all there is of it yet, and taking the whole folder would remove them.
        starting = [
            name
            for name in tree_names
            if name.endswith(".json")
            and name[: -len(".json")] not in commits
            and COMMIT_ID.fullmatch(name[: -len(".json")])
        ]
        # Every blob the removed revisions use is looked at before anything is removed: a link
        # there that is not the library's own link into its store refuses the delete.
        sizes = _blob_sizes(cache, repo_id, set().union(*used.values()))
        if not others and not starting:
            return _whole_model(cache, repo_id, _attributed(used, set(), sizes))  # the last ones
        refs = [
            (folder, "refs", *ref.split("/"))
            for ref, target in cache.refs(repo_id).items()
            if target in commits
        ]
        blobs = sorted(set().union(*used.values()) - kept)
        with cache.model_folder(repo_id, "blobs") as blob_folder:
            shared = {
                h: (folder, "blobs", b)
                for b in blobs
                if blob_folder is not None
                and (h := _shared_hash(blob_folder, b, folder, str(cache.root))) is not None
            }
    records = [
        (".locks", folder, name)
        for c in present
        for name in (unverified_name(c), selection_name(c), selection_lock_name(c))
    ]
    return DeletePlan(
        root=cache.root,
        repo_id=repo_id,
        commit=present[0] if len(present) == 1 else None,
        trees=tuple((folder, "snapshots", c) for c in present if c in used),
        files=(
            *((folder, "blobs", b) for b in blobs),
            *((folder, "trees", f"{c}.json") for c in present),
            *records,
            *refs,
        ),
        own_folders=tuple((folder, ".no_exist", c) for c in present),
        shared=tuple(sorted(shared)),
        freed_bytes=sum(sizes[b][0] for b in blobs),
        links=tuple(shared.values()),
        by_revision=_attributed(used, kept, sizes),
    )


def _entries(model: Folder, name: str) -> list[os.DirEntry[str]]:
    with held(model.sub(name)) as inner:
        return inner.names() if inner is not None else []


def _subfolders(model: Folder, name: str) -> set[str]:
    return {e.name for e in _entries(model, name) if e.is_dir(follow_symlinks=False)}


def _lstat_in(model: Folder, name: str, child: str) -> os.stat_result | None:
    with held(model.sub(name)) as inner:
        return inner.lstat(child) if inner is not None else None


def _blob_sizes(cache: ModelCache, repo_id: str, names: set[str]) -> dict[str, tuple[int, int]]:
    """For each blob of the model's ``blobs/``: (bytes it holds itself, bytes of its content):
    a link into the shared store holds none itself, and its content is the shared blob's.
    Raises ``UnsafeCachePath`` for a link that is not the library's own link to a blob its store
    holds (planted, or forged to look like one): a delete refuses it with nothing removed."""
    folder = repo_folder_name(repo_id)
    sizes: dict[str, tuple[int, int]] = {}
    root = cache.anchor()
    if root is None:
        return dict.fromkeys(names, (0, 0))
    with root, cache.model_folder(repo_id, "blobs") as blobs:
        for name in names:
            info = blobs.lstat(name) if blobs is not None else None
            if info is None:
                sizes[name] = (0, 0)
            elif stat.S_ISREG(info.st_mode):
                sizes[name] = (info.st_size, info.st_size)
            else:
                assert blobs is not None
                shared = _shared_hash(blobs, name, folder, str(cache.root))
                held_there = _store_entry(root, shared) if shared is not None else None
                if held_there is None:
                    raise UnsafeCachePath(repo_id, where=f"{folder}/blobs/{name}")
                sizes[name] = (0, held_there.st_size)
    return sizes


def _attributed(
    used: dict[str, set[str]], kept: set[str], sizes: dict[str, tuple[int, int]]
) -> tuple[tuple[str, int], ...]:
    """Bytes of the files only the removed revisions held, by revision: the blobs each uses that
    no kept revision does, each counted once, for the first revision (in commit order) using it."""
    counted = set(kept)
    out = []
    for commit in sorted(used):
        mine = used[commit] - counted
        counted |= mine
        out.append((commit, sum(sizes.get(b, (0, 0))[1] for b in mine)))
    return tuple(out)


def last_access(cache: ModelCache, repo_id: str, commit: str) -> float | None:
    """The newest ``st_atime`` of the blobs the revision's links use (read through the model's
    folder, links not followed); None when it has none, or a link leads out of the model."""
    try:
        names = _blobs_of(cache, repo_id, commit)
    except (ModelError, LinkInTheWay, KeepsChanging, OSError):
        return None
    newest: float | None = None
    with cache.model_folder(repo_id, "blobs") as blobs:
        if blobs is None:
            return None
        for name in names:
            with contextlib.suppress(OSError):
                info = blobs.lstat(name)
                if info is not None and stat.S_ISREG(info.st_mode):
                    newest = max(newest or 0.0, info.st_atime)
    return newest


def _blobs_of(cache: ModelCache, repo_id: str, commit: str) -> set[str]:
    """The names in the model's ``blobs/`` a snapshot's links use, read by their text; raises
    ``UnsafeCachePath`` for a link that leads anywhere but into the model's folder (the library's
    own link into the shared store goes through the model's ``blobs/<name>``, read there)."""
    folder = repo_folder_name(repo_id)
    found: set[str] = set()
    with cache.model_folder(repo_id, "snapshots", commit) as snapshot:
        if snapshot is None:
            return found
        for rel, info in walk_files(snapshot):
            if not stat.S_ISLNK(info.st_mode):
                continue  # a copy (not a link): removed with the snapshot's folder
            *dirs, leaf = rel.split("/")
            at = (folder, "snapshots", commit, *dirs)
            with held(snapshot.walk(*dirs)) as holder:
                target = holder.readlink(leaf) if holder is not None else None
            if target is None:
                continue  # gone meanwhile
            where = resolve_link(at, target, str(cache.root))
            if where is None or where[0] != folder:
                raise UnsafeCachePath(repo_id, where="/".join((*at, leaf)))
            if len(where) == 3 and where[1] == "blobs":
                found.add(where[2])
    return found


def _remove_at(root: Folder, entry: Names) -> int:
    """Remove ``entry`` (whatever it is now: a link is removed as a link); the bytes of the
    regular files removed. A link on the way to it raises ``LinkInTheWay`` (nothing through it
    is touched)."""
    *parents, name = entry
    holder = root.walk(*parents)
    if holder is None:
        return 0
    with holder:
        return holder.remove(name)


# Model folders set aside for removal: under ``.locks``, which ``scan_cache_dir`` skips, so that
# the library never sees half a model; what a crash left there is removed at the next start.
REMOVING = ".removing"


def _set_aside(root: Folder, folder: str) -> Names:
    """Move the model folder ``folder`` to ``.locks/.removing/<folder>.<token>`` in one rename
    and return where it is now; where that cannot be done (``.locks`` is a link, another
    filesystem), the folder where it is (removed there, as before)."""
    try:
        with held(root.sub(".locks", create=True)) as locks:
            assert locks is not None
            with held(locks.sub(REMOVING, create=True)) as removing:
                assert removing is not None
                aside = f"{folder}.{secrets.token_hex(8)}"
                root.move_to(folder, removing, aside)
    except (LinkInTheWay, KeepsChanging, OSError):
        return (folder,)
    return (".locks", REMOVING, aside)


def finish_removals(cache: ModelCache) -> int:
    """Remove what a crash left set aside (``_set_aside``); how many model folders."""
    root = cache.anchor()
    if root is None:
        return 0
    with root:
        try:
            with held(root.walk(".locks", REMOVING)) as removing:
                if removing is None:
                    return 0
                names = [entry.name for entry in removing.names()]
                for name in names:
                    removing.remove(name)
                return len(names)
        except (LinkInTheWay, KeepsChanging):
            return 0  # not ours: left alone


def _model_bytes(root: Folder, trees: tuple[Names, ...]) -> int:
    """Bytes of the regular files under the folders ``trees`` (read through descriptors)."""
    total = 0
    for tree in trees:
        with held(root.walk(*tree)) as folder:
            if folder is not None:
                total += sum(i.st_size for _, i in walk_files(folder) if stat.S_ISREG(i.st_mode))
    return total


def _remove_own(root: Folder, entry: Names) -> None:
    """Remove a folder of the cache's own (a model's locks, a revision's ``.no_exist``): a link
    planted on the way (``.locks`` itself, or ``.no_exist``) is removed, never followed."""
    current = root.dup()
    try:
        for name in entry[:-1]:
            try:
                nxt = current.sub(name)
            except LinkInTheWay:
                current.remove(name)  # the link itself
                return
            if nxt is None:
                return
            current.close()
            current = nxt
        current.remove(entry[-1])
    finally:
        current.close()


# -- the library's shared store, through descriptors --------------------------------------------
# The library's functions (``huggingface_hub.utils._shared_blobs``) act by path; these do what its
# ``sweep_shared_blob`` and ``expected_shared_blob_freed_size`` do, by the same rules (a marked
# store, a manifest of the links to each blob, read and checked under the blob's flock, which the
# library takes too), from the cache's root descriptor.


def _store_prefix(root: Folder, xet_hash: str) -> Folder | None:
    """The store's folder of ``xet_hash`` (``blobs/<xx>/``), when the store is the library's
    (marked) and nothing on the way is a link; else None."""
    try:
        with held(root.sub(STORE)) as store:
            if store is None or store.read(STORE_MARKER, 64) != STORE_LAYOUT:
                return None
            return store.sub(xet_hash[:2])
    except (LinkInTheWay, ValueError):
        return None


def _references(root: Folder, xet_hash: str, root_path: str) -> set[Names] | None:
    """The links of the manifest of ``xet_hash`` that really link it (each read by its text
    through descriptors); None when the manifest or a link cannot be read (then nothing is
    collected: the library's rule, leak rather than delete)."""
    prefix = _store_prefix(root, xet_hash)
    if prefix is None:
        return None
    with prefix:
        try:
            raw = prefix.read(f"{xet_hash}.refs", MAX_MANIFEST_BYTES)
        except (OSError, ValueError):
            return None
    if raw is None:
        return None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None
    found: set[Names] = set()
    for line in lines:
        parts = tuple(line.split("/"))
        if len(parts) != 3 or parts[1] != "blobs" or not parts[0].startswith("models--"):
            continue
        if any(p in ("", ".", "..") for p in parts):
            continue
        try:
            with held(root.walk(parts[0], "blobs")) as blobs:
                if blobs is None:
                    continue
                if _shared_hash(blobs, parts[2], parts[0], root_path) == xet_hash:
                    found.add(parts)
        except (LinkInTheWay, OSError):
            return None
    return found


def _store_entry(root: Folder, xet_hash: str) -> os.stat_result | None:
    """The ``lstat`` of the library's store's blob ``xet_hash`` when it holds it as a regular
    file, else None."""
    prefix = _store_prefix(root, xet_hash)
    if prefix is None:
        return None
    with prefix:
        info = prefix.lstat(xet_hash)
    return info if info is not None and stat.S_ISREG(info.st_mode) else None


def _shared_size(root: Folder, xet_hash: str) -> int:
    info = _store_entry(root, xet_hash)
    return info.st_size if info is not None else 0


def _sweep(root: Folder, xet_hash: str, root_path: str) -> int:
    """Collect the shared blob ``xet_hash`` when no link of its manifest links it any more (the
    manifest rewritten to the links that remain otherwise); the bytes freed."""
    prefix = _store_prefix(root, xet_hash)
    if prefix is None:
        return 0
    with prefix, prefix.flock(f"{xet_hash}.lock"):
        references = _references(root, xet_hash, root_path)
        if references is None:
            return 0
        if references:
            body = "".join(f"{'/'.join(r)}\n" for r in sorted(references)).encode()
            prefix.write_atomic(f"{xet_hash}.refs", body, mode=0o666)
            return 0
        info = prefix.lstat(xet_hash)
        if info is None or not stat.S_ISREG(info.st_mode):
            return 0
        prefix.unlink(xet_hash)
        prefix.unlink(f"{xet_hash}.refs")
        return info.st_size
