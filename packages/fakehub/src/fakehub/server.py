"""An HTTP server on 127.0.0.1 that speaks enough of the Hugging Face Hub protocol for the real
``huggingface_hub`` client (``snapshot_download``, ``hf_hub_download``, ``HfApi``), with faults.

Endpoints (repo ids are ``namespace/name``; revisions arrive percent-encoded, ``/`` as ``%2F``):

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: repo info with ``sha``
  and ``siblings``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true``: entries with ``oid``, ``size`` and
  ``lfs``; paginated with a ``Link: <...>; rel="next"`` header like the Hub.
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob id, or
  the sha256 for LFS files, which also get ``X-Linked-Etag`` and ``X-Linked-Size``),
  ``Content-Length``, ``Accept-Ranges`` and ``Range`` requests (206 with ``Content-Range``).

With ``FakeHub(..., xet=True)`` every LFS file is stored in Xet, as on the Hub today (see
``fakehub.xet``): ``xetHash`` in the tree, ``X-Xet-Hash`` and a ``rel="xet-auth"`` link on
``/resolve``, ``GET /api/models/{repo}/xet-read-token/{rev}``, and a CAS under ``/cas``
(``/cas/v1/reconstructions/{hash}``, xorb ranges under ``/cas/xorbs/...``). Faults apply to these
paths like to any other; ``FakeHub.content_path`` names a file's content requests on either path.

With ``FakeHub(..., cdn=True)`` LFS files are served as the Hub serves them over plain HTTP: their
``/resolve`` URL answers ``302`` to a signed URL on another origin (a second port of 127.0.0.1,
``/cdn/{repo}/{sha256}?X-Amz-Signature=...``), with the file's headers; the CDN answers ``GET``
and ``Range`` and records the ``Authorization`` header of every request it gets
(``FakeHub.cdn_authorizations``): a client must not send it the token.

Errors carry ``X-Error-Code`` as the Hub's do: ``RepoNotFound`` (404; 401 for a private repo without a
valid token), ``GatedRepo`` (401 without a token, 403 with a token that has no access),
``RevisionNotFound`` (404), ``EntryNotFound`` (404).

Content is sent with ``sendfile`` when no fault touches the body, so the server streams at loopback
speed and is never the bottleneck of a benchmark.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fakehub import xet
from fakehub.faults import Fault, FaultKind, Lies
from fakehub.loopback import LoopbackServer, QuietHTTPServer
from fakehub.repos import Repo, RepoFile, load_repos

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_SEND_CHUNK = 1024 * 1024


class HubError(Exception):
    """An error answer in the Hub's own shape."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class FakeHub(LoopbackServer):
    """The fake hub: its repos, its faults, and the counts of the requests it served.

    Use as a context manager, or ``start()`` / ``stop()``::

        with FakeHub(repos_dir) as hub:
            snapshot_download("org/model", endpoint=hub.url, cache_dir=tmp)
            assert hub.count("GET", "*/resolve/*") == 3
    """

    def __init__(
        self,
        repos_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: set[str] | None = None,
        gated_access: set[str] | None = None,
        page_size: int = 1000,
        xet: bool = False,
        xet_token_ttl: float = 3600,
        xorb_chunks: int = xet.CHUNKS_PER_XORB,
        cdn: bool = False,
        send_buffer: int | None = None,
        uplink: int = 0,
    ) -> None:
        self.repos_dir = repos_dir
        # The hub's whole uplink, shared by every response body of content (bytes per second;
        # 0: none): what many clients of one hub (a fleet's nodes) share, unlike ``rate``, which
        # caps each connection.
        self.uplink = uplink
        # Close each connection after its answer without saying so (no ``Connection: close``):
        # what a client sees of a server whose keep-alive timed out while the connection was idle.
        self.drop_idle = False
        self._uplink_due = 0.0
        # The kernel's send buffer of each connection (SO_SNDBUF); None: the kernel's own, up to
        # 4 MiB. A byte counted as served is one in that buffer: a real server's buffer is on its
        # side of the link, so a small one makes the count what the link carried.
        self.send_buffer = send_buffer
        self.xet = xet
        self.xet_token_ttl = xet_token_ttl
        # Chunks of 64 KiB per xorb: 1024 (64 MiB, as the real storage packs a large upload);
        # fewer make a small test file span several xorbs.
        self.xorb_chunks = xorb_chunks
        self.tokens = set(tokens or ())
        self.gated_access = set(gated_access or ())
        self.page_size = page_size
        self.faults: list[Fault] = []
        self.lies = Lies()  # what this hub says instead of the truth (hostile mode)
        self.requests: Counter[tuple[str, str]] = Counter()
        self.body_bytes: Counter[str] = Counter()  # content bytes sent, by decoded path
        self._ranges: list[tuple[str, int, int]] = []  # (decoded path, start, end) of file GETs
        self._sending = 0  # response bodies being sent now
        self._lock = threading.Lock()
        self._repos: dict[str, tuple[tuple[int, int, int], Repo]] = {}
        self._xet_tokens: dict[str, tuple[str, float]] = {}  # access token -> (repo id, expiry)
        self._stopping = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.hub = self
        # The CDN LFS files are redirected to (cdn=True): another origin, the same content.
        self.cdn_authorizations: list[str | None] = []
        self._cdn: _Server | None = None
        if cdn:
            self._cdn = _Server((host, 0), _Handler)
            self._cdn.hub = self
            self._cdn.is_cdn = True
        self._cdn_thread: threading.Thread | None = None

    @property
    def cdn_url(self) -> str | None:
        if self._cdn is None:
            return None
        host, port = self._cdn.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        if self._cdn is not None:
            self._cdn_thread = threading.Thread(
                target=self._cdn.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._cdn_thread.start()
        return super().start()

    def stop(self) -> None:
        self._stopping.set()
        if self._cdn is not None:
            self._cdn.shutdown()
            self._cdn.server_close()
            if self._cdn_thread is not None:
                self._cdn_thread.join(timeout=5)
        super().stop()

    # -- faults and counts -------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    @contextmanager
    def fault(self, fault: Fault) -> Iterator[Fault]:
        """Inject ``fault`` for the duration of a ``with`` block."""
        self.add_fault(fault)
        try:
            yield fault
        finally:
            with self._lock:
                self.faults.remove(fault)

    def count(self, method: str | None = None, pattern: str = "*") -> int:
        """How many requests were served whose method and decoded path match."""
        import fnmatch

        with self._lock:
            return sum(
                n
                for (m, p), n in self.requests.items()
                if (method is None or m == method) and fnmatch.fnmatchcase(p, pattern)
            )

    def served(self, pattern: str = "*") -> int:
        """Bytes of file content (``/resolve`` bodies, Xet xorb ranges) sent to paths matching
        ``pattern``: what clients actually fetched."""
        import fnmatch

        with self._lock:
            return sum(n for p, n in self.body_bytes.items() if fnmatch.fnmatchcase(p, pattern))

    def ranges_asked(self, pattern: str = "*") -> list[tuple[int, int]]:
        """The byte ranges (start, end exclusive) of the ``Range`` GETs of files (``/resolve``)
        whose decoded path matches ``pattern``, in the order they came."""
        import fnmatch

        with self._lock:
            return [(a, b) for p, a, b in self._ranges if fnmatch.fnmatchcase(p, pattern)]

    def _through_uplink(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit in the uplink's rate (a shared schedule, 50 ms burst)."""
        with self._lock:
            now = time.monotonic()
            self._uplink_due = max(self._uplink_due, now - 0.05) + nbytes / self.uplink
            delay = self._uplink_due - now - 0.05
        if delay > 0:
            self.wait(delay)

    def wait_idle(self, seconds: float = 10.0) -> bool:
        """Wait until no response body is being sent (a client that went away leaves the server
        writing until its next write fails); whether that happened within ``seconds``."""
        deadline = time.monotonic() + seconds
        while self._sending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.body_bytes.clear()
            self._ranges.clear()

    def _count_body(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.body_bytes[path] += nbytes

    def _record(self, method: str, path: str) -> list[Fault]:
        with self._lock:
            self.requests[(method, path)] += 1
            faults = list(self.faults)
        return [f for f in faults if f.take(method, path)]

    def repo(self, repo_id: str) -> Repo | None:
        # Tests add commits while the server runs: reload a repo when its repo.json changes.
        folder = self.repos_dir / repo_id
        try:
            stat = (folder / "repo.json").stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            cached = self._repos.get(repo_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        repo = Repo.load(folder)
        with self._lock:
            self._repos[repo_id] = (key, repo)
        return repo

    def content_path(self, repo_id: str, path: str, revision: str = "main") -> str:
        """A glob (for faults and counts) of the requests that carry this file's content: its
        ``/resolve`` URL, or, for a file this hub serves through Xet, the file's xorbs."""
        repo = self.repo(repo_id)
        commit = repo.resolve(revision) if repo is not None else None
        entry = repo.commits[commit].get(path) if repo is not None and commit else None
        if entry is None:
            raise KeyError(f"{repo_id}@{revision} has no file {path}")
        if self.xet and entry.lfs:
            return f"/cas/xorbs/{repo_id}/{entry.sha256}/*"
        if self._cdn is not None and entry.lfs:
            return f"/cdn/{repo_id}/{entry.sha256}"
        return f"/{repo_id}/resolve/*/{path}"

    def issue_xet_token(self, repo_id: str) -> tuple[str, int]:
        """A Xet access token for one repo's files, and its expiry (Unix seconds)."""
        token = "xet_" + secrets.token_hex(16)
        expiry = time.time() + self.xet_token_ttl
        with self._lock:
            self._xet_tokens[token] = (repo_id, expiry)
        return token, int(expiry)

    def xet_token_repo(self, token: str | None) -> str | None:
        """The repo a valid, unexpired Xet access token is for."""
        with self._lock:
            granted = self._xet_tokens.get(token or "")
        if granted is None or granted[1] < time.time():
            return None
        return granted[0]

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the server is stopping."""
        return self._stopping.wait(seconds)


class _Server(QuietHTTPServer):
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128
    hub: FakeHub
    is_cdn: bool = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and a small body go out in two writes: without TCP_NODELAY, Nagle's algorithm and
    # the client's delayed ACK hold the body back ~40 ms on every small file.
    disable_nagle_algorithm = True
    server: _Server
    server_version = "fakehub/0.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        if (size := self.server.hub.send_buffer) is not None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # -- routing -----------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        raw_segments = split.path.split("/")[1:]
        segments = [unquote(s) for s in raw_segments]
        decoded = "/" + "/".join(segments)
        faults = hub._record(method, decoded)
        try:
            for fault in faults:
                if fault.kind is FaultKind.LATENCY and hub.wait(fault.seconds):
                    return
            for fault in faults:
                if fault.kind is FaultKind.STATUS:
                    headers = {}
                    if fault.retry_after is not None:
                        headers["Retry-After"] = f"{fault.retry_after:g}"
                    raise HubError(fault.status, None, f"injected {fault.status}", headers)
            query = parse_qs(split.query)
            lies = hub.lies
            if lies.api_redirect_loop and segments[0] == "api":
                self._send_head(302, {"Location": self.path, "Content-Length": "0"})
                return
            if lies.redirect_files_to and len(segments) >= 5 and segments[2] == "resolve":
                self._send_head(302, {"Location": lies.redirect_files_to, "Content-Length": "0"})
                return
            if getattr(self.server, "is_cdn", False):
                self._from_cdn(method, segments, faults)
            elif segments == ["_fakehub", "served"]:
                # For benchmarks that run the hub as a process: content bytes sent so far.
                self._send_json(method, {"bytes": hub.served()})
            elif segments[:2] == ["api", "models"] and len(segments) >= 4:
                self._api(method, segments[2:], query)
            elif segments[0] == "cas":
                self._cas(method, segments[1:], faults)
            elif len(segments) >= 5 and segments[2] == "resolve":
                repo_id = "/".join(segments[:2])
                self._resolve(method, repo_id, segments[3], "/".join(segments[4:]), faults)
            else:
                raise HubError(404, None, "Not Found")
        except HubError as error:
            self._send_error(method, error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        if hub.drop_idle:
            self.close_connection = True

    def _api(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        repo_id = "/".join(parts[:2])
        rest = parts[2:]
        repo = self._authorized_repo(repo_id, files=False)
        if not rest:
            self._repo_info(method, repo, "main")
        elif rest[0] == "revision" and len(rest) == 2:
            self._repo_info(method, repo, rest[1])
        elif rest[0] == "tree" and len(rest) >= 2:
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            cursor = int(query.get("cursor", ["0"])[0] or 0)
            self._tree(method, repo, rest[1], "/".join(rest[2:]), recursive, cursor)
        elif rest[0] == "xet-read-token" and len(rest) == 2 and self.server.hub.xet:
            self._xet_token(method, self._authorized_repo(repo_id, files=True), rest[1])
        else:
            raise HubError(404, None, "Not Found")

    # -- access ------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _authorized_repo(self, repo_id: str, *, files: bool) -> Repo:
        hub = self.server.hub
        repo = hub.repo(repo_id)
        token = self._token()
        valid = token is not None and token in hub.tokens
        if repo is None or (repo.private and not valid):
            status = 401 if token is None or not valid else 404
            raise HubError(status, "RepoNotFound", "Repository not found")
        if repo.gated and files and token not in hub.gated_access:
            status = 401 if not valid else 403
            message = (
                f"Access to model {repo_id} is restricted and you are not in the authorized list."
            )
            raise HubError(status, "GatedRepo", message)
        return repo

    def _commit(self, repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # -- API endpoints -----------------------------------------------------------------------

    def _repo_info(self, method: str, repo: Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        files = repo.commits[commit]
        body = {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit if self.server.hub.lies.sha is None else self.server.hub.lies.sha,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        self._send_json(method, body)

    def _tree(
        self, method: str, repo: Repo, revision: str, prefix: str, recursive: bool, cursor: int
    ) -> None:
        commit = self._commit(repo, self.server.hub.lies.tree_from or revision)
        entries = _tree_entries(
            repo.commits[commit], prefix.strip("/"), recursive, with_xet=self.server.hub.xet
        )
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
        lies = self.server.hub.lies
        entries = entries + list(lies.tree_entries)
        for item in entries:
            if item.get("path") in lies.size_overrides:
                item["size"] = lies.size_overrides[item["path"]]
                if "lfs" in item:
                    item["lfs"]["size"] = item["size"]
        page = entries[cursor : cursor + self.server.hub.page_size]
        headers = {}
        if lies.endless_tree or lies.looping_tree:
            if lies.endless_tree:
                page = _made_up_files(cursor, self.server.hub.page_size)
            next_cursor = cursor + len(page) if lies.endless_tree else 0
            path = urlsplit(self.path).path
            link = f"{self._base()}{path}?recursive={str(recursive).lower()}&cursor={next_cursor}"
            headers["Link"] = f'<{link}>; rel="next"'
        elif cursor + len(page) < len(entries):
            next_cursor = cursor + len(page)
            path = urlsplit(self.path).path
            link = f"{self._base()}{path}?recursive={str(recursive).lower()}&cursor={next_cursor}"
            headers["Link"] = f'<{link}>; rel="next"'
        self._send_json(method, page, headers)

    # -- files -------------------------------------------------------------------------------

    def _resolve(
        self, method: str, repo_id: str, revision: str, path: str, faults: list[Fault]
    ) -> None:
        repo = self._authorized_repo(repo_id, files=True)
        commit = self._commit(repo, self.server.hub.lies.files_from or revision)
        entry = repo.commits[commit].get(path)
        if entry is None:
            raise HubError(
                404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit}
            )
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
            if self.server.hub.xet:
                token_url = f"{self._base()}/api/models/{repo_id}/xet-read-token/{commit}"
                headers["X-Xet-Hash"] = xet.file_hash(entry.sha256)
                headers["Link"] = f'<{token_url}>; rel="xet-auth"'
        headers.update(self.server.hub.lies.headers)
        cdn = self.server.hub.cdn_url
        if cdn is not None and entry.lfs and not self.server.hub.xet:
            # As the Hub does: the content is on a CDN, at a signed URL of its own origin.
            headers["Location"] = f"{cdn}/cdn/{repo_id}/{entry.sha256}?X-Amz-Signature=fake"
            headers["Content-Length"] = "0"
            self._send_head(302, headers)
            return
        self._send_object(method, repo, entry, headers, faults)

    def _from_cdn(self, method: str, segments: list[str], faults: list[Fault]) -> None:
        """``/cdn/{repo}/{sha256}``: the content of an LFS object, as a CDN serves it (no token
        needed: the signature is in the URL)."""
        hub = self.server.hub
        with hub._lock:
            hub.cdn_authorizations.append(self.headers.get("Authorization"))
        if len(segments) != 4 or segments[0] != "cdn":
            raise HubError(404, None, "Not Found")
        repo = hub.repo("/".join(segments[1:3]))
        entry = next(
            (
                e
                for files in (repo.commits.values() if repo is not None else [])
                for e in files.values()
                if e.lfs and e.sha256 == segments[3]
            ),
            None,
        )
        if repo is None or entry is None:
            raise HubError(404, None, "NoSuchKey")
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        self._send_object(method, repo, entry, headers, faults)

    def _send_object(
        self,
        method: str,
        repo: Repo,
        entry: RepoFile,
        headers: dict[str, str],
        faults: list[Fault],
    ) -> None:
        """A file's content (its ``Range`` when asked: 206 with ``Content-Range``)."""
        start, end, status = 0, entry.size, 200
        if method == "GET" and self.headers.get("Range"):
            start, end = self._requested_range(entry.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
            hub = self.server.hub
            with hub._lock:
                hub._ranges.append((unquote(urlsplit(self.path).path), start, end))
        headers["Content-Length"] = str(end - start)
        self._send_head(status, headers)
        if method == "HEAD":
            return
        with repo.object_path(entry).open("rb") as source:
            self._send_range(source, start, end, _body_fault(faults))

    def _requested_range(self, size: int) -> tuple[int, int]:
        """The ``Range`` header's byte range as (start, end exclusive), clipped to ``size``."""
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match is None or (not match.group(1) and not match.group(2)):
            raise HubError(416, None, "Invalid range")
        start, end = 0, size
        if match.group(1):
            start = int(match.group(1))
            if match.group(2):
                end = min(int(match.group(2)) + 1, size)
        else:  # suffix range: the last N bytes
            start = max(size - int(match.group(2)), 0)
        if start >= size and size > 0:
            raise HubError(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
        return start, end

    # -- Xet ---------------------------------------------------------------------------------

    def _xet_token(self, method: str, repo: Repo, revision: str) -> None:
        self._commit(repo, revision)
        token, expiry = self.server.hub.issue_xet_token(repo.repo_id)
        cas = f"{self._base()}/cas"
        headers = {
            "X-Xet-Cas-Url": cas,
            "X-Xet-Access-Token": token,
            "X-Xet-Token-Expiration": str(expiry),
        }
        self._send_json(method, {"casUrl": cas, "accessToken": token, "exp": expiry}, headers)

    def _cas(self, method: str, parts: list[str], faults: list[Fault]) -> None:
        if len(parts) == 3 and parts[0] == "v1" and parts[1] == "reconstructions":
            self._reconstruction(method, parts[2])
        elif len(parts) == 5 and parts[0] == "xorbs":
            self._xorb(method, "/".join(parts[1:3]), parts[3], parts[4], faults)
        else:  # /v2/reconstructions among others: the client then falls back to v1
            raise HubError(404, None, "Not Found")

    def _reconstruction(self, method: str, file_id: str) -> None:
        hub = self.server.hub
        repo_id = hub.xet_token_repo(self._token())
        if repo_id is None:
            raise HubError(401, None, "Missing, invalid or expired Xet access token")
        repo = hub.repo(repo_id)
        entry = None
        if repo is not None:
            entry = _find_file(repo, lambda f: f.lfs and xet.file_hash(f.sha256) == file_id)
        if repo is None or entry is None:
            raise HubError(404, None, f"File {file_id} not found")
        start, end = 0, entry.size
        if self.headers.get("Range"):
            start, end = self._requested_range(entry.size)
        xorbs_url = f"{self._base()}/cas/xorbs/{repo_id}"
        self._send_json(
            method,
            xet.reconstruction(
                entry.sha256, entry.size, start, end - 1, xorbs_url, self.server.hub.xorb_chunks
            ),
        )

    def _xorb(
        self, method: str, repo_id: str, sha256: str, index: str, faults: list[Fault]
    ) -> None:
        repo = self.server.hub.repo(repo_id)
        entry = None if repo is None else _find_file(repo, lambda f: f.sha256 == sha256)
        if repo is None or entry is None or not index.isdigit():
            raise HubError(404, None, "No such xorb")
        chunks = self.server.hub.xorb_chunks
        if int(index) >= xet.Layout(entry.size, chunks).xorbs:
            raise HubError(404, None, "No such xorb")
        if not self.headers.get("Range"):
            # Like the real storage: a xorb is readable only by the ranges a reconstruction grants.
            raise HubError(403, None, "A Range header is required")
        with xet.XorbReader(repo.object_path(entry), entry.size, int(index), chunks) as source:
            start, end = self._requested_range(source.size)
            self._send_head(
                206,
                {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{end - 1}/{source.size}",
                    "Content-Length": str(end - start),
                },
            )
            if method == "HEAD":
                return
            # A corruption hits the first chunk's data, not its header: same length, wrong bytes.
            self._send_range(source, start, end, _body_fault(faults), corrupt_at=xet.HEADER_SIZE)

    # -- bodies ------------------------------------------------------------------------------

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_range(
        self, source: Any, start: int, end: int, fault: Fault | None, corrupt_at: int = 0
    ) -> None:
        """Send bytes ``start..end`` (exclusive) of ``source``, through ``fault`` if any;
        ``corrupt_at`` is the byte of the body a corruption changes."""
        hub = self.server.hub
        with hub._lock:
            hub._sending += 1
        try:
            self._send_body(source, start, end, fault, corrupt_at)
        finally:
            with hub._lock:
                hub._sending -= 1

    def _send_body(
        self, source: Any, start: int, end: int, fault: Fault | None, corrupt_at: int
    ) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        if fault is None and isinstance(source, xet.XorbReader) and not hub.uplink:
            # A xorb: each chunk's header, then its data straight from the content file (a
            # header held back for the data after it, never when it ends the answer).
            spans = list(source.spans(start, end))
            for i, span in enumerate(spans):
                if isinstance(span, bytes):
                    more = socket.MSG_MORE if i + 1 < len(spans) else 0
                    self.connection.sendall(span, more)
                    hub._count_body(path, len(span))
                else:
                    hub._count_body(path, _sendfile(self.connection, source, *span))
            return
        if fault is None and hasattr(source, "fileno") and not hub.uplink:
            hub._count_body(path, _sendfile(self.connection, source, start, end - start))
            return
        if fault is not None and fault.kind is FaultKind.STALL:
            hub.wait(fault.seconds)
            self.close_connection = True
            return
        stop = end
        if fault is not None and fault.kind is FaultKind.DROP:
            stop = min(end, start + fault.after_bytes)
        elif fault is not None and fault.kind is FaultKind.SHORT_BODY:
            stop = max(start, end - fault.missing)
        trickling = fault is not None and fault.kind is FaultKind.TRICKLE
        rate = max(fault.rate, 1) if fault is not None else 1
        chunk_size = max(1, min(_SEND_CHUNK, rate // 10 or 1)) if trickling else _SEND_CHUNK
        source.seek(start)
        position = start
        began = time.monotonic()
        while position < stop:
            chunk = source.read(min(chunk_size, stop - position))
            if not chunk:
                break
            flip = start + corrupt_at - position
            if fault is not None and fault.kind is FaultKind.CORRUPT and 0 <= flip < len(chunk):
                # Flip every bit of one byte of the body: same length, wrong content.
                chunk = chunk[:flip] + bytes([chunk[flip] ^ 0xFF]) + chunk[flip + 1 :]
            if hub.uplink:
                hub._through_uplink(len(chunk))
            self.wfile.write(chunk)
            hub._count_body(path, len(chunk))
            position += len(chunk)
            if trickling:
                due = began + (position - start) / rate
                if hub.wait(max(0.0, due - time.monotonic())):
                    break
        if stop < end:
            # The body is cut short: close so the client sees the connection end mid-body.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _base(self) -> str:
        return f"http://{self.headers.get('Host', '127.0.0.1')}"

    # -- answers -----------------------------------------------------------------------------

    def _send_json(self, method: str, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _send_error(self, method: str, error: HubError) -> None:
        data = json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error.code is not None:
            self.send_header("X-Error-Code", error.code)
            self.send_header("X-Error-Message", error.message)
        for name, value in error.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


def _body_fault(faults: list[Fault]) -> Fault | None:
    return next((f for f in faults if f.kind is not FaultKind.LATENCY), None)


def _find_file(repo: Repo, wanted: Callable[[RepoFile], bool]) -> RepoFile | None:
    for files in repo.commits.values():
        for entry in files.values():
            if wanted(entry):
                return entry
    return None


def _tree_entries(
    files: dict[str, RepoFile], prefix: str, recursive: bool, *, with_xet: bool = False
) -> list[dict[str, Any]]:
    """Tree entries under ``prefix`` in the Hub's shape: folders first at each level, then files."""
    base = f"{prefix}/" if prefix else ""
    folders: set[str] = set()
    out_files: list[dict[str, Any]] = []
    for path, entry in sorted(files.items()):
        if not path.startswith(base):
            continue
        rest = path[len(base) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if depth > 1 and not recursive:
                break
            folders.add(base + "/".join(parts[:depth]))
        if len(parts) > 1 and not recursive:
            continue
        item: dict[str, Any] = {
            "type": "file",
            "oid": entry.blob_id,
            "size": entry.size,
            "path": path,
        }
        if entry.lfs:
            item["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": entry.pointer_size,
            }
            if with_xet:
                item["xetHash"] = xet.file_hash(entry.sha256)
        out_files.append(item)
    out_folders = [
        {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder}
        for folder in sorted(folders)
    ]
    return out_folders + out_files


def _made_up_files(start: int, count: int) -> list[dict[str, Any]]:
    """Tree entries of files that do not exist, for a listing that never ends."""
    return [
        {"type": "file", "oid": f"{n:040x}", "size": 1, "path": f"endless/{n:08d}.bin"}
        for n in range(start, start + count)
    ]


def _sendfile(sock: socket.socket, source: Any, offset: int, count: int) -> int:
    """Send ``count`` bytes of ``source`` from ``offset``; return how many were sent."""
    total = 0
    while count > 0:
        sent = os.sendfile(sock.fileno(), source.fileno(), offset, min(count, 1 << 30))
        if sent == 0:
            break
        offset += sent
        count -= sent
        total += sent
    return total


def serve(
    repos_dir: Path,
    host: str,
    port: int,
    tokens: set[str],
    gated_access: set[str],
    xet: bool = False,
    rate: int = 0,
    latency: float = 0.0,
    send_buffer: int | None = None,
    uplink: int = 0,
) -> None:
    """Serve ``repos_dir`` until interrupted (the standalone mode). ``rate``: each response body
    of file content at most that many bytes per second (a link that caps every connection, as a
    CDN does); ``latency``: every request waits that long first; ``uplink``: all bodies of content
    together at most that many bytes per second."""
    hub = FakeHub(
        repos_dir,
        host=host,
        port=port,
        tokens=tokens,
        gated_access=gated_access,
        xet=xet,
        send_buffer=send_buffer,
        uplink=uplink,
    )
    if rate:
        for content in ("*/resolve/*", "/cas/xorbs/*", "/cdn/*"):
            hub.add_fault(Fault(FaultKind.TRICKLE, path=content, rate=rate))
    if latency:
        hub.add_fault(Fault(FaultKind.LATENCY, seconds=latency))
    repos = load_repos(repos_dir)
    mode = ", LFS files through Xet," if xet else ""
    print(f"fakehub serving {len(repos)} repos from {repos_dir}{mode} at {hub.url}", flush=True)
    hub.serve_until_interrupted()
