"""``DownloadJob``: one running download, its progress counters and its task.

Progress changes only on the event loop thread (``apply``, from the backend's updates, which carry
absolute counters); routes read snapshots (``status``, ``progress``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from api.models.backend import DownloadUpdate, FileSelection, Peer, RateShare
from api.models.events import EventBus
from api.models.types import (
    DownloadEvent,
    DownloadEventType,
    DownloadPhase,
    DownloadProgress,
    Model,
    ModelStatus,
    ModelStatusResponse,
    SelectionInfo,
)

_RATE_SMOOTHING = 0.3  # weight of the newest sample in the speed average
PROGRESS_EVENT_INTERVAL = 0.5  # seconds between two progress events of one download
# No ETA before the speed was measured this long (an attempt's first small file, or its first
# burst, said "648 h left" at the start of a download).
ETA_AFTER_SECONDS = 3.0
XET_UNCAPPED = (
    "some of its files come through hf_xet, which cannot be capped: the bandwidth cap does not"
    " hold for them (MODELS_XET_WHEN_CAPPED=xet, or a file already under way when the cap was set)"
)


@dataclass
class DownloadJob:
    """One running download: what it is, how far it got, and the task that runs it."""

    model: Model
    start_time: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    phase: DownloadPhase = DownloadPhase.RESOLVING
    commit: str | None = None
    served_commit: str | None = None  # a branch's update: what its ref names until this is done
    discard: bool = False  # cancelled by its user: what it fetched for a next attempt goes too
    queue_position: int | None = None  # while queued: 1 for the next to start
    key: str | None = None  # its row in the job store, while it is kept there
    rate: RateShare = field(default_factory=RateShare)  # its bandwidth share (manager's)
    through_xet: bool = False  # bytes came through hf_xet, which a bandwidth cap cannot reach
    total_bytes: int | None = None
    downloaded_bytes: int | None = None
    files_total: int | None = None
    files_done: int | None = None
    verified_bytes: int | None = None
    transferred_bytes: int = 0
    from_peers_bytes: int = 0  # of transferred_bytes, copied from a fleet's peers
    attempt: int = 1
    bytes_per_second: float | None = None
    _sample: tuple[float, int] | None = None
    _measured_since: float | None = None  # the attempt's first speed sample
    _last_progress_event: float = 0.0
    selections: tuple[FileSelection, ...] = ()  # what it fetches, once the plan is known
    peers: tuple[Peer, ...] = ()  # a fleet's nodes to copy its files from first
    task: asyncio.Task[None] | None = None
    bus: EventBus | None = None

    @property
    def task_id(self) -> str:
        return self.model.task_id

    def event(self, type_: DownloadEventType, **fields: str | None) -> DownloadEvent:
        """The event, ``fields`` being its texts (``error_message``, ``retry_reason``...)."""
        return DownloadEvent.model_validate(
            {
                "type": type_,
                "task_id": self.task_id,
                "model": self.model,
                "time": time.time(),
                "commit": self.commit,
                "progress": self.progress(),
                **fields,
            }
        )

    def publish(self, type_: DownloadEventType, **fields: str | None) -> None:
        if self.bus is not None:
            self.bus.publish(self.event(type_, **fields))

    def apply(self, update: DownloadUpdate) -> None:
        """Take an update from the backend (on the event loop thread) and publish what changed."""
        phase_before = self.phase
        if update.commit is not None:
            self.commit = update.commit
        if update.through_xet:
            self.through_xet = True
        if update.selections is not None:
            self.selections = update.selections  # a resumed download learns it from its plan
        if update.total_bytes is not None:
            self.total_bytes = update.total_bytes
            self.phase = DownloadPhase.DOWNLOADING
        if update.files_total is not None:
            self.files_total = update.files_total
        if update.attempt is not None and update.attempt != self.attempt:
            self.attempt = update.attempt
            self._sample = None  # a new attempt: the speed starts over
            self._measured_since = None
        if update.retry_reason is not None:
            self.publish(
                DownloadEventType.RETRYING,
                retry_reason=update.retry_reason,
                retry_kind=update.retry_kind,
            )
        if update.verifying:
            self.phase = DownloadPhase.VERIFYING
            self.verified_bytes = update.downloaded_bytes
        else:
            if update.files_done is not None:
                self.files_done = update.files_done
            if update.transferred_bytes is not None:
                self.transferred_bytes = update.transferred_bytes  # a total: all attempts
            if update.from_peers_bytes is not None:
                self.from_peers_bytes = update.from_peers_bytes
            if update.downloaded_bytes is not None:
                self.phase = DownloadPhase.DOWNLOADING
                self._measure(update.downloaded_bytes)
                self.downloaded_bytes = update.downloaded_bytes
        now = time.monotonic()
        if self.phase is DownloadPhase.VERIFYING and phase_before is not DownloadPhase.VERIFYING:
            self.publish(DownloadEventType.VERIFYING)
            self._last_progress_event = now
        elif now - self._last_progress_event >= PROGRESS_EVENT_INTERVAL:
            self.publish(DownloadEventType.PROGRESS)
            self._last_progress_event = now

    def _measure(self, downloaded: int) -> None:
        now = time.monotonic()
        if self._sample is not None:
            then, before = self._sample
            if now - then >= 0.2 and downloaded >= before:
                rate = (downloaded - before) / (now - then)
                self.bytes_per_second = (
                    rate
                    if self.bytes_per_second is None
                    else _RATE_SMOOTHING * rate + (1 - _RATE_SMOOTHING) * self.bytes_per_second
                )
                self._sample = (now, downloaded)
        else:
            self._sample = (now, downloaded)
            self._measured_since = now

    def status(self) -> ModelStatusResponse:
        return ModelStatusResponse(
            model=self.model,
            status=ModelStatus.DOWNLOADING,
            progress=self.progress(),
            commit=self.commit,
            selection=[SelectionInfo.of(s) for s in self.selections] or None,
            served_commit=self.served_commit,
            coming_commit=self.commit if self.served_commit is not None else None,
        )

    def progress(self) -> DownloadProgress:
        percent = eta = None
        if self.total_bytes is not None and self.downloaded_bytes is not None:
            percent = (
                100.0 if self.total_bytes == 0 else 100.0 * self.downloaded_bytes / self.total_bytes
            )
            percent = round(min(percent, 100.0), 2)
            measured = self._measured_since is not None and (
                time.monotonic() - self._measured_since >= ETA_AFTER_SECONDS
            )
            if self.bytes_per_second and measured:
                remaining = max(self.total_bytes - self.downloaded_bytes, 0)
                eta = round(remaining / self.bytes_per_second, 1)
        return DownloadProgress(
            start_time=self.start_time,
            elapsed_seconds=round(time.monotonic() - self.started, 3),
            phase=self.phase,
            downloaded_bytes=self.downloaded_bytes,
            total_bytes=self.total_bytes,
            percent=percent,
            bytes_per_second=None
            if self.bytes_per_second is None
            else round(self.bytes_per_second, 1),
            eta_seconds=eta,
            files_done=self.files_done,
            files_total=self.files_total,
            verified_bytes=self.verified_bytes,
            queue_position=self.queue_position if self.phase is DownloadPhase.QUEUED else None,
            transferred_bytes=self.transferred_bytes,
            from_peers_bytes=self.from_peers_bytes or None,
            attempt=self.attempt,
            bandwidth_limit_bytes_per_second=self.rate.value,
            bandwidth_note=XET_UNCAPPED if self.through_xet and self.rate.value else None,
        )
