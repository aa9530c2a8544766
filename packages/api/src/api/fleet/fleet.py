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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from api import logfmt
from api.fleet.agent import NodeAgent, NodeModelStatus, Refusal
from api.fleet.rollout import Sources
from api.fleet.rollout import plan as plan_rollout
from api.models.backend import Peer
from api.models.downloads import NO_SUCH_THING
from api.models.errors import (
    FleetUnavailable,
    HubAnswer,
    ModelNotFound,
    NodesLackSpace,
    OnNode,
    UnknownNode,
)
from api.models.events import EventBus
from api.models.paging import ListQuery, select
from api.models.revisions import PLAN_CALLS
from api.models.service import Figures, ServiceFigures
from api.models.throughput import Throughput
from api.models.types import (
    BandwidthResponse,
    BudgetResponse,
    DeleteResponse,
    DeleteStatus,
    DiskSpaceInfo,
    DownloadListResponse,
    DownloadProgress,
    DownloadShare,
    DownloadStartedResponse,
    EvictRequest,
    EvictResponse,
    HistoryResponse,
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
    PinResponse,
    PlanResponse,
    PrunedRevision,
    PruneRequest,
    PruneResponse,
    ThroughputResponse,
    UpdateBudget,
    UpdateInfo,
    UpdatesResponse,
    VerifyResponse,
)
from api.settings import Settings

logger = logging.getLogger(__name__)
# The least a node's share of the update checks' budget can be: one check's calls and one more.
MIN_UPDATE_SHARE = PLAN_CALLS + 1
_T = TypeVar("_T")
_P = ParamSpec("_P")

NAMESPACE = "model-service"
CACHE_LABEL = "models-cache"  # a node's own cache folder, as a Ray node label
WATCH_SECONDS = 5.0
CALL_TIMEOUT = 60.0
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
    """One download to several nodes, the Hub paid once: every node starts at once, the roots
    (the nodes that have it, or the one that fetches it from the Hub) serving the others along
    two trees (``api.fleet.rollout``), each node passing on what it receives."""

    request: ModelRequest
    targets: list[str]
    refused: dict[str, str] = field(default_factory=dict)  # node -> why it did not start


class NodeFailed(Exception):
    """A node did not answer (its agent died, the node left, or it was too slow)."""


class NodeUnreachable(NodeFailed):
    """A node did not answer within the time a request waits for it (it may still be alive)."""


