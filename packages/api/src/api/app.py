"""The host application: ``create_app()`` and the module-level ``app`` served by uvicorn."""

from __future__ import annotations

import asyncio
import functools
import html
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from api import logfmt
from api.auth import Keys, require_read, warn_if_open
from api.metrics import RequestTimer, ServiceMetrics
from api.models.errors import ModelError
from api.models.events import log_event
from api.models.hub import guard
from api.models.hub.adapter import HubCacheBackend
from api.models.hub.zygote import Zygote
from api.models.manager import ModelManager, compose
from api.models.routes import model_error_handler
from api.models.routes import router as models_router
from api.models.service import ModelService
from api.models.types import REPO_JSON_PATTERN, REVISION_JSON_PATTERN
from api.perimeter import OPENAPI_RESPONSES as PERIMETER_RESPONSES
from api.perimeter import AllowedHosts, Perimeter, RedactQuery
from api.settings import Settings

API_PREFIX = "/api"
MAX_BODY_BYTES = 64 * 1024  # a Model is a few hundred bytes; anything far larger is refused (413)

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the route reads them.

    The body is read here, whole (at most ``limit`` bytes), then handed to the route: a chunked
    body has no Content-Length to check first, and an error raised while the route reads would
    reach the client as a 400 of the JSON parser instead."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: the app sees the disconnect
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body too large: at most {self.limit} bytes are accepted"},
            status_code=413,
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def _printable(value: object) -> object:
    """A location part or message as JSON can carry it: text with lone surrogates escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value if isinstance(value, int) else str(value)


def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming the field and the rule, without echoing the input: a value the client sent may
    not even be encodable (a lone surrogate, NaN, 1e999999), and it is the client's own anyway."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "type": _printable(error.get("type", "value_error")),
            "loc": [_printable(part) for part in error.get("loc", ())],
            "msg": _printable(error.get("msg", "invalid value")),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def on_stop_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` on the event loop when SIGTERM or SIGINT arrives, then let the handler
    that was there (uvicorn's) act as before. Returns the function that puts the handlers back.
    Signals can only be handled in the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:  # the default action: stop as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)

    def restore() -> None:
        for signum, before in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, before)

    return restore


def configure_logging(level: str, secrets: list[str] | None = None) -> None:
    """Every line the service writes is logfmt (``api.logfmt``): its own loggers get a handler
    (uvicorn configures only its own), uvicorn's handlers the same format. uvicorn's access log
    gets a filter that hides secrets a client put in a query string."""
    logfmt.install("api", level.upper())
    logfmt.reformat("uvicorn", "uvicorn.error", "uvicorn.access")
    access = logging.getLogger("uvicorn.access")
    for old in [f for f in access.filters if isinstance(f, RedactQuery)]:
        access.removeFilter(old)
    access.addFilter(RedactQuery(secrets or []))


WEB = Path(__file__).parent / "web"
# The page loads only its own files and talks only to this service; no other site may frame it
# (its buttons delete models).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; form-action 'none'; base-uri 'none';"
    " frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _operator_page() -> str:
    """The page, with the API's rules for a repo id and a revision put in its form (so that bad
    input is caught before it is sent, by the same patterns the API's schema publishes)."""
    page = (WEB / "index.html").read_text(encoding="utf-8")
    return page.replace("{{REPO_PATTERN}}", html.escape(REPO_JSON_PATTERN)).replace(
        "{{REVISION_PATTERN}}", html.escape(REVISION_JSON_PATTERN)
    )


SWITCH_INTERVAL_SECONDS = 0.001  # tuning: bench/scale.py, status while six lists run


