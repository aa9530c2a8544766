"""``Housekeeping``: what removes or checks what is cached: delete (a running download is
cancelled instead), prune, and verify. Each keeps what downloads here or in another process
sharing the cache, and, unless forced, what a vLLM server serves (``InUse``)."""

from __future__ import annotations

import asyncio
import logging

from api import logfmt
from api.models.backend import CacheState, HubBackend, Pruned
from api.models.budget import Uses
from api.models.downloads import Downloads
from api.models.errors import (
    DownloadConflict,
    InUseUnknown,
    ModelNotFound,
    TooManyVerifications,
)
from api.models.failures import Failures
from api.models.history import History
from api.models.inuse import InUse
from api.models.revisions import Revision
from api.models.serving import ServedModel, ServedNow
from api.models.threads import Threads
from api.models.types import (
    DeleteResponse,
    DeleteStatus,
    KeptRevision,
    Model,
    PrunedRevision,
    PruneRequest,
    PruneResponse,
    VerifyResponse,
)

logger = logging.getLogger(__name__)


class Housekeeping:
    def __init__(
        self,
        backend: HubBackend,
        threads: Threads,
        downloads: Downloads,
        failures: Failures,
        in_use: InUse,
        verifications: int,
        retry_after: int,
        uses: Uses,
        history: History,
    ) -> None:
        self._uses = uses
        self._history = history
        self._backend = backend
        self._threads = threads
        self._downloads = downloads
        self._failures = failures
        self._in_use = in_use
        self._verifications = verifications
        self._retry_after = retry_after
        self._verify_slots = asyncio.Semaphore(verifications)

    async def delete(self, model: Model, force: bool = False) -> DeleteResponse:
        """Cancel the download of ``model`` if one runs, else delete it from the cache.

        Without ``hf_commit`` the whole model (every cached revision) is deleted; with one, that
        revision only, keeping blobs other revisions share. Raises ``ModelNotFound`` when there is
        nothing to cancel or delete, ``DownloadConflict`` when deleting the whole model while
        another of its revisions downloads, and, unless ``force``, ``ModelInUse`` when a vLLM
        server serves what would be deleted and ``InUseUnknown`` when one does not answer.
        """
        if await self._downloads.cancel(model):
            return DeleteResponse(status=DeleteStatus.CANCELLED)
        if model.hf_commit is None:
            # The whole model: not while another of its revisions downloads or starts here.
            for task_id, other, _ in self._downloads.running():
                if other.hf_repo == model.hf_repo:
                    raise DownloadConflict(task_id)
        if not force and self._in_use.configured:
            await self._in_use.refuse(model)
        freed = await self._threads.cache(self._backend.delete, model.hf_repo, model.hf_commit)
        if freed is None:
            raise ModelNotFound(model.task_id)
        self._failures.drop(model.task_id)
        self._history.record("deleted", model.hf_repo, model.hf_commit, size=freed)
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

    async def prune(self, request: PruneRequest, force: bool = False) -> PruneResponse:
        """Remove the revisions no ref points to (and, with ``include_partial``, PARTIAL ones),
        of ``hf_repo`` or of every model, keeping those that download (here or in another process
        sharing the cache) and, unless ``force``, those a vLLM server serves. Blobs a kept
        revision uses stay. With ``dry_run``, nothing changes.

        Raises ``InUseUnknown`` (not for a dry run, nor with ``force``) when a vLLM server does
        not answer: what it serves cannot be kept then."""
        cached = await self._threads.walk(self._backend.list_cached, request.hf_repo)
        now: ServedNow = ServedNow()
        users: dict[Revision, list[ServedModel]] = {}
        if not force and self._in_use.configured:
            now, users = await self._in_use.users(request.hf_repo, fresh=True, revisions=cached)
            if now.unreachable and not request.dry_run:
                server, why = now.unreachable[0]
                raise InUseUnknown("what prune would remove", server, why)
        running = {(m.hf_repo, c) for _, m, c in self._downloads.running()}
        starting = {m.hf_repo for _, m, c in self._downloads.running() if c is None}
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
            if self._uses.pinned(revision.repo_id, revision.commit, revision.refs):
                reason = "pinned (DELETE /api/models/pin to let it go)"
            elif (revision.repo_id, revision.commit) in running or revision.repo_id in starting:
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
            pruned: Pruned = await self._threads.cache(
                self._backend.prune, repo_id, targets, request.dry_run
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
                if not request.dry_run:
                    self._history.record("pruned", repo_id, commit, size=size)
                revisions.append(
                    PrunedRevision(
                        model=Model.model_construct(hf_repo=repo_id, hf_commit=commit),
                        size_bytes=size,
                    )
                )
            if not request.dry_run:
                self._failures.forget_removed(repo_id, commits, cached)
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

    async def verify(self, model: Model) -> VerifyResponse:
        """Hash every file of the cached revision against its ETag, off the event loop.

        Raises ``DownloadConflict`` while it downloads and ``ModelNotFound`` when not cached."""
        if (running := self._downloads.running_as(model)) is not None:
            raise DownloadConflict(running)
        if self._verify_slots.locked():
            raise TooManyVerifications(self._verifications, self._retry_after)
        async with self._verify_slots:
            report = await self._threads.hash(self._backend.verify, model.hf_repo, model.revision)
        if report is None:
            raise ModelNotFound(model.task_id)
        verified = not report.missing and not report.mismatched
        if verified:
            self._uses.used(model.hf_repo, report.commit, "verified")
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
