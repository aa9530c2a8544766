"""The manager's event bus: every change of a download's state, for the SSE stream, the metrics and
the logs. Publishing happens on the event loop thread and never blocks."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterator

from api import logfmt
from api.models.types import DownloadEvent, DownloadEventType

logger = logging.getLogger(__name__)

Listener = Callable[[DownloadEvent], None]
QUEUE_SIZE = 1000


class EventBus:
    """Fan-out of ``DownloadEvent``: synchronous listeners (metrics, logs) and queued
    subscribers (event streams). A subscriber that falls 1000 events behind loses the oldest
    progress events rather than slowing the downloads."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._queues: set[asyncio.Queue[DownloadEvent]] = set()
        self._closed = asyncio.Event()
        self._seq = 0
        # The latest events, for a client that reconnects with Last-Event-ID.
        self._recent: collections.deque[DownloadEvent] = collections.deque(maxlen=QUEUE_SIZE)

    def close(self) -> None:
        """End every subscriber's stream (the service is stopping); idempotent."""
        self._closed.set()

    async def next(self, queue: asyncio.Queue[DownloadEvent]) -> DownloadEvent | None:
        """The subscriber's next event, or None once the bus is closed."""
        if self._closed.is_set():
            return None
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({getter, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (getter, closing):
                waiter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, event: DownloadEvent) -> None:
        self._seq += 1
        event = event.model_copy(update={"seq": self._seq})
        self._recent.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop a download
                logfmt.log(
                    logger, logging.ERROR, "listener_failed", exc_info=True, on=event.type.value
                )
        for queue in self._queues:
            _put(queue, event)

    @contextlib.contextmanager
    def subscribe(self, after: int | None = None) -> Iterator[asyncio.Queue[DownloadEvent]]:
        """A queue of the events to come; with ``after`` (a ``seq`` the subscriber saw last),
        first the ones it missed that are still held (the latest 1000)."""
        queue: asyncio.Queue[DownloadEvent] = asyncio.Queue(maxsize=QUEUE_SIZE)
        if after is not None:
            for event in self._recent:
                if event.seq is not None and event.seq > after:
                    _put(queue, event)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


def _put(queue: asyncio.Queue[DownloadEvent], event: DownloadEvent) -> None:
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(event)


def log_event(event: DownloadEvent) -> None:
    """One structured (logfmt) line per state change of a download; progress is not logged."""
    if event.type is DownloadEventType.PROGRESS:
        return
    progress = event.progress
    fields: dict[str, object] = {
        "task_id": event.task_id,
        "repo": event.model.hf_repo,
        "commit": event.commit or "-",
        "bytes": (progress.downloaded_bytes if progress else None) or 0,
        "total_bytes": (progress.total_bytes if progress else None) or "-",
        "duration": f"{progress.elapsed_seconds:.3f}" if progress else "-",
        "attempt": (progress.attempt if progress else None) or 1,
    }
    if event.node_id is not None:
        fields["node"] = event.node_id[:12]  # a fleet's node (its id's first 12 digits)
    if event.retry_reason is not None:
        fields["retry_kind"] = event.retry_kind or "-"
        fields["reason"] = event.retry_reason
    if event.error_message is not None:
        fields["error"] = event.error_message
    if event.type is DownloadEventType.EVICTED:
        fields["freed_bytes"] = event.freed_bytes or 0
        fields["reason"] = event.reason or "-"
    level = logging.WARNING if event.type is DownloadEventType.FAILED else logging.INFO
    logfmt.log_line(logger, level, logfmt.line(event.type.value, **fields))
