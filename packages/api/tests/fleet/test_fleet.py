"""A fleet (issue 18, first part): the API over every node of a 3-node Ray cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.settings import Settings
from fakehub.raycluster import RayCluster
from fakehub import FakeHub, Generated, RepoBuilder, trickle
from tests.helpers import FINAL, MB, app_client, downloads_using, wait_for_status

pytestmark = [pytest.mark.fleet, pytest.mark.xdist_group("fleet")]

BODY = {"hf_repo": "org/model"}


@pytest.fixture
def fleet_settings(
    settings: Settings, cluster: RayCluster, node_caches: list[Path]
) -> Settings:
    return settings.model_copy(update={"ray_address": cluster.address})


@pytest.fixture
def model(repos: RepoBuilder) -> str:
    return repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(3 * MB, seed=81)})


def on_disk(cache: Path) -> bool:
    return any((cache / "models--org--model" / "snapshots").glob("*/w.bin"))


async def node_ids(client: httpx.AsyncClient) -> list[str]:
    space = (await client.get("/api/models/space")).json()
    return [n["node_id"] for n in space["nodes"]]


async def test_a_download_reaches_every_node_and_a_delete_leaves_none(
    fleet_settings: Settings, model: str, node_caches: list[Path]
) -> None:
    async with app_client(fleet_settings) as client:
        space = (await client.get("/api/models/space")).json()
        assert sorted(n["cache_path"] for n in space["nodes"]) == sorted(map(str, node_caches))
        started = await client.post("/api/models/download", json=BODY)
        assert started.status_code == 202, started.text
        assert len(started.json()["nodes"]) == 3
        answer = await wait_for_status(client, BODY, FINAL)
        assert answer["status"] == "DOWNLOADED", answer
        assert [n["status"] for n in answer["nodes"]] == ["DOWNLOADED"] * 3
        assert answer["commit"] == model
        assert all(on_disk(cache) for cache in node_caches)
        listed = (await client.get("/api/models/list")).json()["models"]
        assert [(m["model"]["hf_commit"], len(m["nodes"])) for m in listed] == [(model, 3)]
        deleted = (await client.request("DELETE", "/api/models", json=BODY)).json()
        assert deleted["status"] == "deleted"
        assert [n["status"] for n in deleted["nodes"]] == ["deleted"] * 3
        assert not any(on_disk(cache) for cache in node_caches)
        assert (await client.post("/api/models/status", json=BODY)).json()["status"] == "NOT_FOUND"


async def test_a_subset_of_the_nodes(
    fleet_settings: Settings, model: str, node_caches: list[Path]
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


async def test_no_room_on_the_nodes_starts_nothing_anywhere(
    fleet_settings: Settings, model: str, node_caches: list[Path]
) -> None:
    tight = fleet_settings.model_copy(update={"space_margin_bytes": 1 << 60})
    async with app_client(tight) as client:
        answer = await client.post("/api/models/download", json=BODY)
        assert answer.status_code == 507, answer.text
        assert "not enough space on 3 node(s)" in answer.json()["detail"]
        assert (await client.post("/api/models/status", json=BODY)).json()["status"] == "NOT_FOUND"
    assert not any((cache / "models--org--model").exists() for cache in node_caches)


async def test_a_cancel_stops_every_nodes_worker(
    fleet_settings: Settings, hub: FakeHub, model: str, node_caches: list[Path]
) -> None:
    hub.add_fault(trickle(MB // 2, path="*/resolve/*/w.bin"))
    async with app_client(fleet_settings) as client:
        assert (await client.post("/api/models/download", json=BODY)).status_code == 202

        def running(answer: dict[str, Any]) -> bool:
            return all(
                (n["progress"] or {}).get("transferred_bytes") for n in answer.get("nodes") or []
            )

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not running(answer := (await client.post("/api/models/status", json=BODY)).json()):
            assert loop.time() < deadline, answer
            await asyncio.sleep(0.1)
        assert all(downloads_using(cache) for cache in node_caches)
        cancelled = (await client.request("DELETE", "/api/models", json=BODY)).json()
        assert [n["status"] for n in cancelled["nodes"]] == ["cancelled"] * 3
        # No worker left writing on any node.
        deadline = loop.time() + 30
        while any(downloads_using(cache) for cache in node_caches):
            assert loop.time() < deadline, "a worker outlived its cancel"
            await asyncio.sleep(0.1)
