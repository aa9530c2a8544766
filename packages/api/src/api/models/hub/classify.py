"""A failed download attempt, classified: its kind, whether another attempt can succeed, and a
message safe for a client (no URL, no path, no token)."""

from __future__ import annotations

import contextlib
import email.utils
import errno
import re
import time

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from api.models.errors import DownloadFailed, FailureKind
from api.models.hub.guard import UntrustedAnswer

_NO_RETRY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # worth another attempt


def classify_error(
    error: BaseException, repo_id: str, revision: str
) -> tuple[FailureKind, bool, str]:
    """(kind, retryable, message safe for a client) for an error of a download attempt.

    Classified by the most specific class first, then by ``__cause__``: the library wraps a failed
    metadata call in ``LocalEntryNotFoundError`` and its HTTP errors subclass ``OSError``, so a
    "retry every OSError" policy would retry 404s, gated repos and full disks.
    """
    if isinstance(error, DownloadFailed):  # ours, already classified (a ranged download's)
        return error.kind, error.retryable, str(error)
    untrusted = _untrusted(error)
    if untrusted is not None:
        return (
            FailureKind.UNTRUSTED,
            False,
            f"the Hub's answer was refused, nothing was written: {untrusted}",
        )
    if isinstance(error, GatedRepoError):
        return (
            FailureKind.GATED,
            False,
            f"{repo_id} is gated: accept its terms on the Hub with your account and set HF_TOKEN"
            " to a token of that account",
        )
    if isinstance(error, RevisionNotFoundError):
        return (
            FailureKind.REVISION_NOT_FOUND,
            False,
            f"revision '{revision}' not found in {repo_id}",
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            FailureKind.NOT_FOUND,
            False,
            f"{repo_id} not found on the Hub (or it is private and HF_TOKEN gives no access)",
        )
    if isinstance(error, RemoteEntryNotFoundError):
        return (
            FailureKind.NOT_FOUND,
            False,
            f"a file of {repo_id} listed by the Hub is missing on it",
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        if status == 429:
            return FailureKind.RATE_LIMITED, True, "the Hub answered HTTP 429 (too many requests)"
        if status in RETRYABLE_STATUS:
            return FailureKind.NETWORK, True, f"the Hub answered HTTP {status}"
        if status in (401, 403):
            return (
                FailureKind.UNAUTHORIZED,
                False,
                f"the Hub refused access (HTTP {status}): check HF_TOKEN",
            )
        return FailureKind.UNEXPECTED, False, f"the Hub answered HTTP {status}"
    if isinstance(error, httpx2.TooManyRedirects):
        # A loop (or a chain longer than the client follows): what the Hub did, said plainly.
        return (
            FailureKind.UNTRUSTED,
            False,
            "the Hub's answer was refused, nothing was written: it redirected in a loop (more"
            " redirects than any answer needs)",
        )
    if isinstance(error, OfflineModeIsEnabled):
        return FailureKind.NETWORK, False, "the Hub client is in offline mode (HF_HUB_OFFLINE)"
    if isinstance(error, (httpx2.TimeoutException,)):
        return FailureKind.NETWORK, True, "the connection to the Hub timed out"
    if isinstance(error, (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.NetworkError)):
        return FailureKind.NETWORK, True, "the connection to the Hub failed"
    if isinstance(error, httpx2.TransportError):
        return FailureKind.NETWORK, True, "the transfer from the Hub failed"
    if isinstance(error, LocalEntryNotFoundError):
        if error.__cause__ is not None:
            return classify_error(error.__cause__, repo_id, revision)
        return FailureKind.NETWORK, True, "the Hub could not be reached"
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return FailureKind.DISK_FULL, False, "the cache's disk is full"
        if error.errno in _NO_RETRY_ERRNOS:
            return FailureKind.PERMISSION, False, "the cache folder is not writable"
        if error.errno is None:
            # The library's size-consistency check ("file should be of size N but has size M").
            return FailureKind.NETWORK, True, "a file arrived with the wrong size"
        return (
            FailureKind.UNEXPECTED,
            False,
            f"a local error occurred ({errno.errorcode.get(error.errno, error.errno)})",
        )
    if _is_xet_error(error):
        return _classify_xet_error(str(error))
    if isinstance(error, ValueError):
        return FailureKind.INVALID, False, "the Hub client rejected the request"
    return FailureKind.UNEXPECTED, False, f"unexpected error ({type(error).__name__})"


def _untrusted(error: BaseException | None) -> UntrustedAnswer | None:
    """The guard's refusal, also when the library wrapped it in an error of its own."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, UntrustedAnswer):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


_XET_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})")
_XET_MARKERS = ("CAS Client Error", "File reconstruction error", "Task error", "Xet")


def _is_xet_error(error: BaseException) -> bool:
    """hf_xet raises bare RuntimeErrors (and two classes of its own) whose text tells the cause."""
    if type(error).__name__ in ("XetAuthenticationError", "XetObjectNotFoundError"):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _XET_MARKERS)


def _classify_xet_error(text: str) -> tuple[FailureKind, bool, str]:
    """The same policy as on the plain HTTP path, read from the text of a Xet transfer error."""
    status = _XET_STATUS.search(text)
    code = int(status.group(1)) if status else None
    lowered = text.lower()
    if "no space left" in lowered or "os error 28" in lowered or "quota exceeded" in lowered:
        return FailureKind.DISK_FULL, False, "the cache's disk is full"
    if "permission denied" in lowered or "read-only file system" in lowered:
        return FailureKind.PERMISSION, False, "the cache folder is not writable"
    if code in RETRYABLE_STATUS:
        return FailureKind.NETWORK, True, f"the Xet storage answered HTTP {code}"
    if code in (401, 403) or "authentication" in lowered:
        return (
            FailureKind.UNAUTHORIZED,
            False,
            f"the Xet storage refused access{f' (HTTP {code})' if code else ''}: check HF_TOKEN",
        )
    if code == 404 or "not found" in lowered:
        return FailureKind.NOT_FOUND, False, "a file listed by the Hub is missing on its storage"
    if code is not None:
        return FailureKind.UNEXPECTED, False, f"the Xet storage answered HTTP {code}"
    # Connection, timeout, truncated or malformed data: a transfer that may well succeed again.
    return FailureKind.NETWORK, True, "the Xet transfer failed"


def failure_of(error: BaseException, repo_id: str, revision: str) -> DownloadFailed:
    """The error of one attempt as the one failure type (not yet worded for its attempts)."""
    kind, retryable, message = classify_error(error, repo_id, revision)
    after = error.retry_after if isinstance(error, DownloadFailed) else retry_after_seconds(error)
    return DownloadFailed(kind, message, retryable=retryable, retry_after=after)


def retry_after_seconds(error: BaseException) -> float | None:
    """The ``Retry-After`` of a 429/503 answer, in seconds, when the Hub sent one."""
    while error is not None:
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            if error.response.status_code in (429, 503):
                return _seconds_of(error.response.headers.get("Retry-After"))
            return None
        error = error.__cause__  # type: ignore[assignment]
    return None


def _seconds_of(value: str | None) -> float | None:
    """A ``Retry-After`` value in seconds from now: delay-seconds or an HTTP-date (RFC 9110)."""
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is not None:
            return max(0.0, when.timestamp() - time.time())
    return None
