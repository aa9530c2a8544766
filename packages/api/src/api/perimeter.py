"""The service's perimeter: which requests it serves at all, before any route runs.

With no key set (the default, on loopback), anything that can make a request to the port can
drive the API, and a web page the operator opens is such a thing:

- **DNS rebinding**: a hostile page's own name made to resolve to 127.0.0.1, so that the browser
  treats the service as that page's origin (it may then read every answer). The browser still
  sends the hostile name in ``Host``. So a request whose ``Host`` is not a name the service is
  reached by gets a 400 before any work: ``localhost``, this machine's host name, any IP
  address (rebinding needs a name: a page whose origin is an address is the service's own, or
  a foreign site, which the next rule handles), and the names of ``MODELS_ALLOWED_HOSTS``.
- **Cross-site requests**: a foreign page may *send* requests to 127.0.0.1 (a form, a
  ``fetch`` in ``no-cors`` mode) without reading the answer. A request that changes something
  (any method but GET, HEAD, OPTIONS) whose ``Origin`` is not the service's own gets a 403, as
  does any request a browser marks ``Sec-Fetch-Site: cross-site`` other than a navigation (a
  link to the page or to ``/docs`` still opens). Clients that are not browsers send neither
  header and are not affected. (The rule of Go's ``http.CrossOriginProtection``.)

It also notes every address the service answered on (``scope["server"]``, and the ``Host``
asked for): a redirect of the Hub to one of them is refused (``guard.note_own_origin``), so that
the Hub cannot make a download worker send requests to the service itself.

And the access log never prints a secret a client put in a query string by mistake
(``?api_key=...``): ``RedactQuery`` replaces the values of parameters whose names say they are
secrets, and any value that is one of the configured keys.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# What the perimeter can answer on any endpoint, before the endpoint runs: in the OpenAPI schema
# of every operation (the app's own responses), so that a client, and the schema fuzzer, knows.
OPENAPI_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "The request's Host is not a name of this service (MODELS_ALLOWED_HOSTS);"
        " nothing was done",
        "content": {
            "application/json": {
                "example": {
                    "detail": "this service does not answer under the name 'evil.example' (the"
                    " request's Host): ..."
                }
            }
        },
    },
    403: {
        "description": "A browser page of another site sent it (its Origin, or Sec-Fetch-Site:"
        " cross-site); nothing was done",
        "content": {
            "application/json": {
                "example": {
                    "detail": "a request from another site (https://evil.example) may not change"
                    " anything here; use this service's own page, or a client that is not a"
                    " browser"
                }
            }
        },
    },
}
MAX_OWN_ORIGINS = 64  # the addresses and names the service notes as its own
# Parameter names whose values are secrets, wherever they appear in a query string.
SECRET_NAME = re.compile(r"key|token|secret|passw|auth|signature|credential|session", re.I)


def host_name(host: str) -> str:
    """The name part of a ``Host`` value (port and IPv6 brackets removed), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AllowedHosts:
    """The names the service answers under: ``localhost``, this machine's host name, any IP
    address, and those an operator adds (``MODELS_ALLOWED_HOSTS``; ``*`` allows any)."""

    def __init__(self, extra: Iterable[str]) -> None:
        names = {n.strip().lower() for n in extra if n.strip()}
        self.any = "*" in names
        self.names = names | {"localhost", socket.gethostname().lower()}

    def allows(self, host: str | None) -> bool:
        if self.any:
            return True
        if not host:
            return False
        name = host_name(host)
        return name in self.names or _is_address(name) or name.endswith(".localhost")


def _json_error(status: int, detail: str) -> tuple[dict[str, object], bytes]:
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, body


class Perimeter:
    """ASGI middleware: the ``Host`` and cross-site rules (module docstring), before the body is
    read or any route runs; ``on_origin`` is told each address the service answered on."""

    def __init__(
        self,
        app: ASGIApp,
        allowed: AllowedHosts | None = None,
        on_origin: Callable[[str, int], None] | None = None,
    ) -> None:
        """``allowed``: the names; by default the application's ``state.allowed_hosts`` (set by
        its lifespan from the settings), else only the defaults."""
        self.app = app
        self.allowed = allowed
        self.on_origin = on_origin
        self._defaults = AllowedHosts(())
        self._seen: set[tuple[str, int]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        allowed = self.allowed or getattr(
            getattr(scope.get("app"), "state", None), "allowed_hosts", None
        )
        refusal = self._refusal(scope, headers, host, allowed or self._defaults)
        if refusal is not None:
            start, body = _json_error(*refusal)
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        self._note(scope, host)
        await self.app(scope, receive, send)

    def _refusal(
        self, scope: Scope, headers: dict[str, str], host: str | None, allowed: AllowedHosts
    ) -> tuple[int, str] | None:
        if not allowed.allows(host):
            shown = (host or "")[:100].encode("ascii", "backslashreplace").decode()
            return (
                400,
                f"this service does not answer under the name {shown!r} (the request's Host):"
                " a page of another site may have made its name point here. If the name is"
                " yours, add it to MODELS_ALLOWED_HOSTS",
            )
        origin = headers.get("origin")
        method = scope.get("method", "GET")
        if origin is not None and method not in SAFE_METHODS and not _same_origin(origin, host):
            shown = origin[:100].encode("ascii", "backslashreplace").decode()
            return (
                403,
                f"a request from another site ({shown}) may not change anything here; use this"
                " service's own page, or a client that is not a browser",
            )
        if headers.get("sec-fetch-site") == "cross-site" and headers.get("sec-fetch-mode") not in (
            "navigate",
            None,
        ):
            return 403, "a request from another site may not use this service; open its own page"
        return None

    def _note(self, scope: Scope, host: str | None) -> None:
        if self.on_origin is None:
            return
        found: list[tuple[str, int]] = []
        server = scope.get("server")
        if server and server[1] is not None:
            # The socket's own address (as many as the machine has), and the name the request
            # used when it is a name (an address is the socket's already; any address is allowed
            # as a Host, so a client could otherwise grow this set, and every worker's job, at
            # will). At most ``MAX_OWN_ORIGINS`` in all.
            found.append((str(server[0]), int(server[1])))
            if host and not _is_address(host_name(host)):
                found.append((host_name(host), int(server[1])))
        for origin in found:
            if origin not in self._seen and len(self._seen) < MAX_OWN_ORIGINS:
                self._seen.add(origin)
                self.on_origin(*origin)


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether an ``Origin`` header names the service as the request reached it (by ``Host``)."""
    if origin == "null" or not host:
        return False
    parts = urlsplit(origin)
    return parts.netloc.lower() == host.strip().lower()


class RedactQuery(logging.Filter):
    """For uvicorn's access log: the path's query string with the values of secret-named
    parameters, and of any configured key, replaced by ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = {s for s in secrets if s}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], self.redact(args[2]), *args[3:])
        return True

    def redact(self, path: str) -> str:
        if "?" not in path:
            return path
        base, _, query = path.partition("?")
        pairs = parse_qsl(query, keep_blank_values=True)
        if not any(SECRET_NAME.search(k) or v in self.secrets for k, v in pairs):
            return path
        cleaned = [
            (k, "***" if SECRET_NAME.search(k) or v in self.secrets else v) for k, v in pairs
        ]
        return f"{base}?{urlencode(cleaned, safe='*')}"
