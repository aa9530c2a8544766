"""HTTP routes of the models API: translate JSON to manager calls and domain errors to status codes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import TypeAdapter

from api.auth import KeyFirstRoute, require_read, require_write
from api.models.errors import (
    BadCursor,
    BudgetExceeded,
    CacheNotWritable,
    DownloadCancelled,
    DownloadConflict,
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
from api.models.paging import ListQuery
from api.models.service import ModelService
from api.models.threads import WALK_NICE, background_pool, same_objects
from api.models.types import (
    COMMIT_EXAMPLE,
    REPO_EXAMPLE,
    REPO_JSON_PATTERN,
    BandwidthResponse,
    BandwidthSetting,
    BudgetResponse,
    DeleteResponse,
    DiskSpaceInfo,
    DownloadEvent,
    DownloadListResponse,
    DownloadStartedResponse,
    ErrorResponse,
    EvictRequest,
    EvictResponse,
    HistoryResponse,
    ListSort,
    Model,
    ModelListItem,
    ModelListResponse,
    ModelRequest,
    ModelStatus,
    ModelStatusResponse,
    PinResponse,
    PlanResponse,
    PruneRequest,
    PruneResponse,
    ThroughputResponse,
    UpdatesResponse,
    VerifyResponse,
)

# One table from domain errors to HTTP codes.
ERROR_STATUS: dict[type[ModelError], int] = {
    DownloadConflict: status.HTTP_409_CONFLICT,
    DownloadCancelled: status.HTTP_409_CONFLICT,
    TooManyDownloads: status.HTTP_429_TOO_MANY_REQUESTS,
    TooManyVerifications: status.HTTP_429_TOO_MANY_REQUESTS,
    ModelNotFound: status.HTTP_404_NOT_FOUND,
    InsufficientStorage: status.HTTP_507_INSUFFICIENT_STORAGE,
    BudgetExceeded: status.HTTP_507_INSUFFICIENT_STORAGE,
    NoBudget: status.HTTP_422_UNPROCESSABLE_CONTENT,
    NotPinned: status.HTTP_404_NOT_FOUND,
    BadCursor: status.HTTP_422_UNPROCESSABLE_CONTENT,
    UnsafeCachePath: status.HTTP_409_CONFLICT,
    RevisionBusy: status.HTTP_409_CONFLICT,
    CacheNotWritable: status.HTTP_409_CONFLICT,
    SelectionUnusable: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ModelInUse: status.HTTP_409_CONFLICT,
    InUseUnknown: status.HTTP_409_CONFLICT,
    NodesLackSpace: status.HTTP_507_INSUFFICIENT_STORAGE,
    UnknownNode: status.HTTP_422_UNPROCESSABLE_CONTENT,
    NotAFleet: status.HTTP_422_UNPROCESSABLE_CONTENT,
    FleetUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
}
# Why the Hub gave no file list (POST /plan): the repo's own answer, or a gateway's.
HUB_ANSWER_STATUS: dict[FailureKind, int] = {
    FailureKind.NOT_FOUND: status.HTTP_404_NOT_FOUND,
    FailureKind.REVISION_NOT_FOUND: status.HTTP_404_NOT_FOUND,
    FailureKind.UNAUTHORIZED: status.HTTP_401_UNAUTHORIZED,
    FailureKind.GATED: status.HTTP_403_FORBIDDEN,
    FailureKind.UNTRUSTED: status.HTTP_502_BAD_GATEWAY,
    FailureKind.UNEXPECTED: status.HTTP_500_INTERNAL_SERVER_ERROR,  # a bug of ours
}


def model_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Map a ``ModelError`` (any subclass) to its status code and a JSON ``detail``. A fleet
    node's refusal (``OnNode``) answers with the status of the error the node raised, and its
    words with the node named."""
    assert isinstance(exc, ModelError)
    cause = exc.error if isinstance(exc, OnNode) else exc
    code = next(
        (ERROR_STATUS[cls] for cls in type(cause).__mro__ if cls in ERROR_STATUS),
        status.HTTP_500_INTERNAL_SERVER_ERROR,
    )
    retry_after: float | None = None
    if isinstance(cause, (TooManyDownloads, TooManyVerifications)):
        retry_after = cause.retry_after
    if isinstance(cause, HubAnswer):
        # Anything else (no answer, a 5xx, a timeout) is the Hub's side not answering in time.
        code = HUB_ANSWER_STATUS.get(cause.kind, status.HTTP_504_GATEWAY_TIMEOUT)
        retry_after = cause.retry_after
    headers = {"Retry-After": str(max(int(retry_after), 1))} if retry_after is not None else None
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


