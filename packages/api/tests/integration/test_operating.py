"""Operator experience (issue 7): the event stream, the list of downloads, logs, metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakehub import FakeHub, Generated, RepoBuilder, http_error, trickle
from tests.helpers import FINAL, MB, running_service, sse, wait_for_status


async def collect(
    client: httpx.AsyncClient,
    url: str,
    until: set[str],
    found: list[tuple[str, dict[str, Any]]],
    connected: asyncio.Event | None = None,
) -> None:
    async for event, data in sse(client, url, connected=connected):
        found.append((event, data))
        if event in until:
            return


async def test_event_stream_tells_the_whole_story(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(12 * MB, seed=60)})
    repos.commit("org/other", {"config.json": "{}"})
    hub.add_fault(trickle(6 * MB, path="*/w.bin"))
    hub.add_fault(http_error(503, path="*/w.bin", method="GET", times=1))
    body = {"hf_repo": "org/model"}
    with running_service(
        cache_dir,
        hub.url,
        tmp_path / "service.log",
        MODELS_RETRY_MIN_BACKOFF_SECONDS="0.05",
        MODELS_RETRY_MAX_BACKOFF_SECONDS="0.2",
    ) as (base, _):
        async with httpx.AsyncClient(base_url=base) as client:
            found: list[tuple[str, dict[str, Any]]] = []
            subscribed = asyncio.Event()
            listener = asyncio.create_task(
                collect(
                    client,
                    "/api/models/events?hf_repo=org/model",
                    {"completed", "failed"},
                    found,
                    subscribed,
                )
            )
            await asyncio.wait_for(subscribed.wait(), 30)
            await client.post("/api/models/download", json={"hf_repo": "org/other"})
            await client.post("/api/models/download", json=body)
            active = (await client.get("/api/models/downloads")).json()["downloads"]
            assert {d["model"]["hf_repo"] for d in active} <= {"org/model", "org/other"}
            assert "org/model" in {d["model"]["hf_repo"] for d in active}
            await asyncio.wait_for(listener, 60)
            assert (await client.get("/api/models/downloads")).json() == {"downloads": []}
            bad = await client.get("/api/models/events", params={"hf_repo": "../etc"})
            assert bad.status_code == 422
    kinds = [event for event, _ in found]
    assert kinds[0] == "started"
    assert "retrying" in kinds
    assert "verifying" in kinds
    assert kinds[-1] == "completed"
    assert {data["model"]["hf_repo"] for _, data in found} == {"org/model"}  # the filter works
    progress = [data for event, data in found if event == "progress"]
    assert len(progress) >= 2
    times = [data["time"] for data in progress]
    # At most one progress event every 0.5 s (the clock of the service, not of this test).
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(times))
    assert all(p["progress"]["total_bytes"] == 12 * MB + 2 for p in progress)
    retrying = next(data for event, data in found if event == "retrying")
    assert retrying["retry_kind"] == "network"
    assert retrying["retry_reason"] == "the Hub answered HTTP 503"
    log = (tmp_path / "service.log").read_text()
    lines = [line for line in log.splitlines() if "task_id=org/model:latest" in line]
    assert any("event=started" in line for line in lines)
    assert any("event=retrying" in line and "retry_kind=network" in line for line in lines)
    completed = next(line for line in lines if "event=completed" in line)
    for field in ("repo=org/model", "commit=", f"bytes={12 * MB + 2}", "duration=", "attempt=2"):
        assert field in completed


async def test_failed_and_cancelled_events(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the in-process app: the manager's bus carries failed and cancelled too."""
    caplog.set_level(logging.INFO)
    repos.commit("org/slow", {"w.bin": Generated(8 * MB, seed=61)})
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)  # no token here: it fails
    hub.add_fault(trickle(MB, path="*/w.bin"))
    await client.post("/api/models/download", json={"hf_repo": "org/gated"})
    await wait_for_status(client, {"hf_repo": "org/gated"}, FINAL)
    await client.post("/api/models/download", json={"hf_repo": "org/slow"})
    await client.request("DELETE", "/api/models", json={"hf_repo": "org/slow"})
    lines = caplog.text.splitlines()
    assert any(
        "event=failed task_id=org/gated:latest" in line and "error=" in line for line in lines
    )
    assert any("event=cancelled task_id=org/slow:latest" in line for line in lines)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics(client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder) -> None:
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(3 * MB, seed=62)})
    repos.commit("org/slow", {"w.bin": Generated(8 * MB, seed=63)})
    hub.add_fault(http_error(503, path="*/org/model/resolve/*/w.bin", method="GET", times=1))
    hub.add_fault(trickle(MB, path="*/org/slow/resolve/*"))
    await client.post("/api/models/download", json={"hf_repo": "org/model"})
    assert (await wait_for_status(client, {"hf_repo": "org/model"}, FINAL))[
        "status"
    ] == "DOWNLOADED"
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)  # no token here: it fails
    await client.post("/api/models/download", json={"hf_repo": "org/gated"})
    await wait_for_status(client, {"hf_repo": "org/gated"}, FINAL)
    await client.post("/api/models/download", json={"hf_repo": "org/slow"})
    during = (await client.get("/metrics")).text
    assert metric(during, "models_active_downloads") == 1
    await client.request("DELETE", "/api/models", json={"hf_repo": "org/slow"})
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "models_downloads_total", result="completed") == 1
    assert metric(text, "models_downloads_total", result="failed") == 1
    assert metric(text, "models_downloads_total", result="cancelled") == 1
    assert metric(text, "models_download_retries_total", cause="network") == 1
    assert metric(text, "models_active_downloads") == 0
    assert metric(text, "models_bandwidth_cap_bytes_per_second") == 0
    fetched = metric(text, "models_downloaded_bytes_total")
    assert 3 * MB + 2 <= fetched < 3 * MB + 2 + 8 * MB  # model, plus what slow got before cancel
    assert metric(text, "models_cache_size_bytes") >= 3 * MB
    assert metric(text, "models_cache_free_bytes") > 0
    assert (
        metric(
            text,
            "http_request_duration_seconds_count",
            method="POST",
            route="/api/models/status",
            status="200",
        )
        >= 2
    )


