"""The download worker: ``python -m api.models.hub.worker``, one process per download attempt.

Reads one ``protocol.Job`` on stdin (repo, revision, cache, endpoint, the Hub limits and the plan:
the commit and its files with sizes and ETags; the token comes in the ``HF_TOKEN`` environment
variable), runs ``snapshot_download`` for the commit, then checks every file against its ETag.
Writes ``protocol`` messages on stdout: ``Started``, ``Progress`` (at most every 0.25 s),
``Verifying`` while hashing, then ``Done`` or ``Failed``.

A file whose content does not match its ETag is deleted and fetched once more; a second mismatch
fails the download. The worker exits when its stdin closes (the service died) and, on Linux, when
its parent (the zygote, ``zygote.py``, which forks it with its imports done) dies.
Retries across attempts are the service's (``api.models.hub.adapter``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from huggingface_hub import snapshot_download

from api import logfmt
from api.models.anchored import Folder
from api.models.backend import DownloadPlan, RemoteFile
from api.models.errors import DownloadFailed, FailureKind
from api.models.hub import _compat, guard, protocol, throttle
from api.models.hub.cache import INCOMPLETE_SUFFIX, RANGED_SUFFIX, ModelCache, blob_name
from api.models.hub.classify import failure_of
from api.models.hub.hashing import descriptor_matches, new_digest
from api.models.hub.ranged import ChecksumMismatch, Prefix, Ranges, fetch_large_files
from api.models.hub.selection import exact_patterns

PROGRESS_INTERVAL = 0.25
# The library reads its HTTP body in chunks of this size and reports progress per chunk (10 MiB by
# default): 1 MiB gives progress, and the stall watchdog, a finer grain. A test pins it.
CHUNK_SIZE = 1024 * 1024


# hf_xet retries a failed range by itself; left at its defaults it retries a persistent 5xx for
# minutes, under the service's own policy (attempts, backoff, Retry-After, error messages). A few
# quick retries absorb a blip; then the error comes up to the service. HF_XET_* set in the
# service's environment win over these.
XET_DEFAULTS = {
    "HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "3",
    "HF_XET_CLIENT_RETRY_BASE_DELAY": "500ms",
}
# hf_xet's download concurrency is left adaptive: bench/xet_tuning.py measured its other settings
# (planning/ranged-downloads.md), and none is better on every link; HF_XET_* in the service's
# environment reach the workers.


class StreamingHasher(threading.Thread):
    """Hashes each blob while the library writes it, so verification costs no extra pass.

    It follows ``blobs/<etag>.<random>.incomplete`` as it grows, reading what is already written
    (from the page cache). When the library renames it to ``blobs/<etag>`` the open file is the
    same inode, so the rest is read to the end and the digest is final. A result counts only for
    that inode, at full size, and only if the library logged no warning (it logs each resume or
    restart of a file, which may rewrite bytes already hashed): otherwise ``verify`` hashes the
    blob from disk.
    """

    POLL = 0.02
    CHUNK = 4 * 1024 * 1024
    # Smaller files are hashed from disk after the download (a few ms for hundreds of them):
    # following them cost more than it saved, a directory scan per step while the library's
    # threads wait for the interpreter (300 small files: 1.58 s -> 1.45 s without;
    # planning/ranged-downloads.md).
    MIN_BYTES = 1024 * 1024

    def __init__(
        self,
        blobs: Folder,
        files: tuple[RemoteFile, ...],
        keep: tuple[Folder, Ranges] | None = None,
    ) -> None:
        """``keep`` (the model's locks folder, the ranged settings): large files the library
        fetches itself are kept for a next attempt as they are hashed (``ranged.Prefix``)."""
        super().__init__(daemon=True, name="streaming-hasher")
        self.blobs = blobs
        self.wanted = {f.etag: f for f in files if f.size >= self.MIN_BYTES}
        self.keep = keep if keep is not None and keep[1].enabled else None
        self._kept: dict[str, Prefix] = {}
        self.results: dict[str, tuple[int, bool]] = {}  # etag -> (inode, matched)
        self.resumed = threading.Event()
        self._stop_event = threading.Event()
        self._open: dict[str, tuple[Any, Any, int]] = {}  # etag -> (file, digest, inode)
        # One buffer, reused: a new 4 MiB object per read is a fresh mapping, faulted in page by
        # page and unmapped again (a tenth of a second of system time per GiB).
        self._buffer = memoryview(bytearray(self.CHUNK))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        for etag, (source, _, _) in self._open.items():
            if (kept := self._kept.pop(etag, None)) is not None:
                kept.advance(source.tell(), now=True)  # what the next attempt goes on from
            source.close()

    def run(self) -> None:
        if not self.wanted:
            return
        while not self._stop_event.is_set():
            if not self._step():
                self._stop_event.wait(self.POLL)
        # The download has ended: finish what was written, so no blob needs a second read.
        while self._step():
            pass

    def _step(self) -> bool:
        """Open new temporary files, hash what was written since; True when there was work."""
        writing: set[str] = set()  # etags with a temporary file of the library's now
        with contextlib.suppress(FileNotFoundError):
            for entry in self.blobs.names():
                if not entry.name.endswith(INCOMPLETE_SUFFIX) or entry.name.endswith(RANGED_SUFFIX):
                    continue  # a blob, or a ranged part file (written out of order: hashed there)
                etag = blob_name(entry.name)
                writing.add(etag)
                if etag in self.wanted and etag not in self._open and etag not in self.results:
                    with contextlib.suppress(OSError):
                        # Never through a link planted under the library's temporary name.
                        fd = self.blobs.open(entry.name)
                        source = os.fdopen(fd, "rb", buffering=0)  # kept open across steps
                        self._open[etag] = (
                            source,
                            new_digest(etag, self.wanted[etag].size),
                            os.fstat(source.fileno()).st_ino,
                        )
                        self._keep(etag, entry.name)
        busy = False
        for etag, (source, digest, inode) in list(self._open.items()):
            count = source.readinto(self._buffer)
            kept = self._kept.get(etag)
            if count:
                digest.update(self._buffer[:count])
                if kept is not None:
                    kept.advance(source.tell())
                busy = True
                continue
            # Nothing more for now: finished when the blob is now this very inode.
            if kept is not None:
                kept.flush()  # what the last reads held back
            try:
                final = os.stat(etag, dir_fd=self.blobs.fd)
            except FileNotFoundError:
                if etag not in writing:
                    # The library gave up on it: what it wrote stays for the next attempt.
                    if kept is not None:
                        kept.advance(source.tell(), now=True)
                        del self._kept[etag]
                    source.close()
                    del self._open[etag]
                continue
            if final.st_ino != inode:
                continue
            digest.update(source.read())
            size = source.tell()
            source.close()
            del self._open[etag]
            if kept is not None:
                kept.drop()  # the blob is in place: its second name goes
                del self._kept[etag]
            expected = self.wanted[etag]
            self.results[etag] = (inode, size == expected.size and digest.hexdigest() == etag)
        return busy

    def _keep(self, etag: str, temporary: str) -> None:
        entry = self.wanted[etag]
        if self.keep is None or entry.size < self.keep[1].min_bytes:
            return
        locks, ranges = self.keep
        if (kept := Prefix.keep(self.blobs, temporary, entry, locks, ranges)) is not None:
            self._kept[etag] = kept


class _ResumeWatch(logging.Handler):
    """Flags any warning of the library's file downloads (it logs each resume or restart)."""

    def __init__(self, flag: threading.Event) -> None:
        super().__init__(logging.WARNING)
        self.flag = flag

    def emit(self, record: logging.LogRecord) -> None:
        self.flag.set()


class Reporter:
    """Writes events to the real stdout (the library's own output goes to stderr)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.base_bytes = 0
        self.bytes = 0
        self.network = 0  # bytes off the network, when the library reports them (Xet)
        self.through_xet = False  # some bytes of this attempt came through hf_xet
        self.files = 0
        self.kind = "progress"
        self.carried = 0  # fetched by the passes before this one
        self.from_peers = 0  # of all of it, copied from a fleet's peers
        self._last = 0.0

    def send(self, message: protocol.WorkerMessage) -> None:
        line = protocol.encode(message)
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def restart(self, kind: str, base_bytes: int = 0) -> None:
        with self._lock:
            if self.kind == "progress":
                self.carried += self._pass_transferred()  # a total across the passes
            self.kind, self.base_bytes, self.bytes, self.files = kind, base_bytes, 0, 0
            self.network = 0

    def found(self, nbytes: int) -> None:
        """Bytes found on disk for this pass (the parts an earlier attempt fetched): counted as
        downloaded, not as transferred."""
        with self._lock:
            self.base_bytes += nbytes

    def _pass_transferred(self) -> int:
        # Fetched by this pass: what came off the network when the library says (on the Xet
        # path, bytes land on disk a whole xorb range at a time, often megabytes after they
        # arrived; these messages also keep the stall watchdog fed meanwhile), else what was
        # written.
        return max(self.network or self.bytes, 0)

    def add(self, nbytes: int = 0, nfiles: int = 0, network: int = 0, peer: bool = False) -> None:
        with self._lock:
            self.bytes += nbytes
            if peer:
                self.from_peers += nbytes
            self.files += nfiles
            # The library's transfer bar counts bytes off the network on both of its paths (in
            # huggingface_hub 2.x its plain HTTP download feeds it too, with the very bytes the
            # byte bar counts). Only hf_xet's are network bytes of their own: hf_xet is imported
            # by the library's Xet download alone (never by this worker, nor by the zygote).
            if network and "hf_xet" in sys.modules:
                self.network += network
                self.through_xet = True
            now = time.monotonic()
            if now - self._last < PROGRESS_INTERVAL and not nfiles:
                return
            self._last = now
            message = self.snapshot()
        self.send(message)

    def flush(self) -> None:
        """Send the counters now (the last bytes of a burst the interval held back)."""
        with self._lock:
            self._last = time.monotonic()
            message = self.snapshot()
        self.send(message)

    def snapshot(self) -> protocol.Progress | protocol.Verifying:
        """The counters as the message of the current pass (called under the lock)."""
        if self.kind == "verifying":
            return protocol.Verifying(verified_bytes=max(self.bytes, 0), files_done=self.files)
        return protocol.Progress(
            downloaded_bytes=self.base_bytes + max(self.bytes, 0),
            files_done=self.files,
            transferred_bytes=self.carried + self._pass_transferred(),
            through_xet=self.through_xet,
            from_peers_bytes=self.from_peers,
        )


def progress_class(reporter: Reporter) -> type:
    """A tqdm stand-in for ``snapshot_download(tqdm_class=...)`` that feeds the reporter.

    snapshot_download makes its bars with this class: the byte bar (``desc`` "Reconstructing...",
    fed by every file's download with the bytes written), the network bar (``desc`` "Downloading
    bytes", fed by Xet downloads as bytes arrive) and the file bar of its thread map (``desc``
    "Fetching N files"). Tests pin this against the library on both paths.
    """

    class _Progress:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            desc = str(kwargs.get("desc") or "")
            if desc.startswith("Reconstruct"):
                self.kind = "bytes"
            elif desc.startswith("Downloading bytes"):
                self.kind = "network"
            elif "Fetching" in desc:
                self.kind = "files"
            else:
                self.kind = "other"
            self.n = kwargs.get("initial", 0) or 0
            self.total = kwargs.get("total")
            self.format_dict: dict[str, Any] = {}

        def update(self, n: float | None = 1) -> None:
            step = int(n or 0)
            self.n += step
            if self.kind == "bytes":
                reporter.add(nbytes=step)
            elif self.kind == "network":
                reporter.add(network=step)
            elif self.kind == "files":
                reporter.add(nfiles=step)

        def __enter__(self) -> _Progress:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def close(self) -> None:
            pass

        def refresh(self) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return _Progress


def die_with_parent() -> None:
    """On Linux, PR_SET_PDEATHSIG: the kernel kills this process when the service dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_XET_DISABLED = _compat.xet_disabled()  # as the environment set it


def apply_rate(rate: float | None, xet_when_capped: str) -> None:
    """This worker's bandwidth share, for its reads from now on: the limiter, and whether files
    stored in Xet go through hf_xet (out of the cap's reach) or by plain HTTP (``throttle``). The
    library asks ``is_xet_available()`` for each file: the next file goes the new way."""
    throttle.LIMITER.set_rate(rate)
    _compat.disable_xet(_XET_DISABLED or not throttle.xet_allowed(rate, xet_when_capped))


def _follow_stdin(xet_when_capped: str) -> None:
    """Take the service's new bandwidth shares (``protocol.Rate`` lines) while the job runs, and
    die with the service on every platform: its end of our stdin closes when it dies."""

    def watch() -> None:
        for line in sys.stdin.buffer:
            try:
                rate = protocol.parse_rate(line)
            except protocol.ProtocolError:
                continue  # only the service writes here: a line it did not mean is ignored
            apply_rate(rate.bytes_per_second, xet_when_capped)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="stdin-watch").start()


