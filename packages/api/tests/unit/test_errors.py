"""A fleet node's refusal crosses Ray as the error its service raised: every ``ModelError`` must
survive pickling as itself (class, words and data), whatever its constructor takes, and the
routes must answer a node's refusal with that error's status."""

from __future__ import annotations

import inspect
import json
import pickle

import pytest
from starlette.requests import Request

from api.models import errors
from api.models.errors import (
    BadCursor,
    BudgetExceeded,
    CacheNotWritable,
    DownloadCancelled,
    DownloadConflict,
    DownloadFailed,
    FailureKind,
    FleetUnavailable,
    HubAnswer,
    InsufficientStorage,
    InUseUnknown,
    ModelError,
    ModelInUse,
    ModelNotFound,
    NoBudget,
    NodesLackSpace,
    NotAFleet,
    NotPinned,
    OnNode,
    RevisionBusy,
    SelectionUnusable,
    TooManyDownloads,
    TooManyVerifications,
    UnknownNode,
    UnsafeCachePath,
)
from api.models.routes import model_error_handler

SAMPLES: list[ModelError] = [
    DownloadConflict("org/a:latest"),
    DownloadCancelled("org/a:latest"),
    TooManyDownloads(3, 7, queued=2),
    TooManyVerifications(2, 5),
    ModelNotFound("org/a:latest"),
    InsufficientStorage(needed=10, available=5, free=8, reserved=1, margin=2),
    BudgetExceeded(needed=10, evictable=4, kept=["org/a@0123456789ab (pinned)"], budget=100),
    NoBudget(),
    BadCursor("the cursor is not one this service gave: start again without it"),
    NotPinned("org/a at main"),
    UnsafeCachePath("org/a", "blobs/x", partly=True),
    RevisionBusy("org/a", "c" * 40),
    CacheNotWritable("org/a", partly=True),
    ModelInUse("org/a at main", "http://127.0.0.1:8001", "served"),
    InUseUnknown("org/a", "http://127.0.0.1:8001", "no answer"),
    SelectionUnusable("files: vllm finds no weights"),
    HubAnswer(DownloadFailed(FailureKind.GATED, "org/a is gated", retry_after=30.0)),
    NodesLackSpace([("a" * 32, 10, 5)]),
    NotAFleet(),
    UnknownNode("abcdef12"),
    FleetUnavailable("every node left"),
    OnNode("b" * 32, TooManyDownloads(3, 9)),
]


def test_every_model_error_is_sampled() -> None:
    """A new error class must be added to SAMPLES (and so be checked to cross a fleet)."""
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, ModelError) and cls is not ModelError
    }
    assert defined == {type(e) for e in SAMPLES}


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_an_error_survives_pickling_as_itself(error: ModelError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.args == error.args
    assert set(vars(back)) == set(vars(error))
    for name, value in vars(error).items():
        if isinstance(value, ModelError):
            assert str(vars(back)[name]) == str(value)
        else:
            assert vars(back)[name] == value


def _answer(error: ModelError) -> tuple[int, dict[str, str], dict[str, object]]:
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
    response = model_error_handler(request, error)
    return response.status_code, dict(response.headers), json.loads(bytes(response.body))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TooManyDownloads(3, 9), 429),
        (ModelNotFound("org/a:latest"), 404),
        (HubAnswer(DownloadFailed(FailureKind.GATED, "org/a is gated")), 403),
        (HubAnswer(DownloadFailed(FailureKind.NETWORK, "slow")), 504),
        (SelectionUnusable("no file matches"), 422),
        (InsufficientStorage(needed=10, available=5, free=8, reserved=1, margin=2), 507),
        (BudgetExceeded(needed=10, evictable=4, kept=["org/a@0123 (pinned)"], budget=100), 507),
        (NotPinned("org/a at main"), 404),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, ModelError) else str(v),
)
def test_a_nodes_refusal_answers_with_its_errors_status_naming_the_node(
    error: ModelError, code: int
) -> None:
    node = "f" * 32
    crossed = pickle.loads(pickle.dumps(OnNode(node, error)))  # as it comes back from Ray
    alone, alone_headers, _ = _answer(error)
    status, headers, body = _answer(crossed)
    assert status == alone == code
    assert headers.get("retry-after") == alone_headers.get("retry-after")
    assert body["detail"] == f"node {node[:12]}: {error}"


def test_a_fleet_with_no_node_to_answer_is_unavailable_not_a_bug() -> None:
    status, _, body = _answer(FleetUnavailable("each node left"))
    assert status == 503
    assert "each node left" in str(body["detail"])
