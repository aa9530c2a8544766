"""Prometheus metrics of the service (``GET /metrics``), fed by the manager's events.

Each application has its own registry, so that several apps (tests) never share counters.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.models.service import ModelService
from api.models.types import DownloadEvent, DownloadEventType

_ENDED = {
    DownloadEventType.COMPLETED: "completed",
    DownloadEventType.FAILED: "failed",
    DownloadEventType.CANCELLED: "cancelled",
}


class ServiceMetrics:
    def __init__(self, service: ModelService) -> None:
        self.service = service  # the one in use: the manager, or the fleet (its gauges sum nodes)
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge("models_active_downloads", "Downloads running now", registry=r)
        self.queued = Gauge(
            "models_queued_downloads", "Downloads waiting for a slot now", registry=r
        )
        self.downloads = Counter(
            "models_downloads", "Downloads ended, by result", ["result"], registry=r
        )
        self.transferred = Counter(
            "models_downloaded_bytes", "Bytes fetched from the Hub by downloads", registry=r
        )
        self.evicted = Counter(
            "models_evicted_revisions", "Revisions evicted to keep the cache budget", registry=r
        )
        self.evicted_bytes = Counter(
            "models_evicted_bytes", "Bytes freed by evictions (the cache budget)", registry=r
        )
        self.retries = Counter(
            "models_download_retries", "Download attempts retried, by cause", ["cause"], registry=r
        )
        self.bandwidth = Gauge(
            "models_bandwidth_cap_bytes_per_second",
            "The cap on all downloads together (0: none)",
            registry=r,
        )
        self.cache_size = Gauge(
            "models_cache_size_bytes", "Bytes in the cache (a fleet: every node's)", registry=r
        )
        self.free = Gauge(
            "models_cache_free_bytes",
            "Free bytes on the cache's filesystem (a fleet: the sum over its nodes)",
            registry=r,
        )
        # With a fleet, the same gauges per node (registered at the first fleet figures, so that
        # one machine's metrics are unchanged); the totals above are their sums.
        self.node_gauges: dict[str, Gauge] = {}
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer HTTP requests, by route",
            ["method", "route", "status"],
            registry=r,
        )
        for result in _ENDED.values():
            self.downloads.labels(result)
        # With a fleet, the nodes' events come here too: the same counters, and per node
        # (registered with the first node's event, so that one machine's metrics are unchanged).
        self.node_downloads: Counter | None = None
        self.node_bytes: Counter | None = None
        # Per download (and node): the bytes from the Hub and from peers counted so far.
        self._seen: dict[tuple[str | None, str], tuple[int, int]] = {}

    def on_event(self, event: DownloadEvent) -> None:
        key = (event.node_id, event.task_id)
        if event.type is DownloadEventType.EVICTED:
            self.evicted.inc()
            self.evicted_bytes.inc(event.freed_bytes or 0)
            return
        if event.type is DownloadEventType.STARTED:
            self._seen[key] = (0, 0)
        progress = event.progress
        if progress is not None and progress.transferred_bytes is not None:
            hub_seen, peers_seen = self._seen.get(key, (0, 0))
            peers = progress.from_peers_bytes or 0
            hub = progress.transferred_bytes - peers
            if hub > hub_seen:
                self.transferred.inc(hub - hub_seen)
                if event.node_id is not None:
                    self._node_bytes().labels(event.node_id, "hub").inc(hub - hub_seen)
            if peers > peers_seen and event.node_id is not None:
                self._node_bytes().labels(event.node_id, "peers").inc(peers - peers_seen)
            self._seen[key] = (max(hub_seen, hub), max(peers_seen, peers))
        if event.type is DownloadEventType.RETRYING:
            self.retries.labels(event.retry_kind or "unknown").inc()
        if event.type in _ENDED:
            self.downloads.labels(_ENDED[event.type]).inc()
            if event.node_id is not None:
                self._node_downloads().labels(event.node_id, _ENDED[event.type]).inc()
            self._seen.pop(key, None)

    def _node_downloads(self) -> Counter:
        if self.node_downloads is None:
            self.node_downloads = Counter(
                "models_node_downloads",
                "Downloads ended on each node of the fleet, by result",
                ["node", "result"],
                registry=self.registry,
            )
        return self.node_downloads

    def _node_bytes(self) -> Counter:
        if self.node_bytes is None:
            self.node_bytes = Counter(
                "models_node_downloaded_bytes",
                "Bytes fetched by each node of the fleet, by source (the Hub, or other nodes)",
                ["node", "source"],
                registry=self.registry,
            )
        return self.node_bytes

    def _node_gauge(self, name: str, help_text: str) -> Gauge:
        gauge = self.node_gauges.get(name)
        if gauge is None:
            gauge = Gauge(name, help_text, ["node"], registry=self.registry)
            self.node_gauges[name] = gauge
        return gauge

    async def render(self) -> bytes:
        """The metrics text, with the gauges read now (in a fleet: from every node that answers
        within MODELS_FLEET_ANSWER_SECONDS; one that does not is counted in
        ``models_nodes_unanswered``)."""
        figures = await self.service.figures()
        total = figures.total
        self.active.set(total.running)
        self.queued.set(total.queued)
        self.bandwidth.set(total.cap or 0)
        self.cache_size.set(total.cache_bytes)
        self.free.set(total.free_bytes)
        if figures.nodes or figures.unanswered:
            per_node = (
                ("models_node_active_downloads", "Downloads running now on each node", "running"),
                ("models_node_queued_downloads", "Downloads waiting on each node", "queued"),
                ("models_node_cache_size_bytes", "Bytes in each node's cache", "cache_bytes"),
                ("models_node_cache_free_bytes", "Free bytes on each node's cache", "free_bytes"),
            )
            for name, help_text, attribute in per_node:
                gauge = self._node_gauge(name, help_text)
                gauge.clear()  # a node that left or did not answer is not shown with old figures
                for node, node_figures in figures.nodes.items():
                    gauge.labels(node).set(getattr(node_figures, attribute))
            self._node_gauge(
                "models_nodes_unanswered",
                "1 for each node that did not answer this scrape in time",
            ).clear()
            for node in figures.unanswered:
                self.node_gauges["models_nodes_unanswered"].labels(node).set(1)
        return generate_latest(self.registry)


class RequestTimer:
    """ASGI middleware: time to the response's first byte, by route template (not raw path),
    into the app's ``ServiceMetrics`` once the lifespan made it (``app.state.metrics``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics = getattr(scope["app"].state, "metrics", None)
                if metrics is not None:
                    path = _route_template(scope)
                    metrics.latency.labels(scope["method"], path, str(message["status"])).observe(
                        time.perf_counter() - started
                    )
            await send(message)

        await self.app(scope, receive, timed_send)


def _route_template(scope: Scope) -> str:
    """The matched route's path template, as OpenAPI shows it (``/api/models/status``).

    FastAPI (0.165) records the full path of a route of an included router in
    ``scope["fastapi"]["effective_route_context"]`` (``scope["route"]`` holds the path relative to
    the router's prefix); a test pins the label.
    """
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    path = getattr(context, "path", None) or getattr(scope.get("route"), "path", None)
    return str(path) if path else "unmatched"