async def get_service(request: Request) -> ModelService:
    """The service in use: the fleet's when the service runs over a Ray cluster
    (MODELS_RAY_ADDRESS), else the one machine's manager (the lifespan chose). A coroutine: FastAPI
    runs a plain function dependency on a worker thread, a hop per request (bench/scale.py: a
    tenth of the event loop's time while six lists ran)."""
    service: ModelService = request.app.state.service
    return service


ServiceDep = Annotated[ModelService, Depends(get_service)]


ForceQuery = Annotated[
    bool,
    Query(
        description="Delete even what a vLLM server of MODELS_VLLM_URLS serves, or while one of"
        " them does not answer"
    ),
]

_MODEL_EXAMPLES: dict[str, Any] = {
    "latest": {"summary": "Default branch", "value": {"hf_repo": REPO_EXAMPLE}},
    "commit": {
        "summary": "A pinned commit",
        "value": {"hf_repo": REPO_EXAMPLE, "hf_commit": COMMIT_EXAMPLE},
    },
}
ModelBody = Annotated[Model, Body(openapi_examples=_MODEL_EXAMPLES)]
_REQUEST_EXAMPLES: dict[str, Any] = {
    **_MODEL_EXAMPLES,
    "vllm": {
        "summary": "What vLLM loads (one weight format, config, tokenizer)",
        "value": {"hf_repo": REPO_EXAMPLE, "files": "vllm"},
    },
    "gguf": {
        "summary": "One GGUF quantization",
        "value": {"hf_repo": "org/model-GGUF", "allow_patterns": ["*Q4_K_M*.gguf"]},
    },
}
RequestBody = Annotated[ModelRequest, Body(openapi_examples=_REQUEST_EXAMPLES)]


def _error(description: str, example: str) -> dict[str, Any]:
    return {
        "model": ErrorResponse,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


_INVALID: dict[str, Any] = {
    "model": ErrorResponse,
    "description": "The body is not a valid Model: each error names the field and the rule",
    "content": {
        "application/json": {
            "example": {
                "detail": [
                    {
                        "type": "value_error",
                        "loc": ["body", "hf_repo"],
                        "msg": "Value error, hf_repo must be 'namespace/name' with exactly one"
                        " '/', e.g. 'meta-llama/Llama-2-7b-hf'",
                    }
                ]
            }
        }
    },
}
# What every endpoint that takes a Model body can answer before it reaches the manager.
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error(
        "The body could not be read as JSON text, or the request's Host is not a name of this"
        " service (MODELS_ALLOWED_HOSTS)",
        "There was an error parsing the body",
    ),
    403: _error(
        "A browser page of another site sent it (its Origin, or Sec-Fetch-Site: cross-site);"
        " nothing was done",
        "a request from another site (https://evil.example) may not change anything here; use"
        " this service's own page, or a client that is not a browser",
    ),
    413: _error(
        "The body is larger than the service accepts",
        "request body too large: at most 65536 bytes are accepted",
    ),
    422: _INVALID,
}
# What a body with a file selection can answer besides.
_SELECTION_ERRORS: dict[int | str, dict[str, Any]] = {
    **_BODY_ERRORS,
    422: {
        **_INVALID,
        "description": "The body is not valid (each error names the field and the rule), or its"
        " selection cannot be downloaded (it matches no file, or files: vllm finds no weights"
        " vLLM reads): detail then says so in words",
    },
}

# Every endpoint, GETs included, can answer this one (a bug of ours; the log says more).
_UNEXPECTED: dict[int | str, dict[str, Any]] = {
    500: _error(
        "An unexpected error of the service (a bug): nothing was changed by this request; the"
        " service log has the details",
        "internal error; see the service log",
    )
}
# With an API key set (MODELS_API_KEY, MODELS_READ_API_KEY), every endpoint can answer this one.
_NO_KEY: dict[int | str, dict[str, Any]] = {
    401: {
        **_error(
            "An API key is set and the request carries none of its keys (Authorization: Bearer"
            " <key>); nothing was started, written or deleted",
            "this request needs an API key: send 'Authorization: Bearer <key>' with a key of"
            " MODELS_API_KEY",
        ),
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    }
}
_SERIALIZER = background_pool(1, "serialize", WALK_NICE)

