"""The bandwidth cap inside a download worker: one limiter per process, shared by every
connection of the worker (the ranged transfers' threads and the library's HTTP client).

The service gives each running download a share of ``MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND`` and
sends it to the download's worker (``protocol.Rate`` on the worker's stdin, at the start and
whenever the share changes: another download starts or ends, an operator changes the cap). The
worker's reads then wait here, so that the bytes it takes off its sockets stay under its share:

- the ranged transfers (``ranged``) read at most ``grain()`` bytes at a time and ``take`` them;
- the library's client (``huggingface_hub``'s ``http_get``, through the transport ``install``ed by
  ``guard``) reads every body through ``ThrottledStream``.

The limiter is a virtual clock (GCRA): each ``take(n)`` moves the time at which the bytes taken so
far are "paid for" by ``n / rate`` (from now at the earliest: an idle while saves no credit), and
waits until that time is at most ``BURST_SECONDS`` ahead.
Over any window the bytes taken are then at most ``rate * window`` plus a burst of
``rate * BURST_SECONDS`` and the reads in flight (one grain per connection). A change of rate wakes
every waiting reader (a higher cap, or none, takes effect at once).

hf_xet (the Xet path) reads in Rust, out of reach: see ``xet_allowed``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx2

BURST_SECONDS = 0.1
MIN_GRAIN = 16 * 1024
WINDOW_SECONDS = 0.02  # of the share: what a connection may hold unread under a cap
MIN_WINDOW = 64 * 1024
MAX_WINDOW = 1024 * 1024


class RateLimiter:
    """Bytes per second for every reader of this process (None: no cap)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rate: float | None = None
        self._paid_until = 0.0  # the time at which the bytes taken so far are paid for
        self._generation = 0  # bumped by each change of rate

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """A new cap (None or 0: none), for the readers waiting now too."""
        with self._cond:
            self._rate = rate if rate else None
            self._paid_until = time.monotonic()
            self._generation += 1
            self._cond.notify_all()

    def grain(self, default: int) -> int:
        """How many bytes a reader should read at a time: ``default``, less under a low cap (so
        that one read is not seconds of the cap)."""
        rate = self._rate
        if rate is None:
            return default
        return max(MIN_GRAIN, min(default, int(rate * BURST_SECONDS)))

    def receive_window(self) -> int | None:
        """The receive buffer a new connection should have under the cap (None: the kernel's
        own, which grows to megabytes: each connection could take in that much at once)."""
        rate = self._rate
        if rate is None:
            return None
        return max(MIN_WINDOW, min(MAX_WINDOW, int(rate * WINDOW_SECONDS)))

    def take(self, nbytes: int) -> None:
        """Count ``nbytes`` read, and wait until they fit under the cap."""
        with self._cond:
            if self._rate is None or nbytes <= 0:
                return
            now = time.monotonic()
            self._paid_until = max(self._paid_until, now) + nbytes / self._rate
            generation = self._generation
            while generation == self._generation:
                wait = self._paid_until - BURST_SECONDS - time.monotonic()
                if wait <= 0:
                    return
                self._cond.wait(wait)


LIMITER = RateLimiter()


def xet_allowed(rate: float | None, xet_when_capped: str) -> bool:
    """Whether files stored in Xet may go through hf_xet now: hf_xet (1.8) has no setting that caps
    its rate (only its concurrency), so under a cap they go through the Hub's plain HTTP download
    of the same file, which is capped, unless the operator chose Xet's speed over the cap."""
    return rate is None or xet_when_capped == "xet"


class ThrottledStream(httpx2.SyncByteStream):
    """A response body read under the process's cap."""

    def __init__(self, inner: httpx2.SyncByteStream, limiter: RateLimiter) -> None:
        self.inner = inner
        self.limiter = limiter

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.limiter.take(len(chunk))
            yield chunk

    def close(self) -> None:
        self.inner.close()


class ThrottledTransport(httpx2.BaseTransport):
    """Every response body of the wrapped transport is read under ``limiter``."""

    def __init__(self, inner: httpx2.BaseTransport, limiter: RateLimiter = LIMITER) -> None:
        self.inner = inner
        self.limiter = limiter

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        stream = response.stream
        if isinstance(stream, httpx2.SyncByteStream):
            response.stream = ThrottledStream(stream, self.limiter)
        return response

    def close(self) -> None:
        self.inner.close()
