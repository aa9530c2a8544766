"""Everything the Hub says is checked before the library or the service uses it (adapter).

``huggingface_hub`` turns the Hub's metadata into file names: a commit id into ``snapshots/<id>``,
``refs/<branch>`` and ``trees/<id>.json``, an ``ETag`` into ``blobs/<etag>`` and its lock, a tree
entry's ``path`` into a snapshot link. It does not validate them, and many users point
``HF_ENDPOINT`` at a mirror we know nothing of. So every answer the process receives from the Hub
passes through ``GuardedTransport``, installed as the library's HTTP client factory
(``huggingface_hub.set_client_factory``) in the service and in every download worker:

- ``X-Repo-Commit`` must be a 40-hex commit id, ``X-Linked-Etag`` and ``X-Xet-Hash`` 64 hex, and the
  ``ETag`` of a ``/resolve`` answer 40 hex (a git blob id) or 64 hex (sha256);
- a JSON answer of the Hub's API is read whole, at most ``MAX_JSON_BYTES`` and within
  ``json_deadline`` seconds, before the library sees it: a revision's ``sha`` must be a commit id,
  each tree entry a safe relative path (``path_problem``) with well-formed ids and sizes, no path
  twice, at most ``max_files`` files and ``MAX_TREE_PAGES`` pages per listing, and a next page only
  on the same origin;
- a request the library sends without a timeout gets one (the library's ``HfApi`` calls have none);
- one commit per revision: a revision answer for a commit id must name that commit, and every
  answer for a file of a commit id (``/resolve/<commit>/...``, and a redirect of one) must say that
  commit in ``X-Repo-Commit`` and redirect only to a file of that commit. In a download worker the
  plan's file list is installed too (``expect``): a file's answer must give the ETag the list gave
  (a mirror that answers the list with one commit and the files with another's is refused);
- a redirect must not carry credentials (``user:password@``, which the client would send to the
  other origin) nor lead to the service's own address (``refuse_origins``): a request forged
  against the service itself.

A failed check raises ``UntrustedAnswer``: the download fails at once, with a plain message, before
anything is written.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpx2

from api.models.backend import DownloadPlan
from api.models.hub.throttle import ThrottledTransport

COMMIT_ID = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_OR_SHA256 = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

MAX_JSON_BYTES = 64 * 1024 * 1024  # a tree page of 1000 entries is about 300 KB
MAX_TREE_PAGES = 10_000
MAX_PATH_BYTES = 4000  # below PATH_MAX (4096) with the cache's own prefix left out
MAX_NAME_BYTES = 255  # NAME_MAX of every Linux filesystem a cache lives on
_ETAG_QUOTES = re.compile(r'^(?:W/)?"?([^"]*)"?$')
# A file's answer: ``/{org}/{name}/resolve/{revision}/{path}`` (and the Hub's own redirect of a
# small file, ``/api/resolve-cache/models/{org}/{name}/{revision}/{path}``).
_RESOLVE = re.compile(
    r"^/(?:(?P<repo>[^/]+/[^/]+)/resolve|api/resolve-cache/models/(?P<cached>[^/]+/[^/]+))"
    r"/(?P<revision>[^/]+)/(?P<path>.+)$"
)
_REVISION_INFO = re.compile(r"^/api/models/[^/]+/[^/]+/revision/(?P<revision>[^/]+)$")


@dataclass(frozen=True)
class Expected:
    """What a download worker's plan says the Hub serves: its commit, and each file's ETag."""

    commit: str
    etags: dict[str, str]


_EXPECTED: Expected | None = None
_REFUSED_ORIGINS: frozenset[tuple[str, int]] = frozenset()


def expect(commit: str, etags: dict[str, str]) -> None:
    """In a download worker: every answer for a file of ``commit`` must give the ETag of the plan
    (the file list it was planned with). Set once, before the first request."""
    global _EXPECTED
    _EXPECTED = Expected(commit, dict(etags))


def refuse_origins(origins: frozenset[tuple[str, int]]) -> None:
    """The service's own addresses (host, port): no redirect of the Hub may lead there."""
    global _REFUSED_ORIGINS
    _REFUSED_ORIGINS = origins