router = APIRouter(
    prefix="/models",
    tags=["Models"],
    responses={**_UNEXPECTED, **_NO_KEY},
    route_class=KeyFirstRoute,
)
Reads = [Depends(require_read)]
Writes = [Depends(require_write)]


@router.post(
    "/status",
    dependencies=Reads,
    response_model=ModelStatusResponse,
    responses=_SELECTION_ERRORS,
)
async def model_status(model: RequestBody, service: ServiceDep) -> ModelStatusResponse:
    """Status of a model in the cache, checked offline.

    For the files selected: those the request names (`files`, `allow_patterns`,
    `ignore_patterns`), else those the revision was downloaded with, else `MODELS_DEFAULT_FILES`.
    `DOWNLOADED` when every selected file is in the cache with its size and verified, `DOWNLOADING`
    (with byte progress) while a download runs, `PARTIAL` when only part of it is there (a failed
    or cancelled download, with `error_message` when it failed), `NOT_FOUND` when nothing is.

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit": "01c7f73d771dfac7d292323805ebc428287df4f9"}`

    Response: `{"model": {...}, "status": "DOWNLOADED", "progress": null, "error_message": null,
    "commit": "01c7f73d771dfac7d292323805ebc428287df4f9"}`
    """
    return await service.status(model)


@router.post(
    "/download",
    dependencies=Writes,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DownloadStartedResponse,
    responses={
        200: {
            "model": DownloadStartedResponse,
            "description": "Already complete in the cache: nothing started, no network used",
            "content": {
                "application/json": {
                    "example": {"task_id": f"{REPO_EXAMPLE}:latest", "status": "DOWNLOADED"}
                }
            },
        },
        202: {"description": "Download started in the background; poll /status for progress"},
        404: _error(
            "The Hub says the repo, or the branch or commit asked, does not exist (a typo?):"
            " nothing was started. A Hub that does not answer within MODELS_PLAN_TIMEOUT_SECONDS"
            " gets 202, and the status says what happened",
            "org/tiny-modle was not found on the Hub (attempt 1, not retried)",
        ),
        409: _error(
            "This revision is already downloading (the task id named may be another name of it:"
            " the branch, or the commit it points to), or a DELETE cancelled it while it started",
            f"{REPO_EXAMPLE}:latest is already downloading; poll POST /api/models/status",
        ),
        **_SELECTION_ERRORS,
        507: _error(
            "The files still missing do not fit in the cache's free space (less what running"
            " downloads need and a margin); nothing was written",
            "not enough free space in the cache: 16000000000 bytes (14.9 GiB) needed, 5000000000"
            " (4.7 GiB) available: 6.0 GiB free, less 766.8 MiB that running downloads still"
            " need, less 512.0 MiB kept free (MODELS_SPACE_MARGIN_BYTES)",
        ),
        429: {
            **_error(
                "Every download slot is busy; the Retry-After header says when to try again",
                "all 3 download slots are busy; retry in 5 s or cancel a download",
            ),
            "headers": {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            },
        },
    },
)
async def download_model(
    model: RequestBody, service: ServiceDep, response: Response
) -> DownloadStartedResponse:
    """Start downloading a model in the background (non-blocking).

    The files fetched are those the request selects (`files`: `all` or `vllm`, `allow_patterns`,
    `ignore_patterns`), else those the revision was downloaded with before, else
    `MODELS_DEFAULT_FILES`; files already in the cache are not fetched again. The selection is
    recorded with the revision when it is verified.

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf"}`

    Response (202): `{"task_id": "meta-llama/Llama-2-7b-hf:latest", "status": "DOWNLOADING"}`

    Response (200, already complete): `{"task_id": "meta-llama/Llama-2-7b-hf:latest", "status": "DOWNLOADED"}`
    """
    started = await service.download(model)
    if started.status is ModelStatus.DOWNLOADED:
        response.status_code = status.HTTP_200_OK
    return started


