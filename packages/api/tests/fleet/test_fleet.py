"""A fleet (issue 18): the API over every node of a real 3-node Ray cluster on this machine, the
Hub paid once per fleet."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.models.hub.throttle import BURST_SECONDS
from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, trickle
from fakehub.raycluster import RayCluster
from tests.helpers import (
    FINAL,
    MB,
    app_and_client,
    app_client,
    downloads_using,
    ranged,
    wait_for_status,
    workers_using,
)

pytestmark = [pytest.mark.fleet]  # one worker for all: the root conftest groups tests/fleet/

BODY = {"hf_repo": "org/model"}
SIZE = 3 * MB


@pytest.fixture
def fleet_settings(settings: Settings, cluster: RayCluster, node_caches: list[Path]) -> Settings:
    return settings.model_copy(update={"ray_address": cluster.address})


@pytest.fixture
def model(repos: RepoBuilder) -> str:
    return repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(SIZE, seed=81)})


def on_disk(cache: Path) -> bool:
    return any((cache / "models--org--model" / "snapshots").glob("*/w.bin"))


async def node_ids(client: httpx.AsyncClient) -> list[str]:
    space = (await client.get("/api/models/space")).json()
    return [n["node_id"] for n in space["nodes"]]


async def status_until(
    client: httpx.AsyncClient,
    done: Callable[[dict[str, Any]], bool],
    seconds: float = 90,
    body: dict[str, Any] = BODY,
) -> dict[str, Any]:
    """The fleet's status once ``done`` holds for it (polled; a deadline, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    answer: dict[str, Any] = {}
    while not done(answer := (await client.post("/api/models/status", json=body)).json()):
        assert loop.time() < deadline, answer
        await asyncio.sleep(0.1)
    return answer


