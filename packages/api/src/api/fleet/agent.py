"""``NodeAgent``: the single-node service's manager on one node of the fleet, as a Ray actor.

It is created by ``Fleet`` pinned to its node (a hard node-affinity strategy), with the service's
settings less the node's own (the cache folder, from the node's environment or its Ray label
``models-cache``; the state folder beside it). Every request crosses as JSON-ready data, and every
``ModelError`` comes back as data (``{"error": {...}}``): an exception with its own constructor
would not survive Ray's pickling intact, and the service must answer with the right status.

Each agent also serves its node's complete blobs to the other nodes (``PeerServer``, on the node's
address in the cluster, answering only the fleet's secret), so that a model crosses the uplink
once per fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Any

from api.models.backend import Peer
from api.models.errors import HubAnswer, ModelError
from api.models.hub.adapter import HubCacheBackend
from api.models.hub.cache import ModelCache
from api.models.hub.peers import PeerServer
from api.models.manager import ModelManager
from api.models.types import DownloadEvent, Model, ModelRequest, PruneRequest
from api.settings import Settings

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
        self.peers = PeerServer(ModelCache(self.settings.cache_dir), peer_token, host)
        # What each download fetched, from the Hub and from peers (its last event's figures):
        # still known once it ended, when its status no longer has a progress.
        self.fetched: dict[str, dict[str, int]] = {}

    async def start(self) -> dict[str, str]:
        """Start the manager (it resumes what this node's job store kept) and the blob server;
        say where the cache is and where its blobs are served."""
        await self._manager()
        if not self.peers.url:
            await self.peers.start()
        return {"cache_path": str(self.settings.cache_dir), "peer_url": self.peers.url}

    async def _manager(self) -> ModelManager:
        if self.manager is None:
            self.manager = ModelManager(self.settings, HubCacheBackend(self.settings))
            self.manager.events.add_listener(self._remember)
            await self.manager.start()
        return self.manager

    def _remember(self, event: DownloadEvent) -> None:
        if event.progress is not None and event.progress.transferred_bytes is not None:
            peers = event.progress.from_peers_bytes or 0
            self.fetched[event.task_id] = {
                "hub": event.progress.transferred_bytes - peers,
                "peers": peers,
            }

    async def _events(
        self, manager: ModelManager, after: int | None, wait: float
    ) -> list[dict[str, Any]]:
        """The events after ``after`` (a ``seq`` of this agent's), or, when there are none yet,
        those that come within ``wait`` seconds."""
        with manager.events.subscribe(after) as queue:
            if queue.empty():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        first = await manager.events.next(queue)
                        if first is not None:
                            queue.put_nowait(first)
            found = []
            while not queue.empty():
                found.append(queue.get_nowait().model_dump(mode="json"))
            return found

    async def stop(self) -> None:
        await self.peers.stop()
        if self.manager is not None:
            await self.manager.shutdown()
            self.manager = None

    async def call(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        """``{"ok": answer}``, or ``{"error": {"kind", "message", "retry_after"}}``."""
        manager = await self._manager()
        try:
            return {"ok": await self._answer(manager, method, payload)}
        except ModelError as error:
            retry_after = getattr(error, "retry_after", None)
            failure = error.kind.value if isinstance(error, HubAnswer) else None
            return {
                "error": {
                    "kind": type(error).__name__,
                    "message": str(error),
                    "retry_after": retry_after if isinstance(retry_after, (int, float)) else None,
                    "failure": failure,
                }
            }

    async def _answer(self, manager: ModelManager, method: str, payload: dict[str, Any]) -> Any:
        if method == "download":
            request = ModelRequest.model_validate(payload["request"])
            peers = tuple(Peer(str(p["url"]), str(p["token"])) for p in payload["peers"])
            model = request.as_model()
            self.fetched.pop(model.task_id, None)
            started = await manager.add_model(model, request.selection, peers)
            return started.model_dump(mode="json")
        if method == "events":
            return await self._events(manager, payload.get("after"), float(payload["wait"]))
        if method == "plan":
            request = ModelRequest.model_validate(payload)
            planned = await manager.plan_model(request.as_model(), request.selection)
            return planned.model_dump(mode="json")
        if method == "verify":
            verified = await manager.verify_model(Model.model_validate(payload))
            return verified.model_dump(mode="json")
        if method == "prune":
            asked = PruneRequest.model_validate(payload["request"])
            pruned = await manager.prune(asked, force=bool(payload.get("force")))
            return pruned.model_dump(mode="json")
        if method == "plan_space":
            request = ModelRequest.model_validate(payload)
            plan = await manager.plan_model(request.as_model(), request.selection)
            return {
                "fits": plan.fits,
                "needed": plan.missing_bytes,
                "available": plan.available_bytes,
            }
        if method == "status":
            request = ModelRequest.model_validate(payload)
            model = request.as_model()
            answer = await manager.get_model_status(model, request.selection)
            return {
                **answer.model_dump(mode="json"),
                "fetched": self.fetched.get(model.task_id),
            }
        if method == "list":
            return [item.model_dump(mode="json") for item in await manager.list_models()]
        if method == "space":
            return (await manager.get_disk_space()).model_dump(mode="json")
        if method == "delete":
            model = Model.model_validate(payload["model"])
            deleted = await manager.delete_model(model, force=bool(payload.get("force")))
            return deleted.model_dump(mode="json")
        raise ValueError(f"no such method: {method}")
