"""The host application: ``create_app()`` and the module-level ``app`` served by uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import RequestTimer, ServiceMetrics
from api.models.errors import ModelError
from api.models.manager import ModelManager
from api.models.routes import model_error_handler
from api.models.routes import router as models_router
from api.settings import Settings

API_PREFIX = "/api"
MAX_BODY_BYTES = 64 * 1024  # a Model is a few hundred bytes; anything far larger is refused (413)

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the route reads them."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body too large: at most {self.limit} bytes are accepted"},
            status_code=413,
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _BodyTooLarge(Exception):
    pass


def configure_logging(level: str) -> None:
    """Give the service's own loggers a handler (uvicorn configures only its own): one line per
    record on stderr, the message itself structured (``key=value``) where it reports a state."""
    log = logging.getLogger("api")
    if not any(getattr(h, "_api_handler", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._api_handler = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level.upper())


def create_app(settings: Settings | None = None, manager: ModelManager | None = None) -> FastAPI:
    """Build the application. Tests pass their own settings (or a manager with a fake backend)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_manager = manager or ModelManager(settings or Settings())
        configure_logging(model_manager.settings.log_level)
        app.state.model_manager = model_manager
        app.state.metrics = ServiceMetrics(model_manager)
        logger.info("model cache at %s", model_manager.backend.cache_path)
        try:
            yield
        finally:
            await model_manager.shutdown()

    app = FastAPI(
        title="vLLM API server",
        description="Model management: fetch, watch, check, list and remove Hugging Face models"
        " in the local cache.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit)
    app.add_middleware(RequestTimer)
    app.add_exception_handler(ModelError, model_error_handler)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the service log"}, status_code=500)

    @app.get(f"{API_PREFIX}/health", tags=["Health"])
    async def health() -> dict[str, str]:
        """Liveness: `{"status": "ok"}`."""
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["Health"],
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
