"""Policy for the revisions of a cached model that the manager delegates: which are in use by a
vLLM server (``in_use_map``), and whether a cached branch has moved on the Hub (``UpdateChecker``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from api import logfmt
from api.models.backend import CachedRevision, DownloadFailed, DownloadPlan, FailureKind
from api.models.serving import ServedModel, ServedNow
from api.models.types import repo_id_problem

logger = logging.getLogger(__name__)

Revision = tuple[str, str]  # (repo id, commit)
T = TypeVar("T")


def in_use_map(
    now: ServedNow,
    revisions: list[CachedRevision],
    locate: Callable[[str], Revision | None],
) -> dict[Revision, list[ServedModel]]:
    """The cached revisions each vLLM server's model cards name (blocking: ``locate`` looks at
    the cache).

    A card's ``root`` (else its ``id``) is either a local path, in use when it is in (or links to)
    a snapshot folder of the cache (``locate``), or a repo id: vLLM then loads the revision a ref
    names (``main``, or the ``--revision`` it was given), so the revisions the repo's refs name
    are in use; a repo cached with no ref at all was downloaded by commit, and each of its
    revisions may be the one served. A revision no ref names that vLLM was started on with
    ``--revision <commit>`` and a repo id is not recognized: serve it by its snapshot path."""
    by_repo: dict[str, list[CachedRevision]] = defaultdict(list)
    for revision in revisions:
        if revision.commit is not None:
            by_repo[revision.repo_id].append(revision)
    users: dict[Revision, list[ServedModel]] = defaultdict(list)
    for card in now.served:
        if repo_id_problem(card.root) is None and not card.root.startswith("/"):
            cached = by_repo.get(card.root, [])
            named = [r for r in cached if r.refs] or cached
            for revision in named:
                assert revision.commit is not None
                users[(revision.repo_id, revision.commit)].append(card)
        elif (found := locate(card.root)) is not None:
            users[found].append(card)
    return users


@dataclass(frozen=True)
class UpdateCheck:
    """The answer for one cached ref: the last check's, or none yet (``checked_at`` None), and
    whether a check of it is queued or running (``pending``)."""

    repo_id: str
    ref: str
    cached_commit: str
    hub_commit: str | None
    bytes_to_download: int | None
    error: str | None
    checked_at: float | None
    pending: bool = False

    @property
    def update_available(self) -> bool:
        return self.hub_commit is not None and self.hub_commit != self.cached_commit


WINDOW_SECONDS = 60.0
DEFAULT_PAUSE_SECONDS = 60.0  # a 429 without Retry-After pauses the checks this long
MAX_PAUSE_SECONDS = 3600.0  # a Retry-After beyond this is read as this (a Hub's mistake)
PLAN_CALLS = 3  # what a file list may cost: the revision, the tree, a HEAD for a gated repo


class HubCalls:
    """The budget of the update checks' calls to the Hub: at most ``per_minute`` in any 60 s,
    spread out (a burst of at most a quarter of them, then the rest evenly over the minute), and
    none at all until a time the Hub named in a 429 (``pause``).

    ``take(n)`` waits until ``n`` more calls fit. Waiters are served first come, first served.
    The clock and the sleep are ``time.monotonic`` and ``asyncio.sleep`` unless a test gives
    others."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._times: deque[float] = deque()
        self._paused_until = 0.0
        self._turn = asyncio.Lock()
        self.per_minute = 0
        self._burst = 0
        self._tokens = 0.0
        self._refilled = clock()
        self.set_per_minute(per_minute)
        self._tokens = float(self._burst)

    def set_per_minute(self, per_minute: int) -> None:
        """A new budget (a fleet gives each node its share of the token's): the calls already
        made count against it, so any minute whose last call comes after this holds to it."""
        if per_minute <= PLAN_CALLS:
            raise ValueError(f"a budget of {per_minute} calls a minute cannot pay for one check")
        if per_minute == self.per_minute:
            return
        if self.per_minute:
            self._delay(0)  # the bucket refilled at the old rate until now
        self.per_minute = per_minute
        self._burst = max(PLAN_CALLS, per_minute // 4)  # below per_minute: some are spread
        self._tokens = min(self._tokens, float(self._burst))

    async def take(self, calls: int = 1) -> None:
        async with self._turn:
            while (delay := self._delay(calls)) > 1e-6:  # a float's rounding is no wait
                await self._sleep(delay)  # a rate's timer: no event to wait for
            self._tokens -= calls
            self._times.extend([self._clock()] * calls)

    def pause(self, seconds: float) -> None:
        """No call before ``seconds`` from now (the Hub's Retry-After)."""
        until = self._clock() + min(max(seconds, 0.0), MAX_PAUSE_SECONDS)
        self._paused_until = max(self._paused_until, until)

    def used(self) -> int:
        """Calls made in the last 60 s."""
        self._forget(self._clock())
        return len(self._times)

    def paused_until(self) -> float | None:
        """The Unix time the checks resume at, while a 429 paused them."""
        now = self._clock()
        if self._paused_until <= now:
            return None
        return time.time() + (self._paused_until - now)

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - WINDOW_SECONDS:
            self._times.popleft()

    def _delay(self, calls: int) -> float:
        """How long until ``calls`` more fit (0: now)."""
        now = self._clock()
        self._forget(now)
        # A bucket of ``burst`` that refills the rest of the minute's budget over the minute: in
        # any 60 s, at most burst + (per_minute - burst) calls.
        rate = (self.per_minute - self._burst) / WINDOW_SECONDS
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        waits = [self._paused_until - now, (calls - self._tokens) / rate]
        over = len(self._times) + calls - self.per_minute
        if over > 0:  # the oldest ``over`` calls must leave the window first
            waits.append(self._times[over - 1] + WINDOW_SECONDS - now)
        return max(0.0, *waits)


class UpdateChecker:
    """Checks cached refs against the Hub within a budget of calls (``HubCalls``): at most
    ``concurrency`` at once, each call within ``timeout``. A check is reused while the ref still
    names the same commit, for ``ttl`` seconds or the time the budget needs to check every ref
    once, whichever is longer; checks asked while one runs share it. A 429 from the Hub pauses
    every check until its Retry-After, then the checks go on.

    ``resolve(repo, ref)`` asks where the ref points now (one call); only when it moved,
    ``plan(repo, ref)`` lists the new revision's files for the selection the cached one was
    downloaded with (``PLAN_CALLS`` at most), and ``missing(repo, plan)`` counts what of it is not
    in the cache yet (no call)."""

    def __init__(
        self,
        resolve: Callable[[str, str], Awaitable[str]],
        plan: Callable[[str, str], Awaitable[DownloadPlan]],
        missing: Callable[[str, DownloadPlan], Awaitable[int]],
        concurrency: int,
        timeout: float,
        ttl: float,
        budget: HubCalls,
    ) -> None:
        self._resolve = resolve
        self._plan = plan
        self._missing = missing
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = timeout
        self._ttl = ttl
        self.budget = budget
        self._done: dict[tuple[str, str], UpdateCheck] = {}
        self._running: dict[tuple[str, str, str], asyncio.Task[UpdateCheck]] = {}

    async def check_all(
        self, refs: list[tuple[str, str, str]], refresh: bool, wait: float | None = None
    ) -> list[UpdateCheck]:
        """The checks of ``refs`` ((repo, ref, cached commit) each), in that order: each one's
        fresh answer, else a check is started and awaited for at most ``wait`` seconds (None:
        until it ends); one still running then answers with its last result (or none), pending.
        """
        reuse = max(self._ttl, len(refs) * WINDOW_SECONDS / self.budget.per_minute)
        now = time.time()
        tasks: dict[tuple[str, str, str], asyncio.Task[UpdateCheck]] = {}
        for repo_id, ref, cached in refs:
            done = self._done.get((repo_id, ref))
            fresh = (
                done is not None
                and done.cached_commit == cached
                and done.checked_at is not None
                and now - done.checked_at <= reuse
            )
            if refresh or not fresh:
                tasks[(repo_id, ref, cached)] = self._start(repo_id, ref, cached)
        if tasks:
            await asyncio.wait(set(tasks.values()), timeout=wait)
        out = []
        for repo_id, ref, cached in refs:
            task = tasks.get((repo_id, ref, cached))
            if task is not None and task.done():
                out.append(task.result())
                continue
            last = self._done.get((repo_id, ref))
            if last is None or last.cached_commit != cached:
                last = UpdateCheck(repo_id, ref, cached, None, None, None, None)
            out.append(replace(last, pending=task is not None))
        return out

    def pending(self) -> int:
        """Checks queued or running."""
        return len(self._running)

    async def aclose(self) -> None:
        """Stop every check (the service stops)."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _start(self, repo_id: str, ref: str, cached: str) -> asyncio.Task[UpdateCheck]:
        key = (repo_id, ref, cached)
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._run(repo_id, ref, cached), name=f"update check {ref}")
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        return task

    async def _run(self, repo_id: str, ref: str, cached: str) -> UpdateCheck:
        async with self._slots:
            while True:
                try:
                    hub, missing, error = await self._ask(repo_id, ref, cached)
                except DownloadFailed as failure:
                    if failure.kind is not FailureKind.RATE_LIMITED:
                        hub, missing, error = None, None, _plain(failure)
                    else:
                        pause = failure.retry_after
                        self.budget.pause(DEFAULT_PAUSE_SECONDS if pause is None else pause)
                        logfmt.log(
                            logger,
                            logging.WARNING,
                            "update_checks_paused",
                            repo=repo_id,
                            ref=ref,
                            seconds=DEFAULT_PAUSE_SECONDS if pause is None else pause,
                            reason="the Hub answered HTTP 429",
                        )
                        continue  # asked again once the pause is over
                break
        check = UpdateCheck(repo_id, ref, cached, hub, missing, error, time.time())
        self._done[(repo_id, ref)] = check
        if error is not None:
            logfmt.log(
                logger, logging.INFO, "update_check_failed", repo=repo_id, ref=ref, reason=error
            )
        return check

    async def _ask(
        self, repo_id: str, ref: str, cached: str
    ) -> tuple[str | None, int | None, str | None]:
        """(the commit the ref names on the Hub, the bytes an update fetches, why unknown)."""
        await self.budget.take(1)
        hub = await self._within(self._resolve(repo_id, ref))
        if hub is None or hub == cached:
            return hub, (0 if hub is not None else None), self._late(hub)
        await self.budget.take(PLAN_CALLS)
        plan = await self._within(self._plan(repo_id, ref))
        if plan is None:
            return None, None, self._late(None)
        if plan.problem is not None:
            return plan.commit, None, plan.problem
        if plan.commit == cached:  # the branch moved back meanwhile
            return plan.commit, 0, None
        return plan.commit, await self._missing(repo_id, plan), None

    async def _within(self, call: Awaitable[T]) -> T | None:
        """The call's answer, or None when the Hub did not give it within the timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except TimeoutError:
            return None

    def _late(self, hub: str | None) -> str | None:
        return None if hub is not None else f"the Hub did not answer within {self._timeout:g} s"


def _plain(failure: DownloadFailed) -> str:
    """The failure's words without the attempt count a download's message carries."""
    return str(failure).removesuffix(" (attempt 1, not retried)")