@router.post(
    "/plan",
    dependencies=Reads,
    response_model=PlanResponse,
    responses={
        **_BODY_ERRORS,  # first: the codes below say more for this endpoint
        401: _error(
            "The Hub wants a token for this repo (private, or HF_TOKEN is wrong); or an API key"
            " is set and the request carries none of its keys (WWW-Authenticate: Bearer)",
            "org/private-model needs a valid token: set HF_TOKEN (HTTP 401) (attempt 1, not"
            " retried)",
        ),
        403: _error(
            "The repo is gated and the token has not been granted access; or a browser page of"
            " another site sent the request (nothing was asked of the Hub then)",
            "org/gated-model is gated: request access on the Hub (attempt 1, not retried)",
        ),
        404: _error(
            "No such repo or revision on the Hub",
            "org/missing-model was not found on the Hub (attempt 1, not retried)",
        ),
        502: _error(
            "The Hub (or the mirror at HF_ENDPOINT) answered something unsafe or malformed",
            "the Hub's answer was refused, nothing was written: a file path is absolute",
        ),
        504: _error(
            "The Hub did not answer in time (MODELS_PLAN_TIMEOUT_SECONDS), or answered with an"
            " error that may pass: try again",
            "the file list is slow",
        ),
    },
)
async def plan_download(model: RequestBody, service: ServiceDep) -> PlanResponse:
    """What a download would fetch, before the first byte: nothing is downloaded or written.

    Every file of the revision with its size and whether the selection takes it, the bytes
    selected and those still missing from the cache, the room for them (free space less what
    running downloads need and the margin) and whether a download would pass the 507 check, and
    the weight files grouped by format and GGUF quantization, each with a pattern that selects it.
    `note` says why a download of this selection would be refused (422), when it would.

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf", "files": "vllm"}`

    Response: `{"model": {...}, "commit": "01c7f7...", "selection": [{"files": "vllm", ...}],
    "files": [{"path": "config.json", "size": 614, "selected": true}, ...], "selected_files": 9,
    "selected_bytes": 13477189828, "missing_bytes": 13477189828, "available_bytes": 500000000000,
    "fits": true, "weights": [{"format": "safetensors", "pattern": "*.safetensors", ...}],
    "note": null}`
    """
    return await service.plan(model)


@router.delete(
    "",
    dependencies=Writes,
    response_model=DeleteResponse,
    responses={
        200: {
            "description": "`cancelled` when a download was stopped, `deleted` when removed from the cache",
            "content": {
                "application/json": {"example": {"status": "deleted", "freed_bytes": 13958643712}}
            },
        },
        404: _error(
            "Neither downloading nor in the cache",
            f"{REPO_EXAMPLE}:latest is neither downloading nor in the cache",
        ),
        409: _error(
            "A vLLM server (MODELS_VLLM_URLS) serves what would be deleted, or one did not answer"
            " (?force=true deletes anyway); deleting the whole model while another of its"
            " revisions downloads (here or in another process sharing the cache); a link in the"
            " model's folder leads outside it; or the cache is not writable",
            f"{REPO_EXAMPLE} at {COMMIT_EXAMPLE} is in use by the vLLM server at"
            " http://127.0.0.1:8001 (served as 'llama'); nothing was deleted. Stop that server"
            " first, or add ?force=true to delete it anyway",
        ),
        **_BODY_ERRORS,
    },
)
async def delete_model(
    model: ModelBody, service: ServiceDep, force: ForceQuery = False
) -> DeleteResponse:
    """Cancel the model's download if one runs, otherwise delete it from the cache.

    Without `hf_commit`: cancels the `:latest` download, or deletes every cached revision of the
    model. With `hf_commit`: that revision only (blobs shared with other revisions are kept).
    A cancel waits until the transfer has stopped and its temporary files are gone.

    What a vLLM server of `MODELS_VLLM_URLS` serves is not deleted (409), nor anything while one
    of them does not answer, unless `?force=true`.

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf"}`

    Response: `{"status": "deleted", "freed_bytes": 13958643712}` or `{"status": "cancelled"}`
    """
    return await service.delete_model(model, force)


_PRUNE_EXAMPLES: dict[str, Any] = {
    "preview": {"summary": "See what would go", "value": {"dry_run": True}},
    "one repo": {
        "summary": "Remove one model's old revisions",
        "value": {"dry_run": False, "hf_repo": REPO_EXAMPLE},
    },
    "leftovers too": {
        "summary": "Also failed and cancelled downloads",
        "value": {"dry_run": False, "include_partial": True},
    },
}


