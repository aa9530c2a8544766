"""The Hub/cache adapter: the only place (with ``worker`` and ``cache``) that knows huggingface_hub.

A download attempt runs in its own worker process (``api.models.hub.worker``, forked from the
zygote, ``zygote.py``) so that a cancel stops the transfer on every path of the library (plain HTTP
and Xet alike): the process is killed, its temporary files are removed, and its blob locks die with
it. The worker reports progress as JSON lines on its stdout; the adapter reads them on the event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.hf_api import RepoFile
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from api.models.backend import (
    CachedRevision,
    DownloadPlan,
    DownloadRequest,
    DownloadUpdate,
    FileSelection,
    FilesPreset,
    LocalState,
    Pruned,
    RateShare,
    RemoteFile,
    VerifyReport,
)
from api.models.errors import DownloadFailed, FailureKind, ModelError
from api.models.hub import deletion, guard, protocol
from api.models.hub import selection as selecting
from api.models.hub.cache import ModelCache
from api.models.hub.classify import failure_of
from api.models.hub.guard import COMMIT_ID, UntrustedAnswer, check_plan
from api.models.hub.ranged import Ranges
from api.models.hub.zygote import ForkedWorker, Zygote, ZygoteGone

if TYPE_CHECKING:  # the worker imports this module: keep pydantic-settings out of its start
    from api.settings import Settings

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


def fetch_plan(repo_id: str, revision: str, endpoint: str, token: str | bool) -> DownloadPlan:
    """Resolve the revision and list its files (blocking; two small metadata requests, and a
    third for a gated repo). The guard has checked each answer; the plan is checked again as a
    whole (``check_plan``).

    A gated repo lists its files to anyone; only its content is refused. So for a gated repo the
    metadata of one file is asked too (a HEAD): a token without access fails here, before the
    first byte, as ``GatedRepoError``."""
    api = HfApi(endpoint=endpoint, token=token)
    commit, gated, siblings = _revision_info(api, repo_id, revision)
    files = tuple(
        RemoteFile(
            path=f.path,
            size=f.lfs.size if f.lfs is not None else f.size,
            etag=f.lfs.sha256 if f.lfs is not None else f.blob_id,
        )
        for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
        if isinstance(f, RepoFile)
    )
    plan = check_plan(DownloadPlan(commit=commit, files=files))
    _same_revision(commit, siblings, {f.path for f in files})
    if gated and files:
        api.get_hf_file_metadata(
            url=hf_hub_url(repo_id, files[0].path, revision=commit, endpoint=endpoint)
        )
    return plan


def fetch_commit(repo_id: str, revision: str, endpoint: str, token: str | bool) -> str:
    """The commit a revision points at on the Hub (blocking; one metadata request, guarded)."""
    return _revision_info(HfApi(endpoint=endpoint, token=token), repo_id, revision)[0]


def _revision_info(
    api: HfApi, repo_id: str, revision: str
) -> tuple[str, bool, frozenset[str] | None]:
    """(commit, gated, the file names it lists) of a revision on the Hub: one metadata request,
    its ``sha`` checked by the guard; an answer without one is refused, and so is one for a
    commit id that names another commit."""
    info = api.repo_info(repo_id, revision=revision)
    if info.sha is None:
        raise UntrustedAnswer("the Hub answered without a commit id")
    if COMMIT_ID.fullmatch(revision) and info.sha != revision:
        raise UntrustedAnswer(f"the Hub answered commit {info.sha[:12]} for commit {revision[:12]}")
    listed = getattr(info, "siblings", None)
    siblings = frozenset(s.rfilename for s in listed) if listed else None
    return info.sha, bool(info.gated), siblings


# Beyond this many files the Hub's ``siblings`` may be cut short (the library stops trusting
# them there: huggingface_hub's ``LARGE_REPO_THRESHOLD``, PR #3565); below it they are whole.
SIBLINGS_WHOLE_BELOW = 1000
# Tuning, fixed here (they were settings no operator story or test set):
HUB_CALL_SLOTS = 8  # the service's metadata calls to the Hub at once (file lists, revisions)
HUB_CONNECT_TIMEOUT_SECONDS = 10.0  # a connection to the Hub that does not open in this long
# A worker that has not taken its job after this long is restarted (a fresh one imports the
# library first, slow on a busy machine); the stall watchdog counts from then.
WORKER_START_TIMEOUT_SECONDS = 60.0


def _same_revision(commit: str, siblings: frozenset[str] | None, listed: set[str]) -> None:
    """The file list (fetched for ``commit``) and the revision answer must name the same files:
    a mirror that answers the list with another commit's is refused. Every file the revision
    answer names must be listed; below ``SIBLINGS_WHOLE_BELOW`` files, exactly those."""
    if siblings is None:
        return
    missing = siblings - listed
    extra = listed - siblings if len(siblings) < SIBLINGS_WHOLE_BELOW else set()
    if missing or extra:
        named = sorted(missing or extra)[0]
        raise UntrustedAnswer(
            f"the Hub's file list of commit {commit[:12]} and its answer for that revision"
            f" disagree ({len(missing)} file(s) missing from the list, {len(extra)} not in the"
            f" revision, for example {named[:80]!r})"
        )


def hub_limits(settings: Settings) -> guard.Limits:
    return guard.Limits(
        max_files=settings.max_repo_files,
        connect_timeout=HUB_CONNECT_TIMEOUT_SECONDS,
        read_timeout=settings.hub_read_timeout_seconds,
        json_deadline=settings.plan_timeout_seconds * 6,
    )


class HubCacheBackend:
    """The real ``HubBackend``: downloads in worker processes, reads the cache on disk."""

    def __init__(self, settings: Settings, zygote: Zygote | None = None) -> None:
        self.settings = settings
        self.cache = ModelCache(
            settings.cache_dir, FileSelection(FilesPreset(settings.default_files))
        )
        guard.install(hub_limits(settings))
        self._hub_slots = asyncio.Semaphore(HUB_CALL_SLOTS)
        # Workers are forked from a zygote that has imported them (``zygote.py``): a worker then
        # starts in milliseconds instead of 0.5 s of CPU, on every attempt. One given here is
        # shared (its owner stops it); else the backend has its own.
        self._owns_zygote = zygote is None
        own_env = {k: v for k, v in self.worker_env().items() if k != "HF_TOKEN"}
        self._zygote = zygote if zygote is not None else Zygote(own_env)

    async def start(self) -> None:
        """With ``warm_worker``, start the zygote now, so that the first download does not wait
        for its imports."""
        if self.settings.warm_worker:
            await self._zygote.start()

    async def aclose(self) -> None:
        """Stop the zygote if it is the backend's own (a worker still running dies with it)."""
        if self._owns_zygote:
            await self._zygote.aclose()

    async def _hub_call(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking Hub call in a daemon thread of its own, at most ``HUB_CALL_SLOTS`` at
        once, so that no Hub call ever waits behind the cache's threads or holds them.

        A cancelled caller returns at once and its slot is free again; the abandoned thread
        ends by itself within the guard's timeouts (every Hub call has them) and, a daemon
        thread, never holds up the process's exit."""
        async with self._hub_slots:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[_T] = loop.create_future()

            def settle(result: Any, error: BaseException | None) -> None:
                if future.done():
                    return  # the caller was cancelled and has gone
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            def run() -> None:
                try:
                    outcome: tuple[Any, BaseException | None] = (function(*args), None)
                except BaseException as error:
                    outcome = (None, error)
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(settle, *outcome)

            threading.Thread(target=run, name="hub call", daemon=True).start()
            return await future

    async def _take_worker(self) -> ForkedWorker:
        try:
            return await self._zygote.spawn(self.worker_env())
        except ZygoteGone as error:
            raise DownloadFailed(
                FailureKind.CRASHED,
                f"the download worker could not start ({error})",
                retryable=True,
            ) from None

    @property
    def cache_path(self) -> str:
        return str(self.settings.cache_dir)

    @property
    def _token(self) -> str | bool:
        # Only the configured token: never a token file the library would find on its own.
        return self.settings.token or False

    # -- cache (blocking) --------------------------------------------------------------------

    def local_state(
        self, repo_id: str, revision: str, selection: FileSelection | None = None
    ) -> LocalState:
        return self.cache.local_state(repo_id, revision, selection)

    def list_cached(self, repo_id: str | None = None) -> list[CachedRevision]:
        return self.cache.list_cached(repo_id)

    def revision_at(self, path: str) -> tuple[str, str] | None:
        return self.cache.revision_at(path)

    def delete(self, repo_id: str, revision: str | None) -> int | None:
        return deletion.delete(self.cache, repo_id, revision)

    def prune(self, repo_id: str, commits: frozenset[str] | None, dry_run: bool) -> Pruned:
        try:
            plan = deletion.plan_prune(self.cache, repo_id, commits)
            if plan is None:
                return Pruned(repo_id)
            freed = (
                plan.expected_freed(self.cache) if dry_run else deletion.execute(self.cache, plan)
            )
        except ModelError as refused:  # busy, a planted link, a read-only folder
            return Pruned(repo_id, refused=str(refused))
        revisions: tuple[tuple[str | None, int], ...] = plan.by_revision or ((None, freed),)
        return Pruned(repo_id, revisions, freed)

    def cache_usage(self) -> tuple[int, int]:
        return self.cache.usage()

    def last_access(self, repo_id: str, commit: str) -> float | None:
        return deletion.last_access(self.cache, repo_id, commit)

    def free_bytes(self) -> int:
        return self.cache.free_bytes()

    def remove_all_orphans(self) -> int:
        # Model folders a crash left set aside for removal, then each model's temporary files.
        return deletion.finish_removals(self.cache) + self.cache.remove_all_orphans()

    def discard_partial(self, repo_id: str) -> int:
        return self.cache.discard_ranged(repo_id)

    def tidy(self, repo_id: str) -> bool:
        return self.cache.tidy(repo_id)

    def missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        return self.cache.missing_bytes(repo_id, plan)

    def verify(self, repo_id: str, revision: str) -> VerifyReport | None:
        return self.cache.verify(repo_id, revision)

    # -- downloads ---------------------------------------------------------------------------

    async def plan(self, request: DownloadRequest) -> DownloadPlan:
        try:
            return await self._plan_attempt(request)
        except DownloadFailed as failure:
            if failure.retryable:
                raise
            raise DownloadFailed(
                failure.kind, f"{failure} (attempt 1, not retried)", retry_after=failure.retry_after
            ) from None

    async def resolve(self, repo_id: str, revision: str) -> str:
        try:
            return await self._hub_call(
                fetch_commit, repo_id, revision, self.settings.hf_endpoint, self._token
            )
        except Exception as error:
            raise failure_of(error, repo_id, revision) from None

    async def download(
        self,
        request: DownloadRequest,
        plan: DownloadPlan | None,
        on_update: Callable[[DownloadUpdate], None],
        rate: RateShare | None = None,
    ) -> str:
        """Attempts with classified retries (tenacity); each attempt is one worker process."""
        s = self.settings
        backoff = wait_random_exponential(
            multiplier=s.retry_min_backoff_seconds, max=s.retry_max_backoff_seconds
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, DownloadFailed) and error.retry_after is not None:
                return min(error.retry_after, s.retry_max_backoff_seconds)
            return float(backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            on_update(
                DownloadUpdate(
                    attempt=state.attempt_number + 1,
                    retry_reason=str(error),
                    retry_kind=error.kind.value if isinstance(error, DownloadFailed) else None,
                )
            )

        number = 0
        fetched = _Fetched()  # what the attempts before this one fetched: totals go up only
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(s.retry_attempts),
                wait=wait,
                retry=retry_if_exception(lambda e: isinstance(e, DownloadFailed) and e.retryable),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if plan is None:
                        plan = await self._plan_attempt(request)
                        if plan.problem is not None:
                            raise DownloadFailed(FailureKind.INVALID, plan.problem)
                    try:
                        return await self._attempt(
                            request, plan, number, on_update, fetched, rate or RateShare()
                        )
                    finally:
                        fetched.attempt_ended()
        except DownloadFailed as failure:
            if failure.retryable:
                message = f"{failure}; gave up after {number} attempts"
            else:
                message = f"{failure} (attempt {number}, not retried)"
            raise DownloadFailed(failure.kind, message, number) from None
        raise AssertionError("unreachable: AsyncRetrying returns or raises")

    async def _plan_attempt(self, request: DownloadRequest) -> DownloadPlan:
        try:
            listing = await self._hub_call(
                fetch_plan,
                request.repo_id,
                request.revision,
                self.settings.hf_endpoint,
                self._token,
            )
        except Exception as error:
            raise failure_of(error, request.repo_id, request.revision) from None
        return await asyncio.to_thread(self.select, request, listing)

    def select(self, request: DownloadRequest, listing: DownloadPlan) -> DownloadPlan:
        """The listing with the request's selection resolved (none asked: the revision's recorded
        selection, else the default), and its weight files grouped (blocking: reads the record)."""
        selections = self.cache.selections_for(
            request.repo_id, listing.commit, request.selection, request.revision
        )
        resolved = selecting.resolve_all(selections, listing.files)
        everything = len(resolved.paths) == len(listing.files)
        return replace(
            listing,
            selected=None if everything else resolved.paths,
            selections=selections,
            problem=resolved.problem,
            weights=tuple(selecting.weight_groups(listing.files)),
        )

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["MODELS_WORKER_NICE"] = str(self.settings.worker_nice)
        if (token := self.settings.token) is not None:
            env["HF_TOKEN"] = token  # through the environment: never on a command line
        return env

    async def _attempt(
        self,
        request: DownloadRequest,
        plan: DownloadPlan,
        number: int,
        on_update: Callable[[DownloadUpdate], None],
        fetched: _Fetched,
        rate: RateShare,
    ) -> str:
        """One attempt in one worker process, watched: no message for ``stall_timeout_seconds``
        (no byte, no file, no hashing progress) kills it as stalled. Its bandwidth share goes
        with its job, and each change of it follows on the worker's stdin."""
        await asyncio.to_thread(self.cache.remove_orphans, request.repo_id)
        on_update(
            DownloadUpdate(
                commit=plan.commit,
                total_bytes=plan.total_bytes,
                files_total=len(plan.wanted),
                attempt=number,
                selections=plan.selections,
            )
        )
        process = await self._take_worker()
        # The job takes the share as it is now, and follows each change from the moment it is
        # written (no await between the two: no change can fall between them).
        job = protocol.Job(
            repo_id=request.repo_id,
            revision=request.revision,
            cache_dir=str(self.settings.cache_dir),
            endpoint=self.settings.hf_endpoint,
            plan=plan,
            limits=hub_limits(self.settings),
            ranges=Ranges(
                min_bytes=self.settings.ranged_min_bytes,
                part_bytes=self.settings.ranged_part_bytes,
                connections=self.settings.ranged_connections,
            ),
            bytes_per_second=rate.value,
            xet_when_capped=self.settings.xet_when_capped,
            peers=request.peers,
            own_origins=guard.own_origins(),
        )
        assert process.stdin is not None
        assert process.stdout is not None
        outcome: protocol.Done | protocol.Failed | None = None
        stall = self.settings.stall_timeout_seconds
        # Until the worker has its job (a fresh one imports the library first, slow on a busy
        # machine) only a crash or a long silence ends it; the stall watchdog counts from then.
        timeout = max(stall, WORKER_START_TIMEOUT_SECONDS)
        stdin = process.stdin

        def send_rate(value: float | None) -> None:
            with contextlib.suppress(ConnectionError, RuntimeError):  # it is ending
                stdin.write(protocol.encode_rate(protocol.Rate(value)))

        unfollow = rate.follow(send_rate)  # the job line below goes first: no await between
        try:
            try:
                process.stdin.write(protocol.encode_job(job))
                await process.stdin.drain()
            except ConnectionError:
                pass  # it died before it read its job: its end, below, says how
            # stdin stays open: the worker exits by itself when it closes (this process died).
            while True:
                try:
                    # Not asyncio.wait_for: on Python 3.11 it can drop a cancellation that
                    # arrives as the line does (gh-86296), and a cancelled download then ran on
                    # to its end (a test of the job store caught one at shutdown).
                    async with asyncio.timeout(timeout):
                        raw = await process.stdout.readline()
                except TimeoutError:
                    if timeout != stall:
                        raise DownloadFailed(
                            FailureKind.CRASHED,
                            f"the download worker did not start within {timeout:g} s",
                            retryable=True,
                        ) from None
                    raise DownloadFailed(
                        FailureKind.STALLED, f"no data for {stall:g} s (stalled)", retryable=True
                    ) from None
                if not raw:
                    break
                message = protocol.parse(raw)
                timeout = stall
                if isinstance(message, (protocol.Done, protocol.Failed)):
                    outcome = message
                elif isinstance(message, (protocol.Progress, protocol.Verifying)):
                    on_update(_update_from(message, number, fetched))
            await process.wait()
        except protocol.ProtocolError as error:
            await _kill(process)
            await asyncio.shield(asyncio.to_thread(self.cache.remove_orphans, request.repo_id))
            raise DownloadFailed(
                FailureKind.CRASHED,
                f"the download worker sent a bad message ({error})",
                retryable=True,
            ) from None
        except BaseException:
            # Cancelled, stalled, anything: stop the transfer now, then clean up after it.
            await _kill(process)
            await asyncio.shield(asyncio.to_thread(self.cache.remove_orphans, request.repo_id))
            raise
        finally:
            unfollow()
            with contextlib.suppress(Exception):
                process.stdin.close()
        await asyncio.to_thread(self.cache.remove_orphans, request.repo_id)
        if outcome is None:
            raise DownloadFailed(
                FailureKind.CRASHED,
                f"the download worker exited unexpectedly (code {process.returncode})",
                retryable=True,
            )
        if isinstance(outcome, protocol.Failed):
            raise DownloadFailed(
                outcome.kind,
                outcome.message,
                retryable=outcome.retryable,
                retry_after=outcome.retry_after,
            )
        return plan.commit


async def _kill(process: ForkedWorker) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    # Wait for it even when cancelled again: no worker may outlive its download.
    await asyncio.shield(process.wait())


class _Fetched:
    """Bytes fetched by a download across its attempts: the worker counts one attempt."""

    def __init__(self) -> None:
        self.before = 0  # by the attempts that ended
        self.current = 0  # by the attempt under way
        self.peers_before = 0  # of those, copied from a fleet's peers
        self.peers_current = 0

    def attempt_ended(self) -> None:
        self.before += self.current
        self.current = 0
        self.peers_before += self.peers_current
        self.peers_current = 0


def _update_from(
    message: protocol.Progress | protocol.Verifying, attempt: int, fetched: _Fetched
) -> DownloadUpdate:
    if isinstance(message, protocol.Verifying):
        return DownloadUpdate(
            downloaded_bytes=message.verified_bytes, attempt=attempt, verifying=True
        )
    fetched.current = message.transferred_bytes
    fetched.peers_current = message.from_peers_bytes
    from_peers = fetched.peers_before + message.from_peers_bytes
    return DownloadUpdate(
        downloaded_bytes=message.downloaded_bytes,
        transferred_bytes=fetched.before + message.transferred_bytes,
        files_done=message.files_done,
        attempt=attempt,
        through_xet=message.through_xet or None,
        from_peers_bytes=from_peers or None,
    )
