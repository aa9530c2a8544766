"""Large files over plain HTTP as parallel byte ranges, resumable from what is on disk (issue 17).

In the download worker, before ``snapshot_download``: each wanted file of at least
``Ranges.min_bytes`` whose blob is not in the cache, and that the Hub serves over plain HTTP (not
Xet), is fetched here as parts of ``part_bytes`` over ``connections`` connections, into
``blobs/<etag>.ranged.incomplete`` (preallocated; each part written at its offset), under the
library's own blob lock (``.locks/<folder>/<etag>.lock``). A record beside the lock,
``<etag>.ranged.json``, says how many bytes of each part are written; it is rewritten at most every
``RECORD_INTERVAL`` seconds, so a kill -9 loses at most that much of the transfer. The content is
hashed in order while the parts arrive; a blob is renamed to ``blobs/<etag>`` only when it matches
its ETag, and the library then only links it into the snapshot: it stays the owner of refs,
snapshots and the file list.

The next attempt (after a failure, a SIGTERM, a kill -9, a restart of the service) finds the
partial file and its record, and fetches only the bytes the record does not have. A record for
another ETag of the same path (the file changed on the Hub) is dropped with its file: that file
starts over. A user's cancel removes both (``ModelCache.discard_ranged``).

Transfers use the standard library's ``http.client`` with ``readinto`` into one buffer per
connection: on this project's machine it moves a 1 GiB file over loopback about four times faster
than the library's HTTP client does (``planning/ranged-downloads.md``). What the library's client
does and this one must do too is done here: the file's metadata (ETag, size, where it is served
from) comes from the library's ``get_hf_file_metadata`` through the guarded client; the token is
sent only to the Hub's origin, never to a CDN a redirect names (the library's own rule,
``_is_same_or_hub_host``); every answer is checked (206, the exact ``Content-Range``, the length).
Where this path cannot do what the library does (a proxy in the environment, Xet, a server without
ranges, a redirect of a part), the file goes the library's way.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from huggingface_hub import get_hf_file_metadata, hf_hub_url

from api import logfmt
from api.models.anchored import Folder, LinkInTheWay
from api.models.backend import Peer, RemoteFile
from api.models.errors import DownloadFailed, FailureKind
from api.models.hub._compat import (
    build_hf_headers,
    is_xet_available,
    same_origin_or_hub,
    xet_disabled,
)
from api.models.hub.cache import RANGED_SUFFIX, RECORD_SUFFIX, lock_free
from api.models.hub.classify import RETRYABLE_STATUS
from api.models.hub.guard import Limits
from api.models.hub.hashing import new_digest
from api.models.hub.throttle import LIMITER

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
RECORD_INTERVAL = 0.25
MAX_RECORD_BYTES = 1024 * 1024
MAX_PARTS = 100_000  # 1.5 TiB in 16 MiB parts
PART_ATTEMPTS = 4  # per part, before the attempt fails (the service then retries the download)
# From a peer, one: a peer that fails hands over to the next source at once (the Hub last), which
# resumes what it wrote.
PEER_PART_ATTEMPTS = 1
# ``readinto`` fills the whole buffer before it returns: this is also the grain of the progress, of
# a kill's loss and of the stall watchdog's view (1 MiB measured no faster on loopback).
BUFFER = 256 * 1024
HASH_STEP = 8 * MiB


@dataclass(frozen=True)
class Ranges:
    """How large files are fetched: from ``min_bytes`` up, in parts of ``part_bytes``, over
    ``connections`` connections (``MODELS_RANGED_*``; ``connections`` 1 or ``min_bytes`` 0 turn
    the path off)."""

    min_bytes: int = 64 * MiB
    part_bytes: int = 16 * MiB
    connections: int = 8

    @property
    def enabled(self) -> bool:
        return self.min_bytes > 0 and self.connections > 1


class ChecksumMismatch(Exception):
    """A file's content did not hash to its ETag twice (``path``: its path in the repo)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class _UseLibrary(Exception):
    """This file cannot go this way (why, for the log): the library fetches it."""