def note_own_origin(host: str, port: int) -> None:
    """An address the service answered on (from a request it served): refused from now on."""
    if (host, port) not in _REFUSED_ORIGINS:
        refuse_origins(_REFUSED_ORIGINS | {(host, port)})


def own_origins() -> tuple[tuple[str, int], ...]:
    return tuple(sorted(_REFUSED_ORIGINS))


class UntrustedAnswer(Exception):
    """The Hub (or the mirror at ``HF_ENDPOINT``) answered something unsafe or malformed.

    ``str(error)`` is safe to show a client: it names the field, never the value's bytes beyond a
    short, escaped excerpt."""


def path_problem(path: object) -> str | None:
    """Why ``path`` (a file path from the Hub or from a file list in the cache) cannot be used as
    a path inside a snapshot, or None when it can: a non-empty relative POSIX path, normalised (no
    ``.``/``..``/empty components, no backslash), no NUL or other control character, each
    component at most 255 bytes of UTF-8 and the whole at most 4000."""
    if not isinstance(path, str) or not path:
        return "a file path is empty or not a string"
    if any(unicodedata.category(c) == "Cc" for c in path):
        return "a file path contains a control character"
    if "\\" in path:
        return "a file path contains a backslash"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "a file path is not valid UTF-8"
    if path.startswith("/"):
        return "a file path is absolute"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "a file path is not normalised (empty, '.' or '..' component)"
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in parts):
        return f"a file name is longer than {MAX_NAME_BYTES} bytes"
    if len(encoded) > MAX_PATH_BYTES:
        return f"a file path is longer than {MAX_PATH_BYTES} bytes"
    return None


def etag_value(header: str) -> str:
    """An ETag header's value without ``W/`` and quotes, as the library normalises it."""
    match = _ETAG_QUOTES.match(header.strip())
    return match.group(1) if match else header


def _excerpt(value: object) -> str:
    return repr(str(value)[:60])


@dataclass(frozen=True)
class Limits:
    max_files: int = 100_000
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    json_deadline: float = 60.0


class _Listing(threading.local):
    """The tree listing this thread is paging through (the library pages in the caller's thread)."""

    def __init__(self) -> None:
        self.pages = 0
        self.paths: set[str] = set()
        self.seen_urls: set[str] = set()


