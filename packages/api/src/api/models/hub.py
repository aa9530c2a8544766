"""The Hub/cache adapter: the only place (with ``worker`` and ``cache``) that knows huggingface_hub.

A download runs in its own worker process (``python -m api.models.worker``) so that a cancel stops
the transfer on every path of the library (plain HTTP and Xet alike): the process is killed, its
temporary files are removed, and its blob locks die with it. The worker reports progress as JSON
lines on its stdout; the adapter reads them on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from api.models import hubguard
from api.models.backend import (
    CachedRevision,
    DownloadFailed,
    DownloadPlan,
    DownloadRequest,
    DownloadUpdate,
    FailureKind,
    LocalState,
    RemoteFile,
    VerifyReport,
)
from api.models.cache import ModelCache
from api.models.hubguard import COMMIT_ID, GIT_OR_SHA256, UntrustedAnswer, path_problem

if TYPE_CHECKING:  # the worker imports this module: keep pydantic-settings out of its start
    from api.settings import Settings

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_NO_RETRY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def classify_error(
    error: BaseException, repo_id: str, revision: str
) -> tuple[FailureKind, bool, str]:
    """(kind, retryable, message safe for a client) for an error of a download attempt.

    Classified by the most specific class first, then by ``__cause__``: the library wraps a failed
    metadata call in ``LocalEntryNotFoundError`` and its HTTP errors subclass ``OSError``, so a
    "retry every OSError" policy would retry 404s, gated repos and full disks.
    """
    untrusted = _untrusted(error)
    if untrusted is not None:
        return (
            FailureKind.UNTRUSTED,
            False,
            f"the Hub's answer was refused, nothing was written: {untrusted}",
        )
    if isinstance(error, GatedRepoError):
        return (
            FailureKind.GATED,
            False,
            f"{repo_id} is gated: accept its terms on the Hub with your account and set HF_TOKEN"
            " to a token of that account",
        )
    if isinstance(error, RevisionNotFoundError):
        return (
            FailureKind.REVISION_NOT_FOUND,
            False,
            f"revision '{revision}' not found in {repo_id}",
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            FailureKind.NOT_FOUND,
            False,
            f"{repo_id} not found on the Hub (or it is private and HF_TOKEN gives no access)",
        )
    if isinstance(error, RemoteEntryNotFoundError):
        return (
            FailureKind.NOT_FOUND,
            False,
            f"a file of {repo_id} listed by the Hub is missing on it",
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        if status in _RETRY_STATUS:
            return FailureKind.NETWORK, True, f"the Hub answered HTTP {status}"
        if status in (401, 403):
            return (
                FailureKind.UNAUTHORIZED,
                False,
                f"the Hub refused access (HTTP {status}): check HF_TOKEN",
            )
        return FailureKind.UNEXPECTED, False, f"the Hub answered HTTP {status}"
    if isinstance(error, OfflineModeIsEnabled):
        return FailureKind.NETWORK, False, "the Hub client is in offline mode (HF_HUB_OFFLINE)"
    if isinstance(error, (httpx2.TimeoutException,)):
        return FailureKind.NETWORK, True, "the connection to the Hub timed out"
    if isinstance(error, (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.NetworkError)):
        return FailureKind.NETWORK, True, "the connection to the Hub failed"
    if isinstance(error, httpx2.TransportError):
        return FailureKind.NETWORK, True, "the transfer from the Hub failed"
    if isinstance(error, LocalEntryNotFoundError):
        if error.__cause__ is not None:
            return classify_error(error.__cause__, repo_id, revision)
        return FailureKind.NETWORK, True, "the Hub could not be reached"
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return FailureKind.DISK_FULL, False, "the cache's disk is full"
        if error.errno in _NO_RETRY_ERRNOS:
            return FailureKind.PERMISSION, False, "the cache folder is not writable"
        if error.errno is None:
            # The library's size-consistency check ("file should be of size N but has size M").
            return FailureKind.NETWORK, True, "a file arrived with the wrong size"
        return (
            FailureKind.UNEXPECTED,
            False,
            f"a local error occurred ({errno.errorcode.get(error.errno, error.errno)})",
        )
    if _is_xet_error(error):
        return _classify_xet_error(str(error))
    if isinstance(error, ValueError):
        return FailureKind.INVALID, False, "the Hub client rejected the request"
    return FailureKind.UNEXPECTED, False, f"unexpected error ({type(error).__name__})"


def _untrusted(error: BaseException | None) -> UntrustedAnswer | None:
    """The guard's refusal, also when the library wrapped it in an error of its own."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, UntrustedAnswer):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


