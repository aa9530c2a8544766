"""Reading and changing the Hugging Face cache on disk (part of the Hub/cache adapter).

Layout (huggingface_hub 2.x)::

    <cache>/models--<ns>--<name>/refs/<branch>            commit id of a branch or tag
    <cache>/models--<ns>--<name>/trees/<commit>.json      the revision's file list, written before
                                                          the first byte of content
    <cache>/models--<ns>--<name>/snapshots/<commit>/<path> symlink to ../../blobs/<etag>
    <cache>/models--<ns>--<name>/blobs/<etag>             content; <etag>.<random>.incomplete while
                                                          it downloads
    <cache>/.locks/models--<ns>--<name>/<etag>.lock        held by the process writing that blob
    <cache>/blobs/<xx>/<xet hash>                          a Xet-downloaded blob, kept once per
                                                          cache; the repo's blobs/<etag> is then a
                                                          link to it, listed in <xet hash>.refs

The shared store is the library's (``huggingface_hub.utils._shared_blobs``): its links are told from
planted ones, and its blobs collected when no repo links them any more, by the library's own
functions, under its locks.

Everything here is offline and blocking: the manager calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils._shared_blobs import shared_blob_target, sweep_shared_blob

from api.models.backend import (
    CachedRevision,
    CacheState,
    DownloadPlan,
    LocalState,
    VerifyReport,
)
from api.models.errors import RevisionBusy, UnsafeCachePath

logger = logging.getLogger(__name__)

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
TREE_FORMAT_VERSION = 1
INCOMPLETE_SUFFIX = ".incomplete"


def repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def repo_id_from_folder(name: str) -> str | None:
    if not name.startswith("models--"):
        return None
    return name[len("models--") :].replace("--", "/")


@dataclass(frozen=True)
class TreeEntry:
    size: int
    etag: str  # the blob's name: sha256 for LFS files, git blob id for regular files
    lfs: bool


class ModelCache:
    """One cache folder: where each model lives, and its state."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_folder_name(repo_id)

    def locks_folder(self, repo_id: str) -> Path:
        return self.root / ".locks" / repo_folder_name(repo_id)

    # -- reading -----------------------------------------------------------------------------

    def resolve_commit(self, repo_id: str, revision: str) -> str | None:
        """The commit of a revision from the cache alone: the id itself, or the ref's content."""
        if COMMIT_RE.fullmatch(revision):
            return revision
        try:
            commit = (self.folder(repo_id) / "refs" / revision).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return commit if COMMIT_RE.fullmatch(commit) else None

    def read_tree(self, repo_id: str, commit: str) -> dict[str, TreeEntry] | None:
        """The revision's file list as the hub client cached it (``trees/<commit>.json``), or None."""
        path = self.folder(repo_id) / "trees" / f"{commit}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format_version") != TREE_FORMAT_VERSION:
                return None
            return {
                rel: TreeEntry(
                    size=int(info.get("lfs_size") or info["size"]),
                    etag=str(info.get("lfs_sha256") or info["blob_id"]),
                    lfs=info.get("lfs_sha256") is not None,
                )
                for rel, info in data["files"].items()
            }
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("ignoring unreadable file list %s: %s", path, error)
            return None

    def local_state(self, repo_id: str, revision: str) -> LocalState:
        folder = self.folder(repo_id)
        if not folder.is_dir():
            return LocalState(CacheState.ABSENT)
        commit = self.resolve_commit(repo_id, revision)
        if commit is None:
            return LocalState(CacheState.PARTIAL if _has_content(folder) else CacheState.ABSENT)
        if self.revision_busy(repo_id, commit):
            return LocalState(CacheState.BUSY, commit)
        snapshot = folder / "snapshots" / commit
        tree = self.read_tree(repo_id, commit)
        if tree is None:
            return LocalState(self._state_without_tree(snapshot), commit)
        missing = missing_files(tree, lambda rel: _size_of(snapshot / rel))
        if not missing and not self._has_temp_files(repo_id, {e.etag for e in tree.values()}):
            return LocalState(CacheState.COMPLETE, commit)
        if len(missing) == len(tree) and not _has_content(folder):
            # Only metadata (a ref, the file list): a download that failed before any content,
            # such as a gated repo. Nothing of the model itself is here.
            return LocalState(CacheState.ABSENT, commit)
        return LocalState(CacheState.PARTIAL, commit)

    def revision_lock(self, repo_id: str, commit: str) -> Path:
        return self.locks_folder(repo_id) / f"{commit}.download.lock"

    @contextlib.contextmanager
    def hold_revision(self, repo_id: str, commit: str) -> Iterator[None]:
        """Held (shared) by every download worker of the revision, from its first byte to its
        verification; the kernel releases it when the worker dies, however it dies."""
        path = self.revision_lock(repo_id, commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def revision_busy(self, repo_id: str, commit: str) -> bool:
        """Whether a download worker (of any process sharing the cache) holds the revision."""
        with _lock_if_free(self.revision_lock(repo_id, commit)) as free:
            return not free

    def _has_temp_files(self, repo_id: str, etags: set[str]) -> bool:
        """Whether a temporary file of one of these blobs is in the cache (a download of it is
        running, or died and left it)."""
        return any(
            p.name.endswith(INCOMPLETE_SUFFIX) and p.name.split(".", 1)[0] in etags
            for p in _iter_files(self.folder(repo_id) / "blobs")
        )

    def missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        """Bytes of the plan's files whose blob is not yet complete in the cache."""
        blobs = self.folder(repo_id) / "blobs"
        return sum(f.size for f in plan.files if _size_of(blobs / f.etag) != f.size)

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        """Record that ``revision`` (a branch or tag) points at ``commit``, atomically."""
        if COMMIT_RE.fullmatch(revision):
            return
        path = self.folder(repo_id) / "refs" / revision
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, path)

    def discard_file(self, repo_id: str, commit: str, rel: str) -> None:
        """Remove a file of a revision and its blob (a checksum mismatch), so it is fetched again.

        A blob in the shared store goes too: its content is wrong for every repo that links it,
        and left there the library would link it again instead of downloading.
        """
        link = self.folder(repo_id) / "snapshots" / commit / rel
        blob = self._blob_behind(repo_id, link)
        if blob is not None:
            shared = shared_blob_target(blob, self.root)  # None unless the library's link
            if shared is not None:
                shared.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
        link.unlink(missing_ok=True)

    def _blob_behind(self, repo_id: str, link: Path) -> Path | None:
        """The entry of the model's ``blobs/`` a snapshot link names (one hop, not resolved
        further: it may itself be a link into the shared store), or None."""
        try:
            hop = Path(os.path.normpath(link.parent / os.readlink(link)))
        except OSError:
            return None  # not a link (a copied file), or gone
        blobs = self.folder(repo_id) / "blobs"
        return hop if hop.parent == blobs else None

    def verify(
        self, repo_id: str, revision: str, on_bytes: Callable[[int], None] | None = None
    ) -> VerifyReport | None:
        """Hash every file of a cached revision and compare it with its ETag, offline.

        The expected ETag comes from the revision's file list; a blob's name is its ETag too, so
        a revision without a file list is checked against the names of the blobs it links to.
        Returns None when the revision is not in the cache.
        """
        commit = self.resolve_commit(repo_id, revision)
        if commit is None:
            return None
        snapshot = self.folder(repo_id) / "snapshots" / commit
        tree = self.read_tree(repo_id, commit)
        if tree is None:
            if not snapshot.is_dir():
                return None
            expected = {rel: _blob_name(snapshot / rel) or "" for rel in _relative_files(snapshot)}
        else:
            expected = {rel: entry.etag for rel, entry in tree.items()}
        missing, mismatched = [], []
        for rel, etag in sorted(expected.items()):
            path = snapshot / rel
            if _size_of(path) is None:
                missing.append(rel)
            elif not content_matches(path, etag, on_bytes):
                mismatched.append(rel)
        return VerifyReport(
            commit=commit,
            files_checked=len(expected) - len(missing),
            missing=tuple(missing),
            mismatched=tuple(mismatched),
        )

    @staticmethod
    def _state_without_tree(snapshot: Path) -> CacheState:
        """No file list (a cache written by an older client): a snapshot whose every link resolves
        is taken as complete; it is the most the cache can tell without the network."""
        if not snapshot.is_dir():
            return CacheState.ABSENT
        entries = list(_iter_files(snapshot))
        if not entries:
            return CacheState.PARTIAL
        if all(_size_of(p) is not None for p in entries):
            return CacheState.COMPLETE
        return CacheState.PARTIAL

    def list_cached(self) -> list[CachedRevision]:
        """Every model revision in the cache, with its state and size on disk."""
        out: list[CachedRevision] = []
        if not self.root.is_dir():
            return out
        with os.scandir(self.root) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            repo_id = repo_id_from_folder(entry.name)
            if repo_id is None or not entry.is_dir(follow_symlinks=False):
                continue
            out.extend(self._revisions_of(repo_id))
        return out

    def _revisions_of(self, repo_id: str) -> list[CachedRevision]:
        folder = self.folder(repo_id)
        refs = self._refs(folder)
        blob_sizes = self._blob_sizes(folder / "blobs")
        snapshots = folder / "snapshots"
        commits = sorted(p.name for p in _iter_dirs(snapshots) if COMMIT_RE.fullmatch(p.name))
        if not commits:
            if not _has_content(folder):
                return []  # metadata only (a failed start): nothing of the model to list
            # A download that stopped before its first file: the model is there only in part.
            trace = sum(st.st_size for _, st in _iter_stats(folder / "blobs"))
            commit = refs.get("main") or next(iter(refs.values()), None)
            return [CachedRevision(repo_id, commit, CacheState.PARTIAL, trace, ())]
        revisions = []
        for commit in commits:
            snapshot = snapshots / commit
            tree = self.read_tree(repo_id, commit)
            linked = {rel: _blob_name(snapshot / rel) for rel in _relative_files(snapshot)}
            size = sum(blob_sizes.get(name or "", 0) for name in set(linked.values()))
            if self.revision_busy(repo_id, commit):
                state = CacheState.BUSY
            elif tree is None:
                state = self._state_without_tree(snapshot)
            else:
                state = _state_from_links(tree, snapshot, linked, blob_sizes)
            names = tuple(sorted(ref for ref, c in refs.items() if c == commit))
            revisions.append(CachedRevision(repo_id, commit, state, size, names))
        return revisions

    def _blob_sizes(self, blobs: Path) -> dict[str, int]:
        """Size of each complete blob of a model, by name; a link into the shared store counts
        with the size of the blob it shares."""
        sizes = {}
        for path, st in _iter_stats(blobs, links_too=True):
            if path.name.endswith(INCOMPLETE_SUFFIX):
                continue
            if stat.S_ISLNK(st.st_mode):
                shared = shared_blob_target(path, self.root)
                if shared is None:
                    continue
                with contextlib.suppress(OSError):
                    sizes[path.name] = shared.stat().st_size
            else:
                sizes[path.name] = st.st_size
        return sizes

    @staticmethod
    def _refs(folder: Path) -> dict[str, str]:
        refs_dir = folder / "refs"
        out = {}
        for path in _iter_files(refs_dir):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                out[path.relative_to(refs_dir).as_posix()] = path.read_text().strip()
        return out

    def usage(self) -> tuple[int, int]:
        """(bytes of the files in the cache, bytes free on the cache's filesystem)."""
        return sum(st.st_size for _, st in _iter_stats(self.root)), self.free_bytes()

    def free_bytes(self) -> int:
        """Bytes free on the cache's filesystem (of its nearest existing folder): one statvfs."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    # -- changing ----------------------------------------------------------------------------

    def remove_orphans(self, repo_id: str) -> int:
        """Remove temporary files no live process is writing; return how many were removed.

        A download holds ``.locks/<folder>/<etag>.lock`` while it writes ``blobs/<etag>.*.incomplete``;
        when that lock can be taken without waiting, the file belongs to a dead process (killed, or
        cancelled by us) and no later download will reuse it.
        """
        removed = 0
        for path in _iter_files(self.folder(repo_id) / "blobs"):
            if not path.name.endswith(INCOMPLETE_SUFFIX):
                continue
            etag = path.name.split(".", 1)[0]
            with _lock_if_free(self.locks_folder(repo_id) / f"{etag}.lock") as free:
                if free:
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            logger.info("removed %d orphaned temporary file(s) of %s", removed, repo_id)
        return removed

    def delete(self, repo_id: str, revision: str | None) -> int | None:
        """Delete one revision, or the whole model when ``revision`` is None.

        A revision that a download worker of another process holds is never deleted
        (``RevisionBusy``). Plan first, then execute: the plan lists every path to remove and checks that each one,
        links resolved, lies inside the model's own folder; a planted link that leads outside
        raises ``UnsafeCachePath`` before anything is removed. Blobs still used by another cached
        revision are kept. Returns the bytes freed, or None when nothing of it was cached.
        """
        folder = self.folder(repo_id)
        if not folder.is_dir() or folder.is_symlink():
            return None
        busy = [
            p.name.split(".", 1)[0]
            for p in _iter_files(self.locks_folder(repo_id))
            if p.name.endswith(".download.lock")
            and self.revision_busy(repo_id, p.name.split(".", 1)[0])
        ]
        if busy and (revision is None or self.resolve_commit(repo_id, revision) in busy):
            raise RevisionBusy(repo_id, busy[0])
        if revision is None:
            return self._delete_folder(repo_id, folder)
        commit = self.resolve_commit(repo_id, revision)
        if commit is None:
            return None
        return self._delete_revision(repo_id, folder, commit)

    def _delete_folder(self, repo_id: str, folder: Path) -> int:
        freed = sum(st.st_size for _, st in _iter_stats(folder))
        shared = self._shared_targets(folder / "blobs")
        # rmtree removes links, never what they point to.
        shutil.rmtree(folder)
        shutil.rmtree(self.locks_folder(repo_id), ignore_errors=True)
        return freed + self._sweep(shared)

    def _shared_targets(self, blobs: Path) -> set[Path]:
        """The shared-store blobs the links among these blobs lead to."""
        found = set()
        for path, _ in _iter_stats(blobs, links_too=True):
            target = shared_blob_target(path, self.root)
            if target is not None:
                found.add(target)
        return found

    def _sweep(self, shared: set[Path]) -> int:
        """Collect the shared blobs no repo links any more (the library checks, under its lock,
        every reference its manifest lists); return the bytes freed."""
        return sum(sweep_shared_blob(target, cache_dir=self.root) for target in shared)

    def _delete_revision(self, repo_id: str, folder: Path, commit: str) -> int | None:
        snapshots = folder / "snapshots"
        snapshot = snapshots / commit
        tree_file = folder / "trees" / f"{commit}.json"
        if not snapshot.is_dir() and not tree_file.exists():
            return None
        real_folder = folder.resolve()
        blobs_dir = (folder / "blobs").resolve()

        def blobs_of(snap: Path) -> set[Path]:
            """The blobs (``<folder>/blobs/<name>``) a snapshot's links use; raises UnsafeCachePath
            for a link that leads anywhere but into the model's folder or, through the model's
            own ``blobs/`` entry, into the library's shared store."""
            found = set()
            for rel in _relative_files(snap):
                target = (snap / rel).resolve()
                if target.is_relative_to(real_folder):
                    if target.parent == blobs_dir:
                        found.add(folder / "blobs" / target.name)
                    continue
                blob = self._blob_behind(repo_id, snap / rel)
                shared = shared_blob_target(blob, self.root) if blob is not None else None
                if blob is None or shared is None or shared.resolve() != target:
                    raise UnsafeCachePath(repo_id)
                found.add(blob)
            return found

        doomed = blobs_of(snapshot) if snapshot.is_dir() else set()
        others = [p for p in _iter_dirs(snapshots) if p.name != commit]
        for other in others:
            doomed -= blobs_of(other)
        if not others:
            return self._delete_folder(repo_id, folder)  # the last revision: the whole model
        freed = sum(p.lstat().st_size for p in doomed if p.exists() and not p.is_symlink())
        shared = {t for p in doomed if (t := shared_blob_target(p, self.root)) is not None}
        # Execute.
        if snapshot.is_dir():
            shutil.rmtree(snapshot)
        for blob in doomed:
            blob.unlink(missing_ok=True)
        freed += self._sweep(shared)
        tree_file.unlink(missing_ok=True)
        shutil.rmtree(folder / ".no_exist" / commit, ignore_errors=True)
        for ref, target in self._refs(folder).items():
            if target == commit:
                (folder / "refs" / ref).unlink(missing_ok=True)
        return freed