@dataclass
class Record:
    """How far each part of one file got: the resume state, kept beside the blob's lock."""

    path: str
    etag: str
    size: int
    part_bytes: int
    written: list[int]

    def parts(self) -> list[tuple[int, int]]:
        return [
            (s, min(s + self.part_bytes, self.size)) for s in range(0, self.size, self.part_bytes)
        ]

    def within(self, length: int) -> bool:
        """Whether every byte the record says is written lies in the first ``length`` bytes."""
        return all(
            n == 0 or start + n <= length
            for n, (start, _) in zip(self.written, self.parts(), strict=True)
        )

    def up_to(self, prefix: int) -> None:
        """Say the first ``prefix`` bytes are written, in order (and nothing after them)."""
        self.written = [min(end, max(prefix, start)) - start for start, end in self.parts()]

    def save(self, locks: Folder) -> None:
        """Written in the model's folder under ``.locks`` (whole, through its descriptor: a link
        planted under this name is replaced, never written through)."""
        locks.write_atomic(
            record_name(self.etag), json.dumps(self.__dict__).encode(), durable=False
        )

    @classmethod
    def load(cls, locks: Folder, etag: str) -> Record | None:
        """The record, or None when absent or not one this code wrote (it is only a hint:
        whatever it says, the content is checked against the ETag before it is used). It is
        read from the cache, which others write: bounded before anything is computed from it."""
        try:
            raw = locks.read(record_name(etag), MAX_RECORD_BYTES)
            if raw is None:
                return None
            data = json.loads(raw)
            size, part_bytes = int(data["size"]), int(data["part_bytes"])
            if size < 0 or part_bytes < MiB or -(-size // part_bytes) > MAX_PARTS:
                return None
            record = cls(
                str(data["path"]),
                str(data["etag"]),
                int(data["size"]),
                int(data["part_bytes"]),
                [int(n) for n in data["written"]],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        bounds = record.parts()
        if record.part_bytes <= 0 or len(bounds) != len(record.written):
            return None
        if any(
            not 0 <= n <= end - start
            for n, (start, end) in zip(record.written, bounds, strict=True)
        ):
            return None
        return record


def record_name(etag: str) -> str:
    return f"{etag}{RECORD_SUFFIX}"


def partial_name(etag: str) -> str:
    return f"{etag}{RANGED_SUFFIX}"


def fetch_large_files(
    *,
    repo_id: str,
    commit: str,
    files: list[RemoteFile],
    blobs: Folder,
    locks: Folder,
    endpoint: str,
    token: str | bool,
    ranges: Ranges,
    limits: Limits,
    on_bytes: Callable[[int, bool], None],
    on_found: Callable[[int], None],
    peers: tuple[Peer, ...] = (),
) -> dict[str, tuple[int, bool]]:
    """Fetch the large ``files`` of a revision whose blob is missing, one after the other, each
    over parallel ranges; return etag -> (inode, True) for each blob placed (hashed on the way,
    so that verification need not read it again). Files this path cannot fetch are left to the
    library. Raises ``DownloadFailed`` (a part that failed ``PART_ATTEMPTS`` times, an answer that
    is not the file) and ``ChecksumMismatch`` (twice the wrong content).

    With ``peers`` (a fleet's nodes that have the revision), every missing file, small or large,
    and Xet or not, is copied from them first, in their order, each checked against the ETag the
    Hub gives for it; a peer that fails, or serves other content, hands over to the next, and the
    Hub comes last (resuming the parts the peers wrote). ``on_bytes`` says which bytes came from
    a peer."""
    placed: dict[str, tuple[int, bool]] = {}
    if not ranges.enabled and not peers:
        return placed
    failed: set[Peer] = set()  # a peer that failed once is not asked again by this worker
    if peers and ranges.enabled:
        # In the order the node they copy from fetches them: its large files first (as ranges,
        # here), then the others (the library's), so that a copy follows its source's.
        files = sorted(files, key=lambda entry: entry.size < ranges.min_bytes)
    for entry in files:
        if _size(blobs, entry.etag) == entry.size:
            continue
        _drop_unresumable(entry, blobs, locks, ranges)
        try:
            # The plan's ETag and size are the Hub's (its file list): a peer's copy is checked
            # against them, with no request to the Hub.
            inode, begun = _from_peers(
                repo_id,
                commit,
                entry,
                peers,
                failed,
                blobs,
                locks,
                ranges,
                limits,
                on_bytes,
                on_found,
            )
            # Large files, and any file a peer began (the Hub then sends only the rest), come
            # from the Hub as ranges; the others the library's way.
            if inode is None and ranges.enabled and (begun or entry.size >= ranges.min_bytes):
                url = hf_hub_url(repo_id, entry.path, revision=commit, endpoint=endpoint)
                # A file begun (by a peer, by an earlier attempt of this path, or by the
                # library's own transfer, kept by ``Prefix``) goes on by ranges from where it
                # stopped, even one the Hub serves through Xet: hf_xet would start it over.
                try:
                    source = _hub_source(url, entry, token, limits, xet_ok=begun)
                except _UseLibrary:
                    # The library fetches it whole: what is kept of it would only stand in the
                    # way of keeping the library's own transfer.
                    _drop_kept(entry, blobs, locks)
                    raise
                for attempt in (1, 2):
                    inode = _fetch(
                        entry, [source], blobs, locks, ranges, limits, _hub(on_bytes), on_found
                    )
                    if inode is not None:
                        break
                    if attempt == 2:
                        raise ChecksumMismatch(entry.path)
            if inode is not None:
                placed[entry.etag] = (inode, True)
        except _UseLibrary:
            continue
    return placed


def _hub(on_bytes: Callable[[int, bool], None]) -> Callable[[int], None]:
    return lambda count: on_bytes(count, False)


def _from_peers(
    repo_id: str,
    commit: str,
    entry: RemoteFile,
    peers: tuple[Peer, ...],
    failed: set[Peer],
    blobs: Folder,
    locks: Folder,
    ranges: Ranges,
    limits: Limits,
    on_bytes: Callable[[int, bool], None],
    on_found: Callable[[int], None],
) -> tuple[int | None, bool]:
    """The blob's inode once the peers' copy is in place (checked against the Hub's ETag), else
    None: no peer could serve it, and the Hub is asked; and whether part of it is on disk (a
    peer's, or an earlier attempt's), for the Hub to complete.

    The peers are asked by tier (``Peer.tier``), the parts of the file spread over the peers of
    a tier at once (part ``i`` from the ``i % n``-th); a peer that fails, or a tier whose copy
    is not the file, hands over to the next tier, resuming what was written."""
    quoted = urllib.parse.quote(entry.path)
    tried = False
    for tier in sorted({peer.tier for peer in peers}):
        group = [peer for peer in peers if peer.tier == tier and peer not in failed]
        if not group:
            continue
        tried = True
        sources = [
            _Source(
                f"{peer.url.rstrip('/')}/{repo_id}/resolve/{commit}/{quoted}",
                # The fleet's secret only: the Hub's token never goes to a peer. The ETag asked
                # for lets a peer serve the blob while it is still receiving it.
                {
                    "Authorization": f"Bearer {peer.token}",
                    "Accept-Encoding": "identity",
                    "X-Blob-Etag": entry.etag,
                },
            )
            for peer in group
        ]
        blamed: list[int] = []
        try:
            inode = _fetch(
                entry,
                sources,
                blobs,
                locks,
                ranges,
                limits,
                lambda n: on_bytes(n, True),
                on_found,
                PEER_PART_ATTEMPTS,
                blamed,
            )
        except (DownloadFailed, _UseLibrary) as failure:
            _fail([group[i] for i in blamed] or group, failed, "peer_failed", entry, failure)
            continue
        if inode is not None:
            return inode, True
        _fail(group, failed, "peer_refused", entry, "other content")
    begun = _resumable(entry, blobs, locks, ranges)
    if tried and not begun:
        _drop_kept(entry, blobs, locks)  # nothing of it on disk: no partial file is left
    return None, begun


def _fail(
    peers: list[Peer], failed: set[Peer], event: str, entry: RemoteFile, reason: object
) -> None:
    """``peers`` are not asked again by this worker; the log says why."""
    for peer in peers:
        logfmt.log(logger, logging.WARNING, event, peer=peer.url, path=entry.path, reason=reason)
        failed.add(peer)


@dataclass(frozen=True)
class _Source:
    url: str
    headers: dict[str, str]


def _hub_source(
    url: str, entry: RemoteFile, token: str | bool, limits: Limits, xet_ok: bool = False
) -> _Source:
    """Where the Hub serves the file's bytes, and the headers to send there: the library's own
    metadata call (through the guard) and its rule for the token. A file served through Xet is
    left to the library, unless ``xet_ok`` (the Hub serves it over HTTP too, with ranges)."""
    metadata = get_hf_file_metadata(url, token=token, timeout=limits.read_timeout)
    if (
        not xet_ok
        and metadata.xet_file_data is not None
        and is_xet_available()
        and not xet_disabled()
    ):
        raise _UseLibrary("served through Xet")
    if metadata.size is None:
        raise _UseLibrary("no size announced")
    if metadata.etag != entry.etag or metadata.size != entry.size:
        raise DownloadFailed(
            FailureKind.UNTRUSTED,
            f"the Hub's answer was refused, nothing was written: {entry.path} is not the file the"
            " revision's file list names (another ETag or size)",
        )
    location = metadata.location
    parts = urlsplit(location)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _UseLibrary("not an http(s) location")
    if _proxied(location):
        raise _UseLibrary("a proxy is configured for it")
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"
    if not same_origin_or_hub(url, location):
        headers.pop("authorization", None)  # a CDN's signed URL: the token stays with the Hub
    return _Source(location, headers)


def _proxied(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    proxies = urllib.request.getproxies()
    scheme = urlsplit(url).scheme
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def _fetch(
    entry: RemoteFile,
    sources: list[_Source],
    blobs: Folder,
    locks: Folder,
    ranges: Ranges,
    limits: Limits,
    on_bytes: Callable[[int], None],
    on_found: Callable[[int], None],
    attempts: int = PART_ATTEMPTS,
    blamed: list[int] | None = None,
) -> int | None:
    """One pass over one file, under its blob lock: resume or start, fetch the missing parts
    (part ``i`` from ``sources[i % len(sources)]``), hash in order; the blob's inode once it is
    in place, None when the content was wrong (the partial file and its record are gone then).
    ``blamed`` gets the index of the source whose part failed, when one did."""
    # The library's own blob lock (a flock on the same file: the two agree).
    with locks.flock(f"{entry.etag}.lock"):
        if _size(blobs, entry.etag) == entry.size:
            raise _UseLibrary("another process has just fetched it")
        _drop_other_versions(entry, blobs, locks)
        partial, record_path = partial_name(entry.etag), record_name(entry.etag)
        record = Record.load(locks, entry.etag)
        try:
            fd = blobs.open(partial, os.O_RDWR | os.O_CREAT)
        except LinkInTheWay:
            blobs.unlink(partial)  # planted in its place: removed, never followed
            fd = blobs.open(partial, os.O_RDWR | os.O_CREAT)
        try:
            length = os.fstat(fd).st_size
            if not _fits(record, entry, ranges) or length > entry.size or not record.within(length):
                fd = _fresh(blobs, partial, fd, entry.size)
                record = Record(entry.path, entry.etag, entry.size, ranges.part_bytes, [])
                record.written = [0] * len(record.parts())
            elif length < entry.size:
                os.ftruncate(fd, entry.size)  # a prefix the library's transfer left: grown
            record.save(locks)
            on_found(sum(record.written))
            transfer = _Transfer(
                fd, entry, sources, record, locks, ranges, limits, on_bytes, attempts
            )
            try:
                matched = transfer.run()
            except _UseLibrary:
                blobs.unlink(partial)  # the library fetches it its own way
                locks.unlink(record_path)
                raise
            finally:
                if blamed is not None:
                    blamed.extend(transfer.blamed)
            if not matched:
                blobs.unlink(partial)
                locks.unlink(record_path)
                return None
            _same_mode_as_folder(fd, blobs)
            blobs.rename(partial, entry.etag)
            locks.unlink(record_path)
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)


def _fits(record: Record | None, entry: RemoteFile, ranges: Ranges) -> TypeGuard[Record]:
    """Whether ``record`` is of this very file, cut in parts of this size."""
    return (
        record is not None
        and (record.path, record.etag, record.size) == (entry.path, entry.etag, entry.size)
        and record.part_bytes == ranges.part_bytes
    )


def _resumable(entry: RemoteFile, blobs: Folder, locks: Folder, ranges: Ranges) -> bool:
    """Whether part of the file is on disk, recorded, for a next attempt to go on from."""
    record = Record.load(locks, entry.etag)
    info = blobs.lstat(partial_name(entry.etag))
    if info is None:
        return False
    return (
        _fits(record, entry, ranges)
        and stat.S_ISREG(info.st_mode)
        and info.st_size <= entry.size
        and record.within(info.st_size)
        and sum(record.written) > 0
    )


def _drop_unresumable(entry: RemoteFile, blobs: Folder, locks: Folder, ranges: Ranges) -> None:
    """A partial file or a record that no attempt can go on from (of another part size, a record
    without its file, ...) goes, unless a live process holds the blob's lock: so that a new one
    can be kept in its place."""
    there = blobs.lstat(partial_name(entry.etag)) or locks.lstat(record_name(entry.etag))
    if there is not None and not _resumable(entry, blobs, locks, ranges):
        _drop_kept(entry, blobs, locks)


def _drop_kept(entry: RemoteFile, blobs: Folder, locks: Folder) -> None:
    """The partial file and its record go, unless a live process holds the blob's lock."""
    _drop_if_free(entry.etag, blobs, locks)


def _drop_if_free(etag: str, blobs: Folder, locks: Folder) -> None:
    if lock_free(locks, f"{etag}.lock"):
        blobs.unlink(partial_name(etag))
        locks.unlink(record_name(etag))


class Prefix:
    """The library's own transfer of a large file (through Xet, or one this path left to it),
    kept for a next attempt: a second name for its temporary file, ``blobs/<etag>.ranged.
    incomplete``, and a record of how far it is written in order (what the worker's streaming
    hash has read of it). The library deletes its temporary file when a transfer fails, and a
    new attempt of hf_xet starts from byte 0; kept this way, an interrupted transfer goes on by
    ranges from where it stopped (``fetch_large_files``)."""

    def __init__(self, blobs: Folder, locks: Folder, record: Record, inode: int) -> None:
        self.blobs = blobs
        self.locks = locks
        self.partial = partial_name(record.etag)
        self.record = record
        self.inode = inode
        self._saved_at = 0.0
        self._dirty = False

    @classmethod
    def keep(
        cls, blobs: Folder, temporary: str, entry: RemoteFile, locks: Folder, ranges: Ranges
    ) -> Prefix | None:
        """Link ``temporary`` (the library's file in ``blobs``, being written) as the partial
        file; None when that cannot be done (a partial file is there already: another
        process's)."""
        try:
            info = blobs.lstat(temporary)
            if info is None or not stat.S_ISREG(info.st_mode):
                return None  # planted in the cache under the library's name: not kept
            blobs.link(temporary, partial_name(entry.etag))
        except OSError:
            return None
        inode = info.st_ino
        record = Record(entry.path, entry.etag, entry.size, ranges.part_bytes, [])
        record.up_to(0)
        kept = cls(blobs, locks, record, inode)
        try:
            record.save(locks)
        except OSError:
            kept.drop()
            return None
        return kept

    def advance(self, prefix: int, now: bool = False) -> None:
        """The first ``prefix`` bytes are in the file: recorded (at most every
        ``RECORD_INTERVAL`` seconds, unless ``now``)."""
        self.record.up_to(min(prefix, self.record.size))
        self._dirty = True
        if now or time.monotonic() - self._saved_at >= RECORD_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """Save what ``advance`` held back (when nothing more comes for a while)."""
        if self._dirty:
            with contextlib.suppress(OSError):
                self.record.save(self.locks)
            self._saved_at = time.monotonic()
            self._dirty = False

    def drop(self) -> None:
        """The transfer completed (the blob is this file now): its second name and record go."""
        with contextlib.suppress(OSError):
            info = self.blobs.lstat(self.partial)
            if info is not None and info.st_ino == self.inode:
                self.blobs.unlink(self.partial)
        with contextlib.suppress(OSError):
            self.locks.unlink(record_name(self.record.etag))


def _fresh(blobs: Folder, partial: str, fd: int, size: int) -> int:
    """An empty file of ``size`` bytes (sparse) in place of ``partial`` (open as ``fd``): a new
    file when the old one has content, never the old one truncated to zero. On ext4, a file
    truncated to zero is written back whole when it is closed (``auto_da_alloc``, meant for
    programs that rewrite a file without ``fsync``): that cost a third of a second per GiB at the
    end of every transfer. The file stays sparse (``fallocate`` measured 3 % faster here, but the
    507 check and the running downloads' reservations count a partial file's unwritten bytes as
    still needed: allocated up front, they would be counted twice)."""
    if not os.fstat(fd).st_size:
        os.ftruncate(fd, size)  # grows it: no truncation to zero
        return fd
    blobs.unlink(partial)
    new = blobs.create(partial)
    try:
        os.ftruncate(new, size)
    except BaseException:
        os.close(new)
        raise  # ``fd`` is still the caller's to close
    os.close(fd)
    return new


def _drop_other_versions(entry: RemoteFile, blobs: Folder, locks: Folder) -> None:
    """A partial file of the same path with another ETag is of a version the Hub no longer
    serves for this revision: removed (its lock free), so that it starts over and no stale
    bytes linger."""
    for other in locks.names():
        if not other.name.endswith(RECORD_SUFFIX):
            continue
        etag = other.name.removesuffix(RECORD_SUFFIX)
        if etag == entry.etag:
            continue
        record = Record.load(locks, etag)
        if record is None or record.path != entry.path:
            continue
        _drop_if_free(etag, blobs, locks)


def _same_mode_as_folder(fd: int, blobs: Folder) -> None:
    """The blob gets the mode a new file of the cache gets (the library's ``_chmod_and_move``):
    umask applied, readable by whoever shares the cache."""
    probe = f".mode-{os.getpid()}-{threading.get_ident()}"
    try:
        os.close(blobs.create(probe, 0o666))
        info = blobs.lstat(probe)
        if info is not None:
            os.fchmod(fd, info.st_mode & 0o777)
    except OSError:
        pass
    finally:
        blobs.unlink(probe)


class _Transfer:
    """The parts of one file, fetched by ``connections`` threads (part ``i`` from
    ``sources[i % len(sources)]``), written at their offsets, the content hashed in order as it
    arrives, the record rewritten while it goes."""

    def __init__(
        self,
        fd: int,
        entry: RemoteFile,
        sources: list[_Source],
        record: Record,
        locks: Folder,
        ranges: Ranges,
        limits: Limits,
        on_bytes: Callable[[int], None],
        attempts: int = PART_ATTEMPTS,
    ) -> None:
        self.attempts = attempts
        self.fd = fd
        self.entry = entry
        self.sources = sources
        self.blamed: list[int] = []  # the sources whose part failed
        self.record = record
        self.locks = locks
        self.ranges = ranges
        self.limits = limits
        self.on_bytes = on_bytes
        self.bounds = record.parts()
        self.written = record.written  # updated in place, read by the hasher and the recorder
        self.cond = threading.Condition()
        self.next_part = 0
        self.failure: BaseException | None = None
        self.finished = False

    def run(self) -> bool:
        """Fetch what is missing; whether the whole content matches the ETag."""
        todo = [i for i, (s, e) in enumerate(self.bounds) if self.written[i] < e - s]
        threads = [
            threading.Thread(target=self._fetch_parts, name=f"range-{n}", daemon=True)
            for n in range(min(self.ranges.connections, len(todo)))
        ]
        hasher = _InOrderHash(self)
        recorder = threading.Thread(
            target=self._record_while_running, name="range-record", daemon=True
        )
        hasher.start()
        recorder.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        recorder.join()
        self.record.save(self.locks)  # what got written, whatever happens next
        if self.failure is not None:
            hasher.stop()
            raise self.failure
        hasher.join()
        return hasher.matched

    def _take(self) -> int | None:
        with self.cond:
            while self.next_part < len(self.bounds):
                index = self.next_part
                self.next_part += 1
                start, end = self.bounds[index]
                if self.written[index] < end - start:
                    return index
            return None

    def _fetch_parts(self) -> None:
        connections: dict[int, _Connection] = {}  # kept alive, one per source
        try:
            while self.failure is None and (index := self._take()) is not None:
                self._fetch_part(index, connections)
        except BaseException as error:
            with self.cond:
                if self.failure is None:
                    self.failure = error
                self.cond.notify_all()
        finally:
            for connection in connections.values():
                connection.close()

    def _fetch_part(self, index: int, connections: dict[int, _Connection]) -> None:
        """Fetch what part ``index`` misses from its source, retrying a failure from where it
        stopped."""
        start, end = self.bounds[index]
        which = index % len(self.sources)
        source = self.sources[which]
        try:
            attempt = 1
            while True:
                try:
                    if (connection := connections.get(which)) is None:
                        connection = connections[which] = _Connection(source.url, self.limits)
                    self._read_part(connection, source, index, start + self.written[index], end)
                    return
                except _Retry as retry:
                    if (spent := connections.pop(which, None)) is not None:
                        spent.close()
                    if retry.stale:
                        continue  # a kept-alive connection the server had closed: not a failure
                    if attempt == self.attempts or self.failure is not None:
                        raise DownloadFailed(
                            FailureKind.NETWORK,
                            retry.message,
                            retryable=True,
                            retry_after=retry.after,
                        ) from None
                    time.sleep(min(retry.after or 0.2 * 2**attempt, 5.0))
                    attempt += 1
        except (DownloadFailed, _UseLibrary):
            with self.cond:
                self.blamed.append(which)
            raise

    def _read_part(
        self, connection: _Connection, source: _Source, index: int, start: int, end: int
    ) -> None:
        response = connection.get_range(source, start, end, self.entry.size)
        position = start
        view = connection.view
        try:
            while position < end:
                if self.failure is not None:
                    return  # another part failed: the attempt ends
                try:
                    grain = LIMITER.grain(len(view))  # smaller under a low bandwidth cap
                    count = response.readinto(view[: min(grain, end - position)])
                except (OSError, http.client.HTTPException) as error:
                    raise _Retry(
                        f"a part of {self.entry.path} was cut off ({type(error).__name__})"
                    ) from None
                if not count:
                    raise _Retry(f"a part of {self.entry.path} ended early")
                os.pwrite(self.fd, view[:count], position)
                LIMITER.take(count)  # waits while over this worker's bandwidth share
                position += count
                with self.cond:
                    self.written[index] += count
                    self.cond.notify_all()
                self.on_bytes(count)
        finally:
            if position < end:
                connection.close()  # the rest of the body is not wanted: this connection is spent

    def _record_while_running(self) -> None:
        last: list[int] | None = None
        with self.cond:
            while not self.finished:
                if self.written != last:
                    last = list(self.written)
                    with contextlib.suppress(OSError):
                        self.record.save(self.locks)
                self.cond.wait(RECORD_INTERVAL)

    def available(self, position: int) -> int:
        """How far from ``position`` the content is written without a gap (under ``cond``)."""
        index = position // self.record.part_bytes
        start, _ = self.bounds[index]
        return start + self.written[index]


class _InOrderHash(threading.Thread):
    """Hashes the file from its start as far as it is written without a gap, while the parts
    arrive (they are taken in order, so the front moves with them)."""

    def __init__(self, transfer: _Transfer) -> None:
        super().__init__(daemon=True, name="range-hash")
        self.transfer = transfer
        self.matched = False
        self._stopped = False

    def stop(self) -> None:
        with self.transfer.cond:
            self._stopped = True
            self.transfer.cond.notify_all()
        self.join()

    def run(self) -> None:
        transfer = self.transfer
        size = transfer.entry.size
        digest = new_digest(transfer.entry.etag, size)
        if digest is None:
            return
        position = 0
        # Read back from the page cache into one buffer, reused: the resident memory stays that
        # buffer's (a mapping of the file would count every page of it as this process's).
        buffer = bytearray(HASH_STEP)
        view = memoryview(buffer)
        while position < size:
            with transfer.cond:
                while not self._stopped and (upto := transfer.available(position)) <= position:
                    if transfer.finished:
                        return  # it stopped short: no verdict
                    transfer.cond.wait()
                if self._stopped:
                    return
            while position < upto:
                count = os.preadv(transfer.fd, [view[: min(HASH_STEP, upto - position)]], position)
                if count <= 0:
                    return
                digest.update(view[:count])
                position += count
        self.matched = digest.hexdigest() == transfer.entry.etag


class _Retry(Exception):
    def __init__(self, message: str, after: float | None = None, stale: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.after = after
        # The request could not be sent on a connection kept alive from an earlier answer: the
        # server closed it while it was idle (uvicorn after 5-30 s). Sent again on a new one.
        self.stale = stale


class _Connection:
    """One kept-alive connection to where the parts are served, and its read buffer."""

    def __init__(self, url: str, limits: Limits) -> None:
        parts = urlsplit(url)
        self.limits = limits
        host, port = parts.hostname or "", parts.port
        try:
            if parts.scheme == "https":
                self.http: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=limits.connect_timeout, context=ssl.create_default_context()
                )
            else:
                self.http = http.client.HTTPConnection(host, port, timeout=limits.connect_timeout)
            self.http.connect()
            if self.http.sock is not None:
                self.http.sock.settimeout(limits.read_timeout)
                self.http.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if (window := LIMITER.receive_window()) is not None:
                    # Under a cap, the kernel takes in no more ahead of our reads than this: the
                    # link carries the cap, not bursts that fill every connection's buffer.
                    self.http.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        except OSError as error:
            raise _Retry(f"the connection for a part failed ({type(error).__name__})") from None
        self.view = memoryview(bytearray(BUFFER))
        self.answered = False  # an answer came on it: a later request may find it closed

    def get_range(self, source: _Source, start: int, end: int, size: int) -> Any:
        """The answer to a ranged GET of ``start..end`` (exclusive), checked to be exactly that."""
        parts = urlsplit(source.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {**source.headers, "Range": f"bytes={start}-{end - 1}"}
        try:
            self.http.request("GET", target, headers=headers)
            response = self.http.getresponse()
        except (OSError, http.client.HTTPException) as error:
            closed = isinstance(
                error, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
            )
            raise _Retry(
                f"a part's request failed ({type(error).__name__})",
                stale=closed and self.answered,
            ) from None
        self.answered = True
        status = response.status
        if status == 206:
            expected = f"bytes {start}-{end - 1}/{size}"
            length = response.getheader("Content-Length")
            if response.getheader("Content-Range") != expected or length != str(end - start):
                response.close()
                raise DownloadFailed(
                    FailureKind.UNTRUSTED,
                    "the Hub's answer was refused: a part of a file came with another range or"
                    " length than asked",
                )
            return response
        response.read(64 * 1024)
        response.close()
        if status in RETRYABLE_STATUS:
            after = response.getheader("Retry-After")
            seconds = float(after) if after and after.replace(".", "", 1).isdigit() else None
            raise _Retry(f"the Hub answered HTTP {status} for a part", seconds)
        if status == 200 or 300 <= status < 400:
            raise _UseLibrary(f"HTTP {status} to a ranged request")
        if status in (401, 403):
            raise DownloadFailed(
                FailureKind.UNAUTHORIZED, f"the Hub refused access to a part (HTTP {status})"
            )
        raise DownloadFailed(FailureKind.UNEXPECTED, f"the Hub answered HTTP {status} for a part")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()


def _size(blobs: Folder, name: str) -> int | None:
    """The size of the blob ``name`` (through the library's link into its shared store)."""
    try:
        return os.stat(name, dir_fd=blobs.fd).st_size
    except OSError:
        return None