_XET_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})")
_XET_MARKERS = ("CAS Client Error", "File reconstruction error", "Task error", "Xet")


def _is_xet_error(error: BaseException) -> bool:
    """hf_xet raises bare RuntimeErrors (and two classes of its own) whose text tells the cause."""
    if type(error).__name__ in ("XetAuthenticationError", "XetObjectNotFoundError"):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _XET_MARKERS)


def _classify_xet_error(text: str) -> tuple[FailureKind, bool, str]:
    """The same policy as on the plain HTTP path, read from the text of a Xet transfer error."""
    status = _XET_STATUS.search(text)
    code = int(status.group(1)) if status else None
    lowered = text.lower()
    if "no space left" in lowered or "os error 28" in lowered or "quota exceeded" in lowered:
        return FailureKind.DISK_FULL, False, "the cache's disk is full"
    if "permission denied" in lowered or "read-only file system" in lowered:
        return FailureKind.PERMISSION, False, "the cache folder is not writable"
    if code in _RETRY_STATUS:
        return FailureKind.NETWORK, True, f"the Xet storage answered HTTP {code}"
    if code in (401, 403) or "authentication" in lowered:
        return (
            FailureKind.UNAUTHORIZED,
            False,
            f"the Xet storage refused access{f' (HTTP {code})' if code else ''}: check HF_TOKEN",
        )
    if code == 404 or "not found" in lowered:
        return FailureKind.NOT_FOUND, False, "a file listed by the Hub is missing on its storage"
    if code is not None:
        return FailureKind.UNEXPECTED, False, f"the Xet storage answered HTTP {code}"
    # Connection, timeout, truncated or malformed data: a transfer that may well succeed again.
    return FailureKind.NETWORK, True, "the Xet transfer failed"


def retry_after_seconds(error: BaseException) -> float | None:
    """The ``Retry-After`` of a 429/503 answer, in seconds, when the Hub sent one."""
    while error is not None:
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            if error.response.status_code in (429, 503):
                value = error.response.headers.get("Retry-After")
                with contextlib.suppress(TypeError, ValueError):
                    return max(0.0, float(value)) if value is not None else None
            return None
        error = error.__cause__  # type: ignore[assignment]
    return None