def update_share(budget: int, nodes: int) -> int:
    """A node's calls a minute of a fleet's ``budget`` shared by ``nodes``: an even split, so that
    together they keep to it, but never less than one check's calls (``MIN_UPDATE_SHARE``)."""
    return max(MIN_UPDATE_SHARE, budget // max(1, nodes))


@dataclass
class Fleet:
    settings: Settings
    # The service's own event bus: the nodes' events are published on it, with their node, so
    # that the event stream, the logs and the metrics have them.
    bus: EventBus = field(default_factory=EventBus)
    agents: dict[str, _Agent] = field(default_factory=dict)
    _pumps: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _rollouts: dict[str, _Rollout] = field(default_factory=dict)  # by task id
    _watcher: asyncio.Task[None] | None = None
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The nodes' blob servers answer this secret only (the fleet's own, never the Hub's token).
    _peer_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The cap on each node's downloads (MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND, then PUT
    # /settings/bandwidth): given to each agent when it starts, and to all at each change.
    _bandwidth: int | None = None
    _said_share_too_small: bool = False

    def __post_init__(self) -> None:
        self._bandwidth = self.settings.max_download_bytes_per_second or None

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
        logfmt.log(logger, logging.INFO, "fleet_joined", address=address, nodes=len(self.agents))

    async def refresh(self) -> None:
        """Agents for the nodes that joined; the ones that left are marked gone."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
                self._pumps[agent.node_id] = asyncio.create_task(
                    self._pump(agent, self.bus), name=f"events of {agent.node_id[:12]}"
                )
                logfmt.log(
                    logger,
                    logging.INFO,
                    "agent_started",
                    node=agent.node_id[:12],
                    address=agent.address,
                    cache=agent.cache_path,
                )
            for node_id, agent in self.agents.items():
                if node_id not in alive and not agent.gone:
                    agent.gone = True
                    logfmt.log(logger, logging.WARNING, "node_gone", node=node_id[:12])

    async def _started(self, agent: _Agent, event: str) -> dict[str, str] | None:
        """The agent's ``start`` answer (where its cache and blob server are), or None when it
        did not answer (logged as ``event``)."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                started: dict[str, str] = await agent.handle.start.remote(self._bandwidth)
        except Exception as error:
            logfmt.log(logger, logging.WARNING, event, node=agent.node_id[:12], reason=error)
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
            logfmt.log(logger, logging.WARNING, "agent_restarted", node=agent.node_id[:12])
            agent.peer_url = started["peer_url"]

    async def _pump(self, agent: _Agent, bus: EventBus) -> None:
        """The node's events, on the service's bus, until the node leaves."""
        after: int | None = None
        while not agent.gone:
            try:
                events = await self._call(agent, CALL_TIMEOUT, NodeAgent.events, after, EVENTS_WAIT)
            except (NodeFailed, OnNode):
                await asyncio.sleep(1.0)  # its agent is being restarted, or the node is leaving
                continue
            for event in events:
                after = event.seq
                bus.publish(event.model_copy(update={"node_id": agent.node_id, "seq": None}))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                await self.refresh()
            except Exception:  # the cluster hiccuped: try again at the next turn
                logfmt.log(logger, logging.ERROR, "cluster_unreadable", exc_info=True)

    async def shutdown(self) -> None:
        """Stop every agent (their downloads stay in each node's job store), leave the cluster."""
        import ray

        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
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

    @property
    def _read(self) -> float:
        """How long a read waits for each node (MODELS_FLEET_ANSWER_SECONDS)."""
        return self.settings.fleet_answer_seconds

    async def _call(
        self,
        agent: _Agent,
        wait: float,
        method: Callable[Concatenate[NodeAgent, _P], Awaitable[_T | Refusal]],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """The agent's answer to ``method`` (one of ``NodeAgent``'s); ``OnNode`` with the error
        its service raised when it refused; ``NodeFailed`` when it did not answer
        (``NodeUnreachable`` when not within ``wait`` seconds)."""
        if agent.gone:
            raise NodeFailed("the node left the cluster")
        try:
            async with asyncio.timeout(wait):
                answer = await getattr(agent.handle, method.__name__).remote(*args, **kwargs)
        except TimeoutError:
            setting = " (MODELS_FLEET_ANSWER_SECONDS)" if wait == self._read else ""
            raise NodeUnreachable(f"no answer within {wait:g} s{setting}: unreachable") from None
        except Exception as error:  # the actor died, the node left: Ray's own errors
            raise NodeFailed(f"{type(error).__name__}") from None
        if isinstance(answer, Refusal):
            raise OnNode(agent.node_id, answer.error)
        result: _T = answer
        return result

    async def _fan_out(
        self, agents: list[_Agent], ask: Callable[[_Agent], Awaitable[_T]]
    ) -> list[_T | BaseException]:
        """Every agent's answer (or why it gave none), all asked at once: each ``ask`` is a
        ``_call``, whose deadline holds for each node whatever the others do."""
        return await asyncio.gather(*(ask(agent) for agent in agents), return_exceptions=True)

    # -- the API (``api.models.service.ModelService``) ----------------------------------------

    @property
    def events(self) -> EventBus:
        return self.bus

    async def download(self, request: ModelRequest) -> DownloadStartedResponse:
        """Download on every targeted node, each checking its own space first: when one lacks it,
        nothing starts anywhere (507 naming those nodes). The Hub is paid once: nodes that
        already have the revision serve it to the others; when none has it, one node fetches it
        from the Hub. Every other node starts at once, copying from its parents in the rollout's
        trees (``api.fleet.rollout``) while they still receive it."""
        targets = self._targets_of(request.nodes)
        asked = _on_a_node(request)
        task_id = request.as_model().task_id
        plans = await self._fan_out(
            targets, lambda a: self._call(a, self._read, NodeAgent.plan, asked)
        )
        for answer in plans:
            if isinstance(answer, OnNode) and not isinstance(answer.error, HubAnswer):
                raise answer
            if (
                isinstance(answer, OnNode)
                and isinstance(answer.error, HubAnswer)
                and answer.error.kind in NO_SUCH_THING
            ):
                raise answer.error  # a typo: the Hub has no such repo or revision (404)
        # A Hub that gives no file list (not found, gated, slow) is no reason to refuse here: as
        # on one machine, the download starts and each node's status says why it failed.
        lacking = [
            (agent.node_id, plan.missing_bytes, plan.available_bytes)
            for agent, plan in zip(targets, plans, strict=True)
            if isinstance(plan, PlanResponse) and not plan.fits
        ]
        if lacking:
            raise NodesLackSpace(lacking)
        answering = [
            a
            for a, p in zip(targets, plans, strict=True)
            if isinstance(p, PlanResponse)
            or (isinstance(p, OnNode) and isinstance(p.error, HubAnswer))
        ]
        if not answering:
            raise FleetUnavailable(_why(plans[0]) if plans else "no alive node")
        holders = await self._holders(asked)
        todo = [a for a in answering if a.node_id not in holders]
        if not todo:
            return DownloadStartedResponse(
                task_id=task_id,
                status=ModelStatus.DOWNLOADED,
                nodes=[a.node_id for a in answering],
            )
        rollout = _Rollout(asked, [a.node_id for a in answering])
        started: list[_Agent] = []
        refusals: list[BaseException] = []
        roots = [n for n in holders if n in self.agents and self.agents[n].peer_url]
        if not roots:
            # The first node that starts fetches from the Hub (the seed), the others from it.
            for index, agent in enumerate(todo):
                seed, refused = await self._start(rollout, [agent], {})
                refusals += refused
                if seed:
                    started, roots, todo = seed, [agent.node_id], todo[index + 1 :]
                    break
        if roots and todo:
            copies, refused = await self._start(
                rollout, todo, plan_rollout(roots, [a.node_id for a in todo])
            )
            started += copies
            refusals += refused
        if not started:
            # Every node refused: the first refusal as it was said (a 409, a 422, a 429), or,
            # when none answered, 503.
            refusal = next(iter(refusals), None)
            if isinstance(refusal, OnNode):
                raise refusal
            raise FleetUnavailable(str(refusal or "no node answered"))
        self._rollouts[task_id] = rollout
        return DownloadStartedResponse(
            task_id=task_id, status=ModelStatus.DOWNLOADING, nodes=rollout.targets
        )

    async def _holders(self, asked: ModelRequest) -> list[str]:
        """The alive nodes where the revision is DOWNLOADED (complete and verified)."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.status, asked)
        )
        return [
            agent.node_id
            for agent, answer in zip(agents, answers, strict=True)
            if isinstance(answer, NodeModelStatus)
            and answer.status.status is ModelStatus.DOWNLOADED
        ]

    def _peers_of(self, sources: Sources) -> tuple[Peer, ...]:
        """The blob servers of a node's parents (tier 0, the parts spread over them), then of
        the roots (tier 1)."""
        return tuple(
            Peer(self.agents[n].peer_url, self._peer_token, tier)
            for tier, nodes in enumerate((sources.parents, sources.roots))
            for n in nodes
            if n in self.agents and self.agents[n].peer_url
        )

    async def _start(
        self, rollout: _Rollout, agents: list[_Agent], planned: dict[str, Sources]
    ) -> tuple[list[_Agent], list[BaseException]]:
        """Start the download on ``agents`` (each copying from its ``planned`` sources, the Hub
        when it has none); those that started, and the others' refusals. A node that refuses (a
        download already running there, no slot) says why in its status."""
        peers = {
            a.node_id: self._peers_of(planned[a.node_id]) if a.node_id in planned else ()
            for a in agents
        }
        answers = await self._fan_out(
            agents,
            lambda a: self._call(
                a, CALL_TIMEOUT, NodeAgent.download, rollout.request, peers[a.node_id]
            ),
        )
        started: list[_Agent] = []
        refusals: list[BaseException] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, BaseException):
                rollout.refused[agent.node_id] = str(answer)
                refusals.append(answer)
                logfmt.log(
                    logger,
                    logging.WARNING,
                    "node_refused",
                    node=agent.node_id[:12],
                    task_id=rollout.request.as_model().task_id,
                    reason=answer,
                )
            else:
                started.append(agent)
        return started, refusals

    def _node_status(
        self, agent: _Agent, answer: NodeModelStatus, rollout: _Rollout | None
    ) -> NodeStatus:
        """One node's answer for a model, with what the rollout knows of it: a node that refused
        to start says why."""
        status = answer.status
        node = NodeStatus(
            node_id=agent.node_id,
            address=agent.address,
            status=status.status,
            progress=status.progress,
            error_message=status.error_message,
            from_hub_bytes=answer.from_hub_bytes,
            from_peers_bytes=answer.from_peers_bytes,
        )
        if (
            rollout is not None
            and status.status is not ModelStatus.DOWNLOADED
            and node.error_message is None
        ):
            node.error_message = rollout.refused.get(agent.node_id)
        return node

    async def status(self, request: ModelRequest) -> ModelStatusResponse:
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
        asked = _on_a_node(request)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.status, asked)
        )
        nodes: list[NodeStatus] = []
        statuses: list[ModelStatusResponse] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, NodeModelStatus):
                nodes.append(self._node_status(agent, answer, rollout))
                statuses.append(answer.status)
            else:
                nodes.append(NodeStatus(status=None, **_not_answered(agent, answer)))
        refusal = next((a for a in answers if isinstance(a, OnNode)), None)
        if not statuses and refusal is not None:
            raise refusal  # the request's own fault (a selection no node can use)
        return _together(model, nodes, statuses)

    async def listing(self, query: ListQuery | None = None) -> ModelListResponse:
        """Each cached revision once, with the nodes that hold it, and the nodes that did not
        answer (and why); a page of it when ``query`` asks (each node filters, the head sorts
        and pages what they gave together)."""
        agents = self._targets_of(None)
        asked = query.filters() if query is not None and query.paged else None
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.listing, asked)
        )

        def join(known: ModelListItem, item: ModelListItem) -> None:
            if ModelStatus.DOWNLOADING in (known.status, item.status):
                known.status = ModelStatus.DOWNLOADING
            elif item.status is not ModelStatus.DOWNLOADED:
                known.status = item.status

        models, unanswered = _merged(
            agents,
            [a.models if isinstance(a, ModelListResponse) else a for a in answers],
            lambda item: (item.model.hf_repo, item.model.hf_commit),
            join,
        )
        answer = select(models, query)
        answer.nodes_unanswered = unanswered or None
        return answer

    async def get_disk_space(self) -> DiskSpaceInfo:
        """Each node's cache and free space; the top figures are their sums."""
        agents = list(self.agents.values())
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.get_disk_space)
        )
        nodes = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, DiskSpaceInfo):
                nodes.append(
                    NodeSpace(
                        node_id=agent.node_id,
                        address=agent.address,
                        cache_path=answer.cache_path,
                        cache_size_bytes=answer.cache_size_bytes,
                        available_bytes=answer.available_bytes,
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
        self._rollouts.pop(model.task_id, None)
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, CALL_TIMEOUT, NodeAgent.delete_model, model, force)
        )
        nodes: list[NodeDeleted] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, DeleteResponse):
                nodes.append(
                    NodeDeleted(
                        node_id=agent.node_id, status=answer.status, freed_bytes=answer.freed_bytes
                    )
                )
            elif isinstance(answer, OnNode) and isinstance(answer.error, ModelNotFound):
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

    async def plan(self, request: ModelRequest) -> PlanResponse:
        """The Hub's file list once, with each node's figures; the top figures are the worst
        node's (the most to fetch, the least room), and ``fits`` holds only when every node fits."""
        agents = self._targets_of(request.nodes)
        asked = _on_a_node(request)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.plan, asked)
        )
        plans: list[PlanResponse] = []
        nodes: list[NodePlan] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, OnNode):
                raise answer  # the Hub's answer: the same on every node
            if isinstance(answer, PlanResponse):
                plans.append(answer)
                nodes.append(
                    NodePlan(
                        node_id=agent.node_id,
                        missing_bytes=answer.missing_bytes,
                        available_bytes=answer.available_bytes,
                        fits=answer.fits,
                    )
                )
            else:
                nodes.append(NodePlan(node_id=agent.node_id, fits=None, error_message=_why(answer)))
        if not plans:
            raise FleetUnavailable(_why(answers[0]) if answers else "no alive node")
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
        answers = await self._fan_out(
            agents, lambda a: self._call(a, CALL_TIMEOUT, NodeAgent.verify_model, model)
        )
        checked: list[VerifyResponse] = []
        nodes: list[NodeVerified] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, VerifyResponse):
                checked.append(answer)
                nodes.append(
                    NodeVerified(
                        node_id=agent.node_id,
                        verified=answer.verified,
                        files_checked=answer.files_checked,
                        missing=answer.missing,
                        mismatched=answer.mismatched,
                    )
                )
            elif isinstance(answer, OnNode) and isinstance(answer.error, ModelNotFound):
                nodes.append(
                    NodeVerified(node_id=agent.node_id, verified=None, error_message=str(answer))
                )
            elif isinstance(answer, OnNode):
                raise answer  # downloading there (409): verified when it completes
            else:
                nodes.append(
                    NodeVerified(node_id=agent.node_id, verified=None, error_message=_why(answer))
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
        answers = await self._fan_out(
            agents, lambda a: self._call(a, CALL_TIMEOUT, NodeAgent.prune, request, force)
        )
        revisions: list[PrunedRevision] = []
        kept: list[KeptRevision] = []
        notes: list[str] = []
        freed = 0
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, OnNode):
                raise answer  # a vLLM server that did not answer there: nothing forced
            if not isinstance(answer, PruneResponse):
                notes.append(f"node {agent.node_id[:12]}: {_why(answer)}")
                continue
            freed += answer.freed_bytes
            revisions += [r.model_copy(update={"node_id": agent.node_id}) for r in answer.revisions]
            kept += [k.model_copy(update={"node_id": agent.node_id}) for k in answer.kept]
            if answer.note:
                notes.append(f"node {agent.node_id[:12]}: {answer.note}")
        return PruneResponse(
            dry_run=request.dry_run,
            revisions=revisions,
            freed_bytes=freed,
            kept=kept,
            note="; ".join(notes) or None,
        )

    async def history(self, limit: int = 100) -> HistoryResponse:
        """Every node's history (each keeps its own), newest first, each entry naming its node."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.history, limit)
        )
        entries = [
            entry.model_copy(update={"node_id": agent.node_id})
            for agent, answer in zip(agents, answers, strict=True)
            if isinstance(answer, HistoryResponse)
            for entry in answer.entries
        ]
        entries.sort(key=lambda e: e.time, reverse=True)
        return HistoryResponse(entries=entries[:limit])

    async def throughput(self) -> ThroughputResponse:
        """Every node's downloads, each naming its node; the service's figure is the sum over the
        nodes, interval by interval (they are cut on the wall clock)."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.throughput)
        )
        mine = Throughput().snapshot()  # nothing yet: the intervals of now, on this clock
        downloads = []
        service = [0.0] * len(mine.service)
        for agent, answer in zip(agents, answers, strict=True):
            if not isinstance(answer, ThroughputResponse):
                continue
            shift = round((answer.start - mine.start) / mine.bucket_seconds)
            for i, rate in enumerate(answer.service):
                if 0 <= i + shift < len(service):
                    service[i + shift] += rate
            downloads += [d.model_copy(update={"node_id": agent.node_id}) for d in answer.downloads]
        return mine.model_copy(update={"service": service, "downloads": downloads})

    async def budget(self) -> BudgetResponse:
        """Each node's budget (it holds per node: each node evicts from its own cache); the top
        figures are the sums over the nodes that answered."""
        agents = self._targets_of(None)
        answers = await self._fan_out(agents, lambda a: self._call(a, self._read, NodeAgent.budget))
        nodes: list[BudgetResponse] = []
        notes: list[str] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, BudgetResponse):
                nodes.append(answer.model_copy(update={"node_id": agent.node_id}))
            else:
                notes.append(f"node {agent.node_id[:12]}: {_why(answer)}")
        limits = [n.budget_bytes for n in nodes]
        return BudgetResponse(
            budget_bytes=None if not limits or None in limits else sum(b or 0 for b in limits),
            usage_bytes=sum(n.usage_bytes for n in nodes),
            reserved_bytes=sum(n.reserved_bytes for n in nodes),
            candidates=[
                c.model_copy(update={"node_id": n.node_id}) for n in nodes for c in n.candidates
            ],
            kept=[k.model_copy(update={"node_id": n.node_id}) for n in nodes for k in n.kept],
            note="; ".join(notes) or None,
            nodes=nodes,
        )

    async def evict(self, request: EvictRequest, dry_run: bool = False) -> EvictResponse:
        """Evict on every node, each down to the target (or its budget) in its own cache."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, CALL_TIMEOUT, NodeAgent.evict, request, dry_run)
        )
        nodes: list[EvictResponse] = []
        notes: list[str] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, OnNode):
                raise answer  # no budget there, and no target: the same on every node
            if not isinstance(answer, EvictResponse):
                notes.append(f"node {agent.node_id[:12]}: {_why(answer)}")
                continue
            nodes.append(answer.model_copy(update={"node_id": agent.node_id}))
            if answer.note:
                notes.append(f"node {agent.node_id[:12]}: {answer.note}")
        return EvictResponse(
            dry_run=dry_run,
            evicted=[e.model_copy(update={"node_id": n.node_id}) for n in nodes for e in n.evicted],
            freed_bytes=sum(n.freed_bytes for n in nodes),
            usage_bytes=sum(n.usage_bytes for n in nodes),
            target_bytes=sum(n.target_bytes for n in nodes),
            kept=[k.model_copy(update={"node_id": n.node_id}) for n in nodes for k in n.kept],
            note="; ".join(notes) or None,
            nodes=nodes,
        )

    async def pin(self, request: ModelRequest) -> PinResponse:
        """Pin on the nodes asked (every node by default): each keeps it from its own eviction."""
        return await self._pinning(request, NodeAgent.pin)

    async def unpin(self, request: ModelRequest) -> PinResponse:
        return await self._pinning(request, NodeAgent.unpin)

    async def _pinning(
        self,
        request: ModelRequest,
        method: Callable[[NodeAgent, ModelRequest], Awaitable[PinResponse | Refusal]],
    ) -> PinResponse:
        agents = self._targets_of(request.nodes)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, CALL_TIMEOUT, method, _on_a_node(request))
        )
        done = [
            (agent, answer)
            for agent, answer in zip(agents, answers, strict=True)
            if isinstance(answer, PinResponse)
        ]
        if not done:
            failed = next((a for a in answers if isinstance(a, OnNode)), None)
            if failed is not None:
                raise failed  # not pinned anywhere (an unpin): the node's own 404
            raise FleetUnavailable("no node answered")
        first = done[0][1]
        return PinResponse(
            model=first.model,
            pinned=first.pinned,
            commits=sorted({c for _, answer in done for c in answer.commits}),
            nodes=[agent.node_id for agent, _ in done],
        )

    async def updates(self, refresh: bool = False, wait: float | None = None) -> UpdatesResponse:
        """Every node's cached branches, each asked of the Hub by its node (within its own
        reuse time, and its share of the fleet's budget of calls: the nodes use one token); a
        branch at the same commit on several nodes is one entry, naming them. A node is given
        ``wait`` (else one Hub check's time, MODELS_PLAN_TIMEOUT_SECONDS) and the read
        deadline."""
        agents = self._targets_of(None)
        checks = self.settings.plan_timeout_seconds if wait is None else wait
        share = self._update_share(len(agents))
        answers = await self._fan_out(
            agents,
            lambda a: self._call(a, self._read + checks, NodeAgent.updates, refresh, checks, share),
        )

        def join(known: UpdateInfo, info: UpdateInfo) -> None:
            times = [t for t in (known.checked_at, info.checked_at) if t is not None]
            known.checked_at = min(times) if times else None
            known.pending = known.pending or info.pending
            known.error = known.error or info.error
            if known.hub_commit is None:
                known.hub_commit = info.hub_commit
                known.update_available = info.update_available
            if info.bytes_to_download is not None:  # the node with the most to fetch
                known.bytes_to_download = max(known.bytes_to_download or 0, info.bytes_to_download)

        models, unanswered = _merged(
            agents,
            [a.models if isinstance(a, UpdatesResponse) else a for a in answers],
            lambda info: (info.model.hf_repo, info.ref, info.cached_commit),
            join,
        )
        budgets = [a.budget for a in answers if isinstance(a, UpdatesResponse) and a.budget]
        pauses = [b.paused_until for b in budgets if b.paused_until is not None]
        budget = UpdateBudget(
            calls_per_minute=sum(b.calls_per_minute for b in budgets),
            calls_last_minute=sum(b.calls_last_minute for b in budgets),
            paused_until=max(pauses, default=None),
            pending=sum(b.pending for b in budgets),
        )
        return UpdatesResponse(
            models=models, budget=budget if budgets else None, nodes_unanswered=unanswered or None
        )

    def _update_share(self, nodes: int) -> int:
        """Each node's calls a minute: the fleet's budget (MODELS_UPDATE_CALLS_PER_MINUTE, what
        the token may spend) split evenly, so that the nodes together keep to it; at least what
        one check costs. A budget too small for that many nodes is said, once."""
        budget = self.settings.update_calls_per_minute
        share = update_share(budget, nodes)
        if share * nodes > budget and not self._said_share_too_small:
            self._said_share_too_small = True
            logfmt.log(
                logger,
                logging.WARNING,
                "update_budget_too_small",
                calls_per_minute=budget,
                nodes=nodes,
                spent_at_most=share * nodes,
                fix="raise MODELS_UPDATE_CALLS_PER_MINUTE to at least 4 per node",
            )
        return share

    async def downloads(self) -> DownloadListResponse:
        """Each download running or queued on a node once, with every node's status."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.downloads)
        )
        by_task: dict[str, tuple[Model, list[NodeStatus], list[ModelStatusResponse]]] = {}
        unanswered: list[NodeUnanswered] = []
        for agent, answer in zip(agents, answers, strict=True):
            if not isinstance(answer, DownloadListResponse):
                unanswered.append(NodeUnanswered(**_not_answered(agent, answer)))
                continue
            for status in answer.downloads:
                task_id = status.model.task_id
                rollout = self._rollouts.get(task_id)
                _, nodes, statuses = by_task.setdefault(task_id, (status.model, [], []))
                nodes.append(self._node_status(agent, NodeModelStatus(status, None, None), rollout))
                statuses.append(status)
        return DownloadListResponse(
            downloads=[
                _together(model, nodes, statuses) for model, nodes, statuses in by_task.values()
            ],
            nodes_unanswered=unanswered or None,
        )

    async def bandwidth_now(self) -> BandwidthResponse:
        """The fleet's cap (it holds on each node) and each node's downloads' shares."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.bandwidth_now)
        )
        return self._bandwidth_answer(agents, answers)

    async def cap_bandwidth(self, bytes_per_second: int | None) -> BandwidthResponse:
        """A new cap on every node, applied to its running downloads at once (and given to the
        nodes that join, or whose agent restarts, from now on)."""
        self._bandwidth = bytes_per_second
        logfmt.log(
            logger,
            logging.INFO,
            "bandwidth_cap",
            bytes_per_second=bytes_per_second or "none",
            per_node="true",
        )
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.cap_bandwidth, bytes_per_second)
        )
        return self._bandwidth_answer(agents, answers)

    def _bandwidth_answer(
        self, agents: list[_Agent], answers: list[BandwidthResponse | BaseException]
    ) -> BandwidthResponse:
        shares: list[DownloadShare] = []
        unanswered: list[NodeUnanswered] = []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, BandwidthResponse):
                shares += [
                    d.model_copy(update={"node_id": agent.node_id}) for d in answer.downloads
                ]
            else:
                unanswered.append(NodeUnanswered(**_not_answered(agent, answer)))
        return BandwidthResponse(
            max_bytes_per_second=self._bandwidth,
            xet_when_capped=self.settings.xet_when_capped,
            downloads=shares,
            per_node=True,
            nodes_unanswered=unanswered or None,
        )

    async def figures(self) -> ServiceFigures:
        """Each node's figures, and their sums (the cap: the one each node holds)."""
        agents = self._targets_of(None)
        answers = await self._fan_out(
            agents, lambda a: self._call(a, self._read, NodeAgent.figures)
        )
        nodes = {
            agent.node_id: answer.total
            for agent, answer in zip(agents, answers, strict=True)
            if isinstance(answer, ServiceFigures)
        }
        figures = list(nodes.values())
        return ServiceFigures(
            Figures(
                running=sum(f.running for f in figures),
                queued=sum(f.queued for f in figures),
                cap=self._bandwidth,
                cache_bytes=sum(f.cache_bytes for f in figures),
                free_bytes=sum(f.free_bytes for f in figures),
            ),
            nodes,
            [a.node_id for a in agents if a.node_id not in nodes],
        )


