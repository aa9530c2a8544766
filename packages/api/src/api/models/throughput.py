"""``Throughput``: bytes off the network per interval, for the service and for each running
download, over the last minutes (``GET /api/models/throughput``; the page's charts).

A listener of the event bus: each progress event carries the download's ``transferred_bytes`` (a
total over its attempts, from the Hub and from a fleet's peers); what it grew by since the last
event of that download is added to the interval (``BUCKET_SECONDS``, on the wall clock, so that
a fleet's nodes add up interval by interval) the event came in. Kept in memory only: the chart of
the last ``WINDOW_SECONDS``; what was downloaded before that is in the history."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from api.models.types import (
    DownloadEvent,
    DownloadEventType,
    Model,
    ThroughputResponse,
    ThroughputSeries,
)

BUCKET_SECONDS = 2  # one point of the charts
WINDOW_SECONDS = 600  # how far back they go

_ENDS = {DownloadEventType.COMPLETED, DownloadEventType.FAILED, DownloadEventType.CANCELLED}


@dataclass
class _Running:
    model: Model
    total: int  # transferred_bytes at its last event
    buckets: dict[int, int] = field(default_factory=dict)  # interval -> bytes


class Throughput:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._service: dict[int, int] = {}
        self._running: dict[str, _Running] = {}

    def on_event(self, event: DownloadEvent) -> None:
        now = int(self._clock() // BUCKET_SECONDS)
        fetched = event.progress.transferred_bytes if event.progress is not None else None
        with self._lock:
            running = self._running.get(event.task_id)
            if event.type is DownloadEventType.STARTED or (running is None and fetched is not None):
                # A new download (or one met mid-way): what it fetched before is not this
                # interval's.
                running = _Running(event.model, fetched or 0)
                self._running[event.task_id] = running
            if running is not None and fetched is not None:
                grown = fetched - running.total
                running.total = fetched
                if grown > 0:  # a new attempt may count from less: nothing was fetched then
                    running.buckets[now] = running.buckets.get(now, 0) + grown
                    self._service[now] = self._service.get(now, 0) + grown
            if event.type in _ENDS:
                self._running.pop(event.task_id, None)
            self._forget(now)

    def _forget(self, now: int) -> None:
        """Drop the intervals older than the window (called under the lock)."""
        oldest = now - WINDOW_SECONDS // BUCKET_SECONDS + 1
        for buckets in (self._service, *(r.buckets for r in self._running.values())):
            for old in [b for b in buckets if b < oldest]:
                del buckets[old]

    def snapshot(self) -> ThroughputResponse:
        """Bytes per second of each interval of the window, oldest first: the service's, and each
        running download's."""
        now = int(self._clock() // BUCKET_SECONDS)
        count = WINDOW_SECONDS // BUCKET_SECONDS
        first = now - count + 1
        with self._lock:
            self._forget(now)

            def rates(buckets: dict[int, int]) -> list[float]:
                return [buckets.get(first + i, 0) / BUCKET_SECONDS for i in range(count)]

            return ThroughputResponse(
                bucket_seconds=BUCKET_SECONDS,
                start=first * BUCKET_SECONDS,
                service=rates(self._service),
                downloads=[
                    ThroughputSeries(task_id=task, model=r.model, bytes_per_second=rates(r.buckets))
                    for task, r in sorted(self._running.items())
                ],
            )