@router.post(
    "/prune",
    dependencies=Writes,
    response_model=PruneResponse,
    responses={
        409: _error(
            "A vLLM server (MODELS_VLLM_URLS) did not answer, so what it serves cannot be kept:"
            " nothing was removed (?force=true prunes anyway; a dry run answers with a note)",
            "cannot tell whether what prune would remove is in use: the vLLM server at"
            " http://127.0.0.1:8001 did not answer (no answer within 5 s); nothing was deleted."
            " Add ?force=true to delete it anyway",
        ),
        **_BODY_ERRORS,
    },
)
async def prune_models(
    request: Annotated[PruneRequest, Body(openapi_examples=_PRUNE_EXAMPLES)],
    service: ServiceDep,
    force: ForceQuery = False,
) -> PruneResponse:
    """Remove the cached revisions no ref (branch or tag) points to: what updates left behind,
    and revisions downloaded by commit. With `include_partial`, PARTIAL revisions too (failed or
    cancelled downloads). Kept, and listed in `kept` with the reason: revisions downloading (here
    or in another process sharing the cache) and, unless `?force=true`, revisions a vLLM server
    of `MODELS_VLLM_URLS` serves. Blobs a kept revision shares stay. `dry_run: true` changes
    nothing and answers the same.

    Request: `{"dry_run": true}`

    Response: `{"dry_run": true, "revisions": [{"model": {"hf_repo": "meta-llama/Llama-2-7b-hf",
    "hf_commit": "01c7f73d771dfac7d292323805ebc428287df4f9"}, "size_bytes": 13476839424}],
    "freed_bytes": 13476839424, "kept": [], "note": null}`
    """
    return await service.prune(request, force)


@router.get("/history", dependencies=Reads, response_model=HistoryResponse)
async def history(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many entries, newest first")] = 100,
) -> HistoryResponse:
    """What happened to the cache, newest first, kept across restarts (the latest 10,000): each
    download's end (`downloaded`, `failed`, `cancelled`, with its bytes and duration), each
    `deleted`, `pruned` and `evicted` revision (with the bytes freed), and `by`: the name of the
    API key that asked (`name:key` in MODELS_API_KEY), never the key."""
    return await service.history(limit)


@router.get("/throughput", dependencies=Reads, response_model=ThroughputResponse)
async def throughput(service: ServiceDep) -> ThroughputResponse:
    """Bytes off the network per second (from the Hub, and from a fleet's peers), every download
    together and each running download, over the last 10 minutes in intervals of `bucket_seconds`
    (oldest first, the first starting at `start`): the page's charts. Kept in memory: a restart
    starts it over (what was downloaded before is in `GET /history`)."""
    return await service.throughput()


@router.get("/budget", dependencies=Reads, response_model=BudgetResponse)
async def cache_budget(service: ServiceDep) -> BudgetResponse:
    """The cache's budget (`MODELS_CACHE_BUDGET_BYTES`; null: none, nothing is ever evicted),
    what the cache holds, and the order in which eviction would free room: each candidate with
    the bytes its removal would free and its last use (served by vLLM, downloaded or verified
    here, else its files' access time), least recently used first; and what eviction keeps, with
    why (pinned, served by a vLLM server, its model downloading). The vLLM servers are asked now.
    """
    return await service.budget()


@router.post(
    "/evict",
    dependencies=Writes,
    response_model=EvictResponse,
    responses={
        422: _error(
            "No budget is set and the body gives no target_bytes",
            "no cache budget is set (MODELS_CACHE_BUDGET_BYTES): give target_bytes, the most the"
            " cache may hold after the eviction",
        ),
        **_BODY_ERRORS,
    },
)
async def evict_models(
    service: ServiceDep,
    request: Annotated[EvictRequest, Body()] = EvictRequest(),  # noqa: B008 - an empty body
    dry_run: Annotated[bool, Query(description="Say what would go; remove nothing")] = False,
) -> EvictResponse:
    """Free room now, as a download would: remove the least recently used revisions that are not
    pinned, served by a vLLM server or downloading, until the cache holds at most `target_bytes`
    (default: the budget). `?dry_run=true` removes nothing and answers the same. When what may
    go does not reach the target, what could go went and `note` says why the rest stays."""
    return await service.evict(request, dry_run)