async def joined(client: httpx.AsyncClient, cluster: RayCluster, node_caches: list[Path]) -> str:
    """A node added to the cluster, once the service has an agent on it (the watch's 5 s)."""
    newcomer = await asyncio.to_thread(
        cluster.add_node, node_caches[0].parent.parent / f"node{len(cluster.caches)}" / "cache"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        space = (await client.get("/api/models/space")).json()
        if newcomer in {n["node_id"] for n in space["nodes"] if not n.get("gone")}:
            return newcomer
        assert loop.time() < deadline, "the new node got no agent"
        await asyncio.sleep(0.2)


async def test_a_download_reaches_every_node_the_hub_serving_each_file_once(
    fleet_settings: Settings, hub: FakeHub, model: str, node_caches: list[Path]
) -> None:
    async with app_and_client(fleet_settings) as (app, client):
        space = (await client.get("/api/models/space")).json()
        assert sorted(n["cache_path"] for n in space["nodes"]) == sorted(map(str, node_caches))
        started = await client.post("/api/models/download", json=BODY)
        assert started.status_code == 202, started.text
        assert len(started.json()["nodes"]) == 3
        # One node fetches from the Hub; the two others start at once, copying from it (and
        # from each other) while it receives the files.
        first = (await client.post("/api/models/status", json=BODY)).json()
        assert first["status"] == "DOWNLOADING"
        assert not any(n["waiting_for"] for n in first["nodes"])
        answer = await wait_for_status(client, BODY, FINAL)
        assert answer["status"] == "DOWNLOADED", answer
        assert [n["status"] for n in answer["nodes"]] == ["DOWNLOADED"] * 3
        assert answer["commit"] == model
        assert all(on_disk(cache) for cache in node_caches)
        # The Hub sent each file's content once, for three nodes.
        assert hub.count("GET", "*/resolve/*/w.bin") == 1
        assert hub.count("GET", "*/resolve/*/config.json") == 1
        assert hub.served("*/resolve/*") == SIZE + 2
        seeds = [n for n in answer["nodes"] if n["from_hub_bytes"]]
        copies = [n for n in answer["nodes"] if n["from_peers_bytes"]]
        assert [n["from_hub_bytes"] for n in seeds] == [SIZE + 2]
        assert sorted(n["from_peers_bytes"] for n in copies) == [SIZE + 2] * 2
        listed = (await client.get("/api/models/list")).json()["models"]
        assert [(m["model"]["hf_commit"], len(m["nodes"])) for m in listed] == [(model, 3)]
        # Plan, verify and prune act on every node and answer per node.
        plan = (await client.post("/api/models/plan", json=BODY)).json()
        assert [(n["missing_bytes"], n["fits"]) for n in plan["nodes"]] == [(0, True)] * 3
        verified = (await client.post("/api/models/verify", json=BODY)).json()
        assert verified["verified"] is True, verified
        assert [n["verified"] for n in verified["nodes"]] == [True] * 3
        pruned = (await client.post("/api/models/prune", json={"dry_run": True})).json()
        assert pruned == {
            "dry_run": True,
            "revisions": [],
            "freed_bytes": 0,
            "kept": [],
            "note": None,
        }
        # The service's event bus (what GET /events streams) has each node's events, with the
        # node; the metrics count per node.
        with app.state.model_manager.events.subscribe(after=0) as queue:
            held = [queue.get_nowait() for _ in range(queue.qsize())]
        ended = {e.node_id for e in held if e.type == "completed"}
        assert ended == {n["node_id"] for n in answer["nodes"]}, held
        assert all(e.node_id for e in held)
        metrics = (await client.get("/metrics")).text
        for node in ended:
            assert f'models_node_downloads_total{{node="{node}",result="completed"}} 1.0' in metrics
        from_peers = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("models_node_downloaded_bytes_total") and 'source="peers"' in line
        ]
        assert sum(from_peers) == 2 * (SIZE + 2)
        # The throughput sums the nodes: the Hub's copy and the two from peers (at least: the
        # cluster's nodes outlive a test, and keep 10 minutes of what earlier ones fetched).
        figures = (await client.get("/api/models/throughput")).json()
        assert len(figures["service"]) == 600 / figures["bucket_seconds"]
        assert sum(figures["service"]) * figures["bucket_seconds"] >= 3 * (SIZE + 2)
        # Asked again: complete everywhere, nothing starts.
        again = await client.post("/api/models/download", json=BODY)
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "DOWNLOADED"
        deleted = (await client.request("DELETE", "/api/models", json=BODY)).json()
        assert deleted["status"] == "deleted"
        assert [n["status"] for n in deleted["nodes"]] == ["deleted"] * 3
        assert not any(on_disk(cache) for cache in node_caches)
        assert (await client.post("/api/models/status", json=BODY)).json()["status"] == "NOT_FOUND"


async def test_a_subset_of_the_nodes_then_the_rest_from_it(
    fleet_settings: Settings, hub: FakeHub, model: str, node_caches: list[Path]
) -> None:
    async with app_client(fleet_settings) as client:
        ids = await node_ids(client)
        one = ids[1]
        started = await client.post("/api/models/download", json={**BODY, "nodes": [one[:8]]})
        assert started.json()["nodes"] == [one]
        answer = await wait_for_status(client, BODY, FINAL)
        assert answer["status"] == "DOWNLOADED", answer  # on every node it was sent to
        assert [n["node_id"] for n in answer["nodes"]] == [one]
        holders = [cache for cache in node_caches if on_disk(cache)]
        assert len(holders) == 1
        everywhere = (await client.post("/api/models/status", json={**BODY, "nodes": ids})).json()
        assert everywhere["status"] == "PARTIAL"
        assert "downloaded on 1 of 3 node(s)" in everywhere["error_message"]
        unknown = await client.post("/api/models/status", json={**BODY, "nodes": ["ffffffff"]})
        assert unknown.status_code == 422
        assert "ffffffff" in unknown.json()["detail"]
        # The rest of the fleet copies from the node that has it: the Hub serves nothing more.
        served = hub.served("*/resolve/*")
        assert (await client.post("/api/models/download", json=BODY)).status_code == 202
        answer = await wait_for_status(client, BODY, FINAL)
        assert answer["status"] == "DOWNLOADED", answer
        assert hub.served("*/resolve/*") == served
        assert all(on_disk(cache) for cache in node_caches)


