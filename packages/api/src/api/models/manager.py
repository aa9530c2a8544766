"""``ModelManager``: the service on one machine, a facade over parts named for their jobs.

- ``Downloads`` (``downloads.py``): admission, the queue, each download's life, the bandwidth
  shares, cancel, and the downloads resumed after a restart;
- ``Views`` (``views.py``): status, list, space and updates, read offline;
- ``Housekeeping`` (``housekeeping.py``): delete, prune and verify;
- ``InUse`` (``inuse.py``): what the vLLM servers serve; ``Failures`` (``failures.py``): why the
  last downloads failed; ``Threads`` and ``Keeper`` (``threads.py``): where blocking work runs and
  how the job store is written.

``compose`` builds the parts and wires them (``app.py`` and a fleet's agent call it); no part
calls back into the manager. The manager keeps the spec's methods (``is_model_exist``,
``add_model``, ``get_model_status``, ``cancel_download``, ``delete_model``, ``list_models``,
``get_disk_space``) and the service's operations (``api.models.service.ModelService``), and runs
the start and the stop in their order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from api import logfmt
from api.models.backend import FileSelection, HubBackend, Peer
from api.models.budget import Budget, Uses
from api.models.downloads import Downloads
from api.models.errors import NoBudget, NotAFleet, NotPinned
from api.models.events import EventBus
from api.models.failures import Failures
from api.models.history import History
from api.models.housekeeping import Housekeeping
from api.models.inuse import InUse
from api.models.paging import ListQuery
from api.models.service import Figures, ServiceFigures
from api.models.serving import VllmServers
from api.models.store import JobStore
from api.models.threads import Keeper, Threads
from api.models.throughput import Throughput
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
    ModelListItem,
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
from api.models.views import Views
from api.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """Everything a manager is made of, built by ``compose``."""

    settings: Settings
    backend: HubBackend
    events: EventBus
    threads: Threads
    keeper: Keeper
    failures: Failures
    in_use: InUse
    downloads: Downloads
    views: Views
    housekeeping: Housekeeping
    uses: Uses
    budget: Budget
    history: History
    throughput: Throughput


def compose(
    settings: Settings, backend: HubBackend, servers: VllmServers | None = None
) -> ModelManager:
    """A manager of ``backend``'s cache, its parts built and wired (the composition of one
    machine's service; ``servers``: the vLLM servers, by default those of the settings)."""
    events = EventBus()  # listeners (logs, metrics) are wired by the app
    threads = Threads(settings.max_concurrent_verifications, settings.worker_nice)
    keeper = Keeper(JobStore(settings.state_path))
    failures = Failures(keeper)
    uses = Uses(keeper)
    history = History(keeper)
    events.add_listener(history.on_event)
    throughput = Throughput()
    events.add_listener(throughput.on_event)
    in_use = InUse(
        servers
        or VllmServers(settings.vllm_urls, settings.vllm_key, settings.vllm_timeout_seconds),
        backend,
        threads,
        settings.vllm_check_ttl_seconds,
        uses,
    )
    budget = Budget(settings.cache_budget_bytes, backend, threads, uses, in_use, events)
    downloads = Downloads(settings, backend, threads, keeper, failures, events, uses, budget)
    views = Views(
        backend,
        threads,
        downloads,
        failures,
        in_use,
        settings.plan_timeout_seconds,
        uses,
        settings.update_calls_per_minute,
    )
    housekeeping = Housekeeping(
        backend,
        threads,
        downloads,
        failures,
        in_use,
        settings.max_concurrent_verifications,
        settings.retry_after_seconds,
        uses,
        history,
    )
    return ModelManager(
        Parts(
            settings,
            backend,
            events,
            threads,
            keeper,
            failures,
            in_use,
            downloads,
            views,
            housekeeping,
            uses,
            budget,
            history,
            throughput,
        )
    )


