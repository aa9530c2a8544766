"""``NodeAgent``: the single-node service's manager on one node of the fleet, as a Ray actor.

It is created by ``Fleet`` pinned to its node (a hard node-affinity strategy), with the service's
settings less the node's own (the cache folder, from the node's environment or its Ray label
``models-cache``; the state folder beside it). It has one method per operation of the service
(``api.models.service.ModelService``), each taking and returning the API's own types; a
``ModelError`` the node's manager raises comes back as a value, ``Refusal`` (the error itself,
which pickles intact), so that the service answers with that error's status and words, and a
refusal costs no traceback.

Each agent also serves its node's blobs, complete or still arriving, to the other nodes
(``PeerServer``, on the node's address in the cluster, answering only the fleet's secret), so that
a model crosses the uplink once per fleet and a rollout is a pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from api.models.backend import Peer
from api.models.errors import ModelError
from api.models.hub.adapter import HubCacheBackend
from api.models.hub.cache import ModelCache
from api.models.hub.peers import PeerServer
from api.models.manager import ModelManager, compose
from api.models.paging import ListQuery
from api.models.service import ServiceFigures
from api.models.types import (
    BandwidthResponse,
    BudgetResponse,
    DeleteResponse,
    DiskSpaceInfo,
    DownloadEvent,
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
from api.settings import Settings

_T = TypeVar("_T")

# How often an agent looks whether its raylet is still its parent.
NODE_WATCH_SECONDS = 0.5


def die_with_the_node() -> None:
    """Exit the agent's process as soon as its parent (the node's raylet, which started it) is
    gone: a node killed or cut off must not keep downloading into its cache for a cluster that no
    longer knows it (a raylet killed with kill -9 left its agent and worker writing blobs 45 s
    later). The agent's zygote and download workers die with the agent (PR_SET_PDEATHSIG)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(NODE_WATCH_SECONDS)
        os._exit(3)

    threading.Thread(target=watch, name="node watch", daemon=True).start()


@dataclass(frozen=True)
class Refusal:
    """The node's service refused: the ``ModelError`` it raised, as it raised it."""

    error: ModelError


async def refusing(work: Awaitable[_T]) -> _T | Refusal:
    try:
        return await work
    except ModelError as error:
        return Refusal(error)


@dataclass(frozen=True)
class NodeModelStatus:
    """A model's status on the node, and what its last download fetched from the Hub and from
    peers (still known once it ended, when the status no longer has a progress)."""

    status: ModelStatusResponse
    from_hub_bytes: int | None
    from_peers_bytes: int | None