async def test_pins_the_budget_and_eviction_act_per_node(
    fleet_settings: Settings, hub: FakeHub, model: str, node_caches: list[Path]
) -> None:
    """The budget holds per node (issue 31): a pin is made on every node, the budget answers per
    node, and an eviction frees each node's own cache; what is pinned stays everywhere."""
    async with app_client(fleet_settings) as client:
        ids = await node_ids(client)
        one = ids[0]
        started = await client.post("/api/models/download", json={**BODY, "nodes": [one[:8]]})
        assert started.status_code == 202, started.text
        assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
        pinned = (await client.put("/api/models/pin", json=BODY)).json()
        assert sorted(pinned["nodes"]) == sorted(ids)
        assert len(pinned["commits"]) == 1
        budget = (await client.get("/api/models/budget")).json()
        assert sorted(n["node_id"] for n in budget["nodes"]) == sorted(ids)
        kept = [(k["node_id"], k["reason"]) for k in budget["kept"]]
        assert kept == [(one, "pinned")]
        evict = {"target_bytes": 0}
        dry = (await client.post("/api/models/evict?dry_run=true", json=evict)).json()
        assert dry["evicted"] == []  # pinned
        assert (await client.request("DELETE", "/api/models/pin", json=BODY)).status_code == 200
        dry = (await client.post("/api/models/evict?dry_run=true", json=evict)).json()
        assert [e["node_id"] for e in dry["evicted"]] == [one], (dry["kept"], dry["note"])
        assert sum(on_disk(cache) for cache in node_caches) == 1  # a dry run: still there
        done = (await client.post("/api/models/evict", json=evict)).json()
        assert [e["node_id"] for e in done["evicted"]] == [one]
        assert not any(on_disk(cache) for cache in node_caches)
        assert (await client.post("/api/models/evict", json={})).status_code == 422  # no budget


async def test_no_room_on_the_nodes_starts_nothing_anywhere(
    fleet_settings: Settings, model: str, node_caches: list[Path], repos: RepoBuilder
) -> None:
    tight = fleet_settings.model_copy(update={"space_margin_bytes": 1 << 60})
    async with app_client(tight) as client:
        answer = await client.post("/api/models/download", json=BODY)
        assert answer.status_code == 507, answer.text
        assert "not enough space on 3 node(s)" in answer.json()["detail"]
        assert (await client.post("/api/models/status", json=BODY)).json()["status"] == "NOT_FOUND"
        # A repo the Hub does not have (a typo): as on one machine, 404 for the plan and for
        # the download, which starts nowhere.
        absent = {"hf_repo": "org/absent"}
        planned = await client.post("/api/models/plan", json=absent)
        assert planned.status_code == 404, planned.text
        refused = await client.post("/api/models/download", json=absent)
        assert refused.status_code == 404, refused.text
        assert "org/absent" in refused.json()["detail"]
        # A gated one (no token here): the download starts (on one node: the others wait for
        # it) and its status says why it failed, everywhere.
        repos.commit("org/gated", {"config.json": "{}"}, gated=True)
        gated = {"hf_repo": "org/gated"}
        started = await client.post("/api/models/download", json=gated)
        assert started.status_code == 202, started.text
        failed = await status_until(
            client,
            lambda a: not any(n["status"] == "DOWNLOADING" for n in a["nodes"]),
            body=gated,
        )
        assert failed["status"] == "NOT_FOUND", failed
        assert all(n["error_message"] for n in failed["nodes"]), failed["nodes"]
    assert not any((cache / "models--org--model").exists() for cache in node_caches)


