"""The figures behind the page's pictures (issue 30): the throughput of the service and of each
running download over the last minutes, and what each revision holds alone and shares."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fakehub import FakeHub, Generated, RepoBuilder, trickle
from tests.helpers import FINAL, MB, wait_for_status


async def throughput(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/api/models/throughput")
    assert answer.status_code == 200, answer.text
    figures: dict[str, Any] = answer.json()
    assert len(figures["service"]) == 600 / figures["bucket_seconds"]
    return figures


@pytest.mark.both_paths
async def test_throughput_counts_every_byte_fetched_in_its_interval(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/a", {"config.json": "{}", "w.bin": Generated(6 * MB, seed=1)})
    repos.commit("org/b", {"w.bin": Generated(3 * MB, seed=2)})
    for repo in ("org/a", "org/b"):
        hub.add_fault(trickle(2 * MB, path=hub.content_path(repo, "w.bin")))
    idle = await throughput(client)
    assert idle["downloads"] == []
    assert sum(idle["service"]) == 0

    bodies = [{"hf_repo": "org/a"}, {"hf_repo": "org/b"}]
    for body in bodies:
        assert (await client.post("/api/models/download", json=body)).status_code == 202
    # While both run: each has its series, and the service's is their sum, interval by interval.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        figures = await throughput(client)
        series = {d["model"]["hf_repo"]: d["bytes_per_second"] for d in figures["downloads"]}
        if len(series) == 2 and all(sum(s) > 0 for s in series.values()):
            break
        assert asyncio.get_running_loop().time() < deadline, figures["downloads"]
        await asyncio.sleep(0.1)
    together = [a + b for a, b in zip(series["org/a"], series["org/b"], strict=True)]
    assert figures["service"] == pytest.approx(together)
    assert figures["start"] % figures["bucket_seconds"] == 0

    for body in bodies:
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    done = await throughput(client)
    assert done["downloads"] == []  # only running downloads have a series
    fetched = sum(done["service"]) * done["bucket_seconds"]
    if hub.xet:  # hf_xet's bytes off the network: the xorbs, framing included
        assert fetched >= 9 * MB
    else:  # every byte of every file, once
        assert fetched == 9 * MB + 2


async def test_list_says_what_each_revision_holds_alone(
    client: httpx.AsyncClient, repos: RepoBuilder
) -> None:
    shared = Generated(2 * MB, seed=3)
    old = repos.commit("org/m", {"config.json": '{"v": 1}', "w.bin": shared})
    body: dict[str, Any] = {"hf_repo": "org/m", "hf_commit": old}
    await client.post("/api/models/download", json=body)
    assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    listed = (await client.get("/api/models/list")).json()["models"]
    alone = [(m["size_bytes"], m["unique_bytes"], m["model_size_bytes"]) for m in listed]
    assert alone == [(2 * MB + 8, 2 * MB + 8, 2 * MB + 8)]

    new = repos.commit("org/m", {"config.json": '{"v": 22}', "w.bin": shared, "x.bin": "xx"})
    await client.post("/api/models/download", json={"hf_repo": "org/m"})
    assert (await wait_for_status(client, {"hf_repo": "org/m"}, FINAL))["status"] == "DOWNLOADED"
    listed = (await client.get("/api/models/list")).json()["models"]
    figures = {m["model"]["hf_commit"]: (m["size_bytes"], m["unique_bytes"]) for m in listed}
    # The weights are shared: each revision alone holds its config (and the new one x.bin).
    assert figures == {old: (2 * MB + 8, 8), new: (2 * MB + 11, 11)}
    assert {m["model_size_bytes"] for m in listed} == {2 * MB + 8 + 11}