def missing_files(tree: dict[str, TreeEntry], size_of: Callable[[str], int | None]) -> list[str]:
    """Files of the list that are absent or of the wrong size (``size_of`` gives None if absent)."""
    return [rel for rel, entry in tree.items() if size_of(rel) != entry.size]


def _state_from_links(
    tree: dict[str, TreeEntry],
    snapshot: Path,
    linked: dict[str, str | None],
    blob_sizes: dict[str, int],
) -> CacheState:
    """Completeness from what a directory walk already found: the blob each link names, sized."""

    def present(rel: str) -> int | None:
        name = linked.get(rel)
        return blob_sizes.get(name) if name else _size_of(snapshot / rel)

    return CacheState.PARTIAL if missing_files(tree, present) else CacheState.COMPLETE


_HASH_CHUNK = 8 * 1024 * 1024


def content_matches(path: Path, etag: str, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Whether the file's content hashes to ``etag``: sha256 for a 64-hex ETag (LFS/Xet files),
    the git blob id (sha1 of ``blob <size>\\0`` + content) for a 40-hex one (regular files)."""
    etag = etag.lower()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False  # gone (another process sharing the cache discarded it): not a match
    if len(etag) == 64:
        digest = hashlib.sha256()
    elif len(etag) == 40:
        digest = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    else:
        return False  # not an ETag the Hub serves: cannot be vouched for
    try:
        source = path.open("rb")
    except FileNotFoundError:
        return False
    with source:
        while chunk := source.read(_HASH_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest() == etag


def _has_content(folder: Path) -> bool:
    """Any blob (complete or temporary) or snapshot entry: a trace of the model's content."""
    return any(_iter_files(folder / "blobs")) or any(_iter_files(folder / "snapshots"))


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size  # follows the snapshot link to its blob
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None
        raise


def _blob_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None  # a regular file (copied, not linked): sized directly


def _relative_files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in _iter_files(root)]


def _iter_files(root: Path) -> Iterator[Path]:
    """Files and links under ``root``, without following links to folders."""
    for path, _ in _iter_stats(root, follow=False, links_too=True):
        yield path


def _iter_stats(
    root: Path, *, follow: bool = False, links_too: bool = False
) -> Iterator[tuple[Path, os.stat_result]]:
    """(path, lstat) of the regular files under ``root`` (and links when ``links_too``)."""
    try:
        with os.scandir(root) as scan:
            entries = list(scan)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=follow):
                yield from _iter_stats(Path(entry.path), follow=follow, links_too=links_too)
            elif entry.is_file(follow_symlinks=False) or (links_too and entry.is_symlink()):
                yield Path(entry.path), entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we walked


def _iter_dirs(root: Path) -> Iterator[Path]:
    try:
        with os.scandir(root) as entries:
            dirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return
    yield from dirs


@contextlib.contextmanager
def _lock_if_free(lock_path: Path) -> Iterator[bool]:
    """Hold ``lock_path`` (the hub client's flock) if nobody does; yield whether we got it."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        yield True  # no lock file: no process ever locked this blob here
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
