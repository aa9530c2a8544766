"""A fleet node's blob server: the complete blobs of its cache, read-only, over the Hub's own
``resolve`` protocol (``GET /{org}/{name}/resolve/{commit}/{path}``, with ranges), so that the
download path of another node can copy from it as from the Hub (``ranged.fetch_large_files`` with
``peers``), checking every byte against the Hub's ETag.

It answers only the fleet: a request without the fleet's secret (``Authorization: Bearer``) gets
a 401, whatever it asks. It names revisions by commit only (a peer never decides what a branch
means), serves only what ``ModelCache.open_content(..., blob_only=True)`` opens (a snapshot's
link to a blob named by an ETag, inside the cache, reached without following any other link),
and writes nothing. Anything else is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from api import logfmt
from api.models.hub.cache import ModelCache
from api.models.hub.guard import COMMIT_ID
from api.models.types import REPO_ID_PATTERN

logger = logging.getLogger(__name__)


class _Blob(FileResponse):
    # Starlette reads a file in a thread per chunk: 1 MiB chunks (not its 64 KiB) make a copy of
    # a 1 GiB file a thousand thread hops, not sixteen thousand.
    chunk_size = 1024 * 1024


def peer_app(cache: ModelCache, token: str) -> Starlette:
    expected = f"Bearer {token}".encode()

    async def resolve(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not token or not hmac.compare_digest(given, expected):
            return PlainTextResponse("this node serves its fleet only", status_code=401)
        org, name = request.path_params["org"], request.path_params["name"]
        commit, path = request.path_params["commit"], request.path_params["path"]
        repo_id = f"{org}/{name}"
        if (
            not COMMIT_ID.fullmatch(commit)
            or not REPO_ID_PATTERN.fullmatch(repo_id)
            or ".." in repo_id
        ):
            return PlainTextResponse("not served here", status_code=404)
        fd = await asyncio.to_thread(cache.open_content, repo_id, commit, path, True)
        if fd is None:
            return PlainTextResponse("not served here", status_code=404)
        # Served from the descriptor the cache opened without following a link out of it (the
        # response reopens that very file through /proc, whatever its path names by then).
        info = os.fstat(fd)
        etag = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
        return _Blob(
            f"/proc/self/fd/{fd}",
            stat_result=info,
            headers={"ETag": f'"{etag}"', "X-Repo-Commit": commit},
            media_type="application/octet-stream",
            background=BackgroundTask(os.close, fd),
        )

    return Starlette(
        routes=[
            Route("/{org}/{name}/resolve/{commit}/{path:path}", resolve, methods=["GET", "HEAD"])
        ]
    )


class PeerServer:
    """The blob server of one node, on ``host`` (the node's address in the cluster), a port the
    kernel picks; ``url`` once started."""

    def __init__(self, cache: ModelCache, token: str, host: str) -> None:
        self._app = peer_app(cache, token)
        self._host = host
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> str:
        listener = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]), name="peers")
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{port}"
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its failure, raised here
            await asyncio.sleep(0.01)
        logfmt.log(logger, logging.INFO, "peer_server", url=self.url)
        return self.url

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
            self._server = None
