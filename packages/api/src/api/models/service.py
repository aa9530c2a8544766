"""``ModelService``: everything the routes, the page and the metrics ask of "the service".

Two implementations: ``ModelManager`` for one machine, ``api.fleet.fleet.Fleet`` for a Ray
cluster. The lifespan puts the one in use on ``app.state.service``; the routes call it through
one dependency and never choose. mypy checks both against this protocol (``_checked`` below, and
the fleet's module), so that an operation added here and forgotten by one of them fails the
type check, not an operator.

Every method takes and returns the API's own types: a request's ``nodes`` means something to a
fleet only (one machine refuses it, ``NotAFleet``); the per-node fields of the answers stay unset
on one machine, so that its answers are exactly the spec's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from api.models.events import EventBus
from api.models.paging import ListQuery
from api.models.types import (
    BandwidthResponse,
    BudgetResponse,
    DeleteResponse,
    DiskSpaceInfo,
    DownloadListResponse,
    DownloadStartedResponse,
    EvictRequest,
    EvictResponse,
    HistoryResponse,
    Model,
    ModelListResponse,
    ModelRequest,
    ModelStatusResponse,
    PinResponse,
    PlanResponse,
    PruneRequest,
    PruneResponse,
    ThroughputResponse,
    UpdatesResponse,
    VerifyResponse,
)


@dataclass(frozen=True)
class Figures:
    """What the metrics' gauges show, read now: downloads running and queued, the bandwidth cap
    (None: none), the cache's bytes and its filesystem's free bytes."""

    running: int
    queued: int
    cap: int | None
    cache_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ServiceFigures:
    """The service's figures (in a fleet: the sums over the nodes that answered) and, in a
    fleet, each node's (by node id; a node that did not answer is absent from ``nodes`` and
    named in ``unanswered``)."""

    total: Figures
    nodes: dict[str, Figures] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)


class ModelService(Protocol):
    @property
    def events(self) -> EventBus:
        """The download events (in a fleet: every node's, each with its ``node_id``)."""
        ...

    async def status(self, request: ModelRequest) -> ModelStatusResponse: ...

    async def download(self, request: ModelRequest) -> DownloadStartedResponse: ...

    async def plan(self, request: ModelRequest) -> PlanResponse: ...

    async def delete_model(self, model: Model, force: bool = False) -> DeleteResponse: ...

    async def verify_model(self, model: Model) -> VerifyResponse: ...

    async def listing(self, query: ListQuery | None = None) -> ModelListResponse: ...

    async def get_disk_space(self) -> DiskSpaceInfo: ...

    async def updates(
        self, refresh: bool = False, wait: float | None = None
    ) -> UpdatesResponse: ...

    async def prune(self, request: PruneRequest, force: bool = False) -> PruneResponse: ...

    async def downloads(self) -> DownloadListResponse: ...

    async def bandwidth_now(self) -> BandwidthResponse: ...

    async def cap_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse: ...

    async def figures(self) -> ServiceFigures: ...

    async def budget(self) -> BudgetResponse: ...

    async def evict(self, request: EvictRequest, dry_run: bool = False) -> EvictResponse: ...

    async def pin(self, request: ModelRequest) -> PinResponse: ...

    async def unpin(self, request: ModelRequest) -> PinResponse: ...

    async def history(self, limit: int = 100) -> HistoryResponse: ...

    async def throughput(self) -> ThroughputResponse: ...


if TYPE_CHECKING:
    from api.models.manager import ModelManager

    def _checked(manager: ModelManager) -> ModelService:
        return manager  # mypy fails here when the manager lacks an operation
