"""``Fleet``: the service's side of a fleet. It joins the Ray cluster at ``MODELS_RAY_ADDRESS``,
keeps one ``NodeAgent`` per alive node (new nodes get one within ``WATCH_SECONDS``; a node that
leaves is marked gone), fans requests out to them, and puts their answers together.

Ray is imported here only: the single-node service never loads it. Each agent answers as data
(``agent.NodeAgent.call``); a node that does not answer within ``CALL_TIMEOUT`` counts as not
answering for that request, never as a failure of the whole request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api.models.errors import ModelNotFound, NodesLackSpace, OnNode, UnknownNode
from api.models.types import (
    DeleteResponse,
    DeleteStatus,
    DiskSpaceInfo,
    DownloadProgress,
    DownloadStartedResponse,
    Model,
    ModelListItem,
    ModelRequest,
    ModelStatus,
    ModelStatusResponse,
    NodeDeleted,
    NodeSpace,
    NodeStatus,
)
from api.settings import Settings

logger = logging.getLogger(__name__)

NAMESPACE = "model-service"
CACHE_LABEL = "models-cache"  # a node's own cache folder, as a Ray node label
WATCH_SECONDS = 5.0
CALL_TIMEOUT = 60.0
# Settings that are each node's own (from its environment or its label), not the service's.
_NODE_OWN = {"cache_dir", "state_dir", "api_key", "read_api_key", "ray_address"}


@dataclass
class _Agent:
    node_id: str
    address: str
    handle: Any  # a Ray actor handle of NodeAgent
    cache_path: str = ""
    gone: bool = False


class NodeFailed(Exception):
    """A node did not answer (its agent died, the node left, or it was too slow)."""


@dataclass
class Fleet:
    settings: Settings
    agents: dict[str, _Agent] = field(default_factory=dict)
    _targets: dict[str, list[str]] = field(default_factory=dict)  # task id -> the nodes it went to
    _watcher: asyncio.Task[None] | None = None
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- membership --------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster and start an agent on every alive node."""
        import ray

        address = self.settings.ray_address
        await asyncio.to_thread(
            ray.init,
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        await self.refresh()
        self._watcher = asyncio.create_task(self._watch(), name="fleet nodes")
        logger.info("event=fleet_joined address=%s nodes=%d", address, len(self.agents))

    async def refresh(self) -> None:
        """Agents for the nodes that joined; the ones that left are marked gone."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from api.fleet.agent import NodeAgent

        async with self._refreshing:
            nodes = await asyncio.to_thread(ray.nodes)
            alive = {n["NodeID"]: n for n in nodes if n.get("Alive")}
            values = {
                name: value
                for name, value in self.settings.model_dump().items()
                if name not in _NODE_OWN
            }
            remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(NodeAgent)
            for node_id, info in alive.items():
                known = self.agents.get(node_id)
                if known is not None and not known.gone:
                    continue
                label = (info.get("Labels") or {}).get(CACHE_LABEL)
                handle: Any = remote.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
                ).remote(values, label)
                agent = _Agent(node_id, str(info.get("NodeManagerAddress", "")), handle)
                try:
                    async with asyncio.timeout(CALL_TIMEOUT):
                        started = await handle.start.remote()
                except Exception as error:
                    logger.warning("event=agent_failed node=%s reason=%s", node_id[:12], error)
                    continue
                agent.cache_path = started["cache_path"]
                self.agents[node_id] = agent
                logger.info(
                    "event=agent_started node=%s address=%s cache=%s",
                    node_id[:12],
                    agent.address,
                    agent.cache_path,
                )
            for node_id, agent in self.agents.items():
                if node_id not in alive and not agent.gone:
                    agent.gone = True
                    logger.warning("event=node_gone node=%s", node_id[:12])

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                await self.refresh()
            except Exception:  # the cluster hiccuped: try again at the next turn
                logger.exception("fleet: could not read the cluster's nodes")

    async def shutdown(self) -> None:
        """Stop every agent (their downloads stay in each node's job store), leave the cluster."""
        import ray

        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        alive = [a for a in self.agents.values() if not a.gone]
        await asyncio.gather(*(self._stop(a) for a in alive), return_exceptions=True)
        for agent in alive:
            with contextlib.suppress(Exception):
                ray.kill(agent.handle)
        await asyncio.to_thread(ray.shutdown)

    async def _stop(self, agent: _Agent) -> None:
        async with asyncio.timeout(CALL_TIMEOUT):
            await agent.handle.stop.remote()

    # -- calls -------------------------------------------------------------------------------

    def _targets_of(self, nodes: Iterable[str] | None) -> list[_Agent]:
        """The alive agents named (ids or unique prefixes), else every alive one."""
        alive = [a for a in self.agents.values() if not a.gone]
        if nodes is None:
            return alive
        chosen: list[_Agent] = []
        for asked in nodes:
            found = [a for a in alive if a.node_id.startswith(asked)]
            if len(found) != 1:
                raise UnknownNode(asked)
            if found[0] not in chosen:
                chosen.append(found[0])
        return chosen

    async def _call(self, agent: _Agent, method: str, payload: dict[str, Any]) -> Any:
        """The agent's answer; ``OnNode`` for its refusal, ``NodeFailed`` when it did not answer."""
        if agent.gone:
            raise NodeFailed("the node left the cluster")
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                answer: dict[str, Any] = await agent.handle.call.remote(method, payload)
        except TimeoutError:
            raise NodeFailed(f"no answer within {CALL_TIMEOUT:g} s") from None
        except Exception as error:  # the actor died, the node left: Ray's own errors
            raise NodeFailed(f"{type(error).__name__}") from None
        if "error" in answer:
            refusal = answer["error"]
            raise OnNode(
                agent.node_id, refusal["kind"], refusal["message"], refusal.get("retry_after")
            )
        return answer["ok"]

    async def _fan_out(
        self, agents: list[_Agent], method: str, payload: dict[str, Any]
    ) -> list[Any | BaseException]:
        return await asyncio.gather(
            *(self._call(agent, method, payload) for agent in agents), return_exceptions=True
        )

    # -- the API -----------------------------------------------------------------------------

    async def add_model(self, request: ModelRequest) -> DownloadStartedResponse:
        """Download on every targeted node, each checking its own space first: when one lacks it,
        nothing starts anywhere (507 naming those nodes)."""
        targets = self._targets_of(request.nodes)
        payload = request.model_dump(mode="json", exclude={"nodes"})
        task_id = request.as_model().task_id
        plans = await self._fan_out(targets, "plan_space", payload)
        for answer in plans:
            if isinstance(answer, OnNode):
                raise answer  # the Hub's answer (not found, gated...): the same on every node
        lacking = [
            (agent.node_id, int(answer["needed"]), int(answer["available"]))
            for agent, answer in zip(targets, plans, strict=True)
            if isinstance(answer, dict) and not answer["fits"]
        ]
        if lacking:
            raise NodesLackSpace(lacking)
        answers = await self._fan_out(targets, "download", payload)
        started = [
            (agent, answer)
            for agent, answer in zip(targets, answers, strict=True)
            if isinstance(answer, dict)
        ]
        if not started:
            first = answers[0]
            if isinstance(first, OnNode):
                raise first
            raise OnNode(targets[0].node_id, "NodeFailed", str(first))
        self._targets[task_id] = [agent.node_id for agent in targets]
        downloaded = all(a["status"] == ModelStatus.DOWNLOADED for _, a in started)
        return DownloadStartedResponse(
            task_id=task_id,
            status=ModelStatus.DOWNLOADED
            if downloaded and len(started) == len(targets)
            else ModelStatus.DOWNLOADING,
            nodes=[agent.node_id for agent, _ in started],
        )

    async def get_model_status(self, request: ModelRequest) -> ModelStatusResponse:
        """DOWNLOADED only when DOWNLOADED on every node it was downloaded to (else every alive
        node); DOWNLOADING while one downloads; PARTIAL when some have it; NOT_FOUND when none."""
        model = request.as_model()
        remembered = self._targets.get(model.task_id)
        if request.nodes is not None:
            agents = self._targets_of(request.nodes)
        elif remembered is not None:
            agents = [self.agents[n] for n in remembered if n in self.agents]
        else:
            agents = self._targets_of(None)
        payload = request.model_dump(mode="json", exclude={"nodes"})
        answers = await self._fan_out(agents, "status", payload)
        nodes: list[NodeStatus] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, dict):
                status = ModelStatusResponse.model_validate(answer)
                nodes.append(
                    NodeStatus(
                        node_id=agent.node_id,
                        address=agent.address,
                        status=status.status,
                        progress=status.progress,
                        error_message=status.error_message,
                    )
                )
            else:
                nodes.append(
                    NodeStatus(
                        node_id=agent.node_id,
                        address=agent.address,
                        status=None,
                        error_message=f"the node did not answer: {answer}",
                        gone=agent.gone,
                    )
                )
        return _together(model, nodes, answers)

    async def list_models(self) -> list[ModelListItem]:
        """Each cached revision once, with the nodes that hold it."""
        agents = self._targets_of(None)
        answers = await self._fan_out(agents, "list", {})
        merged: dict[tuple[str, str | None], ModelListItem] = {}
        for agent, answer in zip(agents, answers, strict=True):
            if not isinstance(answer, list):
                continue
            for raw in answer:
                item = ModelListItem.model_validate(raw)
                key = (item.model.hf_repo, item.model.hf_commit)
                known = merged.get(key)
                if known is None:
                    item.nodes = [agent.node_id]
                    merged[key] = item
                    continue
                known.nodes = [*(known.nodes or []), agent.node_id]
                if ModelStatus.DOWNLOADING in (known.status, item.status):
                    known.status = ModelStatus.DOWNLOADING
                elif item.status is not ModelStatus.DOWNLOADED:
                    known.status = item.status
        return list(merged.values())

    async def get_disk_space(self) -> DiskSpaceInfo:
        """Each node's cache and free space; the top figures are their sums."""
        agents = list(self.agents.values())
        answers = await self._fan_out(agents, "space", {})
        nodes = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, dict):
                space = DiskSpaceInfo.model_validate(answer)
                nodes.append(
                    NodeSpace(
                        node_id=agent.node_id,
                        address=agent.address,
                        cache_path=space.cache_path,
                        cache_size_bytes=space.cache_size_bytes,
                        available_bytes=space.available_bytes,
                    )
                )
            else:
                nodes.append(
                    NodeSpace(
                        node_id=agent.node_id,
                        address=agent.address,
                        error_message=f"the node did not answer: {answer}",
                        gone=agent.gone,
                    )
                )
        return DiskSpaceInfo(
            cache_size_bytes=sum(n.cache_size_bytes or 0 for n in nodes),
            available_bytes=sum(n.available_bytes or 0 for n in nodes),
            cache_path=", ".join(sorted({n.cache_path for n in nodes if n.cache_path})),
            nodes=nodes,
        )

    async def delete_model(self, model: Model, force: bool = False) -> DeleteResponse:
        """Cancel or delete on every alive node; 404 only when no node had anything of it."""
        agents = self._targets_of(None)
        payload = {"model": model.model_dump(mode="json"), "force": force}
        answers = await self._fan_out(agents, "delete", payload)
        nodes: list[NodeDeleted] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, dict):
                done = DeleteResponse.model_validate(answer)
                nodes.append(
                    NodeDeleted(
                        node_id=agent.node_id, status=done.status, freed_bytes=done.freed_bytes
                    )
                )
            elif isinstance(answer, OnNode) and answer.kind == ModelNotFound.__name__:
                nodes.append(NodeDeleted(node_id=agent.node_id, status=None))
            elif isinstance(answer, OnNode):
                raise answer  # in use, busy, unsafe: the node's refusal, as it said it
            else:
                nodes.append(
                    NodeDeleted(node_id=agent.node_id, status=None, error_message=str(answer))
                )
        acted = [n for n in nodes if n.status is not None]
        if not acted:
            raise ModelNotFound(model.task_id)
        cancelled = any(n.status is DeleteStatus.CANCELLED for n in acted)
        freed = sum(n.freed_bytes or 0 for n in acted)
        return DeleteResponse(
            status=DeleteStatus.CANCELLED if cancelled else DeleteStatus.DELETED,
            freed_bytes=None if cancelled and not freed else freed,
            nodes=nodes,
        )