def download_and_verify(job: protocol.Job, reporter: Reporter) -> None:
    """One attempt, holding the revision so that other processes sharing the cache see it as
    downloading until it is verified."""
    repo_id, plan = job.repo_id, job.plan
    cache = ModelCache(Path(job.cache_dir))
    # The library writes refs/<branch> only when asked for the branch; we pass the commit the
    # plan resolved (no second resolution, no race with a moving branch) and record the ref
    # ourselves. A branch that points at another revision already (an update) keeps pointing
    # there until this one is verified, then moves in one atomic step: whatever resolves the
    # branch from the cache (vLLM offline, a restart of it) never sees a revision in the making.
    # A branch new to the cache points at its revision from the start, so that the cache knows
    # what a stopped download left (PARTIAL).
    serving = cache.resolve_commit(repo_id, job.revision)
    if serving is None or serving == plan.commit:
        cache.write_ref(repo_id, job.revision, plan.commit)
    with cache.hold_revision(repo_id, plan.commit):
        # The journal: until every file is verified the revision is not DOWNLOADED, whatever
        # stops this process and when (the library moves a blob into place before we check it).
        pending = cache.records.read_unverified(repo_id, plan.commit)
        planned = {f.path for f in plan.wanted}
        for path in pending[1] if pending is not None else []:
            if path in planned:
                cache.discard_file(repo_id, plan.commit, path)  # known bad: fetched afresh
        cache.records.mark_unverified(
            repo_id, plan.commit, "a download of this revision stopped before it was verified", []
        )
        _download_and_verify(cache, job, reporter)
        # Verified: the revision is now kept (and its status answers) for these selections too.
        for selection in plan.selections:
            cache.records.record_selection(repo_id, plan.commit, selection)
        cache.records.clear_unverified(repo_id, plan.commit)
        cache.write_ref(repo_id, job.revision, plan.commit)  # complete and verified: the switch


