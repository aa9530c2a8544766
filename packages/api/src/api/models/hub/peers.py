"""A fleet node's blob server: the blobs of its cache, read-only, over the Hub's own ``resolve``
protocol (``GET /{org}/{name}/resolve/{commit}/{path}``, with a range), so that the download path
of another node can copy from it as from the Hub (``ranged.fetch_large_files`` with ``peers``),
checking every byte against the Hub's ETag.

It serves a blob while it is still being received: the asker names the ETag it expects (from its
own Hub file list, ``X-Blob-Etag``), and a blob this node's ranged path is writing
(``blobs/<etag>.ranged.incomplete``) is served as far as its record says it is written, the rest
as it arrives. A rollout is then a pipeline: each node passes on what it receives (planning/
fleet.md). A complete blob is served by that ETag too, before the snapshot links to it. Nothing it
sends is trusted by the asker: every file is hashed against the Hub's ETag there.

It answers only the fleet: a request without the fleet's secret (``Authorization: Bearer``) gets
a 401, whatever it asks. It names revisions by commit only (a peer never decides what a branch
means), opens only what ``ModelCache`` opens without following a link out of the cache, and
writes nothing. Anything else is a 404. ``uplink`` caps what it sends, all askers together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from api import logfmt
from api.models.hub.cache import ModelCache
from api.models.hub.guard import COMMIT_ID, GIT_OR_SHA256
from api.models.hub.ranged import Record
from api.models.types import REPO_ID_PATTERN

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # one read per thread hop: a 1 GiB copy is a thousand hops, not 16,000
# A blob not begun here yet is waited for this long before the answer says so (503): under the
# asker's read timeout (30 s), so that the asker hears why rather than a timeout.
FIRST_BYTE_SECONDS = 20.0
# A blob that stops growing for this long is cut off: the asker hands over to its next source.
STALL_SECONDS = 20.0
POLL_SECONDS = 0.05  # how often a growing blob's record is read while the asker waits
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class Uplink:
    """What the server sends, every asker together, at most ``bytes_per_second`` (None: no cap);
    a burst of a quarter of a second."""

    def __init__(self, bytes_per_second: int | None) -> None:
        self.rate = bytes_per_second
        self._allowance = 0.0
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, count: int) -> None:
        if not self.rate:
            return
        async with self._lock:
            now = time.monotonic()
            burst = self.rate / 4
            self._allowance = min(burst, self._allowance + (now - self._at) * self.rate)
            self._at = now
            self._allowance -= count
            if self._allowance < 0:
                await asyncio.sleep(-self._allowance / self.rate)


@dataclass
class _Growing:
    """A blob of this node's cache being received: how far it is written without a gap."""

    cache: ModelCache
    repo_id: str
    etag: str
    fd: int
    size: int

    def written_from(self, position: int) -> int:
        """Where the bytes written from ``position`` on end (``position`` when none is yet);
        the whole size once the blob is complete (renamed into place: the same file); -1 when
        this file is no longer the one being written (dropped, or started over)."""
        info = os.fstat(self.fd)
        if info.st_nlink == 0:
            return -1  # no name leads to it any more: dropped, never renamed into place
        record = _record(self.cache, self.repo_id, self.etag)
        if record is None:
            # Renamed into place (the record goes right after), or between two records.
            complete = self.cache.open_blob(self.repo_id, self.etag)
            if complete is None:
                return position
            try:
                return self.size if os.path.samestat(os.fstat(complete), info) else position
            finally:
                os.close(complete)
        if record.size != self.size:
            return -1
        index = position // record.part_bytes
        start = index * record.part_bytes
        return max(position, start + record.written[index]) if index < len(record.written) else -1


def _record(cache: ModelCache, repo_id: str, etag: str) -> Record | None:
    """What the ranged path's record of the blob ``etag`` says is written (None: none)."""
    with cache.locks_of(repo_id) as locks:
        record = Record.load(locks, etag) if locks is not None else None
    return record if record is not None and record.etag == etag else None


def _open_growing(cache: ModelCache, repo_id: str, etag: str) -> tuple[int, int] | None:
    """The descriptor of the blob ``etag`` the ranged path is writing, and the blob's size, once
    its record is there (a partial file without one is still being set up: not served yet)."""
    fd = cache.open_partial(repo_id, etag)
    if fd is None:
        return None
    record = _record(cache, repo_id, etag)
    if record is None:
        os.close(fd)
        return None
    return fd, record.size


