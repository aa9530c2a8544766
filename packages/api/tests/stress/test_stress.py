"""Slow tests, run by `make stress` (not by `make test`): longer fuzzing, repeated crashes,
heavier load. Each bounds its own request count and time and uses only 127.0.0.1."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, trickle
from tests.helpers import FINAL, MB, app_client, running_service, wait_for_status, workers_using
from tests.integration.test_hostile_input import _ok, fuzz_operation, schema_of, server  # noqa: F401 - a fixture

pytestmark = pytest.mark.stress


def test_fuzz_every_endpoint_longer(server: tuple[str, Path, Path]) -> None:  # noqa: F811
    from schemathesis import GenerationMode  # here: slow to import, and every run collects this

    url, root, cache = server
    # The same schema and rejections as the default tier's fuzzing (413 for an oversized body).
    schema = schema_of(url)
    for operation in (_ok(result) for result in schema.get_all_operations()):
        if operation.path == "/api/models/events":
            continue  # never ends by design
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue
            fuzz_operation(operation, mode, url, root, cache, examples=500)


async def test_repeated_kill_9_and_restart(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """Five crashes at different points of one download; each restart resumes it by itself (the
    job store); at the end it is DOWNLOADED, verified, with no temporary file and no stray
    worker."""
    repos.commit("org/big", {"config.json": "{}", "w.bin": Generated(48 * MB, seed=40)})
    hub.add_fault(trickle(8 * MB, path="*/w.bin"))
    body = {"hf_repo": "org/big"}
    for cycle in range(5):
        log = tmp_path / f"service-{cycle}.log"
        with running_service(cache_dir, hub.url, log) as (base, service):
            async with httpx.AsyncClient(base_url=base) as client:
                status = (await client.post("/api/models/status", json=body)).json()["status"]
                assert status == ("NOT_FOUND" if cycle == 0 else "DOWNLOADING")
                started = await client.post("/api/models/download", json=body)
                assert started.status_code == (202 if cycle == 0 else 409)  # 409: it runs
                await asyncio.sleep(0.6 + 0.3 * cycle)
            service.send_signal(signal.SIGKILL)
            service.wait()
        await asyncio.sleep(0.5)
        assert workers_using(cache_dir) == []
    hub.clear_faults()
    async with app_client(Settings(cache_dir=cache_dir, hf_endpoint=hub.url)) as client:
        await client.post("/api/models/download", json=body)
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        assert (await client.post("/api/models/verify", json=body)).json()["verified"] is True
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".incomplete")]


async def test_heavy_load_during_downloads(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    """2000 requests, 200 at a time, on every read endpoint while 3 downloads run."""
    for i in range(3):
        repos.commit(f"org/big-{i}", {"w.bin": Generated(16 * MB, seed=50 + i)})
    hub.add_fault(trickle(2 * MB, path="*/w.bin"))
    for i in range(3):
        await client.post("/api/models/download", json={"hf_repo": f"org/big-{i}"})
    calls = [
        lambda: client.get("/api/models/list"),
        lambda: client.get("/api/models/space"),
        lambda: client.post("/api/models/status", json={"hf_repo": "org/big-0"}),
        lambda: client.post("/api/models/status", json={"hf_repo": "org/absent"}),
    ]
    for batch in range(10):
        answers = await asyncio.gather(*(calls[(batch + i) % 4]() for i in range(200)))
        assert {a.status_code for a in answers} == {200}
    for i in range(3):
        await client.request("DELETE", "/api/models", json={"hf_repo": f"org/big-{i}"})