def _download_and_verify(cache: ModelCache, job: protocol.Job, reporter: Reporter) -> None:
    """Fetch what is missing, verify everything, fetch a bad file once more. The model's
    ``blobs/`` and its folder under ``.locks`` are opened once, through descriptors
    (``api.models.anchored``): what this process writes there itself never follows a link."""
    with (
        cache.model_folder(job.repo_id, "blobs", create=True) as blobs,
        cache.locks_of(job.repo_id, True) as locks,
    ):
        assert blobs is not None  # made when absent
        assert locks is not None
        _fetch_and_verify(cache, job, reporter, blobs, locks)


def _fetch_and_verify(
    cache: ModelCache, job: protocol.Job, reporter: Reporter, blobs: Folder, locks: Folder
) -> None:
    repo_id, plan = job.repo_id, job.plan
    token: str | bool = os.environ.get("HF_TOKEN") or False
    # The selection, resolved to exact paths (the plan's): the library fetches those only.
    allow = exact_patterns(plan.selected) if plan.selected is not None else None

    ranged: dict[str, tuple[int, bool]] = {}  # etag -> (inode, matched): hashed on the way

    def fetch() -> None:
        present = plan.total_bytes - cache.missing_bytes(repo_id, plan)
        reporter.restart("progress", present)
        reporter.send(protocol.Progress(present, 0, reporter.carried))
        # Large files over plain HTTP first, as parallel ranges (resumed where an earlier
        # attempt stopped); the library then finds their blobs and only links them.
        placed = fetch_large_files(
            repo_id=repo_id,
            commit=plan.commit,
            files=list(plan.wanted),
            blobs=blobs,
            locks=locks,
            endpoint=job.endpoint,
            token=token,
            ranges=job.ranges,
            limits=job.limits,
            on_bytes=lambda n, peer: reporter.add(nbytes=n, peer=peer),
            on_found=reporter.found,
            peers=job.peers,
        )
        if placed:
            ranged.update(placed)
            reporter.flush()  # the last bytes of the parts, before the library's pass
        # The library lists the files from its cached file list when there is one: one that is
        # not the plan's (planted, or stale) goes, and the library lists them from the Hub.
        cache.drop_tree_unless(repo_id, plan)
        snapshot_download(
            repo_id,
            revision=plan.commit,
            cache_dir=job.cache_dir,
            endpoint=job.endpoint,
            token=token,
            allow_patterns=allow,
            tqdm_class=progress_class(reporter),
        )
        reporter.flush()  # the pass's last bytes: the interval may have held them back

    hasher = StreamingHasher(blobs, plan.wanted, (locks, job.ranges))
    watch = _ResumeWatch(hasher.resumed)
    library_log = logging.getLogger("huggingface_hub.file_download")
    library_log.addHandler(watch)
    hasher.start()
    try:
        fetch()
    finally:
        hasher.stop()
        library_log.removeHandler(watch)
    streamed = {} if hasher.resumed.is_set() else dict(hasher.results)
    streamed.update(ranged)
    bad = verify(cache, repo_id, plan, reporter, streamed=streamed)
    if bad:
        for path in bad:
            cache.discard_file(repo_id, plan.commit, path)
        fetch()
        still_bad = verify(cache, repo_id, plan, reporter, only=set(bad))
        for path in still_bad:
            cache.discard_file(repo_id, plan.commit, path)  # never left to pass as good
        if still_bad:
            raise ChecksumMismatch(still_bad[0])


