"""Timing: one revision is one job whatever its name, a DELETE is never lost, deleting one revision
never harms another that is starting, and what a killed service left is cleaned at start-up."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, latency, trickle
from tests.helpers import FINAL, MB, app_client, wait_for_status


@pytest.fixture
def commit(repos: RepoBuilder) -> str:
    return repos.commit(
        "org/model", {"config.json": "{}", "model.safetensors": Generated(4 * MB, seed=2)}
    )


@pytest.mark.parametrize("first", ["latest", "main", "commit"])
async def test_one_revision_is_one_job_whatever_its_name(
    client: httpx.AsyncClient, hub: FakeHub, commit: str, first: str
) -> None:
    names = {
        "latest": {"hf_repo": "org/model"},
        "main": {"hf_repo": "org/model", "hf_commit": "main"},
        "commit": {"hf_repo": "org/model", "hf_commit": commit},
    }
    task_ids = {
        "latest": "org/model:latest",
        "main": "org/model:main",
        "commit": f"org/model:{commit}",
    }
    hub.add_fault(trickle(2 * MB, path=hub.content_path("org/model", "model.safetensors")))
    assert (await client.post("/api/models/download", json=names[first])).status_code == 202
    for other, body in names.items():
        if other == first:
            continue
        answer = await client.post("/api/models/download", json=body)
        assert answer.status_code == 409, (other, answer.text)
        assert task_ids[first] in answer.json()["detail"]
        # Every name of the revision shows the one download (a branch only where it is known
        # offline to point at the commit: a download by commit id resolves no branch).
        status = (await client.post("/api/models/status", json=body)).json()
        if first != "commit" or other == "commit":
            assert status["status"] == "DOWNLOADING"
            assert status["model"] == {"hf_commit": None, **names[other]}
    downloads = (await client.get("/api/models/downloads")).json()["downloads"]
    assert len(downloads) == 1
    hub.clear_faults()
    assert (await wait_for_status(client, names[first], FINAL))["status"] == "DOWNLOADED"
    assert hub.count("GET", hub.content_path("org/model", "model.safetensors")) == 1


async def test_a_delete_while_a_download_starts_cancels_it(
    client: httpx.AsyncClient, hub: FakeHub, commit: str, cache_dir: Path
) -> None:
    """The file list is slow to come: the DELETE arrives before the download's task exists."""
    body = {"hf_repo": "org/model"}
    hub.add_fault(latency(1.0, path="/api/models/org/model/tree/*", times=1))
    download = asyncio.create_task(client.post("/api/models/download", json=body))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while hub.count("GET", "/api/models/org/model/revision/*") == 0:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    deleted = await client.request("DELETE", "/api/models", json=body)
    assert deleted.json() == {"status": "cancelled", "freed_bytes": None}
    answer = await download
    assert answer.status_code == 409
    assert "cancelled while it was starting" in answer.json()["detail"]
    assert (await client.post("/api/models/status", json=body)).json()["status"] == "NOT_FOUND"
    assert hub.count("GET", "*/resolve/*") == 0