async def test_a_cancel_stops_every_nodes_worker(
    fleet_settings: Settings, hub: FakeHub, model: str, node_caches: list[Path]
) -> None:
    hub.add_fault(trickle(MB // 2, path="*/resolve/*/w.bin"))
    async with app_client(fleet_settings) as client:
        assert (await client.post("/api/models/download", json=BODY)).status_code == 202

        def fetching(answer: dict[str, Any]) -> bool:
            return any(
                (n["progress"] or {}).get("transferred_bytes") for n in answer.get("nodes") or []
            )

        answer = await status_until(client, fetching)
        assert [n["status"] for n in answer["nodes"]] == ["DOWNLOADING"] * 3, answer
        cancelled = (await client.request("DELETE", "/api/models", json=BODY)).json()
        assert cancelled["status"] == "cancelled"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while any(downloads_using(cache) for cache in node_caches):
            assert loop.time() < deadline, "a worker outlived its cancel"
            await asyncio.sleep(0.1)
        after = (await client.post("/api/models/status", json=BODY)).json()
        # As on one machine: a node keeps config.json when it had it (PARTIAL); w.bin is
        # nowhere.
        assert after["status"] in ("PARTIAL", "NOT_FOUND"), after
        assert all(n["status"] in ("PARTIAL", "NOT_FOUND") for n in after["nodes"]), after
    assert not any(on_disk(cache) for cache in node_caches)


async def test_a_peer_that_leaves_mid_copy_hands_over_to_the_hub_and_a_new_node_catches_up(
    fleet_settings: Settings,
    hub: FakeHub,
    repos: RepoBuilder,
    cluster: RayCluster,
    node_caches: list[Path],
) -> None:
    size = 24 * MB
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(size, seed=82)})
    # Under a cap of 8 MB/s per node, a copy of the 24 MB file takes 3 s: time to take its peer
    # away (the file is far larger than what the kernel's socket buffers hold between them).
    slow = fleet_settings.model_copy(update={"max_download_bytes_per_second": 8_000_000})
    holder = cluster.nodes[1]  # not the head: the cluster lives on without it
    others = [n for n in cluster.nodes if n != holder]
    async with app_client(slow) as client:
        assert (
            await client.post("/api/models/download", json={**BODY, "nodes": [holder]})
        ).status_code == 202
        assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
        first = hub.served("*/resolve/*")
        assert (await client.post("/api/models/download", json=BODY)).status_code == 202

        def copying(answer: dict[str, Any]) -> bool:
            # Both copies under way (not only the first: on a busy machine the second node's
            # worker can start a second later, and a peer taken away before it began gave that
            # node nothing to copy, which this test then read as a failure of the hand-over).
            by_node = {n["node_id"]: n for n in answer["nodes"]}
            return all(
                ((by_node[n]["progress"] or {}).get("from_peers_bytes") or 0) > MB // 2
                for n in others
            )

        await status_until(client, copying)
        await asyncio.to_thread(cluster.remove_node, holder)

        def others_done(answer: dict[str, Any]) -> bool:
            by_node = {n["node_id"]: n for n in answer["nodes"]}
            return (
                all(by_node[n]["status"] == "DOWNLOADED" for n in others)
                and by_node[holder]["gone"]
            )

        answer = await status_until(client, others_done)
        assert answer["status"] == "PARTIAL", answer
        assert f"node {holder[:12]}" in answer["error_message"]
        copies = [n for n in answer["nodes"] if n["node_id"] in others]
        # Each copy got part of the file from the peer, and the rest from the Hub.
        fetched = [(n["from_peers_bytes"], n["from_hub_bytes"]) for n in copies]
        assert all(peers > 0 and hub > 0 for peers, hub in fetched), fetched
        again = hub.served("*/resolve/*") - first
        assert 0 < again < 2 * size
        assert sum(n["from_hub_bytes"] for n in copies) == again

        # A node that joins gets an agent within the watch's 10 s, and copies from the others.
        newcomer = await joined(client, cluster, node_caches)
        served = hub.served("*/resolve/*")
        started = await client.post("/api/models/download", json=BODY)
        assert started.status_code == 202, started.text
        assert (
            started.json()["nodes"] == sorted(started.json()["nodes"])
            or newcomer in started.json()["nodes"]
        )
        answer = await status_until(
            client,
            lambda a: (
                a["status"] in ("DOWNLOADED", "PARTIAL")
                and not any(n["status"] == "DOWNLOADING" for n in a["nodes"])
            ),
        )
        assert answer["status"] == "DOWNLOADED", answer
        assert hub.served("*/resolve/*") == served
        assert on_disk(cluster.caches[newcomer])