def _together(
    model: Model, nodes: list[NodeStatus], answers: list[Any | BaseException]
) -> ModelStatusResponse:
    """The fleet's status of a model from its nodes' (``get_model_status``)."""
    statuses = [n.status for n in nodes]
    if ModelStatus.DOWNLOADING in statuses:
        status = ModelStatus.DOWNLOADING
    elif statuses and all(s is ModelStatus.DOWNLOADED for s in statuses):
        status = ModelStatus.DOWNLOADED
    elif any(s in (ModelStatus.DOWNLOADED, ModelStatus.PARTIAL) for s in statuses):
        status = ModelStatus.PARTIAL
    else:
        status = ModelStatus.NOT_FOUND
    first = next(
        (ModelStatusResponse.model_validate(a) for a in answers if isinstance(a, dict)), None
    )
    error = None
    if status is not ModelStatus.DOWNLOADED:
        have = sum(1 for s in statuses if s is ModelStatus.DOWNLOADED)
        problems = [f"node {n.node_id[:12]}: {n.error_message}" for n in nodes if n.error_message]
        if have or problems:
            error = f"downloaded on {have} of {len(nodes)} node(s)" + (
                "; " + "; ".join(problems) if problems else ""
            )
    downloading = [n.progress for n in nodes if n.progress is not None]
    progress: DownloadProgress | None = min(
        downloading, key=lambda p: p.percent if p.percent is not None else -1.0, default=None
    )
    return ModelStatusResponse(
        model=model,
        status=status,
        progress=progress,
        error_message=error,
        commit=first.commit if first is not None else None,
        selection=first.selection if first is not None else None,
        nodes=nodes,
    )