@router.put(
    "/pin",
    dependencies=Writes,
    response_model=PinResponse,
    responses={**_BODY_ERRORS},
)
async def pin_model(request: RequestBody, service: ServiceDep) -> PinResponse:
    """Pin a revision: it is never evicted (nor pruned). `hf_commit` names a commit, or a branch
    or tag (omitted: `main`), whose pin follows it when it moves. `commits`: what it keeps now.
    """
    return await service.pin(request)


@router.delete(
    "/pin",
    dependencies=Writes,
    response_model=PinResponse,
    responses={
        404: _error("No such pin", f"{REPO_EXAMPLE} at main is not pinned"),
        **_BODY_ERRORS,
    },
)
async def unpin_model(request: RequestBody, service: ServiceDep) -> PinResponse:
    """Remove a pin (the same `hf_repo` and `hf_commit` it was made with)."""
    return await service.unpin(request)


@router.get("/updates", dependencies=Reads, response_model=UpdatesResponse)
async def model_updates(
    service: ServiceDep,
    refresh: Annotated[
        bool,
        Query(description="Ask the Hub now, not reusing the answers of the last 5 minutes"),
    ] = False,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=120,
            description="Seconds to wait for the checks this asks for; those still running then"
            " answer `pending`, with their last result",
        ),
    ] = 10.0,
) -> UpdatesResponse:
    """For every branch or tag cached (refs/main...), whether it points at another commit on the
    Hub now, and how many bytes an update would fetch (the new revision's files, for the selection
    the cached one was downloaded with, less those already in the cache). A repo the Hub cannot
    answer for (gone, gated, down, slow) carries its `error`; the others are answered all the
    same. Checks run 4 at a time, each call within `MODELS_PLAN_TIMEOUT_SECONDS`, and are reused for
    5 minutes (or, with more branches than the budget checks in 5 minutes, until each was
    checked once).

    The checks keep to a budget of calls to the Hub (`MODELS_UPDATE_CALLS_PER_MINUTE`, spread
    out; `budget` says what it is, what was spent, and what waits), so that one click never gets
    the token rate-limited: a check beyond it waits its turn and runs on after the answer. A 429
    from the Hub pauses every check until its `Retry-After`. This answers within `wait` seconds:
    a branch whose check has not ended is `pending`, with its last result (`checked_at` null when
    it has none yet); ask again later for the rest.

    To update: `POST /api/models/download` with the entry's `model`.

    Response: `{"models": [{"model": {"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit": null},
    "ref": "main", "cached_commit": "01c7f7...", "hub_commit": "8cca52...", "update_available":
    true, "bytes_to_download": 9976576152, "error": null, "checked_at": 1795548651.4}]}`
    """
    return await service.updates(refresh, wait)


@router.post(
    "/verify",
    dependencies=Writes,
    response_model=VerifyResponse,
    responses={
        404: _error(
            "The revision is not in the cache",
            f"{REPO_EXAMPLE}:latest is neither downloading nor in the cache",
        ),
        429: {
            **_error(
                "MODELS_MAX_CONCURRENT_VERIFICATIONS verifications already run; the Retry-After"
                " header says when to try again",
                "2 verification(s) already running (MODELS_MAX_CONCURRENT_VERIFICATIONS);"
                " retry in 5 s",
            ),
            "headers": {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            },
        },
        409: _error(
            "The model is downloading: it is verified when it completes",
            f"{REPO_EXAMPLE}:latest is already downloading; poll POST /api/models/status",
        ),
        **_BODY_ERRORS,
    },
)
async def verify_model(model: ModelBody, service: ServiceDep) -> VerifyResponse:
    """Check every cached file of a revision against its ETag (sha256 for LFS files, git blob id
    for regular files), offline. Hashing runs off the event loop; a large model takes a while
    (about the time to read it from disk).

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf"}`

    Response: `{"model": {...}, "commit": "01c7f73d771dfac7d292323805ebc428287df4f9", "verified":
    false, "files_checked": 12, "missing": [], "mismatched": ["model-00001-of-00002.safetensors"]}`
    """
    return await service.verify_model(model)


