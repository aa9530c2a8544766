"""``ModelManager``: owns the state of downloads and the policy around them.

Routes translate HTTP; the manager decides (conflicts, limits, what a status is); the backend
(``api.models.hub``) talks to the Hub and the cache. Downloads are asyncio tasks, one per model
revision, held in ``_download_tasks`` by strong reference; each task drives a worker process
through the backend. Progress changes only on the event loop thread; routes read snapshots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from api import logfmt
from api.models.backend import (
    CachedRevision,
    CacheState,
    DownloadFailed,
    DownloadPlan,
    DownloadRequest,
    DownloadUpdate,
    FailureKind,
    FileSelection,
    HubBackend,
    LocalState,
    Peer,
    Pruned,
)
from api.models.errors import (
    DownloadCancelled,
    DownloadConflict,
    HubAnswer,
    InsufficientStorage,
    InUseUnknown,
    ModelInUse,
    ModelNotFound,
    NotAFleet,
    SelectionUnusable,
    TooManyDownloads,
    TooManyVerifications,
)
from api.models.events import EventBus
from api.models.job import DownloadJob
from api.models.revisions import Revision, UpdateChecker, in_use_map
from api.models.service import Figures, ServiceFigures
from api.models.serving import ServedModel, ServedNow, VllmServers
from api.models.store import JobStore
from api.models.types import (
    COMMIT_PATTERN,
    BandwidthResponse,
    DeleteResponse,
    DeleteStatus,
    DiskSpaceInfo,
    DownloadEventType,
    DownloadListResponse,
    DownloadPhase,
    DownloadShare,
    DownloadStartedResponse,
    InUseInfo,
    KeptRevision,
    Model,
    ModelListItem,
    ModelListResponse,
    ModelRequest,
    ModelStatus,
    ModelStatusResponse,
    PlanFile,
    PlanResponse,
    PrunedRevision,
    PruneRequest,
    PruneResponse,
    SelectionInfo,
    UpdateInfo,
    UpdatesResponse,
    VerifyResponse,
    WeightChoice,
    revision_problem,
)
from api.settings import Settings

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Tuning, fixed here (they were settings no operator story or test set):
CACHE_THREADS = 4  # threads reading the cache for status, list, space and delete
UPDATE_CHECK_CONCURRENCY = 4  # branches GET /updates asks the Hub about at once
UPDATE_CHECK_TTL_SECONDS = 300.0  # a branch's check is reused this long (unless ?refresh=true)

_STATE_TO_STATUS = {
    CacheState.COMPLETE: ModelStatus.DOWNLOADED,
    CacheState.PARTIAL: ModelStatus.PARTIAL,
    CacheState.ABSENT: ModelStatus.NOT_FOUND,
    CacheState.BUSY: ModelStatus.DOWNLOADING,  # by another process sharing the cache
}


class ModelManager:
    """Fetch, watch, check, list and remove models in the local Hugging Face cache."""

    def __init__(
        self, settings: Settings, backend: HubBackend, servers: VllmServers | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend
        # What the vLLM servers using this cache serve (MODELS_VLLM_URLS): never deleted unasked.
        self.servers = servers or VllmServers(
            settings.vllm_urls, settings.vllm_key, settings.vllm_timeout_seconds
        )
        self.update_checks = UpdateChecker(
            backend.resolve,
            self._plan_of_ref,
            self._missing_bytes,
            concurrency=UPDATE_CHECK_CONCURRENCY,
            timeout=settings.plan_timeout_seconds,
            ttl=UPDATE_CHECK_TTL_SECONDS,
        )
        self._download_tasks: dict[str, asyncio.Task[None]] = {}
        self._jobs: dict[str, DownloadJob] = {}
        self._errors: dict[str, str] = {}  # task id -> why its last download failed
        self._starting: dict[str, _Start] = {}  # between the checks and the task's start
        # Downloads waiting for a slot (MODELS_MAX_QUEUED_DOWNLOADS), first in, first out; each
        # is also in _jobs (its status), with no task yet.
        self._queue: collections.deque[_Queued] = collections.deque()
        self.events = EventBus()  # listeners (logs, metrics) are wired by the app
        # What outlives the service (downloads to resume, last errors), written on a thread of
        # its own in the order submitted; off when the state folder cannot be used.
        self.store = JobStore(settings.state_path)
        self._store_open = False
        self._state_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._stopping = False  # shutting down: cancelled downloads stay in the store
        # MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND, changeable at run time; None: no cap.
        self._bandwidth: int | None = settings.max_download_bytes_per_second or None
        # Threads of their own for cache reads (status, list, space, delete) and for hashing
        # (verify): neither waits behind the other, nor behind the Hub calls (the backend's).
        self._cache_pool = ThreadPoolExecutor(max_workers=CACHE_THREADS, thread_name_prefix="cache")
        self._verify_slots = asyncio.Semaphore(settings.max_concurrent_verifications)
        self._hash_pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrent_verifications,
            thread_name_prefix="hash",
            initializer=_lower_thread_priority,
            initargs=(settings.worker_nice,),
        )

    async def _on_cache_pool(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._cache_pool, function, *args)

    async def _on_state_pool(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._state_pool, function, *args)

    def _keep(self, function: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        """Run a write of the job store on its thread, after every write submitted before it; a
        failure is logged (the download goes on, unkept), never raised."""
        loop = asyncio.get_running_loop()
        if not self._store_open:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        future = loop.run_in_executor(self._state_pool, function, *args)
        future.add_done_callback(_log_store_failure)
        return future

    def _set_errors(self, errors: dict[str, str]) -> None:
        self._errors.update(errors)
        self._keep(self.store.set_errors, errors)

    def _drop_errors(self, *task_ids: str) -> None:
        dropped = [t for t in task_ids if self._errors.pop(t, None) is not None]
        if dropped:
            self._keep(self.store.drop_errors, dropped)

    # -- queries -----------------------------------------------------------------------------

    async def is_model_exist(self, model: Model) -> bool:
        """True when every file of the revision is in the cache (offline)."""
        state = await self._on_cache_pool(self.backend.local_state, model.hf_repo, model.revision)
        return state.state is CacheState.COMPLETE

    async def get_model_status(
        self, model: Model, asked: FileSelection | None = None
    ) -> ModelStatusResponse:
        """The status of the revision for the files ``asked``, else for those it was downloaded
        with, else for the default selection."""
        job = self._job_for(model)
        if job is not None:
            answer = job.status().model_copy(update={"model": model})  # as it was asked
        else:
            local = await self._on_cache_pool(
                self.backend.local_state, model.hf_repo, model.revision, asked
            )
            status = _STATE_TO_STATUS[local.state]
            error = None
            if status is not ModelStatus.DOWNLOADED:
                error = self._errors.get(model.task_id)
                error = error or self._error_of(model.hf_repo, local.commit) or local.note
            answer = ModelStatusResponse(
                model=model,
                status=status,
                error_message=error,
                commit=local.commit,
                selection=[SelectionInfo.of(s) for s in local.selections] or None,
            )
        served = answer.served_commit or answer.commit
        if self.servers.configured and served is not None:
            _, users = await self._users(model.hf_repo, fresh=False)
            answer.in_use_by = _in_use_info(users.get((model.hf_repo, served), []))
        return answer

    async def list_models(self) -> list[ModelListItem]:
        """Every cached model revision (DOWNLOADED or PARTIAL), and every running download."""
        cached = await self._on_cache_pool(self.backend.list_cached)
        users = None
        if self.servers.configured:
            _, users = await self._users(None, fresh=False, revisions=cached)
        jobs = list(self._jobs.values())
        items: list[ModelListItem] = []
        covered: set[int] = set()
        for revision in cached:
            job = next((j for j in jobs if _same_revision(j, revision)), None)
            if job is not None:
                covered.add(id(job))
            items.append(
                ModelListItem(
                    model=Model.model_construct(
                        hf_repo=revision.repo_id, hf_commit=revision.commit
                    ),
                    status=ModelStatus.DOWNLOADING
                    if job is not None
                    else _STATE_TO_STATUS[revision.state],
                    size_bytes=revision.size_bytes,
                    refs=list(revision.refs),
                    progress=job.progress() if job is not None else None,
                    error_message=None
                    if job is not None or revision.state is CacheState.COMPLETE
                    else self._error_of(revision.repo_id, revision.commit) or revision.note,
                    selection=[SelectionInfo.of(s) for s in revision.selections] or None,
                    in_use_by=None
                    if users is None or revision.commit is None
                    else _in_use_info(users.get((revision.repo_id, revision.commit), [])),
                )
            )
        for job in jobs:
            if id(job) not in covered:
                items.append(
                    ModelListItem(
                        model=job.model, status=ModelStatus.DOWNLOADING, progress=job.progress()
                    )
                )
        return items

    def _error_of(self, repo_id: str, commit: str | None) -> str | None:
        """Why the last download of this exact revision failed, whatever name it was asked by."""
        return self._errors.get(f"{repo_id}:{commit}") if commit is not None else None

    async def get_disk_space(self) -> DiskSpaceInfo:
        used, free = await self._on_cache_pool(self.backend.cache_usage)
        return DiskSpaceInfo(
            cache_size_bytes=used, available_bytes=free, cache_path=self.backend.cache_path
        )

    # -- downloads ---------------------------------------------------------------------------

    async def add_model(
        self, model: Model, asked: FileSelection | None = None, peers: tuple[Peer, ...] = ()
    ) -> DownloadStartedResponse:
        """Start downloading the files ``asked`` of ``model`` (None: those the revision was
        downloaded with, else the default selection) in the background.

        Returns status DOWNLOADED (and starts nothing) when the revision is already complete in
        the cache: for a commit id with no network traffic; for a branch or tag after one request
        that asks the Hub where it points now (when it moved, the new commit is downloaded beside
        the old one, and the branch moves to it once it is verified; a Hub that cannot answer
        leaves the cached revision as the answer). Else DOWNLOADING with the task id.
        Raises ``DownloadConflict`` when the same revision is already downloading, under any of
        its names (``org/name``, ``org/name`` at ``main``, and the commit ``main`` points to are
        one revision), ``TooManyDownloads`` when every download slot is taken, and
        ``DownloadCancelled`` when a DELETE cancelled it while it was starting. ``peers`` (a fleet's
        nodes that have the revision) are where its files are copied from first.
        """
        task_id = model.task_id
        self._check_can_start(model)
        local = await self._on_cache_pool(
            self.backend.local_state, model.hf_repo, model.revision, asked
        )
        if local.state is CacheState.COMPLETE and not await self._branch_moved(model, local):
            return DownloadStartedResponse(task_id=task_id, status=ModelStatus.DOWNLOADED)
        # Checked again after the await, then the slot (or a place in the queue) is held while
        # the file list is fetched.
        queued = self._check_can_start(model)
        start = _Start(model, queued=queued)
        self._starting[task_id] = start
        try:
            planned = await self._plan_with_space_check(model, asked)
            plan = planned if isinstance(planned, DownloadPlan) else None
            if plan is not None:
                # Now the commit is known: one revision, one job, whatever it was asked as.
                start.commit = plan.commit
                if (running := self._running_as(model, plan.commit, besides=task_id)) is not None:
                    raise DownloadConflict(running)
            if start.cancelled:
                raise DownloadCancelled(task_id)
            job = DownloadJob(model=model, bus=self.events, peers=peers)
            if plan is not None:
                # Known before the first byte: the status shows the totals at once.
                job.commit = plan.commit
                job.selections = plan.selections
                if local.commit not in (None, plan.commit) and local.state is not CacheState.ABSENT:
                    # A branch that moved: its ref names the cached revision until this one is
                    # complete and verified.
                    job.served_commit = local.commit
                job.total_bytes = plan.total_bytes
                job.files_total = len(plan.wanted)
            self._drop_errors(task_id, *([f"{model.hf_repo}:{job.commit}"] if job.commit else []))
            if isinstance(planned, DownloadFailed) and not planned.retryable:
                # Fail now: no retry can mend it (not found, gated, a refused answer).
                job.publish(DownloadEventType.STARTED)
                self._end(job, planned)
                return DownloadStartedResponse(task_id=task_id, status=ModelStatus.DOWNLOADING)
            # Or start, with the plan, or without it after waiting what the Hub asked: the
            # download then fetches the file list itself, with its retries.
            delay = (planned.retry_after or 0.0) if isinstance(planned, DownloadFailed) else 0.0
            self._jobs[task_id] = job
            # Kept before it starts (its end, submitted later, is written after it).
            job.key = uuid.uuid4().hex
            kept = self._keep(self.store.add, job.key, model, asked)
            if queued and not self._slot_free(besides=task_id):
                job.phase = DownloadPhase.QUEUED
                self._queue.append(_Queued(job, plan, asked, delay))
                self._number_queue()
                job.publish(DownloadEventType.QUEUED)
            else:
                self._launch(job, plan, asked, delay)
        finally:
            self._starting.pop(task_id, None)
            # A start that failed, or that found no file list to fetch, held a slot until now.
            self._start_queued()
        # Accepted once it is on disk: a crash after the answer still resumes it. A write that
        # failed was logged (_keep): the download runs all the same, not kept for a restart.
        with contextlib.suppress(Exception):
            await kept
        return DownloadStartedResponse(task_id=task_id, status=ModelStatus.DOWNLOADING)

    def _launch(
        self, job: DownloadJob, plan: DownloadPlan | None, asked: FileSelection | None, delay: float
    ) -> None:
        """Start the download's task (it holds a slot from now on)."""
        if job.phase is DownloadPhase.QUEUED:
            job.phase = DownloadPhase.RESOLVING if plan is None else DownloadPhase.DOWNLOADING
            job.queue_position = None
        job.task = asyncio.create_task(
            self._run(job, plan, asked, delay), name=f"download {job.task_id}"
        )
        self._download_tasks[job.task_id] = job.task
        self._share_bandwidth()
        job.publish(DownloadEventType.STARTED)

    def _slot_free(self, besides: str | None = None) -> bool:
        """Whether a download can start now: the running ones and those between their checks
        and their start (not those that will queue) leave a slot."""
        starting = sum(1 for t, s in self._starting.items() if not s.queued and t != besides)
        return len(self._download_tasks) + starting < self.settings.max_concurrent_downloads

    def _start_queued(self) -> None:
        """Start the next queued downloads while slots are free (a download ended)."""
        while self._queue and self._slot_free():
            waiting = self._queue.popleft()
            self._launch(waiting.job, waiting.plan, waiting.asked, waiting.delay)
        self._number_queue()

    def _number_queue(self) -> None:
        for position, waiting in enumerate(self._queue, start=1):
            waiting.job.queue_position = position

    async def _branch_moved(self, model: Model, local: LocalState) -> bool:
        """Whether the branch (or tag) asked for points on the Hub at another commit than the
        complete one cached: one metadata request. A commit id never moves (no request); a Hub
        that cannot answer leaves the cached revision as the answer."""
        if COMMIT_PATTERN.fullmatch(model.revision) or local.commit is None:
            return False
        try:
            async with asyncio.timeout(self.settings.plan_timeout_seconds):
                commit = await self.backend.resolve(model.hf_repo, model.revision)
        except (DownloadFailed, TimeoutError) as failure:
            logfmt.log(
                logger,
                logging.INFO,
                "update_check_failed",
                repo=model.hf_repo,
                revision=model.revision,
                reason=failure,
            )
            return False
        return commit != local.commit

    def _running(self) -> Iterator[tuple[str, Model, str | None]]:
        """(task id, model, commit when known) of every download that runs or starts here."""
        for task_id, job in self._jobs.items():
            yield task_id, job.model, job.commit
        for task_id, start in self._starting.items():
            yield task_id, start.model, start.commit

    def _running_as(
        self, model: Model, commit: str | None = None, besides: str | None = None
    ) -> str | None:
        """The task id under which this revision already downloads or starts, if it does: the
        same task id, the same branch (``latest`` is ``main``), or the same commit (``commit``,
        once the plan has resolved it; else ``hf_commit`` when it is one). ``besides``: a task
        id not to count (the start asking)."""
        if commit is None and model.hf_commit and COMMIT_PATTERN.fullmatch(model.hf_commit):
            commit = model.hf_commit
        for task_id, other, other_commit in self._running():
            if other.hf_repo != model.hf_repo or task_id == besides:
                continue
            if task_id == model.task_id or other.revision == model.revision:
                return task_id
            if commit is not None and commit in (other_commit, other.hf_commit):
                return task_id
        return None

    def _check_can_start(self, model: Model) -> bool:
        """Raise ``DownloadConflict`` when the revision runs or waits already, and
        ``TooManyDownloads`` when every slot is taken and the queue is full (or there is none);
        return whether the download will have to wait in the queue."""
        if (running := self._running_as(model)) is not None:
            raise DownloadConflict(running)
        if self._slot_free():
            return False
        waiting = len(self._queue) + sum(1 for s in self._starting.values() if s.queued)
        if waiting < self.settings.max_queued_downloads:
            return True
        raise TooManyDownloads(
            self.settings.max_concurrent_downloads,
            self.settings.retry_after_seconds,
            self.settings.max_queued_downloads,
        )

    def _job_for(self, model: Model) -> DownloadJob | None:
        """The running job of this revision, under any of its names."""
        running = self._running_as(model)
        return self._jobs.get(running) if running is not None else None

    async def _fetch_plan(
        self, model: Model, asked: FileSelection | None
    ) -> DownloadPlan | DownloadFailed:
        """The revision's file list with the selection resolved; a failure to fetch it is
        returned (a slow list is a retryable one)."""
        request = DownloadRequest(model.hf_repo, model.revision, asked)
        try:
            async with asyncio.timeout(self.settings.plan_timeout_seconds):
                return await self.backend.plan(request)
        except DownloadFailed as failure:
            return failure
        except TimeoutError:
            return DownloadFailed(FailureKind.NETWORK, "the file list is slow", retryable=True)

    async def _space_for(self, repo_id: str, plan: DownloadPlan) -> _Space:
        """What a download of the plan would still fetch, and the room for it: the free space
        less what running downloads still need, less the margin (the 507 check's figures)."""
        needed = await self._on_cache_pool(self.backend.missing_bytes, repo_id, plan)
        # Only the free space: walking the whole cache for its size would slow every start.
        free = await self._on_cache_pool(self.backend.free_bytes)
        reserved = sum(
            max((job.total_bytes or 0) - (job.downloaded_bytes or 0), 0)
            for job in self._jobs.values()
        )
        available = max(free - reserved - self.settings.space_margin_bytes, 0)
        return _Space(needed, available, free, reserved)

    async def _plan_with_space_check(
        self, model: Model, asked: FileSelection | None
    ) -> DownloadPlan | DownloadFailed:
        """Fetch the file list and refuse a selection that cannot be downloaded
        (``SelectionUnusable``) and a download that cannot fit (``InsufficientStorage``)."""
        plan = await self._fetch_plan(model, asked)
        if isinstance(plan, DownloadFailed):
            return plan
        if plan.problem is not None:
            raise SelectionUnusable(plan.problem)
        space = await self._space_for(model.hf_repo, plan)
        if not space.fits:
            raise InsufficientStorage(
                space.needed,
                space.available,
                space.free,
                space.reserved,
                self.settings.space_margin_bytes,
            )
        return plan

    async def plan_model(self, model: Model, asked: FileSelection | None = None) -> PlanResponse:
        """What a download of the files ``asked`` of ``model`` would fetch, from the Hub's file
        list, writing nothing.

        Raises ``HubAnswer`` when the Hub cannot give the list (missing, private or gated repo,
        no answer)."""
        plan = await self._fetch_plan(model, asked)
        if isinstance(plan, DownloadFailed):
            raise HubAnswer(plan)
        space = await self._space_for(model.hf_repo, plan)
        wanted = {f.path for f in plan.wanted}
        return PlanResponse(
            model=model,
            commit=plan.commit,
            selection=[SelectionInfo.of(s) for s in plan.selections],
            files=[
                PlanFile(path=f.path, size=f.size, selected=f.path in wanted)
                for f in sorted(plan.files, key=lambda f: f.path)
            ],
            selected_files=len(wanted),
            selected_bytes=plan.total_bytes,
            missing_bytes=space.needed,
            available_bytes=space.available,
            fits=space.fits,
            weights=[
                WeightChoice(
                    format=g.format,
                    quantization=g.quantization,
                    folder=g.folder,
                    pattern=g.pattern,
                    files=list(g.files),
                    size_bytes=g.size,
                    selected=all(p in wanted for p in g.files),
                )
                for g in plan.weights
            ],
            note=plan.problem,
        )

    async def _run(
        self,
        job: DownloadJob,
        plan: DownloadPlan | None,
        asked: FileSelection | None,
        delay: float,
    ) -> None:
        request = DownloadRequest(job.model.hf_repo, job.model.revision, asked, job.peers)
        failure: DownloadFailed | None = None

        def on_update(update: DownloadUpdate) -> None:
            verifying = job.phase is DownloadPhase.VERIFYING
            job.apply(update)
            if verifying != (job.phase is DownloadPhase.VERIFYING):
                self._share_bandwidth()  # a verification fetches nothing: the others get more

        try:
            await asyncio.sleep(min(delay, self.settings.retry_max_backoff_seconds))
            async with asyncio.timeout(self.settings.download_timeout_seconds):
                job.commit = await self.backend.download(request, plan, on_update, job.rate)
            failure = await self._landed(job, asked)
        except TimeoutError:
            timeout = self.settings.download_timeout_seconds
            failure = DownloadFailed(
                FailureKind.TIMEOUT, f"gave up after {timeout:g} s (download timeout)", job.attempt
            )
        except DownloadFailed as error:
            failure = error
        except asyncio.CancelledError:
            self._finish(job, kept=self._stopping)  # a shutdown's cancel: resumed at next start
            if job.discard:
                # A user's cancel takes the parts kept for a next attempt with it; a shutdown
                # keeps them, so that the download goes on from there after the restart.
                with contextlib.suppress(OSError):
                    await self._on_cache_pool(self.backend.discard_partial, job.model.hf_repo)
            job.publish(DownloadEventType.CANCELLED)
            self._start_queued()  # its slot is free (after its last event: in that order)
            raise
        except Exception as error:  # a bug: keep the service up, say so in the status
            logfmt.log(
                logger, logging.ERROR, "download_crashed", exc_info=True, task_id=job.task_id
            )
            failure = DownloadFailed(
                FailureKind.UNEXPECTED, f"internal error ({type(error).__name__})"
            )
        self._end(job, failure)

    async def _landed(self, job: DownloadJob, asked: FileSelection | None) -> DownloadFailed | None:
        """Whether what a download that ended well left is what was asked: the very commit when
        a commit was asked, and the revision complete in the cache. Otherwise the failure that
        says why (a download never ends without its revision and no word of it)."""
        wanted, got = job.model.hf_commit, job.commit
        if got is None:
            return DownloadFailed(FailureKind.UNEXPECTED, "the download ended without a revision")
        if wanted is not None and COMMIT_PATTERN.fullmatch(wanted) and got != wanted.lower():
            return DownloadFailed(
                FailureKind.UNTRUSTED,
                f"the Hub answered commit {got[:12]} for commit {wanted.lower()[:12]}: refused",
            )
        local = await self._on_cache_pool(self.backend.local_state, job.model.hf_repo, got, asked)
        if local.state in (CacheState.COMPLETE, CacheState.BUSY):
            return None
        why = local.note or f"it is {local.state.value.lower()}"
        return DownloadFailed(
            FailureKind.UNEXPECTED,
            f"the download ended, but the cache does not hold revision {got[:12]} complete: {why}",
        )

    def _end(self, job: DownloadJob, failure: DownloadFailed | None) -> None:
        """The job leaves the table before its last event: whoever reacts to it and asks for the
        status gets the cache's answer (DOWNLOADED, or PARTIAL with the error)."""
        self._finish(job)
        if failure is None:
            job.phase = DownloadPhase.COMPLETED
            job.publish(DownloadEventType.COMPLETED)
        else:
            errors = {job.task_id: str(failure)}
            if job.commit is not None:
                errors[f"{job.model.hf_repo}:{job.commit}"] = str(failure)
            self._set_errors(errors)
            job.publish(DownloadEventType.FAILED, error_message=str(failure))
        self._start_queued()  # its slot is free (after its last event: in that order)

    def _finish(self, job: DownloadJob, kept: bool = False) -> None:
        """The job leaves the tables, and the store unless ``kept`` (to be resumed)."""
        self._jobs.pop(job.task_id, None)
        self._download_tasks.pop(job.task_id, None)
        if job.key is not None and not kept:
            self._keep(self.store.remove, job.key)
        self._share_bandwidth()

    # -- bandwidth ---------------------------------------------------------------------------

    def _share_bandwidth(self) -> None:
        """Give each running download its share of the cap: the cap divided between those that
        fetch now (a verifying one fetches nothing; it gets the same share, used when it fetches
        again, which shares anew). Each worker follows its share at once."""
        running = [job for job in self._jobs.values() if job.task is not None]
        share: float | None = None
        if self._bandwidth is not None:
            fetching = sum(1 for job in running if job.phase is not DownloadPhase.VERIFYING)
            share = self._bandwidth / max(fetching, 1)
        for job in running:
            job.rate.set(share)

    def set_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse:
        """A new cap for all downloads together (None: none), applied to the running ones now,
        without restarting them."""
        self._bandwidth = bytes_per_second
        logfmt.log(
            logger, logging.INFO, "bandwidth_cap", bytes_per_second=bytes_per_second or "none"
        )
        self._share_bandwidth()
        return self.bandwidth()

    def bandwidth(self) -> BandwidthResponse:
        return BandwidthResponse(
            max_bytes_per_second=self._bandwidth,
            xet_when_capped=self.settings.xet_when_capped,
            downloads=[
                DownloadShare(
                    task_id=job.task_id,
                    bytes_per_second=job.rate.value,
                    note=job.progress().bandwidth_note,
                )
                for job in self._jobs.values()
                if job.task is not None
            ],
        )

    async def cancel_download(self, model: Model) -> bool:
        """Stop a running download and wait until its worker is gone and its temporary files are
        removed. Files already complete stay (the model is then PARTIAL). False when not running."""
        running = self._running_as(model)
        if running is not None and running in self._starting:
            self._starting[running].cancelled = True  # it will not start
            return True
        waiting = next((w for w in self._queue if w.job.task_id == running), None)
        if waiting is not None:
            self._queue.remove(waiting)
            self._finish(waiting.job)
            self._number_queue()
            waiting.job.publish(DownloadEventType.CANCELLED)
            return True
        task = self._download_tasks.get(running) if running is not None else None
        if task is None:
            return False
        if running is not None and (job := self._jobs.get(running)) is not None:
            job.discard = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def delete_model(self, model: Model, force: bool = False) -> DeleteResponse:
        """Cancel the download of ``model`` if one runs, else delete it from the cache.

        Without ``hf_commit`` the whole model (every cached revision) is deleted; with one, that
        revision only, keeping blobs other revisions share. Raises ``ModelNotFound`` when there is
        nothing to cancel or delete, ``DownloadConflict`` when deleting the whole model while
        another of its revisions downloads, and, unless ``force``, ``ModelInUse`` when a vLLM
        server serves what would be deleted and ``InUseUnknown`` when one does not answer.
        """
        if await self.cancel_download(model):
            return DeleteResponse(status=DeleteStatus.CANCELLED)
        if model.hf_commit is None:
            # The whole model: not while another of its revisions downloads or starts here.
            for task_id, other, _ in self._running():
                if other.hf_repo == model.hf_repo:
                    raise DownloadConflict(task_id)
        if not force and self.servers.configured:
            await self._refuse_in_use(model)
        freed = await self._on_cache_pool(self.backend.delete, model.hf_repo, model.hf_commit)
        if freed is None:
            raise ModelNotFound(model.task_id)
        self._drop_errors(model.task_id)
        logfmt.log(
            logger,
            logging.INFO,
            "deleted",
            task_id=model.task_id,
            repo=model.hf_repo,
            revision=model.hf_commit or "all",
            freed_bytes=freed,
        )
        return DeleteResponse(status=DeleteStatus.DELETED, freed_bytes=freed)

    async def _refuse_in_use(self, model: Model) -> None:
        """Raise ``ModelInUse`` when a vLLM server serves a revision a delete of ``model`` would
        remove (every revision without ``hf_commit``), ``InUseUnknown`` when a server did not
        answer; asked now, not from a previous answer."""
        revisions = await self._on_cache_pool(self.backend.list_cached, model.hf_repo)
        if model.hf_commit is None:
            targets = [r.commit for r in revisions if r.commit is not None]
        elif COMMIT_PATTERN.fullmatch(model.hf_commit):
            targets = [model.hf_commit]
        else:
            targets = [r.commit for r in revisions if r.commit and model.hf_commit in r.refs]
        if not targets:
            return  # nothing of it cached: the delete says so
        now, users = await self._users(model.hf_repo, fresh=True, revisions=revisions)
        for commit in targets:
            for card in users.get((model.hf_repo, commit), []):
                raise ModelInUse(f"{model.hf_repo} at {commit}", card.server, card.model_id)
        for server, why in now.unreachable:
            raise InUseUnknown(model.task_id, server, why)

    async def _users(
        self,
        repo_id: str | None,
        fresh: bool,
        revisions: list[CachedRevision] | None = None,
    ) -> tuple[ServedNow, dict[Revision, list[ServedModel]]]:
        """What the vLLM servers answered, and which cached revisions (of ``repo_id``, else all)
        they serve. ``fresh``: asked now (a delete, a prune). Else an answer up to
        ``MODELS_VLLM_CHECK_TTL_SECONDS`` old, and a status or a list waits at most a quarter of a
        second for a new one (past it, the last answer is used)."""
        if fresh:
            now = await self.servers.now()
        else:
            now = await self.servers.now(self.settings.vllm_check_ttl_seconds, waited=0.25)
        if revisions is None:
            revisions = await self._on_cache_pool(self.backend.list_cached, repo_id)
        users = await self._on_cache_pool(in_use_map, now, revisions, self.backend.revision_at)
        return now, users

    # -- revisions: updates and prune ---------------------------------------------------------

    async def check_updates(self, refresh: bool = False) -> list[UpdateInfo]:
        """For every branch (or tag) cached, whether it points at another commit on the Hub now,
        and what an update would fetch; a check that fails says why in ``error``."""
        cached = await self._on_cache_pool(self.backend.list_cached)
        refs = sorted(
            {
                (revision.repo_id, ref, revision.commit)
                for revision in cached
                if revision.commit is not None
                for ref in revision.refs
                if revision_problem(ref) is None and not COMMIT_PATTERN.fullmatch(ref)
            }
        )
        checks = await self.update_checks.check_all(refs, refresh)
        return [
            UpdateInfo(
                model=Model.model_construct(
                    hf_repo=check.repo_id, hf_commit=None if check.ref == "main" else check.ref
                ),
                ref=check.ref,
                cached_commit=check.cached_commit,
                hub_commit=check.hub_commit,
                update_available=check.update_available,
                bytes_to_download=check.bytes_to_download,
                error=check.error,
                checked_at=check.checked_at,
            )
            for check in checks
        ]

    async def _plan_of_ref(self, repo_id: str, ref: str) -> DownloadPlan:
        """The file list of what ``ref`` points at on the Hub, for the selection its cached
        revision was downloaded with."""
        return await self.backend.plan(DownloadRequest(repo_id, ref))

    async def _missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        return await self._on_cache_pool(self.backend.missing_bytes, repo_id, plan)

    async def prune(self, request: PruneRequest, force: bool = False) -> PruneResponse:
        """Remove the revisions no ref points to (and, with ``include_partial``, PARTIAL ones),
        of ``hf_repo`` or of every model, keeping those that download (here or in another process
        sharing the cache) and, unless ``force``, those a vLLM server serves. Blobs a kept
        revision uses stay. With ``dry_run``, nothing changes.

        Raises ``InUseUnknown`` (not for a dry run, nor with ``force``) when a vLLM server does
        not answer: what it serves cannot be kept then."""
        cached = await self._on_cache_pool(self.backend.list_cached, request.hf_repo)
        now: ServedNow = ServedNow()
        users: dict[Revision, list[ServedModel]] = {}
        if not force and self.servers.configured:
            now, users = await self._users(request.hf_repo, fresh=True, revisions=cached)
            if now.unreachable and not request.dry_run:
                server, why = now.unreachable[0]
                raise InUseUnknown("what prune would remove", server, why)
        running = {(m.hf_repo, c) for _, m, c in self._running()}
        starting = {m.hf_repo for _, m, c in self._running() if c is None}
        kept: list[KeptRevision] = []
        doomed: dict[str, set[str | None]] = {}
        for revision in cached:
            if revision.state is CacheState.PARTIAL:
                if not request.include_partial:
                    continue
            elif revision.refs:
                continue  # what a branch or a tag names
            model = Model.model_construct(hf_repo=revision.repo_id, hf_commit=revision.commit)
            reason = None
            if (revision.repo_id, revision.commit) in running or revision.repo_id in starting:
                reason = "it is downloading"
            elif revision.state is CacheState.BUSY:
                reason = "another process sharing the cache is downloading it"
            elif revision.commit is not None and (
                cards := users.get((revision.repo_id, revision.commit))
            ):
                reason = (
                    f"in use by the vLLM server at {cards[0].server} (as {cards[0].model_id!r})"
                )
            if reason is not None:
                kept.append(KeptRevision(model=model, reason=reason))
            else:
                doomed.setdefault(revision.repo_id, set()).add(revision.commit)
        revisions: list[PrunedRevision] = []
        freed = 0
        for repo_id, commits in sorted(doomed.items()):
            whole = None in commits
            targets = None if whole else frozenset(c for c in commits if c is not None)
            pruned: Pruned = await self._on_cache_pool(
                self.backend.prune, repo_id, targets, request.dry_run
            )
            if pruned.refused is not None:
                kept.extend(
                    KeptRevision(
                        model=Model.model_construct(hf_repo=repo_id, hf_commit=c),
                        reason=pruned.refused,
                    )
                    for c in sorted(commits, key=str)
                )
                continue
            freed += pruned.freed_bytes
            for commit, size in pruned.revisions:
                revisions.append(
                    PrunedRevision(
                        model=Model.model_construct(hf_repo=repo_id, hf_commit=commit),
                        size_bytes=size,
                    )
                )
            if not request.dry_run:
                self._forget_errors(repo_id, commits, cached)
        if not request.dry_run and revisions:
            logfmt.log(
                logger,
                logging.INFO,
                "pruned",
                revisions=len(revisions),
                freed_bytes=freed,
                kept=len(kept),
            )
        note = None
        if now.unreachable:
            server, why = now.unreachable[0]
            note = (
                f"the vLLM server at {server} did not answer ({why}): what it serves is not known,"
                " and prune without dry_run will refuse unless ?force=true"
            )
        return PruneResponse(
            dry_run=request.dry_run, revisions=revisions, freed_bytes=freed, kept=kept, note=note
        )

    def _forget_errors(
        self, repo_id: str, removed: set[str | None], cached: list[CachedRevision]
    ) -> None:
        """A removed revision's last error goes with it; a model removed whole takes the errors
        of every name it was asked by (``org/name:latest``...), as a delete does."""
        left = {r.commit for r in cached if r.repo_id == repo_id} - removed
        forgotten = []
        for key in self._errors:
            name, _, revision = key.rpartition(":")
            if name == repo_id and (not left or revision in removed):
                forgotten.append(key)
        self._drop_errors(*forgotten)

    async def verify_model(self, model: Model) -> VerifyResponse:
        """Hash every file of the cached revision against its ETag, off the event loop.

        Raises ``DownloadConflict`` while it downloads and ``ModelNotFound`` when not cached."""
        if (running := self._running_as(model)) is not None:
            raise DownloadConflict(running)
        if self._verify_slots.locked():
            raise TooManyVerifications(
                self.settings.max_concurrent_verifications, self.settings.retry_after_seconds
            )
        async with self._verify_slots:
            report = await asyncio.get_running_loop().run_in_executor(
                self._hash_pool, self.backend.verify, model.hf_repo, model.revision
            )
        if report is None:
            raise ModelNotFound(model.task_id)
        verified = not report.missing and not report.mismatched
        logfmt.log(
            logger,
            logging.INFO,
            "verified",
            task_id=model.task_id,
            commit=report.commit,
            checked=report.files_checked,
            missing=len(report.missing),
            mismatched=len(report.mismatched),
        )
        return VerifyResponse(
            model=model,
            commit=report.commit,
            verified=verified,
            files_checked=report.files_checked,
            missing=list(report.missing),
            mismatched=list(report.mismatched),
        )

    # -- the service's operations (``api.models.service.ModelService``) ------------------------

    async def status(self, request: ModelRequest) -> ModelStatusResponse:
        return await self.get_model_status(_one_machine(request), request.selection)

    async def download(self, request: ModelRequest) -> DownloadStartedResponse:
        return await self.add_model(_one_machine(request), request.selection)

    async def plan(self, request: ModelRequest) -> PlanResponse:
        return await self.plan_model(_one_machine(request), request.selection)

    async def listing(self) -> ModelListResponse:
        return ModelListResponse(models=await self.list_models())

    async def updates(self, refresh: bool = False) -> UpdatesResponse:
        return UpdatesResponse(models=await self.check_updates(refresh))

    async def downloads(self) -> DownloadListResponse:
        return DownloadListResponse(downloads=self.active_downloads())

    async def bandwidth_now(self) -> BandwidthResponse:
        return self.bandwidth()

    async def cap_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse:
        return self.set_bandwidth(bytes_per_second)

    async def figures(self) -> ServiceFigures:
        running, queued = self.counts()
        space = await self.get_disk_space()
        return ServiceFigures(
            Figures(running, queued, self._bandwidth, space.cache_size_bytes, space.available_bytes)
        )

    def active_downloads(self) -> list[ModelStatusResponse]:
        """Every running download with its progress, then the queued ones in their order."""
        return [job.status() for job in self._jobs.values()]

    def counts(self) -> tuple[int, int]:
        """(downloads running, downloads queued)."""
        return len(self._download_tasks), len(self._queue)

    async def start(self) -> None:
        """At start-up: remove what a killed service left (temporary files whose lock is free),
        so that list and space agree from the first request; then resume the downloads that were
        running or queued when the service stopped (``MODELS_RESUME_ON_START``)."""
        removed = await self._on_cache_pool(self.backend.remove_all_orphans)
        if removed:
            logfmt.log(logger, logging.INFO, "orphans_removed", count=removed)
        await self.backend.start()
        await self._resume()

    async def _resume(self) -> None:
        """Open the job store, take the last errors back and resume (or, with resuming off,
        forget) the kept downloads no other live service owns, in the order they were accepted:
        into the free slots, the rest into the queue (a resumed download is never refused)."""
        try:
            await self._on_state_pool(self.store.open)
            errors = await self._on_state_pool(self.store.errors)
            kept = await self._on_state_pool(self.store.claim_unowned)
        except (OSError, sqlite3.Error) as error:
            logfmt.log(
                logger,
                logging.WARNING,
                "state_unavailable",
                path=self.settings.state_path,
                reason=error,
                resumed_after_restart="false",
            )
            return
        self._store_open = True
        self._errors.update(errors)
        for stored in kept:
            model = stored.model
            if not self.settings.resume_on_start or self._running_as(model) is not None:
                self._keep(self.store.remove, stored.key)
                continue
            job = DownloadJob(model=model, bus=self.events, phase=DownloadPhase.QUEUED)
            job.key = stored.key
            self._jobs[job.task_id] = job
            self._queue.append(_Queued(job, None, stored.asked, 0.0))
        self._start_queued()
        for waiting in self._queue:
            waiting.job.publish(DownloadEventType.QUEUED)
        resumed = [job.task_id for job in self._jobs.values()]
        if resumed:
            logfmt.log(
                logger, logging.INFO, "resumed", count=len(resumed), task_ids=",".join(resumed)
            )
        elif kept and not self.settings.resume_on_start:
            logfmt.log(
                logger,
                logging.INFO,
                "not_resumed",
                count=len(kept),
                why="MODELS_RESUME_ON_START=false",
            )

    async def shutdown(self) -> None:
        """Stop every running download and wait for each (no worker outlives the service)."""
        self.events.close()  # event streams end: the server can close their connections
        self._stopping = True  # what is cancelled now stays in the store: resumed at next start
        self._queue.clear()  # nothing starts any more (queued downloads stay in the store too)
        tasks = list(self._download_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.aclose()
        await self.servers.aclose()
        # After every write submitted before it: the claims are released last.
        await self._on_state_pool(self.store.close)
        for pool in (self._cache_pool, self._hash_pool, self._state_pool):
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class _Space:
    needed: int  # bytes a download would still fetch
    available: int  # room for it
    free: int
    reserved: int  # what running downloads still need

    @property
    def fits(self) -> bool:
        return self.needed <= self.available


@dataclass
class _Start:
    """A download between its checks and its task: its file list is being fetched."""

    model: Model
    commit: str | None = None
    cancelled: bool = False
    queued: bool = False  # it will wait in the queue: it holds no slot


@dataclass
class _Queued:
    """A download waiting for a slot, with what its task will be started with."""

    job: DownloadJob
    plan: DownloadPlan | None
    asked: FileSelection | None
    delay: float


def _log_store_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logfmt.log(
            logger,
            logging.WARNING,
            "state_write_failed",
            reason=error,
            resumed_after_restart="maybe not",
        )


def _lower_thread_priority(nice: int) -> None:
    """Hashing is background work: on Linux a thread has a niceness of its own."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _one_machine(request: ModelRequest) -> Model:
    """``nodes`` means something only to a fleet: on one machine it is refused, not ignored."""
    if request.nodes is not None:
        raise NotAFleet()
    return request.as_model()


def _in_use_info(cards: list[ServedModel]) -> list[InUseInfo]:
    return [InUseInfo(server=card.server, model=card.model_id) for card in cards]


def _same_revision(job: DownloadJob, revision: CachedRevision) -> bool:
    return (
        job.model.hf_repo == revision.repo_id
        and job.commit is not None
        and job.commit == revision.commit
    )
