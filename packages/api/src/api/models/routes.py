"""HTTP routes of the models API: translate JSON to manager calls and domain errors to status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.models.errors import (
    CacheNotWritable,
    DownloadCancelled,
    DownloadConflict,
    InsufficientStorage,
    ModelError,
    ModelNotFound,
    RevisionBusy,
    TooManyDownloads,
    TooManyVerifications,
    UnsafeCachePath,
)
from api.models.manager import ModelManager
from api.models.types import (
    COMMIT_EXAMPLE,
    REPO_EXAMPLE,
    REPO_JSON_PATTERN,
    DeleteResponse,
    DiskSpaceInfo,
    DownloadEvent,
    DownloadListResponse,
    DownloadStartedResponse,
    ErrorResponse,
    Model,
    ModelListResponse,
    ModelStatus,
    ModelStatusResponse,
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
    UnsafeCachePath: status.HTTP_409_CONFLICT,
    RevisionBusy: status.HTTP_409_CONFLICT,
    CacheNotWritable: status.HTTP_409_CONFLICT,
}


def model_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Map a ``ModelError`` (any subclass) to its status code and a JSON ``detail``."""
    assert isinstance(exc, ModelError)
    code = next(
        (ERROR_STATUS[cls] for cls in type(exc).__mro__ if cls in ERROR_STATUS),
        status.HTTP_500_INTERNAL_SERVER_ERROR,
    )
    headers = (
        {"Retry-After": str(exc.retry_after)}
        if isinstance(exc, (TooManyDownloads, TooManyVerifications))
        else None
    )
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


def get_manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.model_manager
    return manager


ManagerDep = Annotated[ModelManager, Depends(get_manager)]

_MODEL_EXAMPLES: dict[str, Any] = {
    "latest": {"summary": "Default branch", "value": {"hf_repo": REPO_EXAMPLE}},
    "commit": {
        "summary": "A pinned commit",
        "value": {"hf_repo": REPO_EXAMPLE, "hf_commit": COMMIT_EXAMPLE},
    },
}
ModelBody = Annotated[Model, Body(openapi_examples=_MODEL_EXAMPLES)]


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
    400: _error("The body could not be read as JSON text", "There was an error parsing the body"),
    413: _error(
        "The body is larger than the service accepts",
        "request body too large: at most 65536 bytes are accepted",
    ),
    422: _INVALID,
}

router = APIRouter(prefix="/models", tags=["Models"])


@router.post(
    "/status",
    response_model=ModelStatusResponse,
    responses=_BODY_ERRORS,
)
async def model_status(model: ModelBody, manager: ManagerDep) -> ModelStatusResponse:
    """Status of a model in the cache, checked offline.

    `DOWNLOADED` when every file of the revision is in the cache with its size, `DOWNLOADING`
    (with byte progress) while a download runs, `PARTIAL` when only part of it is there (a failed
    or cancelled download, with `error_message` when it failed), `NOT_FOUND` when nothing is.

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit": "01c7f73d771dfac7d292323805ebc428287df4f9"}`

    Response: `{"model": {...}, "status": "DOWNLOADED", "progress": null, "error_message": null,
    "commit": "01c7f73d771dfac7d292323805ebc428287df4f9"}`
    """
    return await manager.get_model_status(model)


@router.post(
    "/download",
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
        409: _error(
            "This revision is already downloading (the task id named may be another name of it:"
            " the branch, or the commit it points to), or a DELETE cancelled it while it started",
            f"{REPO_EXAMPLE}:latest is already downloading; poll POST /api/models/status",
        ),
        **_BODY_ERRORS,
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
    model: ModelBody, manager: ManagerDep, response: Response
) -> DownloadStartedResponse:
    """Start downloading a model in the background (non-blocking).

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf"}`

    Response (202): `{"task_id": "meta-llama/Llama-2-7b-hf:latest", "status": "DOWNLOADING"}`

    Response (200, already complete): `{"task_id": "meta-llama/Llama-2-7b-hf:latest", "status": "DOWNLOADED"}`
    """
    started = await manager.add_model(model)
    if started.status is ModelStatus.DOWNLOADED:
        response.status_code = status.HTTP_200_OK
    return started


@router.delete(
    "",
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
            "Deleting the whole model while another of its revisions downloads (here or in another"
            " process sharing the cache), a link in the model's folder leads outside it, or the"
            " cache is not writable",
            f"{REPO_EXAMPLE}:{COMMIT_EXAMPLE} is already downloading; poll POST /api/models/status",
        ),
        **_BODY_ERRORS,
    },
)
async def delete_model(model: ModelBody, manager: ManagerDep) -> DeleteResponse:
    """Cancel the model's download if one runs, otherwise delete it from the cache.

    Without `hf_commit`: cancels the `:latest` download, or deletes every cached revision of the
    model. With `hf_commit`: that revision only (blobs shared with other revisions are kept).
    A cancel waits until the transfer has stopped and its temporary files are gone.

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf"}`

    Response: `{"status": "deleted", "freed_bytes": 13958643712}` or `{"status": "cancelled"}`
    """
    return await manager.delete_model(model)


@router.post(
    "/verify",
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
async def verify_model(model: ModelBody, manager: ManagerDep) -> VerifyResponse:
    """Check every cached file of a revision against its ETag (sha256 for LFS files, git blob id
    for regular files), offline. Hashing runs off the event loop; a large model takes a while
    (about the time to read it from disk).

    Request: `{"hf_repo": "meta-llama/Llama-2-7b-hf"}`

    Response: `{"model": {...}, "commit": "01c7f73d771dfac7d292323805ebc428287df4f9", "verified":
    false, "files_checked": 12, "missing": [], "mismatched": ["model-00001-of-00002.safetensors"]}`
    """
    return await manager.verify_model(model)


@router.get("/list", response_model=ModelListResponse)
async def list_models(manager: ManagerDep) -> ModelListResponse:
    """Every model revision in the cache (`DOWNLOADED` or `PARTIAL`) and every running download.

    Response: `{"models": [{"model": {"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit":
    "01c7f73d771dfac7d292323805ebc428287df4f9"}, "status": "DOWNLOADED", "size_bytes": 13958643712,
    "refs": ["main"], "progress": null}]}`
    """
    return ModelListResponse(models=await manager.list_models())


@router.get("/space", response_model=DiskSpaceInfo)
async def disk_space(manager: ManagerDep) -> DiskSpaceInfo:
    """Bytes used by the cache, bytes free on its filesystem, and the cache's path.

    Response: `{"cache_size_bytes": 13958643712, "available_bytes": 500000000000, "cache_path":
    "/root/.cache/huggingface/hub"}`
    """
    return await manager.get_disk_space()


@router.get(
    "/events",
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
    manager: ManagerDep,
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
    with manager.events.subscribe(after) as queue:
        yield ServerSentEvent(comment="connected")
        while (event := await manager.events.next(queue)) is not None:
            if hf_repo is None or event.model.hf_repo == hf_repo:
                yield ServerSentEvent(
                    event=event.type.value, data=event.model_dump(mode="json"), id=str(event.seq)
                )


@router.get("/downloads", response_model=DownloadListResponse)
async def active_downloads(manager: ManagerDep) -> DownloadListResponse:
    """Every download running in this service, with its progress.

    Response: `{"downloads": [{"model": {"hf_repo": "meta-llama/Llama-2-7b-hf", "hf_commit":
    null}, "status": "DOWNLOADING", "progress": {...}, "error_message": null, "commit": "..."}]}`
    """
    return DownloadListResponse(downloads=manager.active_downloads())