async def test_a_reconnecting_stream_gets_what_it_missed(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """SSE ids are event numbers: a client that reconnects with Last-Event-ID gets the events it
    missed first. The `completed` event says phase `completed`."""
    for name in ("org/a", "org/b"):
        repos.commit(name, {"config.json": "{}"})
    with running_service(cache_dir, hub.url, tmp_path / "service.log") as (base, _):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for name in ("org/a", "org/b"):
                body = {"hf_repo": name}
                await client.post("/api/models/download", json=body)
                assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
            # Nobody was listening: reconnect as if the last event seen was the first one.
            found: list[tuple[int, str, dict[str, Any]]] = []
            headers = {"Last-Event-ID": "1"}
            async with client.stream("GET", "/api/models/events", headers=headers) as response:
                fields: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line and not line.startswith(":"):
                        name, _, value = line.partition(":")
                        fields[name] = value.strip()
                        continue
                    if "data" not in fields:
                        continue
                    data = json.loads(fields["data"])
                    found.append((int(fields["id"]), fields["event"], data))
                    fields = {}
                    if found[-1][1] == "completed" and data["model"]["hf_repo"] == "org/b":
                        break
    numbers = [n for n, _, _ in found]
    assert numbers == list(range(2, 2 + len(found)))  # every event after the first, in order
    assert found[0][1] != "started" or found[0][2]["model"]["hf_repo"] != "org/a"
    completed = [d for _, e, d in found if e == "completed"]
    assert {d["model"]["hf_repo"] for d in completed} == {"org/a", "org/b"}
    assert all(d["progress"]["phase"] == "completed" for d in completed)
    assert all(d["seq"] == n for n, _, d in found)
