"""A cancel or a failure leaves a cache that huggingface_hub's own scan (what ``hf cache ls``
reads) reports without a warning, in each phase: before the first file, after one (issue 30).
The library writes ``refs/main`` before the first file: a download stopped then had left a ref
naming no snapshot, and no ``snapshots/`` ("Found 1 cache inconsistencies")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import scan_cache_dir

from fakehub import FakeHub, Generated, RepoBuilder, http_error, trickle
from tests.helpers import FINAL, MB, wait_for_status

BODY = {"hf_repo": "org/model"}


async def progress_until(client: httpx.AsyncClient, done: Any, seconds: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        answer = (await client.post("/api/models/status", json=BODY)).json()
        if done(answer.get("progress") or {}):
            return
        assert loop.time() < deadline, answer
        await asyncio.sleep(0.05)


def warnings_of(cache: Path) -> list[str]:
    return [str(w) for w in scan_cache_dir(cache).warnings]


async def test_a_cancel_before_the_first_file_leaves_no_trace(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"w.bin": Generated(8 * MB, seed=71)})
    hub.add_fault(trickle(MB // 2, path="*/w.bin"))
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    await progress_until(client, lambda p: (p.get("transferred_bytes") or 0) > 0)
    assert (await client.request("DELETE", "/api/models", json=BODY)).json()["status"] == (
        "cancelled"
    )
    assert warnings_of(cache_dir) == []
    assert not (cache_dir / "models--org--model").exists()  # nothing of it was complete
    status = (await client.post("/api/models/status", json=BODY)).json()
    assert status["status"] == "NOT_FOUND"


async def test_a_cancel_after_a_file_keeps_it_and_a_cache_the_library_reads(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(8 * MB, seed=72)})
    hub.add_fault(trickle(MB // 2, path="*/w.bin"))
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    await progress_until(client, lambda p: (p.get("files_done") or 0) >= 1)
    assert (await client.request("DELETE", "/api/models", json=BODY)).json()["status"] == (
        "cancelled"
    )
    assert warnings_of(cache_dir) == []
    status = (await client.post("/api/models/status", json=BODY)).json()
    assert status["status"] == "PARTIAL"  # config.json stays


async def test_a_download_that_fails_before_its_first_file_leaves_no_trace(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"w.bin": Generated(MB, seed=73)})
    hub.add_fault(http_error(403, path="*/resolve/*/w.bin", method="GET"))
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    answer = await wait_for_status(client, BODY, FINAL)
    assert answer["status"] == "NOT_FOUND", answer
    assert answer["error_message"]
    assert warnings_of(cache_dir) == []
