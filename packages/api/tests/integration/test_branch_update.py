"""A branch that moves on the Hub (issue 15, first part): downloading the branch asks where it
points now and fetches the new commit beside the old one; the branch's ref in the cache moves only
when the new revision is complete and verified, so whatever resolves the branch from the cache
never sees a revision in the making; a failed update leaves it where it was; a Hub that cannot
answer leaves the cached revision as the answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from fakehub import FakeHub, Generated, RepoBuilder, http_error, trickle
from fakehub.repos import FileContent
from tests.helpers import FINAL, MB, wait_for_status

BODY = {"hf_repo": "org/model"}


def ref(cache_dir: Path) -> str:
    return (cache_dir / "models--org--model" / "refs" / "main").read_text()


def snapshot(cache_dir: Path, commit: str) -> Path:
    return cache_dir / "models--org--model" / "snapshots" / commit


async def cached_then_released(
    client: httpx.AsyncClient, repos: RepoBuilder, new_size: int, seed: int
) -> tuple[str, str]:
    """org/model downloaded, then a new commit on its main (new weights of ``new_size``):
    (the cached commit, the new one)."""
    old = repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(MB, seed=seed)})
    await client.post("/api/models/download", json=BODY)
    assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    files: dict[str, FileContent] = {
        "config.json": "{}",
        "w.bin": Generated(new_size, seed=seed + 1),
    }
    return old, repos.commit("org/model", files)


async def test_a_moved_branch_is_fetched_and_switched_to_only_when_verified(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old = repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(2 * MB, seed=81)})
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    new = repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(4 * MB, seed=82)})
    hub.add_fault(trickle(2 * MB, path=hub.content_path("org/model", "w.bin")))
    started = await client.post("/api/models/download", json=BODY)
    assert started.status_code == 202, started.text
    # Until the new revision is complete and verified, the branch points at the old one: poll it
    # as a reader of the cache would, as often as the loop allows.
    seen = set()
    while (status := (await client.post("/api/models/status", json=BODY)).json())[
        "status"
    ] == "DOWNLOADING":
        # Which commit the branch serves now, and which one comes.
        assert (status["served_commit"], status["coming_commit"]) == (old, new), status
        current = ref(cache_dir)
        seen.add(current)
        if current == new:  # only once it is complete and verified (the journal is gone)
            assert not (cache_dir / ".locks" / "models--org--model" / f"{new}.unverified").exists()
            assert (snapshot(cache_dir, new) / "w.bin").stat().st_size == 4 * MB
        await asyncio.sleep(0)
    assert status["status"] == "DOWNLOADED", status
    assert old in seen  # what the branch served while the new revision was made
    assert ref(cache_dir) == new
    assert status["commit"] == new
    # The old revision stays (what a running vLLM may have open); both are listed.
    assert snapshot(cache_dir, old).is_dir()
    listed = {
        m["model"]["hf_commit"]: m for m in (await client.get("/api/models/list")).json()["models"]
    }
    assert set(listed) == {old, new}
    assert listed[new]["refs"] == ["main"]
    assert listed[old]["status"] == "DOWNLOADED"


async def test_a_failed_update_leaves_the_branch_on_the_complete_revision(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old, new = await cached_then_released(client, repos, MB, seed=83)
    hub.add_fault(http_error(404, path=f"*/resolve/{new}/w.bin"))
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    answer = await wait_for_status(client, BODY, FINAL)
    # The branch still names the complete old revision: that is what it serves.
    assert ref(cache_dir) == old
    assert answer["status"] == "DOWNLOADED", answer
    assert answer["commit"] == old


async def test_a_cancelled_update_leaves_the_branch_on_the_complete_revision(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old, new = await cached_then_released(client, repos, 8 * MB, seed=87)
    hub.add_fault(trickle(MB, path=hub.content_path("org/model", "w.bin")))
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    status = (await client.post("/api/models/status", json=BODY)).json()
    assert (status["status"], status["coming_commit"]) == ("DOWNLOADING", new)
    cancelled = await client.request("DELETE", "/api/models", json=BODY)
    assert cancelled.json()["status"] == "cancelled"
    assert ref(cache_dir) == old
    answer = (await client.post("/api/models/status", json=BODY)).json()
    assert (answer["status"], answer["commit"]) == ("DOWNLOADED", old)
    assert (answer["served_commit"], answer["coming_commit"]) == (None, None)


async def test_the_update_keeps_the_files_the_branch_was_downloaded_with(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    files: dict[str, FileContent] = {
        "config.json": "{}",
        "a.safetensors": Generated(MB, seed=85),
        "a.bin": b"copy",
    }
    repos.commit("org/model", files)
    await client.post("/api/models/download", json={**BODY, "files": "vllm"})
    assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    new = repos.commit("org/model", {**files, "a.safetensors": Generated(MB, seed=86)})
    assert (await client.post("/api/models/download", json=BODY)).status_code == 202
    answer = await wait_for_status(client, BODY, FINAL)
    assert answer["status"] == "DOWNLOADED"
    assert answer["commit"] == new
    assert sorted(p.name for p in snapshot(cache_dir, new).iterdir()) == [
        "a.safetensors",
        "config.json",
    ]
    assert answer["selection"][0]["files"] == "vllm"


async def test_a_hub_that_cannot_answer_leaves_the_cached_revision_as_the_answer(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    await client.post("/api/models/download", json=BODY)
    assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    repos.commit("org/model", {"config.json": '{"v": 2}'})  # it moved, but the Hub is down
    hub.add_fault(http_error(503, path="/api/models/*"))
    again = await client.post("/api/models/download", json=BODY)
    assert again.status_code == 200
    assert again.json()["status"] == "DOWNLOADED"
