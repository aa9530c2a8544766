"""``NodeAgent``: the single-node service's manager on one node of the fleet, as a Ray actor.

It is created by ``Fleet`` pinned to its node (a hard node-affinity strategy), with the service's
settings less the node's own (the cache folder, from the node's environment or its Ray label
``models-cache``; the state folder beside it). Every request crosses as JSON-ready data, and every
``ModelError`` comes back as data (``{"error": {...}}``): an exception with its own constructor
would not survive Ray's pickling intact, and the service must answer with the right status.
"""

from __future__ import annotations

import os
from typing import Any

from api.models.errors import ModelError
from api.models.hub.adapter import HubCacheBackend
from api.models.manager import ModelManager
from api.models.types import Model, ModelRequest
from api.settings import Settings


class NodeAgent:
    def __init__(self, settings: dict[str, Any], cache_dir: str | None) -> None:
        values = dict(settings)
        if cache_dir:
            values["cache_dir"] = cache_dir
            # The actor's process is the agent's own: everything in it (and the download workers
            # it forks, which inherit it) names the node's cache, as the node's environment would.
            os.environ["HF_HUB_CACHE"] = cache_dir
        self.settings = Settings(**values)
        self.manager: ModelManager | None = None

    async def start(self) -> dict[str, str]:
        """Start the manager (it resumes what this node's job store kept); say where the cache is."""
        if self.manager is None:
            self.manager = ModelManager(self.settings, HubCacheBackend(self.settings))
            await self.manager.start()
        return {"cache_path": str(self.settings.cache_dir)}

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.shutdown()
            self.manager = None

    async def call(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        """``{"ok": answer}``, or ``{"error": {"kind", "message", "retry_after"}}``."""
        manager = self.manager
        if manager is None:
            manager = self.manager = ModelManager(self.settings, HubCacheBackend(self.settings))
            await manager.start()
        try:
            return {"ok": await self._answer(manager, method, payload)}
        except ModelError as error:
            retry_after = getattr(error, "retry_after", None)
            return {
                "error": {
                    "kind": type(error).__name__,
                    "message": str(error),
                    "retry_after": retry_after if isinstance(retry_after, int) else None,
                }
            }

    async def _answer(self, manager: ModelManager, method: str, payload: dict[str, Any]) -> Any:
        if method == "download":
            request = ModelRequest.model_validate(payload)
            started = await manager.add_model(request.as_model(), request.selection)
            return started.model_dump(mode="json")
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
            answer = await manager.get_model_status(request.as_model(), request.selection)
            return answer.model_dump(mode="json")
        if method == "list":
            return [item.model_dump(mode="json") for item in await manager.list_models()]
        if method == "space":
            return (await manager.get_disk_space()).model_dump(mode="json")
        if method == "delete":
            model = Model.model_validate(payload["model"])
            deleted = await manager.delete_model(model, force=bool(payload.get("force")))
            return deleted.model_dump(mode="json")
        raise ValueError(f"no such method: {method}")
