"""``Downloads``: the downloads of the service, from admission to their end.

Admission (a conflict under any name of the revision, a free slot or a place in the queue, the
file list and the 507 check), the queue, each download's task and worker (through the backend),
its end (the failure remembered, the store's record removed), the bandwidth cap's shares, cancel,
and, at start, the downloads the job store kept from before a restart. What runs is read by the
views and the housekeeping through ``running``, ``running_as`` and ``job_for``; they never change
it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from api import logfmt
from api.models.backend import (
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
)
from api.models.budget import Budget, Uses
from api.models.errors import (
    BudgetExceeded,
    DownloadCancelled,
    DownloadConflict,
    HubAnswer,
    InsufficientStorage,
    SelectionUnusable,
    TooManyDownloads,
)
from api.models.events import EventBus
from api.models.failures import Failures
from api.models.job import DownloadJob
from api.models.threads import Keeper, Threads
from api.models.types import (
    COMMIT_PATTERN,
    BandwidthResponse,
    DownloadEventType,
    DownloadPhase,
    DownloadShare,
    DownloadStartedResponse,
    EvictionCandidate,
    Model,
    ModelStatus,
    ModelStatusResponse,
    PlanFile,
    PlanResponse,
    SelectionInfo,
    WeightChoice,
)
from api.settings import Settings

logger = logging.getLogger(__name__)
# What the Hub says of a repo or a revision that does not exist: a download of it is refused (404).
NO_SUCH_THING = frozenset({FailureKind.NOT_FOUND, FailureKind.REVISION_NOT_FOUND})


class Downloads:
    def __init__(
        self,
        settings: Settings,
        backend: HubBackend,
        threads: Threads,
        keeper: Keeper,
        failures: Failures,
        events: EventBus,
        uses: Uses,
        budget: Budget,
    ) -> None:
        self.settings = settings
        self.budget = budget
        self._uses = uses
        self.backend = backend
        self.events = events
        self._threads = threads
        self._keeper = keeper
        self._failures = failures
        self._download_tasks: dict[str, asyncio.Task[None]] = {}
        self._jobs: dict[str, DownloadJob] = {}
        self._starting: dict[str, _Start] = {}  # between the checks and the task's start
        # Downloads waiting for a slot (MODELS_MAX_QUEUED_DOWNLOADS), first in, first out; each
        # is also in _jobs (its status), with no task yet.
        self._queue: collections.deque[_Queued] = collections.deque()
        self._stopping = False  # shutting down: cancelled downloads stay in the store
        # MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND, changeable at run time; None: no cap.
        self._bandwidth: int | None = settings.max_download_bytes_per_second or None

    def jobs(self) -> list[DownloadJob]:
        """Every download running or queued, in the order they were accepted."""
        return list(self._jobs.values())

    async def add(
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
        local = await self._threads.cache(
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
            planned = await self._plan_with_space_check(model, asked, start)
            if isinstance(planned, DownloadFailed) and planned.kind in NO_SUCH_THING:
                # A typo: the Hub says the repo (or the branch, or the commit) does not exist.
                # Refused now, as `hf download` would; nothing starts, nothing is remembered.
                raise HubAnswer(planned)
            plan = planned if isinstance(planned, DownloadPlan) else None
            if plan is not None:
                # Now the commit is known: one revision, one job, whatever it was asked as.
                start.commit = plan.commit
                if (running := self.running_as(model, plan.commit, besides=task_id)) is not None:
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
            self._failures.drop(task_id, *([f"{model.hf_repo}:{job.commit}"] if job.commit else []))
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
            kept = self._keeper.keep(self._keeper.store.add, job.key, model, asked)
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

    def running(self) -> Iterator[tuple[str, Model, str | None]]:
        """(task id, model, commit when known) of every download that runs or starts here."""
        for task_id, job in self._jobs.items():
            yield task_id, job.model, job.commit
        for task_id, start in self._starting.items():
            yield task_id, start.model, start.commit

    def running_as(
        self, model: Model, commit: str | None = None, besides: str | None = None
    ) -> str | None:
        """The task id under which this revision already downloads or starts, if it does: the
        same task id, the same branch (``latest`` is ``main``), or the same commit (``commit``,
        once the plan has resolved it; else ``hf_commit`` when it is one). ``besides``: a task
        id not to count (the start asking)."""
        if commit is None and model.hf_commit and COMMIT_PATTERN.fullmatch(model.hf_commit):
            commit = model.hf_commit
        for task_id, other, other_commit in self.running():
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
        if (running := self.running_as(model)) is not None:
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

    def job_for(self, model: Model) -> DownloadJob | None:
        """The running job of this revision, under any of its names."""
        running = self.running_as(model)
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

    async def _space_for(
        self, repo_id: str, plan: DownloadPlan, start: _Start | None = None
    ) -> _Space:
        """What a download of the plan would still fetch, and the room for it: the free space
        less what running downloads still need (and, with a budget, what the downloads being
        admitted beside ``start`` will), less the margin (the 507 check's figures)."""
        needed = await self._threads.cache(self.backend.missing_bytes, repo_id, plan)
        # Only the free space: walking the whole cache for its size would slow every start.
        free = await self._threads.cache(self.backend.free_bytes)
        reserved = self.reserved()
        if self.budget.enabled:
            reserved += sum(s.needed for s in self._starting.values() if s is not start)
        available = max(free - reserved - self.settings.space_margin_bytes, 0)
        return _Space(needed, available, free, reserved)

    def busy_repos(self) -> set[str]:
        """The models downloading, queued or starting here: eviction keeps every revision of
        them."""
        return {m.hf_repo for _, m, _ in self.running()}

    def reserved(self) -> int:
        """Bytes the running downloads still need."""
        return sum(
            max((job.total_bytes or 0) - (job.downloaded_bytes or 0), 0)
            for job in self._jobs.values()
        )

    async def _plan_with_space_check(
        self, model: Model, asked: FileSelection | None, start: _Start
    ) -> DownloadPlan | DownloadFailed:
        """Fetch the file list and refuse a selection that cannot be downloaded
        (``SelectionUnusable``) and a download that cannot fit (``InsufficientStorage``; with a
        budget, after evicting what may go, or ``BudgetExceeded`` when that would not do)."""
        plan = await self._fetch_plan(model, asked)
        if isinstance(plan, DownloadFailed):
            return plan
        if plan.problem is not None:
            raise SelectionUnusable(plan.problem)
        space = await self._space_for(model.hf_repo, plan, start)
        if self.budget.enabled:
            # Counted from now by every other admission (before its own room is made).
            start.needed = space.needed
            evicted = await self.budget.room_for(
                space.needed, space.reserved, space.available, self.busy_repos(), model.task_id
            )
            if evicted:
                space = await self._space_for(model.hf_repo, plan, start)
        if not space.fits:
            raise InsufficientStorage(
                space.needed,
                space.available,
                space.free,
                space.reserved,
                self.settings.space_margin_bytes,
            )
        return plan

    async def plan(self, model: Model, asked: FileSelection | None = None) -> PlanResponse:
        """What a download of the files ``asked`` of ``model`` would fetch, from the Hub's file
        list, writing nothing.

        Raises ``HubAnswer`` when the Hub cannot give the list (missing, private or gated repo,
        no answer)."""
        plan = await self._fetch_plan(model, asked)
        if isinstance(plan, DownloadFailed):
            raise HubAnswer(plan)
        space = await self._space_for(model.hf_repo, plan)
        fits = space.fits
        evicts: list[EvictionCandidate] = []
        if self.budget.enabled:
            try:
                evicts = await self.budget.room_for(
                    space.needed,
                    space.reserved,
                    space.available,
                    self.busy_repos() | {model.hf_repo},
                    model.task_id,
                    dry_run=True,
                )
                fits = True  # what must go may go (the free space then checked again)
            except BudgetExceeded:
                fits = False
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
            fits=fits,
            evicts=evicts,
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
                    await self._threads.cache(self.backend.discard_partial, job.model.hf_repo)
                    # A cancel before the first file left a ref and no snapshot: tidied.
                    await self._tidy(job)
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
        if failure is not None:
            # A download that failed before its first file left a ref and no snapshot: tidied
            # (its parts kept for a next attempt stay).
            with contextlib.suppress(OSError):
                await self._tidy(job)
        self._end(job, failure)

    async def _tidy(self, job: DownloadJob) -> None:
        """The model's folder as the library's scan reads it (``HubBackend.tidy``), unless
        another download of the model runs or starts here (its revision may be empty yet)."""
        repo = job.model.hf_repo
        if not any(m.hf_repo == repo for t, m, _ in self.running() if t != job.task_id):
            await self._threads.cache(self.backend.tidy, repo)

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
        local = await self._threads.cache(self.backend.local_state, job.model.hf_repo, got, asked)
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
            if job.commit is not None:
                self._uses.used(job.model.hf_repo, job.commit, "downloaded")
            job.publish(DownloadEventType.COMPLETED)
        else:
            errors = {job.task_id: str(failure)}
            if job.commit is not None:
                errors[f"{job.model.hf_repo}:{job.commit}"] = str(failure)
            self._failures.remember(errors)
            job.publish(DownloadEventType.FAILED, error_message=str(failure))
        self._start_queued()  # its slot is free (after its last event: in that order)

    def _finish(self, job: DownloadJob, kept: bool = False) -> None:
        """The job leaves the tables, and the store unless ``kept`` (to be resumed)."""
        self._jobs.pop(job.task_id, None)
        self._download_tasks.pop(job.task_id, None)
        if job.key is not None and not kept:
            self._keeper.keep(self._keeper.store.remove, job.key)
        self._share_bandwidth()

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

    async def cancel(self, model: Model) -> bool:
        """Stop a running download and wait until its worker is gone and its temporary files are
        removed. Files already complete stay (the model is then PARTIAL). False when not running."""
        running = self.running_as(model)
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

    def active(self) -> list[ModelStatusResponse]:
        """Every running download with its progress, then the queued ones in their order."""
        return [job.status() for job in self._jobs.values()]

    def counts(self) -> tuple[int, int]:
        """(downloads running, downloads queued)."""
        return len(self._download_tasks), len(self._queue)

    async def resume(self) -> None:
        """Open the job store, take the last errors back and resume (or, with resuming off,
        forget) the kept downloads no other live service owns, in the order they were accepted:
        into the free slots, the rest into the queue (a resumed download is never refused)."""
        try:
            await self._keeper.run(self._keeper.store.open)
            errors = await self._keeper.run(self._keeper.store.errors)
            kept = await self._keeper.run(self._keeper.store.claim_unowned)
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
        self._keeper.open = True
        self._failures.load(errors)
        for stored in kept:
            model = stored.model
            if not self.settings.resume_on_start or self.running_as(model) is not None:
                self._keeper.keep(self._keeper.store.remove, stored.key)
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

    async def stop(self) -> None:
        """Stop every running download and wait for each (no worker outlives the service); what
        is cancelled now, and what waits in the queue, stays in the store: resumed at next start."""
        self._stopping = True
        self._queue.clear()  # nothing starts any more
        tasks = list(self._download_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    needed: int = 0  # with a budget: the bytes it will fetch, once its plan is known


@dataclass
class _Queued:
    """A download waiting for a slot, with what its task will be started with."""

    job: DownloadJob
    plan: DownloadPlan | None
    asked: FileSelection | None
    delay: float
