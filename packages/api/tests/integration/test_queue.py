"""A queue, when asked for (issue 16): with MODELS_MAX_QUEUED_DOWNLOADS, a download beyond the
slots waits its turn (first in, first out) instead of a 429; 429 only when the queue is full too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, latency, trickle
from tests.helpers import FINAL, MB, app_client, wait_for_status


def body(name: str) -> dict[str, str]:
    return {"hf_repo": f"org/{name}"}


async def status(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.post("/api/models/status", json=body(name))).json()
    return answer


@pytest.fixture
async def queued_client(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> AsyncIterator[httpx.AsyncClient]:
    """One slot and a queue of two; org/slow takes a while (about 4 s), the others are small."""
    repos.commit("org/slow", {"w.bin": Generated(4 * MB, seed=1)})
    for name in ("a", "b", "c"):
        repos.commit(f"org/{name}", {"w.bin": Generated(MB, seed=ord(name))})
    hub.add_fault(trickle(MB, path=hub.content_path("org/slow", "w.bin")))
    config = settings.model_copy(update={"max_concurrent_downloads": 1, "max_queued_downloads": 2})
    async with app_client(config) as client:
        yield client


async def test_downloads_beyond_the_slots_wait_their_turn_in_order(
    queued_client: httpx.AsyncClient, hub: FakeHub
) -> None:
    client = queued_client
    assert (await client.post("/api/models/download", json=body("slow"))).status_code == 202
    for name in ("a", "b"):
        answer = await client.post("/api/models/download", json=body(name))
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"task_id": f"org/{name}:latest", "status": "DOWNLOADING"}
    first, second = await status(client, "a"), await status(client, "b")
    assert (first["status"], first["progress"]["phase"], first["progress"]["queue_position"]) == (
        "DOWNLOADING",
        "queued",
        1,
    )
    assert second["progress"]["queue_position"] == 2
    # Nothing of the queued ones is fetched while they wait.
    assert hub.count("GET", hub.content_path("org/a", "w.bin")) == 0
    # The queue is full: 429 with Retry-After, and it says so.
    refused = await client.post("/api/models/download", json=body("c"))
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "5"
    assert "the queue of 2 is full" in refused.json()["detail"]
    # A revision that waits already is a conflict, as one that runs.
    assert (await client.post("/api/models/download", json=body("a"))).status_code == 409
    listed = (await client.get("/api/models/downloads")).json()["downloads"]
    assert [(d["model"]["hf_repo"], d["progress"]["phase"]) for d in listed][1:] == [
        ("org/a", "queued"),
        ("org/b", "queued"),
    ]
    metrics = (await client.get("/metrics")).text
    assert "models_queued_downloads 2.0" in metrics
    assert "models_active_downloads 1.0" in metrics
    # Each starts when a slot frees, first in first out, and ends downloaded.
    for name in ("slow", "a", "b"):
        assert (await wait_for_status(client, body(name), FINAL))["status"] == "DOWNLOADED"


async def test_a_queued_download_is_cancelled_by_delete_and_leaves_the_queue(
    queued_client: httpx.AsyncClient, hub: FakeHub
) -> None:
    client = queued_client
    await client.post("/api/models/download", json=body("slow"))
    await client.post("/api/models/download", json=body("a"))
    await client.post("/api/models/download", json=body("b"))
    cancelled = await client.request("DELETE", "/api/models", json=body("a"))
    assert cancelled.json()["status"] == "cancelled"
    assert (await status(client, "a"))["status"] == "NOT_FOUND"
    assert (await status(client, "b"))["progress"]["queue_position"] == 1  # moved up
    # A place is free again in the queue.
    assert (await client.post("/api/models/download", json=body("c"))).status_code == 202
    for name in ("slow", "b", "c"):
        assert (await wait_for_status(client, body(name), FINAL))["status"] == "DOWNLOADED"
    assert hub.count("GET", hub.content_path("org/a", "w.bin")) == 0  # never fetched


async def test_the_events_say_queued_then_started_in_order(
    queued_client: httpx.AsyncClient,
) -> None:
    client = queued_client
    app = client._transport.app  # type: ignore[attr-defined]
    seen: list[tuple[str, str]] = []
    app.state.model_manager.events.add_listener(lambda e: seen.append((e.task_id, e.type.value)))
    for name in ("slow", "a", "b"):
        await client.post("/api/models/download", json=body(name))
    assert (await wait_for_status(client, body("b"), FINAL))["status"] == "DOWNLOADED"
    for name in ("a", "b"):
        mine = [kind for task, kind in seen if task == f"org/{name}:latest"]
        assert mine[:2] == ["queued", "started"], mine
        assert mine[-1] == "completed", mine
    starts = [task for task, kind in seen if kind == "started"]
    assert starts == ["org/slow:latest", "org/a:latest", "org/b:latest"]  # first in, first out
    # Each queued one started only once the one before had ended.
    assert seen.index(("org/slow:latest", "completed")) < seen.index(("org/a:latest", "started"))
    assert seen.index(("org/a:latest", "completed")) < seen.index(("org/b:latest", "started"))


async def test_without_a_queue_the_spec_answers_429(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/slow", {"w.bin": Generated(4 * MB, seed=1)})
    repos.commit("org/a", {"w.bin": Generated(MB, seed=2)})
    hub.add_fault(trickle(MB, path=hub.content_path("org/slow", "w.bin")))
    async with app_client(settings.model_copy(update={"max_concurrent_downloads": 1})) as client:
        await client.post("/api/models/download", json=body("slow"))
        refused = await client.post("/api/models/download", json=body("a"))
        assert refused.status_code == 429
        assert "queue" not in refused.json()["detail"]


async def test_a_start_that_fails_at_once_hands_its_slot_to_the_queue(
    queued_client: httpx.AsyncClient, hub: FakeHub
) -> None:
    """A download of a repo the Hub does not have fails while it starts (it held the slot
    meanwhile): the one queued behind it must not wait for ever."""
    client = queued_client
    hub.add_fault(latency(1.0, path="/api/models/org/missing*"))  # a slow "not found"
    missing = asyncio.ensure_future(client.post("/api/models/download", json=body("missing")))
    # It holds the slot while it waits for its file list: from the Hub's first look at it on.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not hub.count(None, "/api/models/org/missing*"):
        assert loop.time() < deadline, "the download never asked the Hub"
        await asyncio.sleep(0.02)
    queued = await client.post("/api/models/download", json=body("a"))
    assert queued.status_code == 202
    assert (await status(client, "a"))["progress"]["phase"] == "queued"
    assert (await missing).status_code == 404  # the Hub has no such repo: nothing started
    assert (await wait_for_status(client, body("missing"), FINAL))["status"] == "NOT_FOUND"
    assert (await wait_for_status(client, body("a"), FINAL, seconds=30))["status"] == "DOWNLOADED"