async def test_a_rollout_over_four_capped_nodes_survives_a_source_that_leaves(
    fleet_settings: Settings,
    hub: FakeHub,
    repos: RepoBuilder,
    cluster: RayCluster,
    node_caches: list[Path],
) -> None:
    """Four nodes, every one receiving and sending at most 8 MB/s: all start at once, each
    copying from its parents in the rollout's trees while they receive (as ranges, so that the
    partial files are what is passed on). The node that feeds two others leaves mid-copy: they
    go on from the seed or the Hub, and every node left ends verified."""
    size = 24 * MB
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(size, seed=83)})
    capped = ranged(
        fleet_settings,
        max_download_bytes_per_second=8_000_000,
        peer_uplink_bytes_per_second=8_000_000,
    )
    head = cluster.nodes[0]
    async with app_client(capped) as client:
        await joined(client, cluster, node_caches)
        others = [n for n in cluster.nodes if n != head]
        assert len(others) == 3
        # The first named fetches from the Hub; the second feeds the two after it (the top of
        # the first tree: api.fleet.rollout), and is not the head (which cannot leave).
        seed, source = others[0], others[1]
        order = [seed, source, head, others[2]]
        started = await client.post("/api/models/download", json={**BODY, "nodes": order})
        assert started.status_code == 202, started.text

        def copying(answer: dict[str, Any]) -> bool:
            by_node = {n["node_id"]: n for n in answer["nodes"]}
            return all(
                ((by_node[n]["progress"] or {}).get("from_peers_bytes") or 0) > MB
                for n in order[1:]
            )

        await status_until(client, copying)
        await asyncio.to_thread(cluster.remove_node, source)

        def ended(answer: dict[str, Any]) -> bool:
            by_node = {n["node_id"]: n for n in answer["nodes"]}
            return by_node[source]["gone"] and all(
                by_node[n]["status"] == "DOWNLOADED" for n in order if n != source
            )

        answer = await status_until(client, ended, seconds=120)
        left = [n for n in answer["nodes"] if n["node_id"] != source]
        assert all((n["from_peers_bytes"] or 0) > MB for n in left if n["node_id"] != seed), left
        verified = (await client.post("/api/models/verify", json=BODY)).json()
        assert verified["verified"] is True, verified
        assert {n["node_id"] for n in verified["nodes"]} == set(order) - {source}
        # The Hub sent the seed's copy, and the rest of one orphan's (the other went on from
        # the seed): less than two copies in all, where four nodes alone would take four.
        content = size + 2
        assert hub.served("*/resolve/*") < 2 * content
        assert sum(n["from_hub_bytes"] or 0 for n in left) == hub.served("*/resolve/*")
    assert all(on_disk(cluster.caches[n]) for n in order if n != source)


