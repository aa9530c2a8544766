"""``Uses`` and ``Budget``: a cache that keeps itself within its budget (issue 31).

``Uses`` knows what may never go and what went unused longest: the pins (``PUT /api/models/pin``)
and the last use of each revision, by the strongest evidence the service has (a vLLM server
serving it, each time the service sees it in ``/v1/models``; a download or a verification here),
kept in the job store so that they outlive a restart.

``Budget`` frees room (``MODELS_CACHE_BUDGET_BYTES``): when a download would take the cache over
its budget, or past the free space, it removes whole revisions, least recently used first, among
those that are not pinned, not served by a vLLM server (asked then, not from an earlier answer),
and not of a model downloading here or in another process sharing the cache. It chooses before it
removes anything: when every revision that may go would not free enough, the download is refused
(507, saying what it would have had to remove and why it could not) and nothing is removed. Each
removal is the prune's (the anchored, link-proof delete of a revision that keeps the blobs other
revisions link), one at a time, stopping as soon as there is room. Evictions are serialised (one
lock), and a download being admitted counts what it will need before it is registered, so that two
downloads admitted together never exceed the budget together."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from api import logfmt
from api.models.backend import CachedRevision, CacheState, HubBackend
from api.models.errors import BudgetExceeded
from api.models.events import EventBus
from api.models.inuse import InUse
from api.models.serving import ServedModel
from api.models.threads import Keeper, Threads
from api.models.types import (
    BudgetResponse,
    DownloadEvent,
    DownloadEventType,
    EvictionCandidate,
    EvictResponse,
    KeptRevision,
    Model,
)
from api.units import human_bytes

logger = logging.getLogger(__name__)
# A use seen again within this many seconds (a status poll while vLLM serves it) is not written
# again: the order of eviction does not change within a minute.
USE_WRITE_INTERVAL = 60.0


class Uses:
    """The pins and the last use of each revision: in memory, and in the job store."""

    def __init__(self, keeper: Keeper) -> None:
        self._keeper = keeper
        self._pins: set[tuple[str, str]] = set()  # (repo, revision as asked)
        self._uses: dict[tuple[str, str], tuple[float, str]] = {}  # (repo, commit) -> (at, how)
        self.version = 0  # changes with every pin and use: the list's entries built on them

    async def load(self) -> None:
        """Read what the store kept (at start; without a store, none)."""
        if not self._keeper.open:
            return
        try:
            self._pins = await self._keeper.run(self._keeper.store.pins)
            self._uses = await self._keeper.run(self._keeper.store.uses)
            self.version += 1
        except Exception as error:  # a store that fails to read: run without what it kept
            logfmt.log(
                logger, logging.WARNING, "state_read_failed", what="pins and uses", reason=error
            )

    def used(self, repo: str, commit: str, how: str) -> None:
        """Record a use of the revision now ('served', 'downloaded', 'verified')."""
        now = time.time()
        last = self._uses.get((repo, commit))
        if last is not None and last[1] == how and now - last[0] < USE_WRITE_INTERVAL:
            return
        self._uses[(repo, commit)] = (now, how)
        self.version += 1
        self._keeper.keep(self._keeper.store.record_uses, [(repo, commit, now, how)])

    def last(self, repo: str, commit: str) -> tuple[float, str] | None:
        return self._uses.get((repo, commit))

    def pinned(self, repo: str, commit: str | None, refs: tuple[str, ...] | list[str]) -> bool:
        """Whether a pin names the revision: its commit, or a branch or tag that points to it."""
        names = (*refs, *((commit,) if commit else ()))
        return any((repo, name) in self._pins for name in names)

    def has_pins(self, repo: str) -> bool:
        return any(pinned_repo == repo for pinned_repo, _ in self._pins)

    def is_pin(self, repo: str, revision: str) -> bool:
        return (repo, revision) in self._pins

    async def pin(self, repo: str, revision: str) -> None:
        self._pins.add((repo, revision))
        self.version += 1
        await self._keeper.keep(self._keeper.store.pin, repo, revision)

    async def unpin(self, repo: str, revision: str) -> bool:
        """False when no such pin was there."""
        if (repo, revision) not in self._pins:
            return False
        self._pins.discard((repo, revision))
        self.version += 1
        await self._keeper.keep(self._keeper.store.unpin, repo, revision)
        return True


@dataclass
class _Candidate:
    revision: CachedRevision
    last: tuple[float, str] | None
    freed: int | None = None  # what removing it alone would free (asked when needed)

    @property
    def commit(self) -> str:
        assert self.revision.commit is not None
        return self.revision.commit

    def answer(self) -> EvictionCandidate:
        return EvictionCandidate(
            model=Model.model_construct(hf_repo=self.revision.repo_id, hf_commit=self.commit),
            size_bytes=self.freed or 0,
            last_used_at=self.last[0] if self.last else None,
            last_used_how=self.last[1] if self.last else None,
        )


@dataclass
class _Survey:
    candidates: list[_Candidate]  # least recently used first
    kept: list[KeptRevision]
    note: str | None  # a vLLM server did not answer: nothing may go


class Budget:
    def __init__(
        self,
        limit: int | None,
        backend: HubBackend,
        threads: Threads,
        uses: Uses,
        in_use: InUse,
        events: EventBus,
    ) -> None:
        self.limit = limit
        self._backend = backend
        self._threads = threads
        self._uses = uses
        self._in_use = in_use
        self._events = events
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.limit is not None

    async def usage(self) -> int:
        return (await self._threads.usage(self._backend.cache_usage))[0]

    async def view(self, busy: set[str], reserved: int) -> BudgetResponse:
        """The budget, the usage, and the eviction order (each candidate with what it would
        free and its last use); ``busy``: the repos downloading here."""
        survey = await self._survey(busy)
        for candidate in survey.candidates:
            await self._measure(candidate)
        return BudgetResponse(
            budget_bytes=self.limit,
            usage_bytes=await self.usage(),
            reserved_bytes=reserved,
            candidates=[c.answer() for c in survey.candidates if c.freed],
            kept=survey.kept,
            note=survey.note,
        )

    async def room_for(
        self,
        needed: int,
        reserved: int,
        available: int,
        busy: set[str],
        for_task: str,
        dry_run: bool = False,
    ) -> list[EvictionCandidate]:
        """Free room for a download that still needs ``needed`` bytes, while running downloads
        still need ``reserved`` and the free space allows ``available``: evict what must go
        (``dry_run``: only say what) and return it. Raises ``BudgetExceeded`` (nothing removed)
        when what may go would not free enough. Nothing happens without a budget."""
        if self.limit is None:
            return []
        async with self._lock:
            usage = await self.usage()
            must_free = max(usage + reserved + needed - self.limit, needed - available, 0)
            if must_free == 0:
                return []
            reason = f"room for {for_task}"
            return await self._free(must_free, busy, reason, dry_run)

    async def evict(self, target: int | None, busy: set[str], dry_run: bool) -> EvictResponse:
        """Free room until the cache holds at most ``target`` bytes (default: the budget). When
        what may go does not reach the target, all of it goes, and ``note`` says why the rest
        stays (a download's admission, instead, removes nothing then)."""
        goal = target if target is not None else self.limit
        assert goal is not None  # the manager refuses a request with neither
        async with self._lock:
            usage = await self.usage()
            must_free = max(usage - goal, 0)
            survey = await self._survey(busy)
            note = survey.note
            evicted: list[EvictionCandidate] = []
            if must_free:
                chosen, total = await self._choose(must_free, survey)
                if total < must_free and survey.note is None:
                    note = (
                        f"the target ({human_bytes(goal)}) is not reached: what may go frees"
                        f" {human_bytes(total)} of the {human_bytes(must_free)} over it (the rest"
                        " is kept, or is not a revision: locks, the library's own files)"
                    )
                if dry_run:
                    evicted = [c.answer() for c in chosen]
                else:
                    evicted, _ = await self._remove(
                        chosen, must_free, "asked (POST /api/models/evict)"
                    )
            return EvictResponse(
                dry_run=dry_run,
                evicted=evicted,
                freed_bytes=sum(e.size_bytes for e in evicted),
                usage_bytes=usage if dry_run else await self.usage(),
                target_bytes=goal,
                kept=survey.kept,
                note=note,
            )

    # -- choosing and removing -----------------------------------------------------------------

    async def _free(
        self, must_free: int, busy: set[str], reason: str, dry_run: bool
    ) -> list[EvictionCandidate]:
        """Choose, least recently used first, revisions that free ``must_free`` bytes, then remove
        them one by one until they did; ``BudgetExceeded`` (nothing removed) when what may go
        would not free enough. Under the lock."""
        survey = await self._survey(busy)
        chosen, total = await self._choose(must_free, survey)
        if total < must_free:
            kept = [
                f"{k.model.hf_repo}@{(k.model.hf_commit or '')[:12]} ({k.reason})"
                for k in survey.kept
            ]
            if survey.note is not None:
                kept.insert(0, survey.note)
            raise BudgetExceeded(must_free, total, kept, self.limit)
        if dry_run:
            return [c.answer() for c in chosen]
        evicted, freed = await self._remove(chosen, must_free, reason)
        if freed < must_free:
            raise BudgetExceeded(
                must_free - freed, 0, ["the cache changed during the eviction"], self.limit
            )
        return evicted

    async def _choose(self, must_free: int, survey: _Survey) -> tuple[list[_Candidate], int]:
        """The least recently used candidates that free ``must_free`` bytes together (all of
        them when they cannot), and what they free; none when a vLLM server did not answer."""
        chosen: list[_Candidate] = []
        total = 0
        if survey.note is None:
            for candidate in survey.candidates:
                if total >= must_free:
                    break
                freed = await self._measure(candidate)
                if freed:
                    chosen.append(candidate)
                    total += freed
        return chosen, total

    async def _remove(
        self, chosen: list[_Candidate], must_free: int, reason: str
    ) -> tuple[list[EvictionCandidate], int]:
        """Remove the chosen revisions in order until ``must_free`` bytes are freed; what went,
        and the bytes freed."""
        evicted: list[EvictionCandidate] = []
        freed = 0
        for candidate in chosen:
            if freed >= must_free:
                break
            repo = candidate.revision.repo_id
            pruned = await self._threads.cache(
                self._backend.prune, repo, frozenset({candidate.commit}), False
            )
            if pruned.refused is not None:  # changed meanwhile (another process took it)
                logfmt.log(
                    logger,
                    logging.WARNING,
                    "eviction_refused",
                    repo=repo,
                    commit=candidate.commit,
                    reason=pruned.refused,
                )
                continue
            candidate.freed = pruned.freed_bytes
            freed += pruned.freed_bytes
            evicted.append(candidate.answer())
            self._announce(candidate, reason)
        return evicted, freed

    async def _measure(self, candidate: _Candidate) -> int:
        """What removing the candidate alone would free (a dry run of its prune)."""
        if candidate.freed is None:
            pruned = await self._threads.cache(
                self._backend.prune,
                candidate.revision.repo_id,
                frozenset({candidate.commit}),
                True,
            )
            candidate.freed = 0 if pruned.refused is not None else pruned.freed_bytes
        return candidate.freed

    async def _survey(self, busy: set[str]) -> _Survey:
        """Every cached revision: those eviction may remove, least recently used first, and
        those it keeps, with why. The vLLM servers are asked now."""
        cached = await self._threads.walk(self._backend.list_cached, None)
        note = None
        users: dict[tuple[str, str], list[ServedModel]] = {}
        if self._in_use.configured:
            now, users = await self._in_use.users(None, fresh=True, revisions=cached)
            if now.unreachable:
                server, silence = now.unreachable[0]
                note = (
                    f"the vLLM server at {server} did not answer ({silence}): what it serves is"
                    " not known, so nothing is evicted"
                )
        candidates: list[_Candidate] = []
        kept: list[KeptRevision] = []
        for revision in cached:
            if revision.commit is None:
                continue  # a folder with no revision: prune's business
            model = Model.model_construct(hf_repo=revision.repo_id, hf_commit=revision.commit)
            why: str | None = None
            if self._uses.pinned(revision.repo_id, revision.commit, revision.refs):
                why = "pinned"
            elif revision.repo_id in busy:
                why = "its model is downloading"
            elif revision.state is CacheState.BUSY:
                why = "another process sharing the cache is downloading it"
            elif cards := users.get((revision.repo_id, revision.commit)):
                why = f"served by the vLLM server at {cards[0].server} (as {cards[0].model_id!r})"
            if why is not None:
                kept.append(KeptRevision(model=model, reason=why))
                continue
            last = self._uses.last(revision.repo_id, revision.commit)
            if last is None:
                at = await self._threads.cache(
                    self._backend.last_access, revision.repo_id, revision.commit
                )
                last = (at, "accessed") if at is not None else None
            candidates.append(_Candidate(revision, last))
        candidates.sort(key=lambda c: (c.last[0] if c.last else 0.0, c.revision.repo_id, c.commit))
        return _Survey(candidates, kept, note)

    def _announce(self, candidate: _Candidate, reason: str) -> None:
        """An eviction: an event, hence a log line (``event=evicted``) and a metric."""
        repo, commit = candidate.revision.repo_id, candidate.commit
        last = candidate.last
        used = "no use known"
        if last is not None:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last[0]))
            used = f"last used: {last[1]}, {at}"
        self._events.publish(
            DownloadEvent(
                type=DownloadEventType.EVICTED,
                task_id=f"{repo}:{commit}",
                model=Model.model_construct(hf_repo=repo, hf_commit=commit),
                time=time.time(),
                commit=commit,
                reason=f"{reason}; {used}",
                freed_bytes=candidate.freed or 0,
            )
        )
