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
import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from api import logfmt
from api.models.anchored import Folder, KeepsChanging, LinkInTheWay, held, resolve_link
from api.models.backend import (
    EVERYTHING,
    CachedRevision,
    CacheState,
    DownloadPlan,
    FileSelection,
    FilesPreset,
    LocalState,
    RemoteFile,
    VerifyReport,
)
from api.models.hub import selection as selecting
from api.models.hub._compat import shared_blob_target
from api.models.hub.guard import (
    COMMIT_ID,
    GIT_OR_SHA256,
    SHA256,
    UntrustedAnswer,
    check_plan,
    path_problem,
)
from api.models.hub.hashing import descriptor_matches
from api.models.hub.index import CacheIndex
from api.models.hub.records import RevisionRecords, journal_note, name_some

logger = logging.getLogger(__name__)

TREE_FORMAT_VERSION = 1
NO_TREE_NOTE = (
    "the cache holds no file list of this revision (it was put there file by file, by another"
    " tool), so whether every file is here is not known; POST /api/models/download checks it"
    " against the Hub and fetches only what is missing"
)
INCOMPLETE_SUFFIX = ".incomplete"
# A large file fetched by parallel ranges (``ranged.py``): its partial content, kept across
# attempts, and the record of how far each part got, beside the blob's lock.
RANGED_SUFFIX = ".ranged" + INCOMPLETE_SUFFIX
RECORD_SUFFIX = ".ranged.json"


