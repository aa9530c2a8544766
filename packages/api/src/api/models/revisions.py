"""Policy for the revisions of a cached model that the manager delegates: which are in use by a
vLLM server (``in_use_map``), and whether a cached branch has moved on the Hub (``UpdateChecker``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from api import logfmt
from api.models.backend import CachedRevision, DownloadFailed, DownloadPlan
from api.models.serving import ServedModel, ServedNow
from api.models.types import repo_id_problem

logger = logging.getLogger(__name__)

Revision = tuple[str, str]  # (repo id, commit)


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
    """The answer for one cached ref."""

    repo_id: str
    ref: str
    cached_commit: str
    hub_commit: str | None
    bytes_to_download: int | None
    error: str | None
    checked_at: float

    @property
    def update_available(self) -> bool:
        return self.hub_commit is not None and self.hub_commit != self.cached_commit


class UpdateChecker:
    """Checks cached refs against the Hub: at most ``concurrency`` at once, each within
    ``timeout``; a check is reused for ``ttl`` seconds while the ref still names the same commit,
    and checks asked while one runs share it.

    ``resolve(repo, ref)`` asks where the ref points now (one request); only when it moved,
    ``plan(repo, ref)`` lists the new revision's files for the selection the cached one was
    downloaded with, and ``missing(repo, plan)`` counts what of it is not in the cache yet."""

    def __init__(
        self,
        resolve: Callable[[str, str], Awaitable[str]],
        plan: Callable[[str, str], Awaitable[DownloadPlan]],
        missing: Callable[[str, DownloadPlan], Awaitable[int]],
        concurrency: int,
        timeout: float,
        ttl: float,
    ) -> None:
        self._resolve = resolve
        self._plan = plan
        self._missing = missing
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = timeout
        self._ttl = ttl
        self._done: dict[tuple[str, str], UpdateCheck] = {}
        self._running: dict[tuple[str, str, str], asyncio.Task[UpdateCheck]] = {}

    async def check_all(self, refs: list[tuple[str, str, str]], refresh: bool) -> list[UpdateCheck]:
        """The checks of ``refs`` ((repo, ref, cached commit) each), in that order."""
        return list(await asyncio.gather(*(self._check(*ref, refresh) for ref in refs)))

    def _check(self, repo_id: str, ref: str, cached: str, refresh: bool) -> Awaitable[UpdateCheck]:
        done = self._done.get((repo_id, ref))
        if (
            not refresh
            and done is not None
            and done.cached_commit == cached
            and time.time() - done.checked_at <= self._ttl
        ):
            return _ready(done)
        key = (repo_id, ref, cached)
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._run(repo_id, ref, cached), name=f"update check {ref}")
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        return asyncio.shield(task)

    async def _run(self, repo_id: str, ref: str, cached: str) -> UpdateCheck:
        hub = missing = error = None
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    hub = await self._resolve(repo_id, ref)
                    missing = 0
                    if hub != cached:
                        plan = await self._plan(repo_id, ref)
                        hub = plan.commit  # the branch may have moved again meanwhile
                        if plan.problem is not None:
                            missing, error = None, plan.problem
                        elif hub != cached:
                            missing = await self._missing(repo_id, plan)
                        else:
                            missing = 0
            except DownloadFailed as failure:
                hub, missing, error = None, None, _plain(failure)
            except TimeoutError:
                hub, missing = None, None
                error = f"the Hub did not answer within {self._timeout:g} s"
        check = UpdateCheck(repo_id, ref, cached, hub, missing, error, time.time())
        self._done[(repo_id, ref)] = check
        if error is not None:
            logfmt.log(
                logger, logging.INFO, "update_check_failed", repo=repo_id, ref=ref, reason=error
            )
        return check


def _plain(failure: DownloadFailed) -> str:
    """The failure's words without the attempt count a download's message carries."""
    return str(failure).removesuffix(" (attempt 1, not retried)")


async def _ready(check: UpdateCheck) -> UpdateCheck:
    return check