@router.get(
    "/list",
    dependencies=Reads,
    response_model=ModelListResponse,
    responses={
        422: _error(
            "A parameter is out of range, or the cursor is not one this service gave",
            "the cursor is not one this service gave: start again without it",
        )
    },
)
async def list_models(
    service: ServiceDep,
    limit: Annotated[
        int | None, Query(ge=1, le=1000, description="At most this many entries (a page)")
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            max_length=2000,
            description="The `next_cursor` of the page before (with the same q, status and sort)",
        ),
    ] = None,
    q: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="Only repo ids that contain this text"),
    ] = None,
    status: Annotated[
        list[ModelStatus] | None, Query(description="Only entries of this status (repeatable)")
    ] = None,
    sort: Annotated[
        ListSort,
        Query(
            description="name (repo id, then commit), size (largest first), last_used (latest"
            " first, never used last)"
        ),
    ] = ListSort.NAME,
) -> Response:
    """Every model revision in the cache (`DOWNLOADED` or `PARTIAL`) and every running download.

    Response: `{"models": [{"model": {"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit":
    "01c7f73d771dfac7d292323805ebc428287df4f9"}, "status": "DOWNLOADED", "size_bytes": 13958643712,
    "refs": ["main"], "progress": null}]}`

    With any of `limit`, `cursor`, `q`, `status` or `sort` (additions), the entries that match, in
    that order, a page at a time: `total` says how many match, and `next_cursor` is there while
    more pages follow. A download that starts or ends between two pages moves no other entry
    between pages.
    """
    query = ListQuery(
        limit=limit,
        cursor=cursor,
        q=q,
        status=frozenset(status) if status else None,
        sort=sort,
    )
    answer = await service.listing(query)
    # Serialized off the event loop (10,000 entries are 3 MB of JSON), one at a time: each thread
    # more that holds the GIL delays the loop's turn (a status never waits behind lists).
    body = await asyncio.get_running_loop().run_in_executor(_SERIALIZER, list_json, answer)
    return Response(body, media_type="application/json")


_ENTRY = TypeAdapter(ModelListItem)
# The JSON of the entries of the last answers, by entry (the list's parts keep the entries of
# revisions that did not change: api.models.views): an entry is serialized once, not at each list
# (six open pages listing 10,000 models serialized 18 MB a second, holding the GIL). Each entry is
# held here, so that its id is no other object's; at most this many, or the last answer's.
_SERIALIZED: dict[int, tuple[ModelListItem, bytes]] = {}
_SERIALIZED_LOCK = threading.Lock()
SERIALIZED_ENTRIES = 20_000


# The last answer's body, with what it was made of: the next answer of the very same entries is
# that body (no Python loop over 10,000 entries: six open pages held the GIL for it).
_LAST_BODY: tuple[bytes, tuple[ModelListItem, ...], bytes] | None = None


def list_json(answer: ModelListResponse) -> bytes:
    """``answer.model_dump_json(by_alias=True)``, each entry serialized alone (and once while it
    is the same object): one call for 10,000 entries holds the GIL for tens of milliseconds, and
    a status waiting on the event loop waits that long."""
    global _LAST_BODY
    rest = answer.model_copy(update={"models": []}).model_dump_json(by_alias=True).encode()
    parts: list[bytes] = []
    with _SERIALIZED_LOCK:
        last = _LAST_BODY
        if last is not None and last[0] == rest and same_objects(last[1], answer.models):
            return last[2]
        if len(_SERIALIZED) + len(answer.models) > max(SERIALIZED_ENTRIES, len(answer.models)):
            kept = {
                id(e): _SERIALIZED[id(e)]
                for e in answer.models
                if id(e) in _SERIALIZED and _SERIALIZED[id(e)][0] is e
            }
            _SERIALIZED.clear()
            _SERIALIZED.update(kept)
        for entry in answer.models:
            known = _SERIALIZED.get(id(entry))
            if known is None or known[0] is not entry:
                known = _SERIALIZED[id(entry)] = (entry, _ENTRY.dump_json(entry, by_alias=True))
            parts.append(known[1])
        # A string's quotes are escaped in JSON: the first unescaped "models":[] is the field.
        body = rest.replace(b'"models":[]', b'"models":[' + b",".join(parts) + b"]", 1)
        _LAST_BODY = (rest, tuple(answer.models), body)
    return body


