"""The failure classification, as a table: the library's errors (and hf_xet's texts) to a kind, a
retry decision and a message that carries no URL, path or token."""

from __future__ import annotations

import email.utils
import errno
import time

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from api.models.errors import FailureKind
from api.models.hub.classify import classify_error, failure_of, retry_after_seconds
from api.models.hub.guard import UntrustedAnswer

URL = "http://hub.internal/org/m/resolve/main/secret-path.bin"


def response(status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers, request=httpx2.Request("GET", URL))


def http(cls: type[HfHubHTTPError], status: int, **headers: str) -> HfHubHTTPError:
    return cls(f"{status} for {URL}", response=response(status, headers))


def wrapped(cause: BaseException) -> LocalEntryNotFoundError:
    error = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    error.__cause__ = cause
    return error


def untrusted_inside() -> Exception:
    error = RuntimeError("outer")
    error.__cause__ = UntrustedAnswer("a file path is absolute: '/etc/passwd'")
    return error


CASES: list[tuple[str, BaseException, FailureKind, bool, str]] = [
    ("gated", http(GatedRepoError, 403), FailureKind.GATED, False, "is gated"),
    ("repo 404", http(RepositoryNotFoundError, 404), FailureKind.NOT_FOUND, False, "not found"),
    (
        "revision 404",
        http(RevisionNotFoundError, 404),
        FailureKind.REVISION_NOT_FOUND,
        False,
        "'main'",
    ),
    ("entry 404", http(RemoteEntryNotFoundError, 404), FailureKind.NOT_FOUND, False, "missing"),
    ("500", http(HfHubHTTPError, 500), FailureKind.NETWORK, True, "HTTP 500"),
    ("503", http(HfHubHTTPError, 503), FailureKind.NETWORK, True, "HTTP 503"),
    ("429", http(HfHubHTTPError, 429), FailureKind.RATE_LIMITED, True, "HTTP 429"),
    ("401", http(HfHubHTTPError, 401), FailureKind.UNAUTHORIZED, False, "HF_TOKEN"),
    ("418", http(HfHubHTTPError, 418), FailureKind.UNEXPECTED, False, "HTTP 418"),
    ("timeout", httpx2.ReadTimeout("read timed out"), FailureKind.NETWORK, True, "timed out"),
    ("connect", httpx2.ConnectError("refused"), FailureKind.NETWORK, True, "failed"),
    ("offline", OfflineModeIsEnabled("offline"), FailureKind.NETWORK, False, "HF_HUB_OFFLINE"),
    ("wrapped 503", wrapped(http(HfHubHTTPError, 503)), FailureKind.NETWORK, True, "HTTP 503"),
    ("wrapped nothing", LocalEntryNotFoundError("x"), FailureKind.NETWORK, True, "reached"),
    ("disk full", OSError(errno.ENOSPC, "No space"), FailureKind.DISK_FULL, False, "full"),
    ("read-only", OSError(errno.EROFS, "ro"), FailureKind.PERMISSION, False, "not writable"),
    ("size check", OSError("file should be of size 5"), FailureKind.NETWORK, True, "wrong size"),
    ("untrusted", UntrustedAnswer("a bad id"), FailureKind.UNTRUSTED, False, "refused"),
    ("untrusted inside", untrusted_inside(), FailureKind.UNTRUSTED, False, "absolute"),
    (
        "xet 503",
        RuntimeError("CAS Client Error: HTTP status server error (503 Service Unavailable)"),
        FailureKind.NETWORK,
        True,
        "HTTP 503",
    ),
    (
        "xet 401",
        RuntimeError("CAS Client Error: HTTP status client error (401 Unauthorized)"),
        FailureKind.UNAUTHORIZED,
        False,
        "HF_TOKEN",
    ),
    (
        "xet disk",
        RuntimeError("Xet: No space left on device (os error 28)"),
        FailureKind.DISK_FULL,
        False,
        "full",
    ),
    ("xet other", RuntimeError("Task error: connection reset"), FailureKind.NETWORK, True, "Xet"),
    ("bug", KeyError("x"), FailureKind.UNEXPECTED, False, "KeyError"),
]


@pytest.mark.parametrize(
    ("error", "kind", "retryable", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classification(
    error: BaseException, kind: FailureKind, retryable: bool, words: str
) -> None:
    got_kind, got_retryable, message = classify_error(error, "org/m", "main")
    assert (got_kind, got_retryable) == (kind, retryable)
    assert words in message
    assert "hub.internal" not in message
    assert "secret-path" not in message


def test_retry_after_is_read_from_429_and_503_only() -> None:
    assert retry_after_seconds(http(HfHubHTTPError, 429, **{"Retry-After": "7"})) == 7
    assert retry_after_seconds(wrapped(http(HfHubHTTPError, 503, **{"Retry-After": "2"}))) == 2
    assert retry_after_seconds(http(HfHubHTTPError, 500, **{"Retry-After": "7"})) is None
    assert retry_after_seconds(http(HfHubHTTPError, 429, **{"Retry-After": "soon"})) is None
    later = email.utils.formatdate(time.time() + 120, usegmt=True)  # the HTTP-date form
    seconds = retry_after_seconds(http(HfHubHTTPError, 429, **{"Retry-After": later}))
    assert seconds is not None
    assert 100 < seconds <= 120
    failure = failure_of(http(HfHubHTTPError, 429, **{"Retry-After": "3"}), "org/m", "main")
    assert (failure.kind, failure.retryable, failure.retry_after) == (
        FailureKind.RATE_LIMITED,
        True,
        3,
    )
