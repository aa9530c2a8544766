"""``History``: what happened to the cache, kept in the job store so that it outlives the page and
the service: each download's end (completed, failed, cancelled, with its bytes and duration), each
delete, each revision a prune or an eviction removed, and who asked (the name of the API key,
``name:key`` in MODELS_API_KEY; never the key).

Who asked travels in a context variable (``ACTOR``), set by the key check of the request: the
download task a request starts inherits it (asyncio copies the context into the tasks it creates),
so the download's end is written with the name of whoever started it."""

from __future__ import annotations

import contextvars
import logging
import time

from api import logfmt
from api.models.threads import Keeper
from api.models.types import (
    DownloadEvent,
    DownloadEventType,
    HistoryEntry,
    Model,
)

logger = logging.getLogger(__name__)

# The name of the API key of the request being served (None: no key is set, or not a request).
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)

_ENDS = {
    DownloadEventType.COMPLETED: "downloaded",
    DownloadEventType.FAILED: "failed",
    DownloadEventType.CANCELLED: "cancelled",
    DownloadEventType.EVICTED: "evicted",
}


class History:
    def __init__(self, keeper: Keeper) -> None:
        self._keeper = keeper

    def on_event(self, event: DownloadEvent) -> None:
        """A listener of the event bus: the ends of downloads, and evictions."""
        what = _ENDS.get(event.type)
        if what is None:
            return
        progress = event.progress
        if event.type is DownloadEventType.EVICTED:
            size, duration, detail = event.freed_bytes, None, event.reason
        else:
            size = progress.downloaded_bytes if progress else None
            duration = progress.elapsed_seconds if progress else None
            detail = event.error_message
        self.record(
            what,
            event.model.hf_repo,
            event.commit or event.model.hf_commit,
            task_id=event.task_id,
            size=size,
            duration=duration,
            detail=detail,
        )

    def record(
        self,
        what: str,
        repo: str,
        commit: str | None,
        *,
        task_id: str | None = None,
        size: int | None = None,
        duration: float | None = None,
        detail: str | None = None,
    ) -> None:
        """One entry, now, by whoever the current request's key names."""
        entry = HistoryEntry(
            time=time.time(),
            event=what,
            task_id=task_id or Model.model_construct(hf_repo=repo, hf_commit=commit).task_id,
            model=Model.model_construct(hf_repo=repo, hf_commit=commit),
            size_bytes=size,
            duration_seconds=duration,
            detail=detail,
            by=ACTOR.get(),
        )
        try:
            self._keeper.keep(self._keeper.store.add_history, entry)
        except RuntimeError:  # no running loop (a test's bare call): not kept
            logfmt.log(logger, logging.WARNING, "history_not_kept", what=what, repo=repo)

    async def entries(self, limit: int) -> list[HistoryEntry]:
        """The latest ``limit`` entries, newest first (none without a store)."""
        if not self._keeper.open:
            return []
        return await self._keeper.run(self._keeper.store.history, limit)
