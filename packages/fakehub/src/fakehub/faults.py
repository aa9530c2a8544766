"""Faults the fake hub can inject, chosen per test, per path and per n-th matching request.

A fault matches requests by method and by a glob on the decoded URL path (for example
``"*/resolve/*/model.safetensors"``). Of the matching requests it applies to the ones numbered in
``requests`` (1-based; all when None), at most ``times`` times in all.

Each fault has on the client the effect the same fault from the real Hub (or a network between) has:
an HTTP error with the Hub's headers, a connection cut mid-body, a body shorter than announced,
same-length corrupted bytes, a trickle, a stall after the headers, added latency.
"""

from __future__ import annotations

import enum
import fnmatch
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TypedDict, Unpack


class FaultKind(enum.Enum):
    STATUS = "status"  # answer with an HTTP error (500, 502, 503, 429, ...)
    DROP = "drop"  # send the headers and `after_bytes` of the body, then close the connection
    SHORT_BODY = "short_body"  # announce the full length, send `missing` bytes fewer, close
    CORRUPT = "corrupt"  # send the full length with some bytes changed
    TRICKLE = "trickle"  # send the body at `rate` bytes per second
    STALL = "stall"  # send the headers, then nothing for `seconds`, then close
    LATENCY = "latency"  # wait `seconds` before answering


BODY_FAULTS = {
    FaultKind.DROP,
    FaultKind.SHORT_BODY,
    FaultKind.CORRUPT,
    FaultKind.TRICKLE,
    FaultKind.STALL,
}


class Match(TypedDict, total=False):
    """Which requests a fault applies to (see the module docstring)."""

    path: str
    method: str | None
    requests: Collection[int] | None
    times: int | None


@dataclass
class Fault:
    kind: FaultKind
    path: str = "*"
    method: str | None = None
    requests: Collection[int] | None = None
    times: int | None = None
    status: int = 503
    retry_after: float | None = None
    after_bytes: int = 0
    missing: int = 1
    rate: int = 0
    seconds: float = 0.0
    matched: int = 0
    applied: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def take(self, method: str, path: str) -> bool:
        """Count a request against this fault; True when the fault applies to it."""
        if self.method is not None and self.method != method:
            return False
        if not fnmatch.fnmatchcase(path, self.path):
            return False
        if method == "HEAD" and self.kind in BODY_FAULTS:
            return False  # a HEAD answer has no body to damage
        with self._lock:
            self.matched += 1
            if self.requests is not None and self.matched not in self.requests:
                return False
            if self.times is not None and self.applied >= self.times:
                return False
            self.applied += 1
            return True


@dataclass
class Lies:
    """What a hostile or broken Hub (or mirror) says instead of the truth; empty by default.

    - ``sha``: the commit id the repo-info answer gives (``../../victim`` or any text).
    - ``tree_entries``: raw entries appended to the last page of every tree listing.
    - ``headers``: headers set on every ``/resolve`` answer (``ETag``, ``X-Linked-Etag``,
      ``X-Repo-Commit``, ...), replacing the true ones.
    - ``size_overrides``: the size the tree listing gives a file (by path), whatever it has.
    - ``endless_tree``: every tree page links to one more, each with new made-up files.
    - ``looping_tree``: every tree page links back to the first.
    - ``tree_from``: a revision whose file list answers every tree listing (a mirror that mixes
      commits: each answer well-formed, of another commit than asked).
    - ``files_from``: a revision whose files answer every ``/resolve`` request (content, ETag and
      ``X-Repo-Commit`` of that revision).
    - ``redirect_files_to``: a URL every ``/resolve`` answer redirects to (302).
    - ``api_redirect_loop``: every API request is redirected to itself.
    """

    sha: str | None = None
    tree_entries: list[dict[str, object]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    size_overrides: dict[str, int] = field(default_factory=dict)
    endless_tree: bool = False
    looping_tree: bool = False
    tree_from: str | None = None
    files_from: str | None = None
    redirect_files_to: str | None = None
    api_redirect_loop: bool = False


def http_error(status: int = 503, **match: Unpack[Match]) -> Fault:
    """Answer matching requests with ``status`` (500, 502, 503, 504, 408, ...)."""
    return Fault(FaultKind.STATUS, status=status, **match)


def rate_limited(retry_after: float = 1, **match: Unpack[Match]) -> Fault:
    """Answer 429 Too Many Requests with a ``Retry-After`` header."""
    return Fault(FaultKind.STATUS, status=429, retry_after=retry_after, **match)


def drop_after(after_bytes: int, **match: Unpack[Match]) -> Fault:
    """Cut the connection after ``after_bytes`` bytes of the body."""
    return Fault(FaultKind.DROP, after_bytes=after_bytes, **match)


def short_body(missing: int = 1, **match: Unpack[Match]) -> Fault:
    """Announce the full Content-Length but send ``missing`` bytes fewer, then close."""
    return Fault(FaultKind.SHORT_BODY, missing=missing, **match)


def corrupt(**match: Unpack[Match]) -> Fault:
    """Send the right number of bytes with some of them changed."""
    return Fault(FaultKind.CORRUPT, **match)


def trickle(rate: int, **match: Unpack[Match]) -> Fault:
    """Send the body at ``rate`` bytes per second."""
    return Fault(FaultKind.TRICKLE, rate=rate, **match)


def stall(seconds: float, **match: Unpack[Match]) -> Fault:
    """Send the headers, then nothing for ``seconds``, then close the connection."""
    return Fault(FaultKind.STALL, seconds=seconds, **match)


def latency(seconds: float, **match: Unpack[Match]) -> Fault:
    """Wait ``seconds`` before answering."""
    return Fault(FaultKind.LATENCY, seconds=seconds, **match)