class ModelManager:
    """Fetch, watch, check, list and remove models in the local Hugging Face cache."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.backend = parts.backend
        self.events = parts.events
        self.store = parts.keeper.store
        self._downloads = parts.downloads
        self._views = parts.views
        self._housekeeping = parts.housekeeping

    # -- the spec's methods --------------------------------------------------------------------

    async def is_model_exist(self, model: Model) -> bool:
        """True when every file of the revision is in the cache (offline)."""
        return await self._views.exists(model)

    async def get_model_status(
        self, model: Model, asked: FileSelection | None = None
    ) -> ModelStatusResponse:
        """The status of the revision for the files ``asked``, else for those it was downloaded
        with, else for the default selection."""
        return await self._views.status(model, asked)

    async def add_model(
        self, model: Model, asked: FileSelection | None = None, peers: tuple[Peer, ...] = ()
    ) -> DownloadStartedResponse:
        """Start downloading ``model`` in the background (``Downloads.add`` says every rule)."""
        return await self._downloads.add(model, asked, peers)

    async def cancel_download(self, model: Model) -> bool:
        """Stop a running download; False when it does not run."""
        return await self._downloads.cancel(model)

    async def delete_model(self, model: Model, force: bool = False) -> DeleteResponse:
        """Cancel the download of ``model`` if one runs, else delete it from the cache."""
        return await self._housekeeping.delete(model, force)

    async def list_models(self) -> list[ModelListItem]:
        """Every cached model revision (DOWNLOADED or PARTIAL), and every running download."""
        return await self._views.listing()

    async def get_disk_space(self) -> DiskSpaceInfo:
        return await self._views.space()

    # -- more of the same kind -----------------------------------------------------------------

    async def plan_model(self, model: Model, asked: FileSelection | None = None) -> PlanResponse:
        return await self._downloads.plan(model, asked)

    async def verify_model(self, model: Model) -> VerifyResponse:
        return await self._housekeeping.verify(model)

    async def prune(self, request: PruneRequest, force: bool = False) -> PruneResponse:
        return await self._housekeeping.prune(request, force)

    def set_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse:
        return self._downloads.set_bandwidth(bytes_per_second)

    def bandwidth(self) -> BandwidthResponse:
        return self._downloads.bandwidth()

    def active_downloads(self) -> list[ModelStatusResponse]:
        """Every running download with its progress, then the queued ones in their order."""
        return self._downloads.active()

    def counts(self) -> tuple[int, int]:
        """(downloads running, downloads queued)."""
        return self._downloads.counts()

    # -- the service's operations (``api.models.service.ModelService``) ------------------------

    async def status(self, request: ModelRequest) -> ModelStatusResponse:
        return await self.get_model_status(_one_machine(request), request.selection)

    async def download(self, request: ModelRequest) -> DownloadStartedResponse:
        return await self.add_model(_one_machine(request), request.selection)

    async def plan(self, request: ModelRequest) -> PlanResponse:
        return await self.plan_model(_one_machine(request), request.selection)

    async def listing(self, query: ListQuery | None = None) -> ModelListResponse:
        """The list, or the page of it ``query`` asks for (``paging``)."""
        return await self._views.page(query)

    async def updates(
        self, refresh: bool = False, wait: float | None = None, calls_per_minute: int | None = None
    ) -> UpdatesResponse:
        """``calls_per_minute``: this node's share of a fleet's budget of Hub calls, from now on
        (None: this machine's own setting, or the share last given)."""
        return await self._views.updates(refresh, wait, calls_per_minute)

    async def downloads(self) -> DownloadListResponse:
        return DownloadListResponse(downloads=self.active_downloads())

    async def bandwidth_now(self) -> BandwidthResponse:
        return self.bandwidth()

    async def cap_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse:
        return self.set_bandwidth(bytes_per_second)

    async def budget(self) -> BudgetResponse:
        """The cache's budget, its usage and the eviction order."""
        downloads = self._downloads
        return await self.parts.budget.view(downloads.busy_repos(), downloads.reserved())

    async def evict(self, request: EvictRequest, dry_run: bool = False) -> EvictResponse:
        """Free room down to ``target_bytes`` (default: the budget), as a download would."""
        if request.target_bytes is None and self.settings.cache_budget_bytes is None:
            raise NoBudget()
        return await self.parts.budget.evict(
            request.target_bytes, self._downloads.busy_repos(), dry_run
        )

    async def pin(self, request: ModelRequest) -> PinResponse:
        """Keep a revision (a commit, or whatever a branch or tag names) from eviction and
        prune; ``hf_commit`` omitted: ``main``."""
        model = _one_machine(request)
        await self.parts.uses.pin(model.hf_repo, model.revision)
        return await self._pin_answer(model)

    async def unpin(self, request: ModelRequest) -> PinResponse:
        model = _one_machine(request)
        if not await self.parts.uses.unpin(model.hf_repo, model.revision):
            raise NotPinned(f"{model.hf_repo} at {model.revision}")
        return await self._pin_answer(model)

    async def _pin_answer(self, model: Model) -> PinResponse:
        cached = await self.parts.threads.cache(self.backend.list_cached, model.hf_repo)
        uses = self.parts.uses
        commits = sorted(
            r.commit
            for r in cached
            if r.commit is not None and model.revision in (r.commit, *r.refs)
        )
        return PinResponse(
            model=Model(hf_repo=model.hf_repo, hf_commit=model.revision),
            pinned=uses.is_pin(model.hf_repo, model.revision),
            commits=commits,
        )

    async def history(self, limit: int = 100) -> HistoryResponse:
        """What happened to the cache, newest first: downloads' ends, deletes, prunes and
        evictions, with who asked."""
        return HistoryResponse(entries=await self.parts.history.entries(limit))

    async def throughput(self) -> ThroughputResponse:
        """Bytes off the network per second over the last minutes: the service's, each running
        download's."""
        return self.parts.throughput.snapshot()

    async def figures(self) -> ServiceFigures:
        running, queued = self.counts()
        space = await self.get_disk_space()
        cap = self.bandwidth().max_bytes_per_second
        return ServiceFigures(
            Figures(running, queued, cap, space.cache_size_bytes, space.available_bytes)
        )

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """At start-up: remove what a killed service left (temporary files whose lock is free),
        so that list and space agree from the first request; then resume the downloads that were
        running or queued when the service stopped (``MODELS_RESUME_ON_START``)."""
        removed = await self.parts.threads.cache(self.backend.remove_all_orphans)
        if removed:
            logfmt.log(logger, logging.INFO, "orphans_removed", count=removed)
        await self.backend.start()
        await self._downloads.resume()  # opens the job store first
        await self.parts.uses.load()

    async def shutdown(self) -> None:
        """Stop every running download and wait for each (no worker outlives the service)."""
        self.events.close()  # event streams end: the server can close their connections
        await self._downloads.stop()
        await self.parts.views.update_checks.aclose()
        await self.backend.aclose()
        await self.parts.in_use.aclose()
        await self.parts.keeper.close()  # after every write submitted before it
        self.parts.threads.shutdown()


def _one_machine(request: ModelRequest) -> Model:
    """``nodes`` means something only to a fleet: on one machine it is refused, not ignored."""
    if request.nodes is not None:
        raise NotAFleet()
    return request.as_model()
