"""API keys: who may change things (``MODELS_API_KEY``) and who may look (``MODELS_READ_API_KEY``).

Requests carry ``Authorization: Bearer <key>``. With a write key set, every request that changes
something or starts work (download, delete, verify, prune) needs one of the write keys; with a read
key set, reads need a read key or a write key. Neither set: open, as the spec has it (and a warning
at start-up when the service listens beyond loopback). Several keys may be given, comma-separated,
so that one can be rotated without downtime. Keys are compared in constant time, each of them every
time, and never logged or returned: a refusal says which kind of key is wanted, nothing more.

The scheme is declared in the OpenAPI document (``HTTPBearer``), so Swagger UI's Authorize button
sends the key. Health (``/api/health``) and the documentation stay open.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import HTTPException, Request, Response, Security, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import logfmt
from api.models.history import ACTOR
from api.settings import Settings

logger = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False,
    description="MODELS_API_KEY for requests that change something (download, delete, verify,"
    " prune); MODELS_READ_API_KEY, or a write key, for reads when a read key is set",
)


@dataclass(frozen=True)
class Keys:
    """The configured keys, as bytes (compared with ``hmac.compare_digest``), each with its name
    (``name:key`` in the setting; None for a key alone)."""

    write: tuple[tuple[str | None, bytes], ...] = ()
    read: tuple[tuple[str | None, bytes], ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> Keys:
        return cls(
            tuple((name, k.encode()) for name, k in settings.named_write_keys),
            tuple((name, k.encode()) for name, k in settings.named_read_keys),
        )

    def allows(self, token: str | None, write: bool) -> bool:
        return self.holder(token, write)[0]

    def holder(self, token: str | None, write: bool) -> tuple[bool, str | None]:
        """Whether ``token`` may do this, and who it is: the matching key's name (``key`` for a
        key without one), None when no key of this kind is set (open)."""
        kind = self.write if write else self.read
        if not kind:
            return True, None  # none of this kind set: open
        if token is None:
            return False, None
        given = token.encode("utf-8", "surrogateescape")
        matched: str | None = None
        found = False
        # A write key grants reads too. Every key, every time: the time says nothing of which
        # matched.
        for name, key in kind if write else kind + self.write:
            if hmac.compare_digest(given, key):
                found = True
                matched = name or "key"
        return found, matched


def _keys(request: Request) -> Keys:
    keys: Keys = request.app.state.keys
    return keys


def _refuse(write: bool) -> HTTPException:
    kind = "MODELS_API_KEY" if write else "MODELS_READ_API_KEY (or MODELS_API_KEY)"
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=f"this request needs an API key: send 'Authorization: Bearer <key>' with a key of"
        f" {kind}",
        headers={"WWW-Authenticate": "Bearer"},
    )


Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None, write: bool) -> None:
    token = credentials.credentials if credentials is not None else None
    allowed, who = _keys(request).holder(token, write)
    if not allowed:
        raise _refuse(write)
    # Who asked, for the history: the work this request starts inherits it (asyncio copies the
    # context into the tasks it creates).
    ACTOR.set(who)


async def require_write(request: Request, credentials: Credentials) -> None:
    """A dependency of every route that changes something or starts work."""
    _check(request, credentials, write=True)


async def require_read(request: Request, credentials: Credentials) -> None:
    """A dependency of every route that reads (status, list, space, plan, updates, downloads,
    events, metrics)."""
    _check(request, credentials, write=False)


def bearer_token(request: Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyFirstRoute(APIRoute):
    """A route whose key is checked before anything else of the request is looked at: FastAPI
    reads and parses the body before it runs the dependencies, so without this a body that is
    not JSON got a 422 before the 401 it was owed (the threat model says the key comes first).
    The dependencies stay, for the OpenAPI document's security scheme."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        calls = {dependency.call for dependency in self.dependant.dependencies}
        if require_write not in calls and require_read not in calls:
            return handler
        write = require_write in calls

        async def key_first(request: Request) -> Response:
            if not _keys(request).allows(bearer_token(request), write):
                raise _refuse(write)
            return await handler(request)

        return key_first


def warn_if_open(
    settings: Settings, argv: list[str] | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """At start-up: no write key while the server listens beyond loopback means anyone who can
    reach the port can delete every model: say so (and return True). The address is uvicorn's
    ``--host`` (or ``UVICORN_HOST``); a server started otherwise is not looked at."""
    if settings.write_keys:
        return False
    host = listening_host(sys.argv if argv is None else argv, os.environ if env is None else env)
    if host is not None and not _loopback(host):
        logfmt.log(
            logger,
            logging.WARNING,
            "open_api",
            host=host,
            why="no MODELS_API_KEY is set and the service listens beyond loopback: anyone who can"
            " reach it can download and delete models. Set MODELS_API_KEY (and"
            " MODELS_READ_API_KEY to protect reads too)",
        )
        return True
    return False


def listening_host(argv: list[str], env: Mapping[str, str]) -> str | None:
    """The address uvicorn was told to listen on, when it was run from its command line."""
    for index, arg in enumerate(argv):
        if arg == "--host" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    if argv and "uvicorn" in argv[0]:  # its script, or `python -m uvicorn`'s __main__.py
        return env.get("UVICORN_HOST", "127.0.0.1")
    return env.get("UVICORN_HOST")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: assume it is reachable