MAX_TREE_BYTES = 256 * 1024 * 1024  # 100,000 files (``MODELS_MAX_REPO_FILES``) of long paths


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
    """One cache folder: where each model lives, and its state. ``default``: the selection of a
    revision no download of the service recorded one for (``MODELS_DEFAULT_FILES``)."""

    def __init__(self, root: Path, default: FileSelection = EVERYTHING, watch: bool = True) -> None:
        self.root = root
        self.default = default
        self.records = RevisionRecords(self.locks_of)
        self._anchor: Folder | None = None
        self._anchor_lock = threading.Lock()
        # The last walk of each model folder, while unchanged (``watch``: told by the kernel).
        self.index = CacheIndex(root, watch=watch)

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_folder_name(repo_id)

    def locks_folder(self, repo_id: str) -> Path:
        return self.root / ".locks" / repo_folder_name(repo_id)

    # -- anchored access (``api.models.anchored``): every write and removal goes this way ----

    def anchor(self, create: bool = False) -> Folder | None:
        """The cache's root folder: opened once, and again only when the configured path names
        another folder now (an operator replaced the cache); a descriptor of the caller's own,
        to close. None when the cache does not exist (unless ``create``)."""
        with self._anchor_lock:
            current = self._anchor
            if current is not None:
                try:
                    if not os.path.samestat(os.stat(self.root), os.fstat(current.fd)):
                        current = None
                except OSError:
                    current = None
            if current is None:
                fresh = Folder.anchor(self.root, create=create)
                if fresh is None:
                    return None
                if self._anchor is not None:
                    logfmt.log(logger, logging.INFO, "cache_reopened", path=self.root)
                    self._anchor.close()  # callers hold descriptors of their own
                self._anchor = current = fresh
            return current.dup()

    @contextlib.contextmanager
    def opened(
        self, *names: str, create: bool = False, mend: bool = False
    ) -> Iterator[Folder | None]:
        """The folder ``names`` below the cache's root, reached without following a link (a link
        on the way raises ``LinkInTheWay``; with ``mend`` it is replaced by a folder); None when
        absent (unless ``create``)."""
        root = self.anchor(create=create)
        if root is None:
            yield None
            return
        with root:
            found = root.walk(*names, create=create, mend=mend)
        if found is None:
            yield None
            return
        with found:
            yield found

    def model_folder(
        self, repo_id: str, *names: str, create: bool = False
    ) -> AbstractContextManager[Folder | None]:
        """The model's folder (or ``names`` below it), as ``opened``."""
        return self.opened(repo_folder_name(repo_id), *names, create=create)

    def locks_of(self, repo_id: str, create: bool = False) -> AbstractContextManager[Folder | None]:
        """The model's folder under ``.locks``: the library's locks and the service's records. It
        holds folders of the cache's own only: a link found in its place is replaced when it is
        made (``mend``), never followed."""
        return self.opened(".locks", repo_folder_name(repo_id), create=create, mend=create)

    # -- reading -----------------------------------------------------------------------------

    def resolve_commit(self, repo_id: str, revision: str) -> str | None:
        """The commit of a revision from the cache alone: the id itself, or the ref's content."""
        if COMMIT_ID.fullmatch(revision):
            return revision
        try:
            commit = (self.folder(repo_id) / "refs" / revision).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return commit if COMMIT_ID.fullmatch(commit) else None

    def read_tree(self, repo_id: str, commit: str) -> dict[str, TreeEntry] | None:
        """The revision's file list as the hub client cached it (``trees/<commit>.json``), or None."""
        with self._trees_of(repo_id) as trees:
            return self._tree_in(trees, repo_id, commit)

    @contextlib.contextmanager
    def _trees_of(self, repo_id: str) -> Iterator[Folder | None]:
        """The model's ``trees/``, opened once for the reads of all its revisions; a link in its
        place counts as no file list (never followed), with a warning."""
        with contextlib.ExitStack() as stack:
            trees: Folder | None = None
            try:  # the opening only: what the caller's block raises is the caller's
                trees = stack.enter_context(self.model_folder(repo_id, "trees"))
            except LinkInTheWay as link:
                logfmt.log(logger, logging.WARNING, "file_lists_ignored", repo=repo_id, reason=link)
            yield trees

    def _tree_in(
        self, trees: Folder | None, repo_id: str, commit: str
    ) -> dict[str, TreeEntry] | None:
        """``read_tree`` from the model's ``trees/`` already open."""
        path = self.folder(repo_id) / "trees" / f"{commit}.json"  # for messages only
        if trees is None or not COMMIT_ID.fullmatch(commit):
            return None
        try:
            raw = trees.read(f"{commit}.json", MAX_TREE_BYTES)
            if raw is None:
                return None
            data = json.loads(raw.decode("utf-8"))
            if data.get("format_version") != TREE_FORMAT_VERSION:
                return None
            tree = {
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
            logfmt.log(logger, logging.WARNING, "file_list_ignored", path=path, reason=error)
            return None
        # The file is in the cache, which other tools and users write too: a path or an id that
        # could lead outside the snapshot makes the whole list untrusted (the rule a plan from
        # the Hub passes).
        files = tuple(RemoteFile(rel, entry.size, entry.etag) for rel, entry in tree.items())
        try:
            check_plan(DownloadPlan(commit, files))
        except UntrustedAnswer as problem:
            logfmt.log(logger, logging.WARNING, "file_list_ignored", path=path, reason=problem)
            return None
        return tree

    def local_state(
        self, repo_id: str, revision: str, asked: FileSelection | None = None
    ) -> LocalState:
        """The state of one revision for the selection ``asked`` (None: the recorded one, else
        the default): the very entry ``list_cached`` gives for it, so that status and list cannot
        disagree. Its ``selections``: the one asked (its preset completed as it was applied),
        else those recorded (none: the default)."""
        applied = self._selections(asked, ()) if asked is not None else ()
        if not self.folder(repo_id).is_dir():
            return LocalState(CacheState.ABSENT, selections=applied)
        commit = self.resolve_commit(repo_id, revision)
        try:
            revisions = self._revisions_of(repo_id, asked)
        except (OSError, ValueError) as error:
            revisions = [_unreadable(repo_id, error, commit)]
        for found in revisions:
            if found.commit == commit:
                return LocalState(found.state, commit, found.note, applied or found.selections)
        return LocalState(CacheState.ABSENT, commit, selections=applied)

    # -- the selection each revision was downloaded with -------------------------------------

    def selections_for(
        self,
        repo_id: str,
        commit: str,
        asked: FileSelection | None,
        revision: str | None = None,
    ) -> tuple[FileSelection, ...]:
        """What a status or a download of the revision is for: ``asked``, else the recorded
        selections, else (a branch that moved: its update) those of the revision the branch
        points at in the cache, else the default."""
        recorded = () if asked is not None else self.records.read_selections(repo_id, commit)
        if not recorded and asked is None and revision is not None:
            serving = self.resolve_commit(repo_id, revision)
            if serving is not None and serving != commit:
                recorded = self.records.read_selections(repo_id, serving)
        return self._selections(asked, recorded)

    @contextlib.contextmanager
    def hold_revision(self, repo_id: str, commit: str) -> Iterator[None]:
        """Held (shared) by every download worker of the revision, from its first byte to its
        verification; the kernel releases it when the worker dies, however it dies."""
        with self.locks_of(repo_id, True) as locks:
            assert locks is not None  # made when absent
            with locks.flock(f"{commit}.download.lock", exclusive=False):
                _touch(locks)  # the index (``CacheIndex``): the model is being downloaded
                try:
                    yield
                finally:
                    _touch(locks)

    def revision_busy(self, repo_id: str, commit: str) -> bool:
        """Whether a download worker (of any process sharing the cache) holds the revision.
        Raises ``LinkInTheWay`` when a link stands in the way of its lock (never followed: the
        answer cannot be known)."""
        with self.locks_of(repo_id) as locks:
            if locks is None:
                return False
            return not locks.lock_free(f"{commit}.download.lock")

    def missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        """Bytes of the plan's wanted files whose blob is not yet complete in the cache."""
        blobs = self.folder(repo_id) / "blobs"
        return sum(f.size for f in plan.wanted if _size_of(blobs / f.etag) != f.size)

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        """Record that ``revision`` (a branch or tag) points at ``commit``, atomically and
        durably (the branch's switch). A link in the way raises ``LinkInTheWay``."""
        if COMMIT_ID.fullmatch(revision) or not COMMIT_ID.fullmatch(commit):
            return
        *parents, name = revision.split("/")
        with self.model_folder(repo_id, "refs", *parents, create=True) as refs:
            assert refs is not None  # made when absent
            refs.write_atomic(name, commit.encode(), mode=0o664)

    def drop_tree_unless(self, repo_id: str, plan: DownloadPlan) -> None:
        """Remove the revision's cached file list when it is not the plan's (the files, their
        sizes and ETags): the library would download by it. One that cannot be read goes too."""
        tree = self.read_tree(repo_id, plan.commit)
        listed = {f.path: (f.size, f.etag) for f in plan.files}
        if tree is not None and {r: (e.size, e.etag) for r, e in tree.items()} == listed:
            return
        with self.model_folder(repo_id, "trees") as trees:
            if trees is not None and trees.unlink(f"{plan.commit}.json"):
                logfmt.log(
                    logger,
                    logging.WARNING,
                    "file_list_dropped",
                    repo=repo_id,
                    commit=plan.commit,
                    reason="the cached file list is not the one the Hub gave for the commit",
                )

    def discard_file(self, repo_id: str, commit: str, rel: str) -> None:
        """Remove a file of a revision and its blob (a checksum mismatch), so it is fetched again.

        A blob in the shared store goes too: its content is wrong for every repo that links it,
        and left there the library would link it again instead of downloading. Each goes by its
        name in its own folder, reached without following a link; a link that leads anywhere
        else is removed itself, and nothing behind it.
        """
        if path_problem(rel) is not None or not COMMIT_ID.fullmatch(commit):
            raise ValueError("not a path inside a snapshot")  # the callers check it first
        folder = repo_folder_name(repo_id)
        *dirs, leaf = rel.split("/")
        root = self.anchor()
        if root is None:
            return
        with root:
            at = (folder, "snapshots", commit, *dirs)
            snapshot = root.walk(*at)
            if snapshot is None:
                return
            with snapshot:
                target = snapshot.readlink(leaf)
                blob = resolve_link(at, target, str(self.root)) if target is not None else None
                if blob is not None and blob[:2] == (folder, "blobs") and len(blob) == 3:
                    with held(root.walk(folder, "blobs")) as blobs:
                        assert blobs is not None
                        shared = _shared_hash(blobs, blob[2], folder, str(self.root))
                        if shared is not None:
                            with held(root.walk("blobs", shared[:2])) as store:
                                if store is not None:
                                    store.unlink(shared)
                        blobs.unlink(blob[2])
                snapshot.unlink(leaf)

    def open_content(
        self, repo_id: str, commit: str, path: str, blob_only: bool = False
    ) -> int | None:
        """A descriptor (read-only) of the content behind ``path`` of the revision ``commit``,
        or None. The snapshot's entry is followed through at most the links the library makes,
        each by its text and opened ``O_NOFOLLOW`` from its own folder: to the model's
        ``blobs/<name>``, and from there into the shared store (``blobs/<xx>/<hash>``). A link
        that leads anywhere else is not followed (None): never a file outside the cache.
        ``blob_only`` (a fleet's peer): only a link to a blob named by an ETag, never a copy in
        the snapshot. A blob is only ever renamed into place complete."""
        if path_problem(path) is not None or not COMMIT_ID.fullmatch(commit):
            return None
        folder = repo_folder_name(repo_id)
        *dirs, leaf = path.split("/")
        at = (folder, "snapshots", commit, *dirs)
        root = self.anchor()
        if root is None:
            return None
        with root:
            try:
                snapshot = root.walk(*at)
                if snapshot is None:
                    return None
                with snapshot:
                    target = snapshot.readlink(leaf)
                    if target is None:
                        return None if blob_only else snapshot.open(leaf)
                blob = resolve_link(at, target, str(self.root))
                if blob is None or blob[:2] != (folder, "blobs") or len(blob) != 3:
                    return None
                if blob_only and not GIT_OR_SHA256.fullmatch(blob[2]):
                    return None
                return self._open_blob(root, folder, blob[2])
            except (LinkInTheWay, FileNotFoundError, NotADirectoryError):
                return None

    def open_blob(self, repo_id: str, etag: str) -> int | None:
        """A descriptor (read-only) of the model's complete blob named ``etag`` (a git or sha256
        id), through the library's link into the shared store when it is one; None when it is not
        there. A fleet's peer serves a blob by the ETag its asker names, before the snapshot links
        to it: a blob is only ever renamed into place complete, and the asker checks the bytes."""
        if not GIT_OR_SHA256.fullmatch(etag):
            return None
        root = self.anchor()
        if root is None:
            return None
        with root:
            try:
                return self._open_blob(root, repo_folder_name(repo_id), etag)
            except (LinkInTheWay, FileNotFoundError, NotADirectoryError):
                return None

    def _open_blob(self, root: Folder, folder: str, name: str) -> int | None:
        with held(root.walk(folder, "blobs")) as blobs:
            if blobs is None:
                return None
            if blobs.readlink(name) is None:
                return blobs.open(name)
            shared = _shared_hash(blobs, name, folder, str(self.root))
        if shared is None:
            return None
        with held(root.walk("blobs", shared[:2])) as store:
            return store.open(shared) if store is not None else None

    def open_partial(self, repo_id: str, etag: str) -> int | None:
        """A descriptor (read-only) of the blob ``etag`` that the ranged path is writing now
        (``blobs/<etag>.ranged.incomplete``), or None. Its record (``ranged.Record``, under the
        model's ``.locks``) says which bytes are written."""
        if not GIT_OR_SHA256.fullmatch(etag):
            return None
        with self.model_folder(repo_id, "blobs") as blobs:
            if blobs is None:
                return None
            try:
                return blobs.open(f"{etag}{RANGED_SUFFIX}")
            except (LinkInTheWay, FileNotFoundError, NotADirectoryError):
                return None

    def verify(
        self, repo_id: str, revision: str, on_bytes: Callable[[int], None] | None = None
    ) -> VerifyReport | None:
        """Hash every file of a cached revision and compare it with its ETag, offline.

        The files are those of the revision's selection (recorded, else the default); the
        expected ETag comes from the revision's file list. A blob's name is its ETag too, so a
        revision without a file list is checked against the names of the blobs it links to.
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
            wanted = self._wanted(tree, None, self.records.read_selections(repo_id, commit)).paths
            expected = {rel: entry.etag for rel, entry in tree.items() if rel in wanted}
        missing, mismatched = [], []
        for rel, etag in sorted(expected.items()):
            path = snapshot / rel
            if _size_of(path) is None:
                missing.append(rel)
                continue
            # Hashed through what the snapshot's links lead to inside the cache only: a link
            # that leads elsewhere is not vouched for (a mismatch), and never read.
            fd = self.open_content(repo_id, commit, rel)
            if fd is None or not descriptor_matches(fd, etag, on_bytes):
                mismatched.append(rel)
        self._record_verification(repo_id, commit, missing, mismatched)
        return VerifyReport(
            commit=commit,
            files_checked=len(expected) - len(missing),
            missing=tuple(missing),
            mismatched=tuple(mismatched),
        )

    def _record_verification(
        self, repo_id: str, commit: str, missing: list[str], mismatched: list[str]
    ) -> None:
        """Bad files go into the journal (status says PARTIAL and names them; a download fetches
        them first); a clean result clears it. A cache that cannot be written keeps its journal
        as it is: the answer of the verification itself is what counts then."""
        try:
            if missing or mismatched:
                counts = [f"{len(mismatched)} mismatched"] if mismatched else []
                counts += [f"{len(missing)} missing"] if missing else []
                reason = f"verification found {' and '.join(counts)} file(s)"
                self.records.mark_unverified(repo_id, commit, reason, missing + mismatched)
            elif not self.revision_busy(repo_id, commit):
                self.records.clear_unverified(repo_id, commit)  # every file checked good: verified
        except OSError as error:
            logfmt.log(
                logger, logging.WARNING, "verification_not_recorded", repo=repo_id, reason=error
            )

    @staticmethod
    def _state_without_tree(snapshot: Path) -> CacheState:
        """No file list (the revision was put in the cache file by file: ``hf_hub_download``,
        transformers' ``from_pretrained``, an older client): whether every file of the revision
        is here cannot be known offline, so it is never COMPLETE (``NO_TREE_NOTE`` says why)."""
        if not snapshot.is_dir():
            return CacheState.ABSENT
        return CacheState.PARTIAL

    def list_cached(self, repo_id: str | None = None) -> list[CachedRevision]:
        """Every model revision in the cache (of ``repo_id`` only, when given), with its state and
        size on disk."""
        out: list[CachedRevision] = []
        if not self.root.is_dir():
            return out
        generation = self.index.begin()
        if repo_id is None:
            kept = self.index.answer(generation)
            if kept is not None:
                return list(kept)  # no change since the last list, which saw every folder
        with os.scandir(self.root) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        present: set[str] = set()
        watched = True
        for entry in entries:
            found = repo_id_from_folder(entry.name)
            if found is None or not entry.is_dir(follow_symlinks=False):
                continue
            if repo_id is not None and found != repo_id:
                continue
            present.add(entry.name)
            try:
                revisions, told = self.index.revisions(
                    entry.name, partial(self._revisions_of, found)
                )
            except (OSError, ValueError) as error:
                # One model's folder that cannot be read must not hide the others.
                out.append(_unreadable(found, error))
                watched = False
            else:
                out.extend(revisions)
                watched = watched and told
        if repo_id is None:
            self.index.keep_only(present)
            if watched:
                self.index.keep_answer(generation, out)
        return out

    def revision_at(self, path: str) -> tuple[str, str] | None:
        """The (repo id, commit) whose snapshot folder holds ``path`` (an absolute path, as a vLLM
        server names what it loaded: the snapshot folder, or a file in it), or None. The path is
        taken as written and, when it exists here, with its links resolved (a folder linked to a
        snapshot)."""
        if not os.path.isabs(path) or "\x00" in path:
            return None
        roots = {self.root, Path(os.path.realpath(self.root))}
        for candidate in {Path(os.path.normpath(path)), Path(os.path.realpath(path))}:
            for root in roots:
                if not candidate.is_relative_to(root):
                    continue
                parts = candidate.relative_to(root).parts
                if len(parts) < 3 or parts[1] != "snapshots" or not COMMIT_ID.fullmatch(parts[2]):
                    continue
                repo_id = repo_id_from_folder(parts[0])
                if repo_id is not None:
                    return repo_id, parts[2]
        return None

    def _wanted(
        self,
        tree: dict[str, TreeEntry],
        asked: FileSelection | None,
        recorded: tuple[FileSelection, ...],
    ) -> selecting.Resolved:
        """The files of the revision a status answers for (``selections_for``)."""
        files = [RemoteFile(rel, entry.size, entry.etag) for rel, entry in tree.items()]
        return selecting.resolve_all(self._selections(asked, recorded), files)

    def _selections(
        self, asked: FileSelection | None, recorded: tuple[FileSelection, ...]
    ) -> tuple[FileSelection, ...]:
        if asked is not None:
            return (asked.or_preset(self.default.preset or FilesPreset.ALL),)
        return recorded or (self.default,)

    def _revisions_of(
        self, repo_id: str, asked: FileSelection | None = None
    ) -> list[CachedRevision]:
        """Every revision of one model found in the cache, and its state: the one rule behind
        both status and list. A revision is known by its snapshot folder or its file list; it is
        COMPLETE when every selected file (``asked``, else the recorded selection, else the
        default) is there with its size, no temporary file of their blobs remains and no
        verification is pending (the journal); BUSY while a download worker holds it; not listed
        at all when nothing of its content is here (a failed start)."""
        folder = self.folder(repo_id)
        refs = self._refs(folder)
        blob_sizes, temp_blobs = self._blob_sizes(folder / "blobs")
        snapshots = folder / "snapshots"
        commits = {p.name for p in _iter_dirs(snapshots) if COMMIT_ID.fullmatch(p.name)}
        for path in _iter_files(folder / "trees"):
            if path.suffix == ".json" and COMMIT_ID.fullmatch(path.stem):
                commits.add(path.stem)
        # The model's file lists and records are read for every revision: their folders are
        # opened once (each open walks from the root; four walks a revision made a list of
        # 10,000 models 1.4 x slower). A link in place of the locks folder is raised, as
        # ``revision_busy`` does: the model is then unreadable, never read through it.
        with self._trees_of(repo_id) as trees, self.locks_of(repo_id) as locks:
            return self._revisions_in(
                repo_id, asked, refs, blob_sizes, temp_blobs, commits, trees, locks
            )

    def _revisions_in(
        self,
        repo_id: str,
        asked: FileSelection | None,
        refs: dict[str, str],
        blob_sizes: dict[str, int],
        temp_blobs: set[str],
        commits: set[str],
        trees: Folder | None,
        locks: Folder | None,
    ) -> list[CachedRevision]:
        """``_revisions_of`` with the model's folders read and opened."""
        folder = self.folder(repo_id)
        snapshots = folder / "snapshots"
        revisions = []
        holds: list[set[str]] = []  # the blobs of each revision, in the order of ``revisions``
        for commit in sorted(commits):
            snapshot = snapshots / commit
            tree = self._tree_in(trees, repo_id, commit)
            linked = {rel: _blob_name(snapshot / rel) for rel in _relative_files(snapshot)}
            size = sum(blob_sizes.get(name or "", 0) for name in set(linked.values()))
            etags = {e.etag for e in tree.values()} if tree is not None else set()
            note = None
            recorded = self.records.selections_in(locks, commit)
            if locks is not None and not locks.lock_free(f"{commit}.download.lock"):
                state = CacheState.BUSY
            elif not linked and not (etags & (blob_sizes.keys() | temp_blobs)):
                continue  # only metadata (a ref, a file list): nothing of the model itself
            elif tree is None:
                state = self._state_without_tree(snapshot)
                note = NO_TREE_NOTE
            else:
                wanted = self._wanted(tree, asked, recorded)
                selected = {rel: e for rel, e in tree.items() if rel in wanted.paths}
                # Completeness from what the walk already found: the blob each link names.
                missing = missing_files(selected, _presence(snapshot, linked, blob_sizes))
                state = CacheState.PARTIAL if missing else CacheState.COMPLETE
                if missing and asked is not None:
                    # Asked for these files: say which are not here (the usual case: a wider
                    # selection than the revision was downloaded with).
                    note = (
                        f"{len(missing)} of the {len(selected)} files selected are not in the"
                        f" cache: {name_some(sorted(missing))}; POST /api/models/download with the"
                        " same selection fetches them"
                    )
                if (
                    state is CacheState.COMPLETE
                    and {e.etag for e in selected.values()} & temp_blobs
                ):
                    state = CacheState.PARTIAL  # a download of one of its blobs ran, or died
                if wanted.problem is not None:
                    note = wanted.problem
                    if state is CacheState.COMPLETE:
                        state = CacheState.PARTIAL
                if not linked:
                    size = sum(blob_sizes.get(etag, 0) for etag in etags)
            if state is not CacheState.BUSY:
                pending = self.records.unverified_in(locks, repo_id, commit)
                if pending is not None:
                    state = CacheState.PARTIAL
                    note = journal_note(*pending)
            names = tuple(sorted(ref for ref, c in refs.items() if c == commit))
            revisions.append(CachedRevision(repo_id, commit, state, size, names, note, recorded))
            blobs = {name for name in linked.values() if name} if linked else set(etags)
            holds.append(blobs & blob_sizes.keys())
        together = sum(blob_sizes[name] for name in set().union(*holds))
        for i, blobs in enumerate(holds):
            others = set().union(*(b for j, b in enumerate(holds) if j != i))
            unique = sum(blob_sizes[name] for name in blobs - others)
            revisions[i] = dataclasses.replace(
                revisions[i], unique_bytes=unique, model_bytes=together
            )
        if not revisions and (any(_iter_files(folder / "blobs")) or temp_blobs):
            # A download that stopped before its first file: the model is there only in part.
            trace = sum(st.st_size for _, st in _iter_stats(folder / "blobs"))
            known = refs.get("main") or next(iter(refs.values()), None)
            revisions.append(CachedRevision(repo_id, known, CacheState.PARTIAL, trace, ()))
        return revisions

    def _blob_sizes(self, blobs: Path) -> tuple[dict[str, int], set[str]]:
        """Size of each complete blob of a model, by name (a link into the shared store counts
        with the size of the blob it shares), and the names of blobs with a temporary file."""
        sizes = {}
        temporary = set()
        for path, st in _iter_stats(blobs, links_too=True):
            if path.name.endswith(INCOMPLETE_SUFFIX):
                temporary.add(blob_name(path.name))
                continue
            if stat.S_ISLNK(st.st_mode):
                shared = shared_blob_target(path, self.root)
                if shared is None:
                    continue
                with contextlib.suppress(OSError):
                    sizes[path.name] = shared.stat().st_size
            else:
                sizes[path.name] = st.st_size
        return sizes, temporary

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

    @contextlib.contextmanager
    def _blobs_and_locks(self, repo_id: str) -> Iterator[tuple[Folder | None, Folder | None]]:
        """The model's ``blobs/`` and its folder under ``.locks``, each None when absent (or when
        a link stands in its place: never followed, and nothing is removed through it)."""
        with contextlib.ExitStack() as stack:
            found: list[Folder | None] = []
            openers = (self.model_folder(repo_id, "blobs"), self.locks_of(repo_id))
            for opener in openers:
                try:
                    found.append(stack.enter_context(opener))
                except LinkInTheWay as error:
                    logfmt.log(
                        logger, logging.WARNING, "link_not_followed", repo=repo_id, path=error.where
                    )
                    found.append(None)
            yield found[0], found[1]

    def remove_orphans(self, repo_id: str) -> int:
        """Remove temporary files no live process is writing; return how many were removed.

        A download holds ``.locks/<folder>/<etag>.lock`` while it writes ``blobs/<etag>.*.incomplete``;
        when that lock can be taken without waiting, the file belongs to a dead process (killed, or
        cancelled by us) and no later download will reuse it.
        """
        removed = 0
        with self._blobs_and_locks(repo_id) as (blobs, locks):
            if blobs is None:
                return 0
            names = {entry.name for entry in blobs.names()}
            records = {entry.name for entry in locks.names()} if locks is not None else set()
            for name in sorted(names):
                if not name.endswith(INCOMPLETE_SUFFIX):
                    continue
                etag = blob_name(name)
                if (
                    name.endswith(RANGED_SUFFIX)
                    and f"{etag}{RECORD_SUFFIX}" in records
                    and etag not in names
                ):
                    continue  # the parts received so far: the next attempt goes on from them
                # (beside its complete blob, a partial file is of no use: it goes, and its record)
                if lock_free(locks, f"{etag}.lock") and blobs.unlink(name):
                    removed += 1
            if locks is not None:
                for record in sorted(records):
                    etag = record.removesuffix(RECORD_SUFFIX)
                    if (
                        record.endswith(RECORD_SUFFIX)
                        and blobs.lstat(f"{etag}{RANGED_SUFFIX}") is None
                    ):
                        locks.unlink(record)  # of a partial file that is gone
        if removed:
            logfmt.log(logger, logging.INFO, "orphans_removed", repo=repo_id, count=removed)
        return removed

    def discard_ranged(self, repo_id: str) -> int:
        """Remove what ranged downloads of the model kept for their next attempt (the partial
        files and their records) where no process is writing: a user's cancel takes everything
        with it. Returns how many files were removed."""
        removed = 0
        with self._blobs_and_locks(repo_id) as (blobs, locks):
            if locks is None:
                return 0
            for entry in locks.names():
                if not entry.name.endswith(RECORD_SUFFIX):
                    continue
                etag = entry.name.removesuffix(RECORD_SUFFIX)
                if lock_free(locks, f"{etag}.lock"):
                    if blobs is not None:
                        blobs.unlink(f"{etag}{RANGED_SUFFIX}")
                    locks.unlink(entry.name)
                    removed += 1
        return removed

    def tidy(self, repo_id: str) -> bool:
        """After a download that ended without its revision (a cancel, a failure), the model's
        folder as ``scan_cache_dir`` and ``hf cache ls`` read it without a warning: the library
        writes ``refs/<branch>`` before the first file, so a download stopped before its first
        file left a ref that names no snapshot, and no ``snapshots/`` (both "corrupted" to the
        library). A ref naming a commit that has no snapshot folder, and that no process is
        downloading, goes; the model's folder goes when nothing of it is left (no snapshot, no
        blob, no ref); when blobs stay (another revision's, or parts kept for a next attempt), an
        empty ``snapshots/`` is made. Through descriptors; a link found is never followed (the
        folder is then left as it is). Returns whether anything changed."""
        folder = repo_folder_name(repo_id)
        changed = False
        with self._blobs_and_locks(repo_id) as (blobs, locks):
            blob_names = [] if blobs is None else [e.name for e in blobs.names()]
            if any(
                name.endswith(INCOMPLETE_SUFFIX) and not lock_free(locks, f"{blob_name(name)}.lock")
                for name in blob_names
            ):
                return False  # a download (of any process) writes into the model now
        try:
            with self.model_folder(repo_id) as model:
                if model is None:
                    return False
                kept: set[str] = set()
                gone: set[str] = set()  # commits of which nothing is left
                with held(model.sub("snapshots")) as snapshots:
                    has_snapshots = snapshots is not None
                    for entry in [] if snapshots is None else snapshots.names():
                        assert snapshots is not None
                        if (
                            entry.is_dir(follow_symlinks=False)
                            and self._idle(repo_id, entry.name)
                            and snapshots.remove_empty(entry.name)  # only while empty
                        ):
                            gone.add(entry.name)  # a revision with no file of it
                        else:
                            kept.add(entry.name)
                left = 0
                with held(model.sub("refs")) as refs:
                    for entry in [] if refs is None else refs.names():
                        assert refs is not None
                        raw = (
                            refs.read(entry.name, 100)
                            if entry.is_file(follow_symlinks=False)
                            else None
                        )
                        commit = (raw or b"").decode("ascii", "replace").strip()
                        if commit not in kept and self._idle(repo_id, commit):
                            if refs.unlink(entry.name):
                                gone.add(commit)
                        else:
                            left += 1  # a ref of a snapshot, or refs/pr/...: not this rule's
                changed = bool(gone)
                if not kept and not blob_names and not left:
                    # Nothing of the model is left: its folder goes, piece by piece and each
                    # only while empty (what another process adds meanwhile stays), the file
                    # lists this service kept for the commits gone with it.
                    with held(model.sub("trees")) as trees:
                        for commit in gone if trees is not None else ():
                            assert trees is not None
                            trees.unlink(f"{commit}.json")
                    for name in ("trees", "refs", "blobs", "snapshots"):
                        model.remove_empty(name)
                    root = self.anchor()
                    if root is not None:
                        with root:
                            if root.remove_empty(folder):
                                return True
                elif has_snapshots:
                    return changed
                # Blobs stay (or something appeared meanwhile): a snapshots/ folder, even empty,
                # is what the library's scan needs.
                with held(model.sub("snapshots", create=True)):
                    return True
        except (LinkInTheWay, KeepsChanging) as error:
            logfmt.log(
                logger, logging.WARNING, "model_folder_not_tidied", repo=repo_id, reason=error
            )
            return changed

    def _idle(self, repo_id: str, commit: str) -> bool:
        """Whether ``commit`` is a commit id that no download (of any process) holds now."""
        return COMMIT_ID.fullmatch(commit) is not None and not self.revision_busy(repo_id, commit)

    def remove_all_orphans(self) -> int:
        """``remove_orphans`` for every model of the cache (at start-up: what a killed service
        left); a folder that cannot be read is skipped."""
        removed = 0
        root = self.anchor()
        if root is None:
            return 0
        with root:
            names = [e.name for e in root.names() if e.is_dir(follow_symlinks=False)]
        for name in names:
            repo_id = repo_id_from_folder(name)
            if repo_id is not None:
                with contextlib.suppress(OSError):
                    removed += self.remove_orphans(repo_id)
        return removed

    def refs(self, repo_id: str) -> dict[str, str]:
        return self._refs(self.folder(repo_id))


def _unreadable(repo_id: str, error: BaseException, commit: str | None = None) -> CachedRevision:
    """What the cache can say of a model folder it cannot read: PARTIAL, and why."""
    reason = type(error).__name__
    if isinstance(error, OSError) and error.errno is not None:
        reason = errno.errorcode.get(error.errno, str(error.errno))
    logfmt.log(logger, logging.WARNING, "cache_folder_unreadable", repo=repo_id, reason=error)
    note = f"the cache folder of {repo_id} cannot be read ({reason}); delete it or fix its files"
    return CachedRevision(repo_id, commit, CacheState.PARTIAL, 0, (), note)


def missing_files(tree: dict[str, TreeEntry], size_of: Callable[[str], int | None]) -> list[str]:
    """Files of the list that are absent or of the wrong size (``size_of`` gives None if absent)."""
    return [rel for rel, entry in tree.items() if size_of(rel) != entry.size]


def _presence(
    snapshot: Path, linked: dict[str, str | None], blob_sizes: dict[str, int]
) -> Callable[[str], int | None]:
    """The size of a file of the snapshot as found (None when absent)."""

    def present(rel: str) -> int | None:
        name = linked.get(rel)
        return blob_sizes.get(name) if name else _size_of(snapshot / rel)

    return present


def blob_name(file_name: str) -> str:
    """The blob (or commit) a file of ``blobs/`` or ``.locks/`` belongs to:
    ``<etag>.<random>.incomplete``, ``<etag>.lock``, ``<commit>.download.lock`` -> the part
    before the first dot."""
    return file_name.split(".", 1)[0]


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


def _touch(folder: Folder) -> None:
    """Set the folder's times to now (its change time with them), through its descriptor."""
    with contextlib.suppress(OSError):
        os.utime(folder.fd)


def _iter_dirs(root: Path) -> Iterator[Path]:
    try:
        with os.scandir(root) as entries:
            dirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return
    yield from dirs


def lock_free(locks: Folder | None, name: str) -> bool:
    """``Folder.lock_free`` of the lock ``name`` (the hub client's flock) of ``locks``, when
    something is to be removed in its name: an absent folder means nobody ever locked it; a link
    in its place, never opened, means it is not known to be free (nothing is removed)."""
    if locks is None:
        return True
    try:
        return locks.lock_free(name)
    except LinkInTheWay:
        return False


def _shared_hash(blobs: Folder, name: str, folder: str, root: str) -> str | None:
    """The Xet hash of the shared-store entry that the model's ``blobs/<name>`` links to, when it
    is the library's link (``../../blobs/<xx>/<hash>``, as its ``_shared_blob_target`` reads
    it: by its text), else None."""
    target = blobs.readlink(name)
    if target is None:
        return None
    at = resolve_link((folder, "blobs"), target, root)
    if (
        at is None
        or len(at) != 3
        or at[0] != "blobs"
        or not SHA256.fullmatch(at[2])
        or at[1] != at[2][:2]
    ):
        return None
    return at[2]