async def test_deleting_one_revision_keeps_another_that_is_starting(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old = repos.commit("org/model", {"config.json": '{"v": 1}'})
    new = repos.commit("org/model", {"config.json": '{"v": 2}', "w.bin": Generated(4 * MB, seed=1)})
    async with app_client(settings) as client:
        pinned = {"hf_repo": "org/model", "hf_commit": old}
        await client.post("/api/models/download", json=pinned)
        assert (await wait_for_status(client, pinned, FINAL))["status"] == "DOWNLOADED"
        # The new revision is between its start and its first file (its file list written, its
        # content slow to come) when the old one is deleted.
        # (The library makes the revision's snapshot folder after a file's HEAD: until then
        # nothing but its file list and lock says the revision exists.)
        hub.add_fault(latency(1.5, path="*/resolve/*", method="HEAD"))
        latest = {"hf_repo": "org/model"}
        assert (await client.post("/api/models/download", json=latest)).status_code == 202
        folder = cache_dir / "models--org--model"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not (folder / "trees" / f"{new}.json").exists():
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        deleted = await client.request("DELETE", "/api/models", json=pinned)
        assert deleted.json()["status"] == "deleted", deleted.text
        assert (folder / "trees" / f"{new}.json").exists()
        assert (cache_dir / ".locks" / "models--org--model" / f"{new}.download.lock").exists()
        hub.clear_faults()
        assert (await wait_for_status(client, latest, FINAL))["status"] == "DOWNLOADED"
        assert (await client.post("/api/models/verify", json=latest)).json()["verified"]
        gone = (await client.post("/api/models/status", json=pinned)).json()
        assert gone["status"] == "NOT_FOUND"


@pytest.mark.parametrize("planted", [".locks", ".no_exist", "snapshot"])
async def test_planted_links_never_lead_a_delete_outside(
    client: httpx.AsyncClient,
    hub: FakeHub,
    repos: RepoBuilder,
    cache_dir: Path,
    tmp_path: Path,
    planted: str,
) -> None:
    one = repos.commit("org/model", {"config.json": '{"v": 1}'})
    two = repos.commit("org/model", {"config.json": '{"v": 2}'})
    for commit in (one, two):
        body = {"hf_repo": "org/model", "hf_commit": commit}
        await client.post("/api/models/download", json=body)
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    victim = tmp_path / "victim"
    (victim / "models--org--model").mkdir(parents=True)
    (victim / "models--org--model" / "keep.txt").write_text("keep")
    (victim / one).mkdir()
    (victim / one / "keep.txt").write_text("keep")
    folder = cache_dir / "models--org--model"
    if planted == ".locks":
        locks = cache_dir / ".locks"
        for child in locks.iterdir():
            for item in child.iterdir():
                item.unlink()
            child.rmdir()
        locks.rmdir()
        locks.symlink_to(victim)
        body = {"hf_repo": "org/model"}
    elif planted == ".no_exist":
        (folder / ".no_exist").mkdir(exist_ok=True)
        os.rename(folder / ".no_exist", tmp_path / "moved")
        (folder / ".no_exist").symlink_to(victim)
        body = {"hf_repo": "org/model", "hf_commit": one}
    else:
        # The revision's folder replaced by a link to the other revision's: a revision DELETE
        # must neither fail with a 500 nor remove the other revision through it.
        snapshot = folder / "snapshots" / one
        shutil.rmtree(snapshot)
        snapshot.symlink_to(two)
        body = {"hf_repo": "org/model", "hf_commit": one}
    answer = await client.request("DELETE", "/api/models", json=body)
    assert answer.status_code in (200, 409), answer.text
    assert (victim / "models--org--model" / "keep.txt").read_text() == "keep"
    assert (victim / one / "keep.txt").read_text() == "keep"
    if planted == "snapshot":
        assert answer.status_code == 409
        assert "nothing was deleted" in answer.json()["detail"]
        other = {"hf_repo": "org/model", "hf_commit": two}
        assert (await client.post("/api/models/status", json=other)).json()["status"] == (
            "DOWNLOADED"
        )


async def test_orphans_of_a_killed_service_are_removed_at_start_up(
    settings: Settings, repos: RepoBuilder, cache_dir: Path, commit: str
) -> None:
    body = {"hf_repo": "org/model"}
    async with app_client(settings) as client:
        await client.post("/api/models/download", json=body)
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    # What a service killed mid-download leaves: a temporary file whose lock nobody holds.
    blobs = cache_dir / "models--org--model" / "blobs"
    orphan = blobs / ("f" * 64 + ".a1b2c3.incomplete")
    orphan.write_bytes(b"x" * MB)
    async with app_client(settings) as client:
        assert not orphan.exists()
        space = (await client.get("/api/models/space")).json()
        listed = (await client.get("/api/models/list")).json()["models"]
        assert space["cache_size_bytes"] < sum(m["size_bytes"] for m in listed) + MB
        assert [m["status"] for m in listed] == ["DOWNLOADED"]