def verify(
    cache: ModelCache,
    repo_id: str,
    plan: DownloadPlan,
    reporter: Reporter,
    only: set[str] | None = None,
    streamed: dict[str, tuple[int, bool]] | None = None,
) -> list[str]:
    """Files of the plan whose content does not hash to their ETag. A blob hashed while it was
    written (``streamed``: etag -> (inode, matched)) is not read again when it is still that
    inode and matched; everything else is hashed from disk. Each file is read through what
    the snapshot's links lead to inside the cache (``ModelCache.open_content``): a link that
    leads anywhere else is a bad file, never read."""
    reporter.restart("verifying")
    reporter.send(protocol.Verifying(0, 0))
    bad = []
    for entry in plan.wanted:
        if only is not None and entry.path not in only:
            continue
        fd = cache.open_content(repo_id, plan.commit, entry.path)
        if fd is None:
            bad.append(entry.path)
            reporter.add(nfiles=1)
            continue
        info = os.fstat(fd)
        known = (streamed or {}).get(entry.etag)
        if info.st_size != entry.size:
            # Hash-valid content of another size than the Hub listed: the listing and the file
            # disagree, so status (which compares sizes) would never say DOWNLOADED.
            os.close(fd)
            bad.append(entry.path)
            reporter.add(nfiles=1)
        elif known is not None and known[1] and info.st_ino == known[0]:
            os.close(fd)
            reporter.add(nbytes=entry.size, nfiles=1)
        else:
            if not descriptor_matches(fd, entry.etag, lambda n: reporter.add(nbytes=n)):
                bad.append(entry.path)
            reporter.add(nfiles=1)
    return bad


