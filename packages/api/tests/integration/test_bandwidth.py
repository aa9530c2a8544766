"""A bandwidth cap (issue 16): the downloads of the service together stay under
MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND, shared between them, changeable while they run.

Only bounds that a busy machine cannot break are asserted: bytes read by a time are at most what
the cap allows by then (a slow machine reads fewer). The rates achieved are measured by
bench/bandwidth.py."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from api.models.hub.throttle import BURST_SECONDS
from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, trickle
from tests.helpers import FINAL, MB, app_client, wait_for_status

CAP = 2 * MB
SLACK = CAP * BURST_SECONDS + 4 * 256 * 1024 + 64 * 1024  # the burst, and one read per connection


def capped(settings: Settings, cap: int | None = CAP, **changes: Any) -> Settings:
    return settings.model_copy(
        update={
            "max_download_bytes_per_second": cap or 0,
            # Large files by parallel ranges (4 connections), small ones by the library's client.
            "ranged_min_bytes": 4 * MB,
            "ranged_part_bytes": MB,
            "ranged_connections": 4,
            **changes,
        }
    )


async def watch_under_cap(
    client: httpx.AsyncClient, bodies: list[dict[str, str]], cap: float, began: float, total: int
) -> list[dict[str, Any]]:
    """Poll until every download ends; at each look, the bytes fetched so far by all of them fit
    under the cap since ``began`` (before they were asked for), and at the end all ``total``
    bytes do: the downloads took at least as long as the cap makes them."""
    loop = asyncio.get_running_loop()
    deadline = began + 120
    slack = SLACK * len(bodies)
    while True:
        answers = [(await client.post("/api/models/status", json=b)).json() for b in bodies]
        elapsed = loop.time() - began
        if all(a["status"] in FINAL for a in answers):
            assert total <= cap * elapsed + slack, (total, elapsed)
            return answers
        each = [(a.get("progress") or {}).get("transferred_bytes") or 0 for a in answers]
        assert sum(each) <= cap * elapsed + slack, (each, elapsed)
        # Shared: none takes more than its part (all of them run from the start here).
        assert max(each) <= cap / len(bodies) * elapsed + SLACK, (each, elapsed)
        assert loop.time() < deadline
        await asyncio.sleep(0.1)


@pytest.mark.both_paths
async def test_a_capped_download_stays_under_the_cap(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit(
        "org/model",
        {"config.json": "{}", "small.bin": Generated(2 * MB, seed=1), "big.bin": Generated(6 * MB)},
    )
    body = {"hf_repo": "org/model"}
    async with app_client(capped(settings)) as client:
        began = asyncio.get_running_loop().time()
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        share = await share_of(client, body)
        assert share == CAP
        (answer,) = await watch_under_cap(client, [body], CAP, began, 8 * MB + 2)
        assert answer["status"] == "DOWNLOADED", answer
        assert (await client.post("/api/models/verify", json=body)).json()["verified"] is True
    # Through Xet too: under the cap its files came by the Hub's plain HTTP download.
    assert hub.count(None, "/cas/*") == 0


async def share_of(client: httpx.AsyncClient, body: dict[str, str]) -> float | None:
    answer = (await client.post("/api/models/status", json=body)).json()
    progress = answer["progress"] or {}
    assert progress.get("bandwidth_note") is None, progress
    share: float | None = progress.get("bandwidth_limit_bytes_per_second")
    return share


async def test_three_downloads_share_the_cap(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    bodies = []
    for i in range(3):
        repos.commit(f"org/m{i}", {"w.bin": Generated(3 * MB, seed=40 + i)})
        bodies.append({"hf_repo": f"org/m{i}"})
    async with app_client(capped(settings)) as client:
        began = asyncio.get_running_loop().time()
        for body in bodies:
            assert (await client.post("/api/models/download", json=body)).status_code == 202
        shares = (await client.get("/api/models/settings/bandwidth")).json()
        assert shares["max_bytes_per_second"] == CAP
        assert sorted(d["bytes_per_second"] for d in shares["downloads"]) == [CAP / 3] * 3
        answers = await watch_under_cap(client, bodies, CAP, began, 9 * MB)
        assert [a["status"] for a in answers] == ["DOWNLOADED"] * 3


async def test_the_cap_changes_while_it_runs_without_a_restart(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/model", {"big.bin": Generated(32 * MB, seed=3)})
    body = {"hf_repo": "org/model"}
    async with app_client(capped(settings, cap=256 * 1024)) as client:
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        loop = asyncio.get_running_loop()
        while True:  # bytes arriving at 256 KiB/s
            progress = (await client.post("/api/models/status", json=body)).json()["progress"]
            if (progress or {}).get("transferred_bytes"):
                break
            await asyncio.sleep(0.05)
        before = progress["transferred_bytes"]
        began = loop.time()
        answer = await client.put(
            "/api/models/settings/bandwidth", json={"max_bytes_per_second": 128 * 1024}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["downloads"][0]["bytes_per_second"] == 128 * 1024
        await asyncio.sleep(1.0)  # a while under the lower cap
        progress = (await client.post("/api/models/status", json=body)).json()["progress"]
        lower = 128 * 1024
        assert progress["transferred_bytes"] - before <= lower * (loop.time() - began) + SLACK * 2
        assert progress["bandwidth_limit_bytes_per_second"] == lower
        assert progress["attempt"] == 1
        # Lifted: the same attempt, the same worker, goes on at the link's speed.
        answer = await client.put(
            "/api/models/settings/bandwidth", json={"max_bytes_per_second": 0}
        )
        assert answer.json()["max_bytes_per_second"] is None
        final = await wait_for_status(client, body, FINAL, seconds=60)
        assert final["status"] == "DOWNLOADED", final
    assert hub.served(hub.content_path("org/model", "big.bin")) == 32 * MB  # nothing twice


@pytest.mark.parametrize(
    "value",
    [1000, -1, "fast", 1.5e6, True],
    ids=["too-low", "negative", "text", "float", "bool"],
)
async def test_a_cap_that_is_not_one_is_refused(client: httpx.AsyncClient, value: object) -> None:
    answer = await client.put(
        "/api/models/settings/bandwidth", json={"max_bytes_per_second": value}
    )
    assert answer.status_code == 422, answer.text
    assert (await client.get("/api/models/settings/bandwidth")).json()[
        "max_bytes_per_second"
    ] is None
    missing = await client.put("/api/models/settings/bandwidth", json={})
    assert missing.status_code == 422


async def test_xet_chosen_over_the_cap_says_the_cap_does_not_hold(
    settings: Settings, repos: RepoBuilder
) -> None:
    with FakeHub(repos.root, xet=True) as hub:
        repos.commit("org/model", {"big.bin": Generated(8 * MB, seed=5)})
        hub.add_fault(trickle(2 * MB, path=hub.content_path("org/model", "big.bin")))
        body = {"hf_repo": "org/model"}
        xet = capped(settings, hf_endpoint=hub.url, xet_when_capped="xet")
        async with app_client(xet) as client:
            assert (await client.post("/api/models/download", json=body)).status_code == 202
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                answer = (await client.post("/api/models/status", json=body)).json()
                note = (answer["progress"] or {}).get("bandwidth_note")
                if note is not None:
                    break
                assert answer["status"] == "DOWNLOADING", "ended without saying it"
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
            assert "hf_xet" in note
            listed = (await client.get("/api/models/settings/bandwidth")).json()["downloads"]
            assert listed[0]["note"] == note
            await wait_for_status(client, body, FINAL)
        assert hub.count(None, "/cas/*") > 0


async def test_a_capped_download_from_a_hub_without_xet_says_nothing_of_hf_xet(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    """A hub that serves plain HTTP only: no word of hf_xet (the library's transfer bar counts
    HTTP bytes too, which had been read as hf_xet's), and transferred_bytes keeps up with what
    arrives, the large file's parallel ranges included (it had counted only the small files)."""
    repos.commit(
        "org/model",
        {
            "config.json": "{}",
            "small.bin": Generated(MB, seed=6),
            "big.bin": Generated(6 * MB, seed=7),
        },
    )
    body = {"hf_repo": "org/model"}
    async with app_client(capped(settings)) as client:
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        seen: list[dict[str, Any]] = []
        while True:
            answer = (await client.post("/api/models/status", json=body)).json()
            if answer["status"] != "DOWNLOADING":
                break
            progress = answer["progress"] or {}
            assert progress.get("bandwidth_note") is None, progress
            seen.append(progress)
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        assert answer["status"] == "DOWNLOADED", answer
    # Under the 2 MB/s cap the 7 MB take seconds: the looks mid-way saw the large file arrive.
    late = [p for p in seen if (p.get("downloaded_bytes") or 0) >= 4 * MB]
    assert late, seen[-3:]
    for progress in late:
        assert progress["transferred_bytes"] >= progress["downloaded_bytes"] - 2 * MB, progress