async def test_an_agent_that_dies_is_restarted_and_its_download_resumed(
    fleet_settings: Settings, hub: FakeHub, model: str, cluster: RayCluster
) -> None:
    node = cluster.nodes[2]
    cache = cluster.caches[node]
    hub.add_fault(trickle(MB // 2, path="*/resolve/*/w.bin"))
    async with app_client(fleet_settings) as client:
        body = {**BODY, "nodes": [node]}
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        await status_until(
            client, lambda a: bool((a["nodes"][0]["progress"] or {}).get("transferred_bytes"))
        )
        workers = downloads_using(cache)
        assert len(workers) == 1
        zygote = next(p for p in workers_using(cache) if p not in workers)
        agent = int(Path(f"/proc/{zygote}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(agent, signal.SIGKILL)  # the agent's process dies mid-download
        hub.clear_faults()
        # Its zygote and worker go with it: nothing keeps writing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while any(pid in downloads_using(cache) for pid in workers):
            assert loop.time() < deadline, "the dead agent's worker lives on"
            await asyncio.sleep(0.1)
        # Ray restarts the agent; the fleet's watch starts it again, and it resumes the download
        # from its node's job store: nobody asks again.
        answer = await status_until(client, lambda a: a["status"] == "DOWNLOADED", seconds=120)
        assert [n["node_id"] for n in answer["nodes"]] == [node]
    # Fetched twice: the first transfer died with the agent; the resumed one completed it.
    assert hub.count("GET", "*/resolve/*/w.bin") >= 2
    assert (cache / "models--org--model").exists()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_node_that_stops_answering_costs_a_line_not_a_minute(
    fleet_settings: Settings, hub: FakeHub, model: str, cluster: RayCluster
) -> None:
    """One node's agent frozen (SIGSTOP): status, list and space answer within the fleet's
    answer time, that node reported unreachable with the reason (before: 60 s each, every call).
    Then its raylet killed: its agent, zygote and download worker are gone within seconds (before:
    they kept writing blobs 45 s later)."""
    node = cluster.nodes[2]
    cache = cluster.caches[node]
    quick = fleet_settings.model_copy(update={"fleet_answer_seconds": 2.0})
    hub.add_fault(trickle(MB // 4, path="*/resolve/*/w.bin"))
    async with app_client(quick) as client:
        assert (
            await client.post("/api/models/download", json={**BODY, "nodes": [node]})
        ).status_code == 202
        await status_until(
            client, lambda a: bool((a["nodes"][0]["progress"] or {}).get("transferred_bytes"))
        )
        [worker] = downloads_using(cache)
        zygote = _parent(worker)
        agent = _parent(zygote)
        raylet = _parent(agent)
        assert b"raylet" in Path(f"/proc/{raylet}/cmdline").read_bytes()
        os.kill(agent, signal.SIGSTOP)
        try:
            # Each answer comes (the 30 s bound is far above the 2 s answer time, and far below
            # the 60 s every call took before), with the frozen node named.
            async with asyncio.timeout(30):
                status = (await client.post("/api/models/status", json=BODY)).json()
            [frozen] = [n for n in status["nodes"] if n["node_id"] == node]
            assert frozen["unreachable"] is True
            assert "no answer within 2 s" in frozen["error_message"]
            async with asyncio.timeout(30):
                listed = (await client.get("/api/models/list")).json()
            assert [n["node_id"] for n in listed["nodes_unanswered"]] == [node]
            assert listed["nodes_unanswered"][0]["unreachable"] is True
            async with asyncio.timeout(30):
                space = (await client.get("/api/models/space")).json()
            by_node = {n["node_id"]: n for n in space["nodes"]}
            assert by_node[node]["unreachable"] is True
            answered = [n for n in space["nodes"] if n["node_id"] != node]
            assert all(n["available_bytes"] for n in answered)
        finally:
            os.kill(agent, signal.SIGCONT)
        hub.clear_faults()
        os.kill(raylet, signal.SIGKILL)  # the node dies as a machine does
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while any(_alive(pid) for pid in (agent, zygote, worker)):
            assert loop.time() < deadline, "a process of the dead node lives on"
            await asyncio.sleep(0.1)
    await asyncio.to_thread(cluster.remove_node, node)  # the cluster's own bookkeeping


def _on_disk_bytes(cache: Path) -> int:
    """Bytes a node has written for org/model (allocated: a file being written is sparse)."""
    folder = cache / "models--org--model"
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


async def test_downloads_events_bandwidth_metrics_and_updates_cover_every_node(
    fleet_settings: Settings, hub: FakeHub, repos: RepoBuilder, node_caches: list[Path]
) -> None:
    """Each endpoint of the service acts on every node (before: /downloads, /updates, both
    bandwidth routes and the metrics' gauges answered for the head's local manager only)."""
    size = 24 * MB
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(size, seed=84)})
    async with app_and_client(fleet_settings) as (app, client):
        ids = await node_ids(client)
        # One node has it (from the Hub, uncapped); then a cap of 4 MB/s set on the running
        # fleet holds for the two nodes that copy it from that one: 6 s each.
        seed, copiers = ids[0], ids[1:]
        body = {**BODY, "nodes": [seed]}
        # Subscribed before the seed's download: a node's events are forwarded to the head's
        # bus after its status changes, so the seed's own "completed" is awaited on the bus
        # (it may come after the status says DOWNLOADED) and only later events are counted.
        with app.state.service.events.subscribe(None) as queue:
            assert (await client.post("/api/models/download", json=body)).status_code == 202
            assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
            async with asyncio.timeout(30):
                while not (
                    (event := await queue.get()).type == "completed" and event.node_id == seed
                ):
                    pass
            cap = 4 * MB
            capped = await client.put(
                "/api/models/settings/bandwidth", json={"max_bytes_per_second": cap}
            )
            assert capped.json()["per_node"] is True
            assert capped.json()["max_bytes_per_second"] == cap
            assert (await client.post("/api/models/download", json=BODY)).status_code == 202

            def both_copy(answer: dict[str, Any]) -> bool:
                by_node = {n["node_id"]: n for n in answer.get("nodes") or []}
                return all(
                    ((by_node.get(n, {}).get("progress") or {}).get("transferred_bytes") or 0) > 0
                    for n in copiers
                )

            await status_until(client, both_copy)
            # GET /downloads: the download once, with each node that runs it.
            listed = (await client.get("/api/models/downloads")).json()
            [running] = listed["downloads"]
            assert running["model"]["hf_repo"] == "org/model"
            assert sorted(
                n["node_id"] for n in running["nodes"] if n["status"] == "DOWNLOADING"
            ) == sorted(copiers), running
            # The shares: each node's download has the whole cap of its node.
            shares = (await client.get("/api/models/settings/bandwidth")).json()
            assert sorted((d["node_id"], d["bytes_per_second"]) for d in shares["downloads"]) == [
                (n, cap) for n in sorted(copiers)
            ]
            # The metrics' gauges: every node's, and their sums.
            metrics = (await client.get("/metrics")).text
            assert "models_active_downloads 2.0" in metrics
            for node in copiers:
                assert f'models_node_active_downloads{{node="{node}"}} 1.0' in metrics
            assert f'models_node_active_downloads{{node="{seed}"}} 0.0' in metrics
            # A lower cap, set while they copy, slows every node's copy at once (bytes on disk).
            lower = 256 * 1024
            loop = asyncio.get_running_loop()
            before = [_on_disk_bytes(cluster_cache) for cluster_cache in node_caches]
            began = loop.time()
            lowered = await client.put(
                "/api/models/settings/bandwidth", json={"max_bytes_per_second": lower}
            )
            assert sorted(d["bytes_per_second"] for d in lowered.json()["downloads"]) == [lower] * 2
            await asyncio.sleep(2.0)  # a while under the lower cap
            after = [_on_disk_bytes(cluster_cache) for cluster_cache in node_caches]
            elapsed = loop.time() - began
            slack = 2 * (cap * BURST_SECONDS + 4 * 256 * 1024 + 64 * 1024)
            grown = [b - a for a, b in zip(before, after, strict=True)]
            # At 4 MB/s, 2 s would have written 8 MB on each copying node.
            assert all(g <= lower * elapsed + slack for g in grown), (grown, elapsed)
            lifted = await client.put(
                "/api/models/settings/bandwidth", json={"max_bytes_per_second": 0}
            )
            assert lifted.json()["max_bytes_per_second"] is None
            final = await wait_for_status(client, BODY, FINAL, seconds=90)
            assert final["status"] == "DOWNLOADED", final
            seen = [queue.get_nowait() for _ in range(queue.qsize())]
        # The event stream's bus: each copying node's download, with its node.
        started = {e.node_id for e in seen if e.type == "started"}
        completed = {e.node_id for e in seen if e.type == "completed"}
        assert started == completed == set(copiers), seen
        assert not (await client.get("/api/models/downloads")).json()["downloads"]
        # GET /updates: the Hub's main moved: every node's cached main says so, once.
        old = final["commit"]
        new = repos.commit(
            "org/model", {"config.json": '{"v": 2}', "w.bin": Generated(size, seed=84)}
        )
        updates = (await client.get("/api/models/updates", params={"refresh": "true"})).json()
        [entry] = updates["models"]
        assert (entry["cached_commit"], entry["hub_commit"]) == (old, new)
        assert entry["update_available"] is True
        assert sorted(entry["nodes"]) == sorted(ids)
        assert entry["bytes_to_download"] == len('{"v": 2}')
        # The nodes use one token: each checks within its share of the fleet's budget, and
        # together they keep to it (each had its own whole budget before).
        fleet_budget = fleet_settings.update_calls_per_minute
        assert updates["budget"]["calls_per_minute"] == fleet_budget // len(ids) * len(ids)
        assert updates["budget"]["calls_last_minute"] <= fleet_budget