class NodeAgent:
    def __init__(
        self, settings: dict[str, Any], cache_dir: str | None, peer_token: str, host: str
    ) -> None:
        die_with_the_node()
        values = dict(settings)
        if cache_dir:
            values["cache_dir"] = cache_dir
            # The actor's process is the agent's own: everything in it (and the download workers
            # it forks, which inherit it) names the node's cache, as the node's environment would.
            os.environ["HF_HUB_CACHE"] = cache_dir
        self.settings = Settings(**values)
        self.manager: ModelManager | None = None
        self.peers = PeerServer(
            ModelCache(self.settings.cache_dir),
            peer_token,
            host,
            self.settings.peer_uplink_bytes_per_second or None,
            self._fetching,
        )
        # What each download fetched, from the Hub and from peers (its last event's figures).
        self.fetched: dict[str, tuple[int, int]] = {}

    def _fetching(self, repo_id: str) -> bool:
        """Whether this node downloads (or is about to download) something of ``repo_id``: its
        blob server then waits for a blob another node asks for that is not here yet."""
        manager = self.manager
        return manager is not None and any(
            s.model.hf_repo == repo_id for s in manager.active_downloads()
        )

    async def start(self, bandwidth: int | None = None) -> dict[str, str]:
        """Start the manager (it resumes what this node's job store kept) with the fleet's
        bandwidth cap now, and the blob server; say where the cache and the blobs are."""
        manager = await self._manager()
        if manager.bandwidth().max_bytes_per_second != bandwidth:
            manager.set_bandwidth(bandwidth)
        if not self.peers.url:
            await self.peers.start()
        return {"cache_path": str(self.settings.cache_dir), "peer_url": self.peers.url}

    async def _manager(self) -> ModelManager:
        if self.manager is None:
            self.manager = compose(self.settings, HubCacheBackend(self.settings))
            self.manager.events.add_listener(self._remember)
            await self.manager.start()
        return self.manager

    def _remember(self, event: DownloadEvent) -> None:
        if event.progress is not None and event.progress.transferred_bytes is not None:
            peers = event.progress.from_peers_bytes or 0
            self.fetched[event.task_id] = (event.progress.transferred_bytes - peers, peers)

    async def stop(self) -> None:
        await self.peers.stop()
        if self.manager is not None:
            await self.manager.shutdown()
            self.manager = None

    # -- one method per operation ------------------------------------------------------------

    async def events(self, after: int | None, wait: float) -> list[DownloadEvent]:
        """The events after ``after`` (a ``seq`` of this agent's), or, when there are none yet,
        those that come within ``wait`` seconds."""
        bus = (await self._manager()).events
        with bus.subscribe(after) as queue:
            if queue.empty():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        first = await bus.next(queue)
                        if first is not None:
                            queue.put_nowait(first)
            found = []
            while not queue.empty():
                found.append(queue.get_nowait())
            return found

    async def download(
        self, request: ModelRequest, peers: tuple[Peer, ...]
    ) -> DownloadStartedResponse | Refusal:
        manager = await self._manager()
        model = request.as_model()
        self.fetched.pop(model.task_id, None)
        return await refusing(manager.add_model(model, request.selection, peers))

    async def plan(self, request: ModelRequest) -> PlanResponse | Refusal:
        return await refusing((await self._manager()).plan(request))

    async def status(self, request: ModelRequest) -> NodeModelStatus | Refusal:
        answer = await refusing((await self._manager()).status(request))
        if isinstance(answer, Refusal):
            return answer
        hub, peers = self.fetched.get(answer.model.task_id, (None, None))
        return NodeModelStatus(answer, hub, peers)

    async def verify_model(self, model: Model) -> VerifyResponse | Refusal:
        return await refusing((await self._manager()).verify_model(model))

    async def delete_model(self, model: Model, force: bool) -> DeleteResponse | Refusal:
        return await refusing((await self._manager()).delete_model(model, force))

    async def prune(self, request: PruneRequest, force: bool) -> PruneResponse | Refusal:
        return await refusing((await self._manager()).prune(request, force))

    async def listing(self, query: ListQuery | None = None) -> ModelListResponse:
        return await (await self._manager()).listing(query)

    async def history(self, limit: int) -> HistoryResponse:
        return await (await self._manager()).history(limit)

    async def throughput(self) -> ThroughputResponse:
        return await (await self._manager()).throughput()

    async def budget(self) -> BudgetResponse:
        return await (await self._manager()).budget()

    async def evict(self, request: EvictRequest, dry_run: bool) -> EvictResponse | Refusal:
        return await refusing((await self._manager()).evict(request, dry_run))

    async def pin(self, request: ModelRequest) -> PinResponse | Refusal:
        return await refusing((await self._manager()).pin(request))

    async def unpin(self, request: ModelRequest) -> PinResponse | Refusal:
        return await refusing((await self._manager()).unpin(request))

    async def get_disk_space(self) -> DiskSpaceInfo:
        return await (await self._manager()).get_disk_space()

    async def updates(
        self, refresh: bool, wait: float | None, calls_per_minute: int | None = None
    ) -> UpdatesResponse:
        return await (await self._manager()).updates(refresh, wait, calls_per_minute)

    async def downloads(self) -> DownloadListResponse:
        return await (await self._manager()).downloads()

    async def bandwidth_now(self) -> BandwidthResponse:
        return await (await self._manager()).bandwidth_now()

    async def cap_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse:
        return await (await self._manager()).cap_bandwidth(bytes_per_second)

    async def figures(self) -> ServiceFigures:
        return await (await self._manager()).figures()
