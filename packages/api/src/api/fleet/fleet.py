"""``Fleet``: the service's side of a fleet. It joins the Ray cluster at ``MODELS_RAY_ADDRESS``,
keeps one ``NodeAgent`` per alive node (new nodes get one within ``WATCH_SECONDS``; a node that
leaves is marked gone), fans requests out to them, and puts their answers together.

Ray is imported here only: the single-node service never loads it. Each agent answers as data
(``agent.NodeAgent.call``); a node that does not answer in time counts as not answering for that
request, never as a failure of the whole request. A read (status, list, space, plan) waits
``MODELS_FLEET_ANSWER_SECONDS`` for each node: one that has not answered by then (its agent
frozen, its machine overloaded, its network gone) is reported ``unreachable``, with the reason,
and the answer comes on time without it. Work that takes its time on a node (a download's start,
a verification, a delete, a prune) waits up to ``CALL_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api.models.errors import (
    DownloadConflict,
    HubAnswer,
    ModelNotFound,
    NodesLackSpace,
    OnNode,
    UnknownNode,
)
from api.models.events import EventBus
from api.models.types import (
    DeleteResponse,
    DeleteStatus,
    DiskSpaceInfo,
    DownloadEvent,
    DownloadProgress,
    DownloadStartedResponse,
    KeptRevision,
    Model,
    ModelListItem,
    ModelListResponse,
    ModelRequest,
    ModelStatus,
    ModelStatusResponse,
    NodeDeleted,
    NodePlan,
    NodeSpace,
    NodeStatus,
    NodeUnanswered,
    NodeVerified,
    PlanResponse,
    PrunedRevision,
    PruneRequest,
    PruneResponse,
    VerifyResponse,
)
from api.settings import Settings

logger = logging.getLogger(__name__)

NAMESPACE = "model-service"
CACHE_LABEL = "models-cache"  # a node's own cache folder, as a Ray node label
WATCH_SECONDS = 5.0
CALL_TIMEOUT = 60.0
FOLLOW_SECONDS = 0.5  # how often a rollout reads the status of the node it waits for
EVENTS_WAIT = 10.0  # each call for a node's events waits this long for one
# Settings that are each node's own (from its environment or its label), not the service's.
_NODE_OWN = {"cache_dir", "state_dir", "api_key", "read_api_key", "ray_address"}


@dataclass
class _Agent:
    node_id: str
    address: str
    handle: Any  # a Ray actor handle of NodeAgent
    cache_path: str = ""
    peer_url: str = ""  # where its blob server answers the other nodes
    gone: bool = False


@dataclass
class _Rollout:
    """One download to several nodes, the Hub paid once: the first node (``seed``) fetches from
    the Hub; the others wait (``waiting``), then copy from the nodes that have it."""

    request: ModelRequest
    targets: list[str]
    waiting: list[str] = field(default_factory=list)
    seed: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # node -> why it did not start
    task: asyncio.Task[None] | None = None


class NodeFailed(Exception):
    """A node did not answer (its agent died, the node left, or it was too slow)."""


class NodeUnreachable(NodeFailed):
    """A node did not answer within the time a request waits for it (it may still be alive)."""


@dataclass
class Fleet:
    settings: Settings
    # The service's own event bus: the nodes' events are published on it, with their node, so
    # that the event stream, the logs and the metrics have them.
    bus: EventBus | None = None
    agents: dict[str, _Agent] = field(default_factory=dict)
    _pumps: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _rollouts: dict[str, _Rollout] = field(default_factory=dict)  # by task id
    _watcher: asyncio.Task[None] | None = None
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The nodes' blob servers answer this secret only (the fleet's own, never the Hub's token).
    _peer_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    # -- membership --------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster and start an agent on every alive node."""
        ray = _ray()
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
            running = [a for n, a in self.agents.items() if n in alive and not a.gone]
            await asyncio.gather(*(self._restart_if_needed(a) for a in running))
            new: list[_Agent] = []
            for node_id, info in alive.items():
                known = self.agents.get(node_id)
                if known is not None and not known.gone:
                    continue
                label = (info.get("Labels") or {}).get(CACHE_LABEL)
                address = str(info.get("NodeManagerAddress", ""))
                handle: Any = remote.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
                ).remote(values, label, self._peer_token, address)
                new.append(_Agent(node_id, address, handle))
            # Started together: a hundred nodes that join take one start's time, not a hundred.
            started = await asyncio.gather(*(self._first_start(a) for a in new))
            for agent, ok in zip(new, started, strict=True):
                if not ok:
                    continue
                self.agents[agent.node_id] = agent
                if self.bus is not None:
                    self._pumps[agent.node_id] = asyncio.create_task(
                        self._pump(agent, self.bus), name=f"events of {agent.node_id[:12]}"
                    )
                logger.info(
                    "event=agent_started node=%s address=%s cache=%s",
                    agent.node_id[:12],
                    agent.address,
                    agent.cache_path,
                )
            for node_id, agent in self.agents.items():
                if node_id not in alive and not agent.gone:
                    agent.gone = True
                    logger.warning("event=node_gone node=%s", node_id[:12])

    async def _started(self, agent: _Agent, event: str) -> dict[str, str] | None:
        """The agent's ``start`` answer (where its cache and blob server are), or None when it
        did not answer (logged as ``event``)."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                started: dict[str, str] = await agent.handle.start.remote()
        except Exception as error:
            logger.warning("event=%s node=%s reason=%s", event, agent.node_id[:12], error)
            return None
        return started

    async def _first_start(self, agent: _Agent) -> bool:
        """Whether the new agent started; one that did not is killed (the next watch makes
        another), so that a node never has two agents on its cache."""
        started = await self._started(agent, "agent_failed")
        if started is None:
            with contextlib.suppress(Exception):
                _ray().kill(agent.handle, no_restart=True)
            return False
        agent.cache_path = started["cache_path"]
        agent.peer_url = started["peer_url"]
        return True

    async def _restart_if_needed(self, agent: _Agent) -> None:
        """An agent Ray restarted (its process died) has neither its manager nor its blob server:
        ``start`` brings both back (the manager resumes the node's downloads from its job store);
        on a running agent it only says where they are."""
        # No answer: it is being restarted, or its node is leaving.
        started = await self._started(agent, "agent_unanswered")
        if started is not None and started["peer_url"] != agent.peer_url:
            logger.warning("event=agent_restarted node=%s", agent.node_id[:12])
            agent.peer_url = started["peer_url"]

    async def _pump(self, agent: _Agent, bus: EventBus) -> None:
        """The node's events, on the service's bus, until the node leaves."""
        after: int | None = None
        while not agent.gone:
            try:
                events = await self._call(agent, "events", {"after": after, "wait": EVENTS_WAIT})
            except (NodeFailed, OnNode):
                await asyncio.sleep(1.0)  # its agent is being restarted, or the node is leaving
                continue
            for raw in events:
                event = DownloadEvent.model_validate(raw)
                after = event.seq
                bus.publish(event.model_copy(update={"node_id": agent.node_id, "seq": None}))

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
        for rollout in self._rollouts.values():
            await _cancel(rollout)
        for pump in self._pumps.values():
            pump.cancel()
        await asyncio.gather(*self._pumps.values(), return_exceptions=True)
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

    async def _call(
        self, agent: _Agent, method: str, payload: dict[str, Any], wait: float | None = None
    ) -> Any:
        """The agent's answer; ``OnNode`` for its refusal, ``NodeFailed`` when it did not answer
        (``NodeUnreachable`` when not within ``wait`` seconds, by default ``CALL_TIMEOUT``)."""
        if agent.gone:
            raise NodeFailed("the node left the cluster")
        limit = CALL_TIMEOUT if wait is None else wait
        try:
            async with asyncio.timeout(limit):
                answer: dict[str, Any] = await agent.handle.call.remote(method, payload)
        except TimeoutError:
            setting = " (MODELS_FLEET_ANSWER_SECONDS)" if wait is not None else ""
            raise NodeUnreachable(f"no answer within {limit:g} s{setting}: unreachable") from None
        except Exception as error:  # the actor died, the node left: Ray's own errors
            raise NodeFailed(f"{type(error).__name__}") from None
        if "error" in answer:
            refusal = answer["error"]
            raise OnNode(
                agent.node_id,
                refusal["kind"],
                refusal["message"],
                refusal.get("retry_after"),
                refusal.get("failure"),
            )
        return answer["ok"]

    async def _fan_out(
        self, agents: list[_Agent], method: str, payload: dict[str, Any], read: bool = False
    ) -> list[Any | BaseException]:
        """Every agent's answer (or why it gave none), each called at once. A ``read`` waits
        ``MODELS_FLEET_ANSWER_SECONDS`` for each node, whatever the others do."""
        wait = self.settings.fleet_answer_seconds if read else None
        return await asyncio.gather(
            *(self._call(agent, method, payload, wait) for agent in agents),
            return_exceptions=True,
        )

    # -- the API -----------------------------------------------------------------------------

    async def add_model(self, request: ModelRequest) -> DownloadStartedResponse:
        """Download on every targeted node, each checking its own space first: when one lacks it,
        nothing starts anywhere (507 naming those nodes). The Hub is paid once: nodes that
        already have the revision serve it to the others; when none has it, one node fetches it
        from the Hub and the others copy it from that node once it is complete."""
        targets = self._targets_of(request.nodes)
        payload = request.model_dump(mode="json", exclude={"nodes"})
        task_id = request.as_model().task_id
        if (running := self._rollouts.get(task_id)) is not None and running.waiting:
            raise DownloadConflict(task_id)
        plans = await self._fan_out(targets, "plan_space", payload, read=True)
        for answer in plans:
            if isinstance(answer, OnNode) and answer.kind != HubAnswer.__name__:
                raise answer
        # A Hub that gives no file list (not found, gated, slow) is no reason to refuse here: as
        # on one machine, the download starts and its status says why it failed (on the first
        # node only: the others wait for it, and say why they did not start).
        lacking = [
            (agent.node_id, int(answer["needed"]), int(answer["available"]))
            for agent, answer in zip(targets, plans, strict=True)
            if isinstance(answer, dict) and not answer["fits"]
        ]
        if lacking:
            raise NodesLackSpace(lacking)
        answering = [
            a
            for a, p in zip(targets, plans, strict=True)
            if isinstance(p, dict) or (isinstance(p, OnNode) and p.kind == HubAnswer.__name__)
        ]
        if not answering:
            raise OnNode(targets[0].node_id, "NodeFailed", str(plans[0]))
        holders = await self._holders(payload)
        todo = [a for a in answering if a.node_id not in holders]
        if not todo:
            return DownloadStartedResponse(
                task_id=task_id,
                status=ModelStatus.DOWNLOADED,
                nodes=[a.node_id for a in answering],
            )
        rollout = _Rollout(request, [a.node_id for a in answering])
        refusals: list[BaseException] = []
        if holders:
            started, refusals = await self._start(rollout, todo, holders)
        else:
            # The first node that starts fetches from the Hub; the others wait for its copy.
            started = []
            for index, agent in enumerate(todo):
                seed, refused = await self._start(rollout, [agent], [])
                refusals += refused
                if seed:
                    started, rollout.waiting = seed, [a.node_id for a in todo[index + 1 :]]
                    break
        if not started:
            # Every node refused: the first refusal as it was said (a 409, a 422, a 429), or,
            # when none answered, 503.
            refusal = next(iter(refusals), None)
            if isinstance(refusal, OnNode):
                raise refusal
            raise OnNode(targets[0].node_id, "NodeFailed", str(refusal or "no node answered"))
        if rollout.waiting:
            rollout.seed = started[0].node_id
            rollout.task = asyncio.create_task(self._follow(rollout), name=f"rollout {task_id}")
        previous = self._rollouts.get(task_id)
        if previous is not None:
            await _cancel(previous)
        self._rollouts[task_id] = rollout
        return DownloadStartedResponse(
            task_id=task_id, status=ModelStatus.DOWNLOADING, nodes=rollout.targets
        )

    async def _holders(self, payload: dict[str, Any]) -> list[str]:
        """The alive nodes where the revision is DOWNLOADED (complete and verified)."""
        agents = self._targets_of(None)
        answers = await self._fan_out(agents, "status", payload, read=True)
        return [
            agent.node_id
            for agent, answer in zip(agents, answers, strict=True)
            if isinstance(answer, dict) and answer["status"] == ModelStatus.DOWNLOADED
        ]

    def _peers_for(self, agent: _Agent, holders: list[str], index: int) -> list[dict[str, str]]:
        """The holders' blob servers, in an order that spreads the copies over them."""
        urls = [
            self.agents[n].peer_url
            for n in holders
            if n in self.agents and n != agent.node_id and self.agents[n].peer_url
        ]
        if urls:
            turn = index % len(urls)
            urls = urls[turn:] + urls[:turn]
        return [{"url": url, "token": self._peer_token} for url in urls]

    async def _start(
        self, rollout: _Rollout, agents: list[_Agent], holders: list[str]
    ) -> tuple[list[_Agent], list[BaseException]]:
        """Start the download on ``agents`` (copying from ``holders``); those that started, and
        the others' refusals. A node that refuses (a download already running there, no slot)
        says why in its status."""
        payload = rollout.request.model_dump(mode="json", exclude={"nodes"})
        answers = await asyncio.gather(
            *(
                self._call(
                    agent,
                    "download",
                    {"request": payload, "peers": self._peers_for(agent, holders, index)},
                )
                for index, agent in enumerate(agents)
            ),
            return_exceptions=True,
        )
        started: list[_Agent] = []
        refusals: list[BaseException] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, BaseException):
                rollout.refused[agent.node_id] = str(answer)
                refusals.append(answer)
                logger.warning(
                    "event=node_refused node=%s task_id=%s reason=%s",
                    agent.node_id[:12],
                    rollout.request.as_model().task_id,
                    answer,
                )
            else:
                started.append(agent)
        return started, refusals

    async def _follow(self, rollout: _Rollout) -> None:
        """Wait for the seed's copy, then start the waiting nodes from it. A seed that leaves or
        fails hands over to the next waiting node (from the Hub again, resuming nothing of the
        other's); a failure of the Hub's is every node's: the waiting ones say so."""
        payload = rollout.request.model_dump(mode="json", exclude={"nodes"})
        while rollout.waiting and rollout.seed is not None:
            await asyncio.sleep(FOLLOW_SECONDS)
            seed = self.agents[rollout.seed]
            try:
                answer = await self._call(
                    seed, "status", payload, self.settings.fleet_answer_seconds
                )
            except (NodeFailed, OnNode) as failure:
                logger.warning("event=seed_lost node=%s reason=%s", seed.node_id[:12], failure)
                await self._next_seed(rollout)
                continue
            status = answer["status"]
            if status == ModelStatus.DOWNLOADING:
                continue
            if status == ModelStatus.DOWNLOADED:
                # They stay "waiting" (DOWNLOADING in the status) until their own download runs:
                # the fleet's status never says PARTIAL in between.
                waiting = [self.agents[n] for n in rollout.waiting if n in self.agents]
                holders = await self._holders(payload)
                await self._start(rollout, [a for a in waiting if not a.gone], holders)
                rollout.waiting = []
                return
            why = answer.get("error_message") or f"it is {status} there"
            for node in rollout.waiting:
                rollout.refused[node] = (
                    f"not started: the first copy, on node {seed.node_id[:12]}, failed: {why}"
                )
            rollout.waiting = []

    async def _next_seed(self, rollout: _Rollout) -> None:
        while rollout.waiting:
            node = rollout.waiting.pop(0)
            agent = self.agents.get(node)
            if (
                agent is not None
                and not agent.gone
                and (await self._start(rollout, [agent], []))[0]
            ):
                rollout.seed = node
                return
        rollout.seed = None

    async def get_model_status(self, request: ModelRequest) -> ModelStatusResponse:
        """DOWNLOADED only when DOWNLOADED on every node it was downloaded to (else every alive
        node); DOWNLOADING while one downloads; PARTIAL when some have it; NOT_FOUND when none."""
        model = request.as_model()
        rollout = self._rollouts.get(model.task_id)
        if request.nodes is not None:
            agents = self._targets_of(request.nodes)
        elif rollout is not None:
            agents = [self.agents[n] for n in rollout.targets if n in self.agents]
        else:
            agents = self._targets_of(None)
        payload = request.model_dump(mode="json", exclude={"nodes"})
        answers = await self._fan_out(agents, "status", payload, read=True)
        nodes: list[NodeStatus] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, dict):
                fetched = answer.pop("fetched", None) or {}
                status = ModelStatusResponse.model_validate(answer)
                node = NodeStatus(
                    node_id=agent.node_id,
                    address=agent.address,
                    status=status.status,
                    progress=status.progress,
                    error_message=status.error_message,
                    from_hub_bytes=fetched.get("hub"),
                    from_peers_bytes=fetched.get("peers"),
                )
                if rollout is not None and status.status is not ModelStatus.DOWNLOADED:
                    if agent.node_id in rollout.waiting and rollout.seed is not None:
                        # Not started: it copies from the seed once the seed has it.
                        node.status = ModelStatus.DOWNLOADING
                        node.waiting_for = rollout.seed
                    elif node.error_message is None:
                        node.error_message = rollout.refused.get(agent.node_id)
                nodes.append(node)
            else:
                nodes.append(NodeStatus(status=None, **_not_answered(agent, answer)))
        return _together(model, nodes, answers)

    async def list_models(self) -> list[ModelListItem]:
        """Each cached revision once, with the nodes that hold it."""
        return (await self.list_answer()).models

    async def list_answer(self) -> ModelListResponse:
        """``list_models``, and the nodes that did not answer (and why)."""
        agents = self._targets_of(None)
        answers = await self._fan_out(agents, "list", {}, read=True)
        merged: dict[tuple[str, str | None], ModelListItem] = {}
        unanswered: list[NodeUnanswered] = []
        for agent, answer in zip(agents, answers, strict=True):
            if not isinstance(answer, list):
                unanswered.append(NodeUnanswered(**_not_answered(agent, answer)))
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
        return ModelListResponse(models=list(merged.values()), nodes_unanswered=unanswered or None)

    async def get_disk_space(self) -> DiskSpaceInfo:
        """Each node's cache and free space; the top figures are their sums."""
        agents = list(self.agents.values())
        answers = await self._fan_out(agents, "space", {}, read=True)
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
                nodes.append(NodeSpace(**_not_answered(agent, answer)))
        return DiskSpaceInfo(
            cache_size_bytes=sum(n.cache_size_bytes or 0 for n in nodes),
            available_bytes=sum(n.available_bytes or 0 for n in nodes),
            cache_path=", ".join(sorted({n.cache_path for n in nodes if n.cache_path})),
            nodes=nodes,
        )

    async def delete_model(self, model: Model, force: bool = False) -> DeleteResponse:
        """Cancel or delete on every alive node; 404 only when no node had anything of it."""
        rollout = self._rollouts.pop(model.task_id, None)
        if rollout is not None:
            await _cancel(rollout)  # the nodes still waiting never start
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

    async def plan_model(self, request: ModelRequest) -> PlanResponse:
        """The Hub's file list once, with each node's figures; the top figures are the worst
        node's (the most to fetch, the least room), and ``fits`` holds only when every node fits."""
        agents = self._targets_of(request.nodes)
        payload = request.model_dump(mode="json", exclude={"nodes"})
        answers = await self._fan_out(agents, "plan", payload, read=True)
        plans: list[PlanResponse] = []
        nodes: list[NodePlan] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, OnNode):
                raise answer  # the Hub's answer: the same on every node
            if isinstance(answer, dict):
                plan = PlanResponse.model_validate(answer)
                plans.append(plan)
                nodes.append(
                    NodePlan(
                        node_id=agent.node_id,
                        missing_bytes=plan.missing_bytes,
                        available_bytes=plan.available_bytes,
                        fits=plan.fits,
                    )
                )
            else:
                nodes.append(
                    NodePlan(node_id=agent.node_id, fits=None, error_message=_unanswered(answer))
                )
        if not plans:
            raise OnNode(agents[0].node_id, "NodeFailed", _unanswered(answers[0]))
        worst = max(plans, key=lambda p: p.missing_bytes - p.available_bytes)
        return worst.model_copy(
            update={
                "missing_bytes": max(p.missing_bytes for p in plans),
                "available_bytes": min(p.available_bytes for p in plans),
                "fits": all(p.fits for p in plans),
                "nodes": nodes,
            }
        )

    async def verify_model(self, model: Model) -> VerifyResponse:
        """Every node with a copy checks it; verified only when every copy is. 404 only when no
        node has one."""
        agents = self._targets_of(None)
        answers = await self._fan_out(agents, "verify", model.model_dump(mode="json"))
        checked: list[VerifyResponse] = []
        nodes: list[NodeVerified] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, dict):
                done = VerifyResponse.model_validate(answer)
                checked.append(done)
                nodes.append(
                    NodeVerified(
                        node_id=agent.node_id,
                        verified=done.verified,
                        files_checked=done.files_checked,
                        missing=done.missing,
                        mismatched=done.mismatched,
                    )
                )
            elif isinstance(answer, OnNode) and answer.kind == ModelNotFound.__name__:
                nodes.append(
                    NodeVerified(node_id=agent.node_id, verified=None, error_message=str(answer))
                )
            elif isinstance(answer, OnNode):
                raise answer  # downloading there (409): verified when it completes
            else:
                nodes.append(
                    NodeVerified(
                        node_id=agent.node_id, verified=None, error_message=_unanswered(answer)
                    )
                )
        if not checked:
            raise ModelNotFound(model.task_id)
        return VerifyResponse(
            model=model,
            commit=checked[0].commit,
            verified=all(c.verified for c in checked) and len(checked) == len(nodes),
            files_checked=sum(c.files_checked for c in checked),
            missing=sorted({path for c in checked for path in c.missing}),
            mismatched=sorted({path for c in checked for path in c.mismatched}),
            nodes=nodes,
        )

    async def prune(self, request: PruneRequest, force: bool = False) -> PruneResponse:
        """Prune on every node; each revision and kept revision names its node."""
        agents = self._targets_of(None)
        payload = {"request": request.model_dump(mode="json"), "force": force}
        answers = await self._fan_out(agents, "prune", payload)
        revisions: list[PrunedRevision] = []
        kept: list[KeptRevision] = []
        notes: list[str] = []
        freed = 0
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, OnNode):
                raise answer  # a vLLM server that did not answer there: nothing forced
            if not isinstance(answer, dict):
                notes.append(f"node {agent.node_id[:12]}: {_unanswered(answer)}")
                continue
            pruned = PruneResponse.model_validate(answer)
            freed += pruned.freed_bytes
            revisions += [r.model_copy(update={"node_id": agent.node_id}) for r in pruned.revisions]
            kept += [k.model_copy(update={"node_id": agent.node_id}) for k in pruned.kept]
            if pruned.note:
                notes.append(f"node {agent.node_id[:12]}: {pruned.note}")
        return PruneResponse(
            dry_run=request.dry_run,
            revisions=revisions,
            freed_bytes=freed,
            kept=kept,
            note="; ".join(notes) or None,
        )


def _ray() -> Any:
    """Ray, or a start-up error that says what to install."""
    module: Any = None
    with contextlib.suppress(ImportError):
        import ray

        module = ray
    if not hasattr(module, "init"):  # absent, or a folder named ray on the path
        raise RuntimeError(
            "MODELS_RAY_ADDRESS is set, but Ray is not installed: install the api[fleet] extra"
            " (pip install 'api[fleet]'; `make run` does when the variable is set)"
        )
    return module


def _unanswered(answer: object) -> str:
    return f"the node did not answer: {answer}"


def _not_answered(agent: _Agent, answer: object) -> dict[str, Any]:
    """What every per-node answer says of a node that gave none: which, why, and whether it
    left the cluster or only missed the time a read waits for it."""
    return {
        "node_id": agent.node_id,
        "address": agent.address,
        "error_message": _unanswered(answer),
        "gone": agent.gone,
        "unreachable": isinstance(answer, NodeUnreachable),
    }


async def _cancel(rollout: _Rollout) -> None:
    rollout.waiting = []
    if rollout.task is not None:
        rollout.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rollout.task


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