class GuardedTransport(httpx2.BaseTransport):
    """Wraps the real transport: defaults the timeouts, checks every answer (module docstring)."""

    def __init__(self, inner: httpx2.BaseTransport, limits: Limits) -> None:
        self.inner = inner
        self.limits = limits
        self._listing = _Listing()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self._default_timeouts(request)
        # The Hub's API answers, not file content (which the Hub also redirects through
        # ``/api/resolve-cache/...``).
        path = request.url.path
        api = "/api/" in path and "/resolve" not in path
        if api:
            # The body is read here, whole: keep it uncompressed so that its size is its size.
            request.headers["Accept-Encoding"] = "identity"
        response = self.inner.handle_request(request)
        try:
            check_headers(request.url.path, response.status_code, response.headers)
            check_commit(request.url.path, response.status_code, response.headers)
            if response.is_redirect:
                check_redirect(request.url, response.headers.get("Location", ""))
            json_answer = "json" in response.headers.get("Content-Type", "")
            if api and json_answer and 200 <= response.status_code < 300:
                return self._checked_json(request, response)
        except BaseException:
            response.close()
            raise
        return response

    def close(self) -> None:
        self.inner.close()

    def _default_timeouts(self, request: httpx2.Request) -> None:
        timeout = dict(request.extensions.get("timeout") or {})
        limits = self.limits
        defaults = {
            "connect": limits.connect_timeout,
            "read": limits.read_timeout,
            "write": limits.read_timeout,
            "pool": limits.connect_timeout,
        }
        for key, value in defaults.items():
            if timeout.get(key) is None:
                timeout[key] = value
        request.extensions["timeout"] = timeout

    def _checked_json(self, request: httpx2.Request, response: httpx2.Response) -> httpx2.Response:
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise UntrustedAnswer(f"the Hub sent a compressed API answer ({encoding}) unasked")
        body = self._read_bounded(response)
        response.close()
        if "/tree/" in request.url.path:
            self._check_tree(request, response, body)
        else:
            info = _json(body)
            check_revision_info(info)
            check_revision_commit(request.url.path, info)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=httpx2.ByteStream(body),
            extensions=response.extensions,
            request=request,
        )

    def _read_bounded(self, response: httpx2.Response) -> bytes:
        deadline = time.monotonic() + self.limits.json_deadline
        chunks: list[bytes] = []
        size = 0
        stream = response.stream
        assert isinstance(stream, httpx2.SyncByteStream)
        for chunk in stream:
            size += len(chunk)
            if size > MAX_JSON_BYTES:
                raise UntrustedAnswer(f"an API answer of the Hub is over {MAX_JSON_BYTES} bytes")
            if time.monotonic() > deadline:
                raise UntrustedAnswer(
                    f"an API answer of the Hub took over {self.limits.json_deadline:g} s"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_tree(self, request: httpx2.Request, response: httpx2.Response, body: bytes) -> None:
        listing = self._listing
        url = str(request.url)
        if "cursor=" not in request.url.query.decode("ascii", "replace"):
            listing.pages, listing.paths, listing.seen_urls = 0, set(), set()
        listing.pages += 1
        listing.seen_urls.add(url)
        if listing.pages > MAX_TREE_PAGES:
            raise UntrustedAnswer(f"the Hub's file list runs past {MAX_TREE_PAGES} pages")
        entries = _json(body)
        if not isinstance(entries, list):
            raise UntrustedAnswer("the Hub's file list is not a list")
        files = check_tree_entries(entries)
        for path in files:
            if path in listing.paths:
                raise UntrustedAnswer(f"the Hub's file list names {_excerpt(path)} twice")
            listing.paths.add(path)
        if len(listing.paths) > self.limits.max_files:
            raise UntrustedAnswer(
                f"the Hub's file list has over {self.limits.max_files} files"
                " (MODELS_MAX_REPO_FILES)"
            )
        next_url = _next_link(response)
        if next_url is not None:
            if not entries:
                raise UntrustedAnswer("the Hub's file list has an empty page that is not the last")
            target = httpx2.URL(next_url)
            if (target.scheme, target.host, target.port) != (
                request.url.scheme,
                request.url.host,
                request.url.port,
            ):
                raise UntrustedAnswer("the Hub's file list continues on another server")
            if next_url in listing.seen_urls:
                raise UntrustedAnswer("the Hub's file list pages in a loop")


def _next_link(response: httpx2.Response) -> str | None:
    link = response.headers.get("Link")
    if not link:
        return None
    for part in link.split(","):
        match = re.match(r'\s*<([^>]*)>\s*;\s*rel="?next"?', part)
        if match:
            return match.group(1)
    return None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise UntrustedAnswer("an API answer of the Hub is not valid JSON") from None


def check_headers(path: str, status: int, headers: httpx2.Headers) -> None:
    """The headers the library turns into file names (module docstring)."""
    commit = headers.get("X-Repo-Commit")
    if commit is not None and not COMMIT_ID.fullmatch(commit):
        raise UntrustedAnswer(f"the Hub sent a malformed commit id {_excerpt(commit)}")
    linked = headers.get("X-Linked-Etag")
    if linked is not None and not SHA256.fullmatch(etag_value(linked)):
        raise UntrustedAnswer(f"the Hub sent a malformed X-Linked-Etag {_excerpt(linked)}")
    xet_hash = headers.get("X-Xet-Hash")
    if xet_hash is not None and not SHA256.fullmatch(xet_hash):
        raise UntrustedAnswer(f"the Hub sent a malformed X-Xet-Hash {_excerpt(xet_hash)}")
    etag = headers.get("ETag")
    if (
        "/resolve" in path  # /resolve/ and /api/resolve-cache/ (the library follows both)
        and status < 400
        and linked is None
        and etag is not None
        and not GIT_OR_SHA256.fullmatch(etag_value(etag))
    ):
        raise UntrustedAnswer(f"the Hub sent a malformed ETag {_excerpt(etag)}")


def _short(commit: str) -> str:
    return commit[:12]


def check_revision_commit(path: str, info: object) -> None:
    """A revision answer for a commit id must name that very commit."""
    match = _REVISION_INFO.match(path)
    if match is None or not isinstance(info, dict):
        return
    asked = unquote(match["revision"])
    answered = info.get("sha")
    if COMMIT_ID.fullmatch(asked) and isinstance(answered, str) and answered != asked:
        raise UntrustedAnswer(
            f"the Hub answered commit {_short(answered)} for commit {_short(asked)}"
        )


def check_commit(path: str, status: int, headers: httpx2.Headers) -> None:
    """An answer for a file of a commit id (a redirect included) must be of that commit, and,
    in a download worker, give the ETag of the plan's file list."""
    match = _RESOLVE.match(path)
    if match is None or status >= 400:
        return
    asked = unquote(match["revision"])
    if not COMMIT_ID.fullmatch(asked):
        return
    answered = headers.get("X-Repo-Commit")
    if answered is not None and answered != asked:
        raise UntrustedAnswer(
            f"the Hub answered a file of commit {_short(asked)} with commit {_short(answered)}"
        )
    expected = _EXPECTED
    if expected is None or asked != expected.commit:
        return
    file = unquote(match["path"])
    linked = headers.get("X-Linked-Etag")
    etag = headers.get("ETag") if linked is None else linked
    want = expected.etags.get(file)
    if want is not None and etag is not None and etag_value(etag) != want:
        raise UntrustedAnswer(
            f"the Hub's file list of commit {_short(asked)} and its answer for {file!r} disagree"
            f" (ETag {_short(want)} listed, {_short(etag_value(etag))} answered)"
        )


def check_redirect(source: httpx2.URL, location: str) -> None:
    """A redirect must not carry credentials, lead to the service itself, or turn a file of one
    commit into a file of another."""
    try:
        target = source.join(location)
    except (httpx2.InvalidURL, ValueError):
        raise UntrustedAnswer("the Hub sent a redirect that is not a URL") from None
    if target.userinfo:
        raise UntrustedAnswer("the Hub redirected to a URL with credentials in it: refused")
    if _REFUSED_ORIGINS and (target.host, target.port or _default_port(target)) in _own(target):
        raise UntrustedAnswer("the Hub redirected to this service's own address: refused")
    before, after = _RESOLVE.match(source.path), _RESOLVE.match(target.path)
    if before is not None and after is not None:
        asked, then = unquote(before["revision"]), unquote(after["revision"])
        if COMMIT_ID.fullmatch(asked) and then != asked:
            raise UntrustedAnswer(
                f"the Hub redirected a file of commit {_short(asked)} to revision {then[:40]!r}"
            )


def _default_port(url: httpx2.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _own(target: httpx2.URL) -> frozenset[tuple[str, int]]:
    """The service's own origins, with every name that means this machine's loopback when the
    target names one (``localhost``, ``127.x``, ``[::1]``, ``0.0.0.0``)."""
    origins = set(_REFUSED_ORIGINS)
    host = target.host
    local = host == "localhost"
    try:
        address = ipaddress.ip_address(host)
        local = local or address.is_loopback or address.is_unspecified
    except ValueError:
        pass
    if local:
        origins |= {(host, port) for _, port in _REFUSED_ORIGINS}
    return frozenset(origins)


def check_revision_info(info: object) -> None:
    """A repo-info answer: its ``sha`` (the commit the library names folders after) and the file
    names it lists."""
    if not isinstance(info, dict):
        return  # other API answers (token routes...) name no path
    if "sha" in info and info["sha"] is not None and not COMMIT_ID.fullmatch(str(info["sha"])):
        raise UntrustedAnswer(f"the Hub sent a malformed commit id {_excerpt(info['sha'])}")
    siblings = info.get("siblings")
    if isinstance(siblings, list):
        for sibling in siblings:
            name = sibling.get("rfilename") if isinstance(sibling, dict) else None
            if (problem := path_problem(name)) is not None:
                raise UntrustedAnswer(f"{problem}: {_excerpt(name)}")


def check_tree_entries(entries: list[Any]) -> list[str]:
    """The paths of the file entries of one tree page, each entry checked; raises
    ``UntrustedAnswer`` on the first bad one."""
    files = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise UntrustedAnswer("the Hub's file list holds an entry that is not an object")
        path = entry.get("path")
        if (problem := path_problem(path)) is not None:
            raise UntrustedAnswer(f"{problem}: {_excerpt(path)}")
        assert isinstance(path, str)  # path_problem says so
        if entry.get("type") != "file":
            continue  # a folder (the library takes any other type for one): only its path is used
        if not _is_size(entry.get("size")):
            raise UntrustedAnswer(f"the Hub's file list gives no valid size for {path!r}")
        if not isinstance(entry.get("oid"), str) or not COMMIT_ID.fullmatch(entry["oid"]):
            raise UntrustedAnswer(f"the Hub's file list gives a malformed blob id for {path!r}")
        lfs = entry.get("lfs")
        if lfs is not None and (
            not isinstance(lfs, dict)
            or not isinstance(lfs.get("oid"), str)
            or not SHA256.fullmatch(lfs["oid"])
            or not _is_size(lfs.get("size"))
        ):
            raise UntrustedAnswer(f"the Hub's file list gives malformed LFS data for {path!r}")
        xet_hash = entry.get("xetHash")
        if xet_hash is not None and (
            not isinstance(xet_hash, str) or not SHA256.fullmatch(xet_hash)
        ):
            raise UntrustedAnswer(f"the Hub's file list gives a malformed Xet hash for {path!r}")
        files.append(path)
    return files


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 50


_INSTALLED: Limits | None = None
_INSTALL_LOCK = threading.Lock()
_SSL_CONTEXT: tuple[tuple[str | None, str | None], ssl.SSLContext] | None = None
_SSL_LOCK = threading.Lock()  # its own: the library calls the factory under a lock of its own


def ssl_context() -> ssl.SSLContext:
    """The TLS context of the library's clients in this process, the one ``httpx2`` makes by
    default (it reads ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``), made once: loading the CA bundle
    costs about 20 ms of CPU, and the zygote makes it before it forks, so that a worker does not
    pay it at each download. Made again if those variables changed."""
    global _SSL_CONTEXT
    where = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    with _SSL_LOCK:
        if _SSL_CONTEXT is None or _SSL_CONTEXT[0] != where:
            _SSL_CONTEXT = (where, httpx2.create_ssl_context())
        return _SSL_CONTEXT[1]


def install(limits: Limits) -> None:
    """Make every client the library builds in this process a guarded one (idempotent)."""
    global _INSTALLED
    from huggingface_hub import set_client_factory

    from api.models.hub._compat import hf_request_event_hook

    with _INSTALL_LOCK:
        if limits == _INSTALLED:
            return

        def factory() -> httpx2.Client:
            # The library's own default client, plus the guard (huggingface_hub 2.x:
            # utils/_http.py default_client_factory); a test pins that it is in use.
            # Bodies are read under the worker's bandwidth share (throttle), if it has one.
            return httpx2.Client(
                transport=GuardedTransport(
                    ThrottledTransport(httpx2.HTTPTransport(verify=ssl_context())), limits
                ),
                event_hooks={"request": [hf_request_event_hook]},
                follow_redirects=True,
                timeout=None,
            )

        set_client_factory(factory)
        _INSTALLED = limits


def check_plan(plan: DownloadPlan) -> DownloadPlan:
    """The plan, when its commit id, every path, size and ETag is safe to use; raises
    ``UntrustedAnswer`` otherwise."""
    if not COMMIT_ID.fullmatch(plan.commit):
        raise UntrustedAnswer("the Hub sent a malformed commit id")
    seen: set[str] = set()
    for entry in plan.files:
        if (problem := path_problem(entry.path)) is not None:
            raise UntrustedAnswer(f"{problem}: {_excerpt(entry.path)}")
        if entry.path in seen:
            raise UntrustedAnswer(f"the Hub's file list names {entry.path[:60]!r} twice")
        seen.add(entry.path)
        if not GIT_OR_SHA256.fullmatch(entry.etag):
            raise UntrustedAnswer(f"the Hub's file list gives a malformed id for {entry.path!r}")
        if isinstance(entry.size, bool) or not 0 <= entry.size < 1 << 50:
            raise UntrustedAnswer(f"the Hub's file list gives no valid size for {entry.path!r}")
    return plan