@router.get("/space", dependencies=Reads, response_model=DiskSpaceInfo)
async def disk_space(service: ServiceDep) -> DiskSpaceInfo:
    """Bytes used by the cache, bytes free on its filesystem, and the cache's path.

    Response: `{"cache_size_bytes": 13958643712, "available_bytes": 500000000000, "cache_path":
    "/root/.cache/huggingface/hub"}`
    """
    return await service.get_disk_space()


@router.get(
    "/events",
    dependencies=Reads,
    response_class=EventSourceResponse,
    responses={
        200: {
            "model": DownloadEvent,
            "description": "A stream of Server-Sent Events; the data of each is a DownloadEvent",
        },
        422: {
            "model": ErrorResponse,
            "description": "hf_repo is not 'namespace/name'",
        },
    },
)
async def download_events(
    service: ServiceDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="The id of the last event received: the missed ones come first",
        ),
    ] = None,
    hf_repo: Annotated[
        str | None,
        Query(
            description="Only the events of this repo ('namespace/name')",
            pattern=REPO_JSON_PATTERN,
            max_length=193,
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events of downloads: `started`, `progress` (at most every 0.5 s per download,
    with the byte figures), `retrying`, `verifying`, `completed`, `failed` (with
    `error_message`) and `cancelled`. The stream ends when the service stops. Each event's `data` is a `DownloadEvent` (JSON); FastAPI
    sends a keep-alive comment when the stream is idle.

    `curl -N localhost:8000/api/models/events?hf_repo=meta-llama/Llama-2-7b-hf`

    ```
    event: progress
    data: {"type":"progress","task_id":"meta-llama/Llama-2-7b-hf:latest","model":{...},
           "time":1795548651.4,"commit":"01c7f7...","progress":{"downloaded_bytes":555745337,...}}
    ```
    """
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else None
    bus = service.events
    with bus.subscribe(after) as queue:
        yield ServerSentEvent(comment="connected")
        while (event := await bus.next(queue)) is not None:
            if hf_repo is None or event.model.hf_repo == hf_repo:
                yield ServerSentEvent(
                    event=event.type.value, data=event.model_dump(mode="json"), id=str(event.seq)
                )


@router.get("/downloads", dependencies=Reads, response_model=DownloadListResponse)
async def active_downloads(service: ServiceDep) -> DownloadListResponse:
    """Every download running in this service, with its progress. In a fleet, each download
    once, with every node that runs it (or waits for another node's copy) in `nodes`.

    Response: `{"downloads": [{"model": {"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit":
    null}, "status": "DOWNLOADING", "progress": {...}, "error_message": null, "commit": "..."}]}`
    """
    return await service.downloads()


@router.get("/settings/bandwidth", dependencies=Reads, response_model=BandwidthResponse)
async def bandwidth(service: ServiceDep) -> BandwidthResponse:
    """The cap on the total download rate, and each running download's share of it. In a
    fleet, the cap holds on each node (`per_node: true`; each share names its node).

    Response: `{"max_bytes_per_second": 50000000, "xet_when_capped": "http", "downloads":
    [{"task_id": "meta-llama/Llama-2-7b-hf:latest", "bytes_per_second": 25000000.0, "note":
    null}]}`
    """
    return await service.bandwidth_now()


@router.put(
    "/settings/bandwidth",
    dependencies=Writes,
    response_model=BandwidthResponse,
    responses={
        **_BODY_ERRORS,
        422: {
            **_INVALID,
            "description": "Not a cap: an integer of at least 65536 (64 KiB/s), or null or 0",
        },
    },
)
async def set_bandwidth(service: ServiceDep, setting: BandwidthSetting) -> BandwidthResponse:
    """Cap the total rate of all downloads of the service (`null` or `0`: no cap), shared fairly
    between the running ones and applied to them at once, without restarting them; it lasts
    until the service stops (`MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND` sets it at start). In a
    fleet, every node takes the cap for its own downloads, from the Hub and from other nodes
    together (a node that joins later takes it too).

    `curl -X PUT localhost:8000/api/models/settings/bandwidth -H 'Content-Type: application/json'
    -d '{"max_bytes_per_second": 50000000}'`
    """
    return await service.cap_bandwidth(setting.max_bytes_per_second)