def create_app(
    settings: Settings | None = None,
    manager: ModelManager | None = None,
    zygote: Zygote | None = None,
) -> FastAPI:
    """Build the application. Tests pass their own settings (or a manager with a fake backend)."""
    # The server that imports the app (uvicorn) logs its start before the lifespan runs: its
    # lines are logfmt from the first.
    logfmt.reformat("uvicorn", "uvicorn.error", "uvicorn.access")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The event loop waits for the GIL behind the threads that build and serialize a list
        # of 10,000 models: a shorter switch interval (5 ms by default) gives it its turn sooner.
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        # The composition root: the one place that picks the backend and wires the listeners.
        if manager is None:
            service_settings = settings or Settings()
            backend = HubCacheBackend(service_settings, zygote)
            model_manager = compose(service_settings, backend)
        else:
            model_manager = manager
        service = model_manager.settings
        configure_logging(
            service.log_level,
            [*service.write_keys, *service.read_keys, *([service.token] if service.token else [])],
        )
        app.state.allowed_hosts = AllowedHosts(service.allowed_hosts)
        metrics = ServiceMetrics(model_manager)
        model_manager.events.add_listener(log_event)
        model_manager.events.add_listener(metrics.on_event)
        app.state.metrics = metrics
        app.state.model_manager = model_manager
        app.state.keys = Keys.of(model_manager.settings)
        warn_if_open(model_manager.settings)
        logfmt.log(logger, logging.INFO, "cache", path=model_manager.backend.cache_path)
        await model_manager.start()
        app.state.fleet = None
        in_use: ModelService = model_manager
        if model_manager.settings.ray_address:
            from api.fleet.fleet import Fleet  # Ray is loaded for a fleet only

            # The nodes' events come on the manager's bus, with their node: one stream.
            app.state.fleet = in_use = Fleet(model_manager.settings, bus=model_manager.events)
            await app.state.fleet.start()
        # What the routes, the page and the metrics act on: never chosen again.
        app.state.service = metrics.service = in_use
        # The server waits for open responses before it runs the shutdown below, and an event
        # stream never ends by itself: end the streams on the stop signal itself.
        restore = on_stop_signal(model_manager.events.close)
        try:
            yield
        finally:
            restore()
            if app.state.fleet is not None:
                await app.state.fleet.shutdown()
            await model_manager.shutdown()

    app = FastAPI(
        title="vLLM API server",
        description="Model management: fetch, watch, check, list and remove Hugging Face models"
        " in the local cache.",
        version="0.1.0",
        lifespan=lifespan,
        responses=PERIMETER_RESPONSES,
        # Swagger UI is served from the package (below), never from a CDN: GPU servers are
        # often air-gapped. ReDoc has no packaged copy here: off.
        docs_url=None,
        redoc_url=None,
    )
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
    # The operator's page (`/`): its assets are in the package, never from a CDN.
    app.mount("/ui", StaticFiles(directory=WEB), name="ui")

    @app.get("/", include_in_schema=False)
    async def operator_page() -> HTMLResponse:
        return HTMLResponse(_operator_page(), headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    app.add_middleware(BodySizeLimit)
    app.add_middleware(RequestTimer)
    # Outermost: a request from a foreign site, or under a name the service is not reached by,
    # is refused before anything reads its body or runs a route.
    app.add_middleware(Perimeter, on_origin=guard.note_own_origin)
    app.add_exception_handler(ModelError, model_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logfmt.log(
            logger,
            logging.ERROR,
            "unhandled_error",
            exc_info=True,
            method=request.method,
            path=request.url.path,
        )
        return JSONResponse({"detail": "internal error; see the service log"}, status_code=500)

    @app.get(f"{API_PREFIX}/health", tags=["Health"])
    async def health() -> dict[str, str]:
        """Liveness, and the service's version: `{"status": "ok", "version": "0.1.0"}`."""
        return {"status": "ok", "version": app.version}

    @app.get(
        "/metrics",
        tags=["Health"],
        dependencies=[Depends(require_read)],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: active downloads, downloads by result, bytes downloaded, retries
        by cause, cache size, free space, request latency by route."""
        service_metrics: ServiceMetrics = request.app.state.metrics
        return Response(await service_metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(models_router, prefix=API_PREFIX)
    return app


app = create_app()