def peer_app(
    cache: ModelCache,
    token: str,
    uplink: Uplink | None = None,
    fetching: Callable[[str], bool] | None = None,
) -> Starlette:
    """``fetching(repo_id)``: whether this node is downloading (or about to download) something
    of that repo, so that a blob not here yet is worth waiting for."""
    expected = f"Bearer {token}".encode()
    link = uplink or Uplink(None)

    async def resolve(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not token or not hmac.compare_digest(given, expected):
            return PlainTextResponse("this node serves its fleet only", status_code=401)
        org, name = request.path_params["org"], request.path_params["name"]
        commit, path = request.path_params["commit"], request.path_params["path"]
        repo_id = f"{org}/{name}"
        etag = request.headers.get("x-blob-etag")
        if (
            not COMMIT_ID.fullmatch(commit)
            or not REPO_ID_PATTERN.fullmatch(repo_id)
            or ".." in repo_id
            or (etag is not None and not GIT_OR_SHA256.fullmatch(etag))
        ):
            return PlainTextResponse("not served here", status_code=404)
        found: tuple[int, int, bool] | Response | None = None
        fd = await asyncio.to_thread(cache.open_content, repo_id, commit, path, True)
        if fd is not None:
            found = (fd, os.fstat(fd).st_size, False)
        elif etag is not None:
            found = await _complete_or_growing(cache, repo_id, etag, fetching)
        if isinstance(found, Response):
            return found
        if found is None:
            return PlainTextResponse("not served here", status_code=404)
        fd, size, growing = found
        if etag is None:
            # Named by the snapshot's link: the blob's own name (its ETag, or its Xet hash).
            etag = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
        growth = _Growing(cache, repo_id, etag, fd, size) if growing else None
        return _answer(request, commit, etag, fd, size, growth, link)

    return Starlette(
        routes=[
            Route("/{org}/{name}/resolve/{commit}/{path:path}", resolve, methods=["GET", "HEAD"])
        ]
    )


async def _complete_or_growing(
    cache: ModelCache, repo_id: str, etag: str, fetching: Callable[[str], bool] | None
) -> tuple[int, int, bool] | Response | None:
    """The descriptor of the blob ``etag``, its size and whether it is still being written; when
    neither is here yet and this node is fetching the repo, waited for (``FIRST_BYTE_SECONDS``,
    then a 503)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_BYTE_SECONDS
    while True:
        fd = await asyncio.to_thread(cache.open_blob, repo_id, etag)
        if fd is not None:
            return fd, os.fstat(fd).st_size, False
        growing = await asyncio.to_thread(_open_growing, cache, repo_id, etag)
        if growing is not None:
            return (*growing, True)
        if fetching is None or not fetching(repo_id):
            return None
        if loop.time() >= deadline:
            return PlainTextResponse(
                "not begun here yet", status_code=503, headers={"Retry-After": "1"}
            )
        await asyncio.sleep(POLL_SECONDS * 4)


def _answer(
    request: Request,
    commit: str,
    etag: str,
    fd: int,
    size: int,
    growth: _Growing | None,
    link: Uplink,
) -> Response:
    start, end = 0, size
    status = 200
    headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
    if (asked := request.headers.get("range")) is not None:
        match = _RANGE.fullmatch(asked.strip())
        first = int(match.group(1)) if match else size
        last = int(match.group(2)) if match and match.group(2) else size - 1
        if match is None or first >= size or last < first:
            os.close(fd)
            return PlainTextResponse(
                "range not satisfiable",
                status_code=416,
                headers={"Content-Range": f"bytes */{size}"},
            )
        start, end = first, min(last + 1, size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        os.close(fd)
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(
        _body(fd, start, end, growth, link),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


async def _body(
    fd: int, start: int, end: int, growth: _Growing | None, link: Uplink
) -> AsyncIterator[bytes]:
    """The bytes ``start..end`` of ``fd``: a growing blob's as they are written (a blob that stops
    growing, or is dropped, cuts the answer short: the asker hands over)."""
    loop = asyncio.get_running_loop()
    position = start
    available = end if growth is None else start
    last_progress = loop.time()
    try:
        while position < end:
            if position >= available:
                assert growth is not None
                available = min(end, await asyncio.to_thread(growth.written_from, position))
                if available < 0:
                    logfmt.log(logger, logging.INFO, "peer_blob_dropped", etag=growth.etag)
                    return
                if available <= position:
                    if loop.time() - last_progress > STALL_SECONDS:
                        logfmt.log(logger, logging.INFO, "peer_blob_stalled", etag=growth.etag)
                        return
                    await asyncio.sleep(POLL_SECONDS)
                    continue
            count = min(CHUNK, available - position)
            chunk = await asyncio.to_thread(os.pread, fd, count, position)
            if not chunk:
                return
            await link.take(len(chunk))
            position += len(chunk)
            last_progress = loop.time()
            yield chunk
    finally:
        os.close(fd)


class PeerServer:
    """The blob server of one node, on ``host`` (the node's address in the cluster), a port the
    kernel picks; ``url`` once started."""

    def __init__(
        self,
        cache: ModelCache,
        token: str,
        host: str,
        uplink_bytes_per_second: int | None = None,
        fetching: Callable[[str], bool] | None = None,
    ) -> None:
        self._app = peer_app(cache, token, Uplink(uplink_bytes_per_second), fetching)
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