class AttemptFailed(Exception):
    """One attempt of a download failed; ``retryable`` says whether another can succeed."""

    def __init__(
        self, kind: FailureKind, message: str, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


def fetch_plan(repo_id: str, revision: str, endpoint: str, token: str | bool) -> DownloadPlan:
    """Resolve the revision and list its files (blocking; two small metadata requests). The
    guard has checked each answer; the plan is checked again as a whole (``check_plan``)."""
    api = HfApi(endpoint=endpoint, token=token)
    commit = api.repo_info(repo_id, revision=revision).sha
    if commit is None:
        raise UntrustedAnswer("the Hub answered without a commit id")
    files = tuple(
        RemoteFile(
            path=f.path,
            size=f.lfs.size if f.lfs is not None else f.size,
            etag=f.lfs.sha256 if f.lfs is not None else f.blob_id,
        )
        for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
        if isinstance(f, RepoFile)
    )
    return check_plan(DownloadPlan(commit=commit, files=files))


def check_plan(plan: DownloadPlan) -> DownloadPlan:
    """The plan, when its commit id, every path, size and ETag is safe to use; raises
    ``UntrustedAnswer`` otherwise."""
    if not COMMIT_ID.fullmatch(plan.commit):
        raise UntrustedAnswer("the Hub sent a malformed commit id")
    seen: set[str] = set()
    for entry in plan.files:
        if (problem := path_problem(entry.path)) is not None:
            raise UntrustedAnswer(f"{problem}: {entry.path[:60]!r}")
        if entry.path in seen:
            raise UntrustedAnswer(f"the Hub's file list names {entry.path[:60]!r} twice")
        seen.add(entry.path)
        if not GIT_OR_SHA256.fullmatch(entry.etag):
            raise UntrustedAnswer(f"the Hub's file list gives a malformed id for {entry.path!r}")
        if isinstance(entry.size, bool) or not 0 <= entry.size < 1 << 50:
            raise UntrustedAnswer(f"the Hub's file list gives no valid size for {entry.path!r}")
    return plan


def plan_to_json(plan: DownloadPlan) -> dict[str, Any]:
    return {"commit": plan.commit, "files": [[f.path, f.size, f.etag] for f in plan.files]}


def plan_from_json(data: dict[str, Any]) -> DownloadPlan:
    return check_plan(
        DownloadPlan(
            commit=str(data["commit"]),
            files=tuple(RemoteFile(str(p), int(n), str(e)) for p, n, e in data["files"]),
        )
    )


def hub_limits(settings: Settings) -> hubguard.Limits:
    return hubguard.Limits(
        max_files=settings.max_repo_files,
        connect_timeout=settings.hub_connect_timeout_seconds,
        read_timeout=settings.hub_read_timeout_seconds,
        json_deadline=settings.plan_timeout_seconds * 6,
    )


class HubCacheBackend:
    """The real ``HubBackend``: downloads in worker processes, reads the cache on disk."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ModelCache(settings.cache_dir)
        hubguard.install(hub_limits(settings))
        self._hub_slots = asyncio.Semaphore(settings.hub_call_slots)
        # A worker started ahead, idle until a download takes it: saves the interpreter start and
        # library imports (about 0.2 s) on each download.
        self._spare: asyncio.Task[asyncio.subprocess.Process] | None = None

    async def aclose(self) -> None:
        """Stop the idle spare worker, if any."""
        spare, self._spare = self._spare, None
        if spare is None:
            return
        try:
            process = await spare
        except Exception:
            return
        await _kill(process)

    async def _hub_call(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking Hub call in a daemon thread of its own, at most ``hub_call_slots`` at
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

    async def _spawn_worker(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "api.models.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.worker_env(),
        )

    async def _take_worker(self) -> asyncio.subprocess.Process:
        spare, self._spare = self._spare, None
        process = None
        if spare is not None:
            with contextlib.suppress(Exception):
                process = await spare
            if process is not None and process.returncode is not None:
                process = None  # it died while idle: start another
        if process is None:
            process = await self._spawn_worker()
        return process

    def _refill_spare(self) -> None:
        """Start the next spare once a download has ended: started while one runs, its imports
        would take CPU from the transfer."""
        if self.settings.warm_worker and self._spare is None:
            self._spare = asyncio.create_task(self._spawn_worker(), name="spare download worker")

    @property
    def cache_path(self) -> str:
        return str(self.settings.cache_dir)

    @property
    def _token(self) -> str | bool:
        # Only the configured token: never a token file the library would find on its own.
        return self.settings.token or False

    # -- cache (blocking) --------------------------------------------------------------------

    def local_state(self, repo_id: str, revision: str) -> LocalState:
        return self.cache.local_state(repo_id, revision)

    def list_cached(self) -> list[CachedRevision]:
        return self.cache.list_cached()

    def delete(self, repo_id: str, revision: str | None) -> int | None:
        return self.cache.delete(repo_id, revision)

    def cache_usage(self) -> tuple[int, int]:
        return self.cache.usage()

    def free_bytes(self) -> int:
        return self.cache.free_bytes()

    def remove_all_orphans(self) -> int:
        return self.cache.remove_all_orphans()

    def missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        return self.cache.missing_bytes(repo_id, plan)

    def verify(self, repo_id: str, revision: str) -> VerifyReport | None:
        return self.cache.verify(repo_id, revision)

    # -- downloads ---------------------------------------------------------------------------

    async def plan(self, request: DownloadRequest) -> DownloadPlan:
        try:
            return await self._plan_attempt(request)
        except AttemptFailed as failure:
            suffix = "" if failure.retryable else " (attempt 1, not retried)"
            raise DownloadFailed(
                failure.kind,
                f"{failure}{suffix}",
                retryable=failure.retryable,
                retry_after=failure.retry_after,
            ) from None

    async def download(
        self,
        request: DownloadRequest,
        plan: DownloadPlan | None,
        on_update: Callable[[DownloadUpdate], None],
    ) -> str:
        """Attempts with classified retries (tenacity); each attempt is one worker process."""
        s = self.settings
        backoff = wait_random_exponential(
            multiplier=s.retry_min_backoff_seconds, max=s.retry_max_backoff_seconds
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, AttemptFailed) and error.retry_after is not None:
                return min(error.retry_after, s.retry_max_backoff_seconds)
            return float(backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            on_update(
                DownloadUpdate(
                    attempt=state.attempt_number + 1,
                    retry_reason=str(error),
                    retry_kind=error.kind.value if isinstance(error, AttemptFailed) else None,
                )
            )

        number = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(s.retry_attempts),
                wait=wait,
                retry=retry_if_exception(lambda e: isinstance(e, AttemptFailed) and e.retryable),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if plan is None:
                        plan = await self._plan_attempt(request)
                    return await self._attempt(request, plan, number, on_update)
        except AttemptFailed as failure:
            if failure.retryable:
                message = f"{failure}; gave up after {number} attempts"
            else:
                message = f"{failure} (attempt {number}, not retried)"
            raise DownloadFailed(failure.kind, message, number) from None
        raise AssertionError("unreachable: AsyncRetrying returns or raises")

    async def _plan_attempt(self, request: DownloadRequest) -> DownloadPlan:
        try:
            return await self._hub_call(
                fetch_plan,
                request.repo_id,
                request.revision,
                self.settings.hf_endpoint,
                self._token,
            )
        except Exception as error:
            kind, retryable, message = classify_error(error, request.repo_id, request.revision)
            raise AttemptFailed(kind, message, retryable, retry_after_seconds(error)) from None

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
    ) -> str:
        """One attempt in one worker process, watched: no message for ``stall_timeout_seconds``
        (no byte, no file, no hashing progress) kills it as stalled."""
        await asyncio.to_thread(self.cache.remove_orphans, request.repo_id)
        on_update(
            DownloadUpdate(
                commit=plan.commit,
                total_bytes=plan.total_bytes,
                files_total=len(plan.files),
                attempt=number,
            )
        )
        spec = {
            "repo_id": request.repo_id,
            "revision": request.revision,
            "cache_dir": str(self.settings.cache_dir),
            "endpoint": self.settings.hf_endpoint,
            "plan": plan_to_json(plan),
            "limits": dataclasses.asdict(hub_limits(self.settings)),
        }
        process = await self._take_worker()
        assert process.stdin is not None
        assert process.stdout is not None
        outcome: dict[str, Any] | None = None
        stall = self.settings.stall_timeout_seconds
        try:
            process.stdin.write(json.dumps(spec).encode() + b"\n")
            await process.stdin.drain()
            # stdin stays open: the worker exits by itself when it closes (this process died).
            while True:
                try:
                    raw = await asyncio.wait_for(process.stdout.readline(), timeout=stall)
                except TimeoutError:
                    raise AttemptFailed(
                        FailureKind.STALLED, f"no data for {stall:g} s (stalled)", True
                    ) from None
                if not raw:
                    break
                message = _parse(raw)
                if message is None:
                    continue
                if message.get("type") in ("done", "failed"):
                    outcome = message
                else:
                    on_update(_update_from(message, number))
            await process.wait()
        except BaseException:
            # Cancelled, stalled, anything: stop the transfer now, then clean up after it.
            await _kill(process)
            await asyncio.shield(asyncio.to_thread(self.cache.remove_orphans, request.repo_id))
            raise
        finally:
            with contextlib.suppress(Exception):
                process.stdin.close()
        await asyncio.to_thread(self.cache.remove_orphans, request.repo_id)
        self._refill_spare()
        if outcome is None:
            raise AttemptFailed(
                FailureKind.CRASHED,
                f"the download worker exited unexpectedly (code {process.returncode})",
                True,
            )
        if outcome["type"] == "failed":
            raise AttemptFailed(
                FailureKind(outcome["kind"]),
                str(outcome["message"]),
                bool(outcome["retryable"]),
                outcome.get("retry_after"),
            )
        return plan.commit


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    # Wait for it even when cancelled again: no worker may outlive its download.
    await asyncio.shield(process.wait())


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except ValueError:
        logger.warning("ignoring a malformed line from a download worker")
        return None
    return message if isinstance(message, dict) else None


def _update_from(message: dict[str, Any], attempt: int) -> DownloadUpdate:
    def num(key: str) -> int | None:
        value = message.get(key)
        return int(value) if isinstance(value, (int, float)) else None

    return DownloadUpdate(
        downloaded_bytes=num("downloaded_bytes"),
        transferred_bytes=num("transferred_bytes"),
        files_done=num("files_done"),
        attempt=attempt,
        verifying=message.get("type") == "verifying",
    )