def run(job: protocol.Job, reporter: Reporter) -> int:
    try:
        download_and_verify(job, reporter)
    except ChecksumMismatch as mismatch:
        reporter.flush()
        reporter.send(
            protocol.Failed(
                FailureKind.CORRUPT,
                f"{mismatch.path} did not match its checksum or its listed size twice;"
                " it was deleted",
                retryable=False,
            )
        )
        return 1
    except BaseException as error:  # report every failure, then exit non-zero
        reporter.flush()  # what this attempt fetched counts, however it ended
        failure = failure_of(error, job.repo_id, job.revision)
        reporter.send(
            protocol.Failed(failure.kind, str(failure), failure.retryable, failure.retry_after)
        )
        return 1
    reporter.send(protocol.Done())
    return 0


def main() -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Anything the library prints goes to stderr, never into the event stream.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _compat.set_download_chunk_size(CHUNK_SIZE)
    for name, value in XET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    die_with_parent()
    logfmt.install_in_worker()  # its lines, and the library's warnings, are the service's log's
    # Downloads are background work: the API that shares these cores answers first.
    with contextlib.suppress(OSError):
        os.nice(int(os.environ.get("MODELS_WORKER_NICE", "10")))
    # Forked from the zygote (imports done), the worker reads its job first.
    line = sys.stdin.buffer.readline()
    reporter = Reporter(out)
    try:
        job = protocol.parse_job(line)
    except (protocol.ProtocolError, guard.UntrustedAnswer) as error:
        # A plan that fails the guard is the Hub's fault; anything else is ours (a crash).
        failure = failure_of(error, "?", "?")
        if isinstance(error, protocol.ProtocolError):
            failure = DownloadFailed(FailureKind.CRASHED, "bad worker input", retryable=True)
        reporter.send(protocol.Failed(failure.kind, str(failure), failure.retryable))
        return 2
    reporter.send(protocol.Started())
    apply_rate(job.bytes_per_second, job.xet_when_capped)
    _follow_stdin(job.xet_when_capped)
    guard.install(job.limits)
    # One commit per revision: every answer for a file of the plan's commit must give the ETag
    # of the plan's file list (a mirror that mixes commits is refused), and no redirect may
    # lead to the service itself.
    guard.expect(job.plan.commit, {f.path: f.etag for f in job.plan.files})
    guard.refuse_origins(frozenset(job.own_origins))
    return run(job, reporter)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter shutdown: the stdin watcher thread may still block in read().
    os._exit(code)
