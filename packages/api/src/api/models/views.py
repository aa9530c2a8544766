"""``Views``: what the service says of the cache, read offline: one model's status, the list, the
disk space, and whether each cached branch moved on the Hub (updates). Each answer is the cache's
state, with what runs now (``Downloads``), the last failures, and what vLLM serves. Nothing here
changes anything."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

from api.models.backend import (
    CachedRevision,
    CacheState,
    DownloadPlan,
    DownloadRequest,
    FileSelection,
    HubBackend,
)
from api.models.budget import Uses
from api.models.downloads import Downloads
from api.models.failures import Failures
from api.models.inuse import InUse, in_use_info
from api.models.job import DownloadJob
from api.models.paging import ListQuery, select
from api.models.revisions import HubCalls, UpdateChecker
from api.models.serving import ServedModel
from api.models.threads import Threads, same_objects
from api.models.types import (
    COMMIT_PATTERN,
    DiskSpaceInfo,
    Model,
    ModelListItem,
    ModelListResponse,
    ModelStatus,
    ModelStatusResponse,
    SelectionInfo,
    UpdateBudget,
    UpdateInfo,
    UpdatesResponse,
    revision_problem,
)

STATE_TO_STATUS = {
    CacheState.COMPLETE: ModelStatus.DOWNLOADED,
    CacheState.PARTIAL: ModelStatus.PARTIAL,
    CacheState.ABSENT: ModelStatus.NOT_FOUND,
    CacheState.BUSY: ModelStatus.DOWNLOADING,  # by another process sharing the cache
}
# Pages of one list kept, by query (the page's first page, its sorts, a search typed).
KEPT_PAGES = 32
# A list that built this many entries anew (the first, or after many changes) settles the heap.
FREEZE_AFTER_ENTRIES = 1000


def settle_long_lived() -> None:
    """Entries just built live until the cache changes: collect the young garbage, then take
    every object alive now out of the cyclic collector's view (``gc.freeze``), so that a full
    collection scans what came after, not ten thousand entries and the index (bench/scale.py:
    full collections of 60-67 ms were the p99 of a status while six lists ran). What is frozen
    is still freed by its reference count when dropped: entries and revisions hold no cycles."""
    gc.collect(1)
    gc.freeze()


@dataclass(frozen=True)
class _LastList:
    """The last list without downloads: the revisions it was made of, its entries, its pages."""

    revisions: tuple[CachedRevision, ...]
    items: list[ModelListItem]
    pages: dict[ListQuery | None, ModelListResponse]


UPDATE_CHECK_CONCURRENCY = 4  # branches GET /updates asks the Hub about at once (tuning)
UPDATE_CHECK_TTL_SECONDS = 300.0  # a branch's check is reused this long (unless ?refresh=true)


class Views:
    def __init__(
        self,
        backend: HubBackend,
        threads: Threads,
        downloads: Downloads,
        failures: Failures,
        in_use: InUse,
        plan_timeout: float,
        uses: Uses,
        update_calls_per_minute: int,
    ) -> None:
        self._uses = uses
        self._backend = backend
        self._threads = threads
        self._downloads = downloads
        self._failures = failures
        self._in_use = in_use
        # The list's entries of the last call, by revision, and what they were built on: an entry
        # whose revision the index returned again (the very object: nothing changed there), with
        # the same pins, uses, errors and vLLM users, is the one built before (bench/scale.py:
        # six lists at once built 60,000 entries a second and held the GIL for it).
        self._entries: dict[int, tuple[CachedRevision, ModelListItem]] = {}
        self._entries_on: tuple[int, int, object] | None = None
        # The last answer without downloads, the revisions it was made of (the same revisions on
        # the same pins, uses, errors and users are that answer: no loop per entry), and the
        # pages made of it, by query (the page asks the same pages again: each one sorts 10,000
        # entries).
        self._last: _LastList | None = None
        self._entries_lock = threading.Lock()
        self.update_checks = UpdateChecker(
            backend.resolve,
            self._plan_of_ref,
            self._missing_bytes,
            concurrency=UPDATE_CHECK_CONCURRENCY,
            timeout=plan_timeout,
            ttl=UPDATE_CHECK_TTL_SECONDS,
            budget=HubCalls(update_calls_per_minute),
        )

    async def exists(self, model: Model) -> bool:
        """True when every file of the revision is in the cache (offline)."""
        state = await self._threads.cache(self._backend.local_state, model.hf_repo, model.revision)
        return state.state is CacheState.COMPLETE

    async def status(self, model: Model, asked: FileSelection | None = None) -> ModelStatusResponse:
        """The status of the revision for the files ``asked``, else for those it was downloaded
        with, else for the default selection."""
        job = self._downloads.job_for(model)
        if job is not None:
            answer = job.status().model_copy(update={"model": model})  # as it was asked
        else:
            local = await self._threads.cache(
                self._backend.local_state, model.hf_repo, model.revision, asked
            )
            status = STATE_TO_STATUS[local.state]
            error = None
            if status is not ModelStatus.DOWNLOADED:
                error = self._failures.get(model.task_id)
                error = error or self._failures.of(model.hf_repo, local.commit) or local.note
            answer = ModelStatusResponse(
                model=model,
                status=status,
                error_message=error,
                commit=local.commit,
                selection=[SelectionInfo.of(s) for s in local.selections] or None,
            )
        served = answer.served_commit or answer.commit
        answer.pinned = await self._pinned(model, served)
        if self._in_use.configured and served is not None:
            _, users = await self._in_use.users(model.hf_repo, fresh=False)
            answer.in_use_by = in_use_info(users.get((model.hf_repo, served), []))
        return answer

    async def listing(self) -> list[ModelListItem]:
        """Every cached model revision (DOWNLOADED or PARTIAL), and every running download."""
        return list((await self.page(None)).models)  # the answer may be kept: this is a copy

    async def page(self, query: ListQuery | None) -> ModelListResponse:
        """The list, or the page of it ``query`` asks for (``paging``). Built off the event loop
        (10,000 entries take a tenth of a second to build), in one hop to the walk thread unless
        the vLLM servers are asked who uses what: each hop is a turn of the event loop, and six
        open pages listing at once made them the loop's work (bench/scale.py)."""
        jobs = self._downloads.jobs()
        if not self._in_use.configured:
            answer, built = await self._threads.walk(self._page_now, jobs, query)
        else:
            cached = await self._threads.walk(self._backend.list_cached)
            _, users = await self._in_use.users(None, fresh=False, revisions=cached)
            answer, built = await self._threads.walk(self._page_of, cached, users, jobs, query)
        if built >= FREEZE_AFTER_ENTRIES:
            settle_long_lived()
        return answer

    def _page_now(
        self, jobs: list[DownloadJob], query: ListQuery | None
    ) -> tuple[ModelListResponse, int]:
        return self._page_of(self._backend.list_cached(), None, jobs, query)

    def _page_of(
        self,
        cached: list[CachedRevision],
        users: dict[tuple[str, str], list[ServedModel]] | None,
        jobs: list[DownloadJob],
        query: ListQuery | None,
    ) -> tuple[ModelListResponse, int]:
        """The page, and how many entries were built (not kept from the last call). The entries
        are kept for the next call, and so is the page while they are the very same: nothing
        may change an answer."""
        items, built = self._items(cached, users, jobs)
        with self._entries_lock:
            last = self._last
            pages = last.pages if last is not None and last.items is items else None
            page = pages.get(query) if pages is not None else None
        if page is None:
            page = select(items, query)
            if pages is not None:
                with self._entries_lock:
                    if len(pages) >= KEPT_PAGES:
                        pages.clear()
                    pages[query] = page
        return page, built

    def _items(
        self,
        cached: list[CachedRevision],
        users: dict[tuple[str, str], list[ServedModel]] | None,
        jobs: list[DownloadJob],
    ) -> tuple[list[ModelListItem], int]:
        """The entries, and how many of them were built (not kept from the last call)."""
        by_revision: dict[tuple[str, str], DownloadJob] = {}
        for running in jobs:
            if running.commit is not None:
                by_revision.setdefault((running.model.hf_repo, running.commit), running)
        items: list[ModelListItem] = []
        covered: set[int] = set()
        on = (self._uses.version, self._failures.version, users)
        made = 0
        with self._entries_lock:
            last = self._last if self._entries_on == on and not jobs else None
            if last is not None and same_objects(last.revisions, cached):
                return last.items, 0
            built = self._entries if self._entries_on == on else {}
            kept: dict[int, tuple[CachedRevision, ModelListItem]] = {}
            for revision in cached:
                job = (
                    by_revision.get((revision.repo_id, revision.commit))
                    if revision.commit is not None
                    else None
                )
                if job is not None:
                    covered.add(id(job))
                    items.append(self._entry(revision, job, users))
                    continue
                before = built.get(id(revision))
                if before is None or before[0] is not revision:
                    before = (revision, self._entry(revision, None, users))
                    made += 1
                kept[id(revision)] = before
                items.append(before[1])
            # Each revision held here keeps its id from being another object's.
            self._entries, self._entries_on = kept, on
            self._last = _LastList(tuple(cached), items, {}) if not jobs else None
        for job in jobs:
            if id(job) not in covered:
                items.append(
                    ModelListItem(
                        model=job.model, status=ModelStatus.DOWNLOADING, progress=job.progress()
                    )
                )
        return items, made

    def _entry(
        self,
        revision: CachedRevision,
        job: DownloadJob | None,
        users: dict[tuple[str, str], list[ServedModel]] | None,
    ) -> ModelListItem:
        return ModelListItem(
            model=Model.model_construct(hf_repo=revision.repo_id, hf_commit=revision.commit),
            status=ModelStatus.DOWNLOADING if job is not None else STATE_TO_STATUS[revision.state],
            size_bytes=revision.size_bytes,
            unique_bytes=revision.unique_bytes,
            model_size_bytes=revision.model_bytes,
            refs=list(revision.refs),
            progress=job.progress() if job is not None else None,
            error_message=None
            if job is not None or revision.state is CacheState.COMPLETE
            else self._failures.of(revision.repo_id, revision.commit) or revision.note,
            selection=[SelectionInfo.of(s) for s in revision.selections] or None,
            in_use_by=None
            if users is None or revision.commit is None
            else in_use_info(users.get((revision.repo_id, revision.commit), [])),
            pinned=self._uses.pinned(revision.repo_id, revision.commit, revision.refs),
            last_used_at=self._last_used(revision),
        )

    async def _pinned(self, model: Model, commit: str | None) -> bool:
        """Whether a pin names the revision: as asked, by its commit, or by a branch or tag that
        points to it (read from the cache only for a model that has pins)."""
        if not self._uses.has_pins(model.hf_repo):
            return False
        refs: tuple[str, ...] = (model.revision,)
        if commit is not None:
            cached = await self._threads.cache(self._backend.list_cached, model.hf_repo)
            refs += tuple(ref for r in cached if r.commit == commit for ref in r.refs)
        return self._uses.pinned(model.hf_repo, commit, refs)

    def _last_used(self, revision: CachedRevision) -> float | None:
        last = self._uses.last(revision.repo_id, revision.commit) if revision.commit else None
        return last[0] if last else None

    async def space(self) -> DiskSpaceInfo:
        used, free = await self._threads.usage(self._backend.cache_usage)
        return DiskSpaceInfo(
            cache_size_bytes=used, available_bytes=free, cache_path=self._backend.cache_path
        )

    async def updates(
        self, refresh: bool = False, wait: float | None = None, calls_per_minute: int | None = None
    ) -> UpdatesResponse:
        """For every branch (or tag) cached, whether it points at another commit on the Hub now,
        and what an update would fetch; a check that fails says why in ``error``. Checks still
        running after ``wait`` seconds answer with their last result, ``pending``. A budget
        ``calls_per_minute`` holds from now on (a fleet's share for this node)."""
        if calls_per_minute is not None:
            self.update_checks.budget.set_per_minute(calls_per_minute)
        cached = await self._threads.walk(self._backend.list_cached)
        refs = sorted(
            {
                (revision.repo_id, ref, revision.commit)
                for revision in cached
                if revision.commit is not None
                for ref in revision.refs
                if revision_problem(ref) is None and not COMMIT_PATTERN.fullmatch(ref)
            }
        )
        checks = await self.update_checks.check_all(refs, refresh, wait)
        budget = self.update_checks.budget
        models = [
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
                pending=check.pending,
            )
            for check in checks
        ]
        return UpdatesResponse(
            models=models,
            budget=UpdateBudget(
                calls_per_minute=budget.per_minute,
                calls_last_minute=budget.used(),
                paused_until=budget.paused_until(),
                pending=self.update_checks.pending(),
            ),
        )

    async def _plan_of_ref(self, repo_id: str, ref: str) -> DownloadPlan:
        """The file list of what ``ref`` points at on the Hub, for the selection its cached
        revision was downloaded with."""
        return await self._backend.plan(DownloadRequest(repo_id, ref))

    async def _missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        return await self._threads.cache(self._backend.missing_bytes, repo_id, plan)