if TYPE_CHECKING:
    from api.models.service import ModelService

    def _checked(fleet: Fleet) -> ModelService:
        return fleet  # mypy fails here when the fleet lacks an operation


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


def _why(answer: object) -> str:
    return f"the node did not answer: {answer}"


def _on_a_node(request: ModelRequest) -> ModelRequest:
    """The request as one node's service takes it: ``nodes`` is the fleet's to use."""
    return request.model_copy(update={"nodes": None})


def _not_answered(agent: _Agent, answer: object) -> dict[str, Any]:
    """What every per-node answer says of a node that gave none: which, why, and whether it
    left the cluster or only missed the time a read waits for it."""
    return {
        "node_id": agent.node_id,
        "address": agent.address,
        "error_message": _why(answer),
        "gone": agent.gone,
        "unreachable": isinstance(answer, NodeUnreachable),
    }


_Item = TypeVar("_Item", ModelListItem, UpdateInfo)


def _merged(
    agents: list[_Agent],
    answers: list[list[_Item] | BaseException],
    key: Callable[[_Item], tuple[str | None, ...]],
    join: Callable[[_Item, _Item], None],
) -> tuple[list[_Item], list[NodeUnanswered]]:
    """Each node's items (list entries, update entries) as one list: an item several nodes have
    (same ``key``) once, naming them in ``nodes``, ``join`` putting its figures together; and the
    nodes that gave no answer, and why."""
    merged: dict[tuple[str | None, ...], _Item] = {}
    unanswered: list[NodeUnanswered] = []
    for agent, answer in zip(agents, answers, strict=True):
        if isinstance(answer, BaseException):
            unanswered.append(NodeUnanswered(**_not_answered(agent, answer)))
            continue
        for item in answer:
            found: tuple[str | None, ...] = key(item)
            if found not in merged:
                merged[found] = item.model_copy(update={"nodes": [agent.node_id]})
                continue
            merged[found].nodes = [*(merged[found].nodes or []), agent.node_id]
            join(merged[found], item)
    return list(merged.values()), unanswered


def _together(
    model: Model, nodes: list[NodeStatus], answers: list[ModelStatusResponse]
) -> ModelStatusResponse:
    """The fleet's status of a model from its nodes' (``status``, ``downloads``)."""
    statuses = [n.status for n in nodes]
    if ModelStatus.DOWNLOADING in statuses:
        status = ModelStatus.DOWNLOADING
    elif statuses and all(s is ModelStatus.DOWNLOADED for s in statuses):
        status = ModelStatus.DOWNLOADED
    elif any(s in (ModelStatus.DOWNLOADED, ModelStatus.PARTIAL) for s in statuses):
        status = ModelStatus.PARTIAL
    else:
        status = ModelStatus.NOT_FOUND
    first = next(iter(answers), None)
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
