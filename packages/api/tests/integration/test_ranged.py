"""Large files over plain HTTP as parallel byte ranges, resumed from what is on disk (issue 17):
the real service and worker against the fake hub, with faults in one part, interruptions of
every kind, a file that changed between attempts, a user's cancel, and a CDN on another origin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, scan_cache_dir
from pydantic import SecretStr

from api.settings import Settings
from conftest import TOKEN
from fakehub import (
    FakeHub,
    Fault,
    Generated,
    RepoBuilder,
    corrupt,
    drop_after,
    http_error,
    short_body,
    stall,
    trickle,
)
from tests.helpers import (
    FINAL,
    MB,
    app_client,
    ranged,
    running_service,
    tls,
    wait_for_status,
    workers_using,
)

BODY = {"hf_repo": "org/model"}
SIZE = 8 * MB
PART = MB  # tests.helpers.ranged's part size
FOLDER = "models--org--model"


def leftovers(cache_dir: Path) -> list[str]:
    """What ranged downloads keep for a next attempt: partial files and their records."""
    return sorted(
        p.name for p in cache_dir.rglob("*") if ".ranged." in p.name and not p.name.startswith(".")
    )


def recorded_bytes(cache_dir: Path) -> int:
    [record] = (cache_dir / ".locks" / FOLDER).glob("*.ranged.json")
    return sum(json.loads(record.read_text())["written"])


def assert_the_cache_is_the_librarys(
    cache_dir: Path, hub: FakeHub, token: str | None = None
) -> None:
    """What the library itself says of the cache afterwards: every checksum right, no warning."""
    checked = HfApi(endpoint=hub.url, token=token or False).verify_repo_checksums(
        "org/model", cache_dir=cache_dir
    )
    assert (checked.mismatches, checked.missing_paths) == ([], [])
    assert checked.checked_count >= 2
    scan = scan_cache_dir(cache_dir)
    assert scan.warnings == []
    assert leftovers(cache_dir) == []


async def test_a_large_file_comes_as_parallel_ranges_into_the_librarys_cache(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=1)})
    content = hub.content_path("org/model", "model.safetensors")
    async with app_client(ranged(settings)) as client:
        await client.post("/api/models/download", json=BODY)
        status = await wait_for_status(client, BODY, FINAL)
    assert status["status"] == "DOWNLOADED", status
    assert hub.count("GET", content) == SIZE // PART  # one request a part, none twice
    assert hub.served(content) == SIZE
    link = cache_dir / FOLDER / "snapshots" / status["commit"] / "model.safetensors"
    assert link.is_symlink()
    assert os.readlink(link).startswith("../../blobs/")
    assert_the_cache_is_the_librarys(cache_dir, hub)


async def test_small_files_and_xet_files_stay_on_the_librarys_path(
    settings: Settings, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=2)})
    with FakeHub(repos.root, xet=True) as hub:
        config = settings.model_copy(update={"hf_endpoint": hub.url})
        async with app_client(ranged(config)) as client:
            await client.post("/api/models/download", json=BODY)
            status = await wait_for_status(client, BODY, FINAL)
        assert status["status"] == "DOWNLOADED"
        # Through Xet: its xorbs, never the file's /resolve body.
        assert hub.count("GET", "/org/model/resolve/*/model.safetensors") == 0
        assert hub.served(hub.content_path("org/model", "model.safetensors")) >= SIZE
        # What was kept of hf_xet's file while it came (for a next attempt) went with its end.
        assert leftovers(cache_dir) == []


@pytest.mark.parametrize(
    ("fault", "refetched"),
    [
        (drop_after(PART // 2, method="GET", requests={3}), 0),  # goes on from where it broke
        (short_body(1000, method="GET", requests={3}), 0),
        (http_error(503, method="GET", requests={3}), 0),
        (stall(0.5, method="GET", requests={3}), 0),  # headers, silence, then the end
        (corrupt(method="GET", requests={3}), SIZE),  # no part checksum: the file again, once
    ],
    ids=["dropped", "short", "5xx", "stalled", "corrupted"],
)
async def test_a_fault_in_one_part_refetches_that_part_only(
    settings: Settings,
    hub: FakeHub,
    repos: RepoBuilder,
    cache_dir: Path,
    fault: Fault,
    refetched: int,
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=3)})
    content = hub.content_path("org/model", "model.safetensors")
    fault.path = content
    hub.add_fault(fault)
    async with app_client(ranged(settings)) as client:
        await client.post("/api/models/download", json=BODY)
        status = await wait_for_status(client, BODY, FINAL)
    assert status["status"] == "DOWNLOADED", status
    assert fault.applied == 1
    # What the broken part had sent counts once more at most; nothing else is fetched twice.
    assert SIZE + refetched <= hub.served(content) <= SIZE + refetched + PART
    assert_the_cache_is_the_librarys(cache_dir, hub)


async def stop_midway(settings: Settings, hub: FakeHub, cache_dir: Path) -> int:
    """Start the download and stop the service (its lifespan: what SIGTERM does) once about half
    of the file is on disk; return the bytes the record kept."""
    content = hub.content_path("org/model", "model.safetensors")
    hub.add_fault(trickle(MB, path=content))  # 4 connections: about 4 MB/s
    async with app_client(ranged(settings)) as client:
        await client.post("/api/models/download", json=BODY)
        await until_on_disk(client, SIZE // 2)
    hub.faults.clear()
    assert hub.wait_idle()  # the bodies the stopped worker was sent have ended
    assert leftovers(cache_dir)  # the partial file and its record are kept
    return recorded_bytes(cache_dir)


async def until_on_disk(client: httpx.AsyncClient, nbytes: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        status = (await client.post("/api/models/status", json=BODY)).json()
        progress = status["progress"] or {}
        if (progress.get("downloaded_bytes") or 0) >= nbytes:
            return
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.05)


async def test_a_stopped_service_goes_on_from_the_parts_on_disk(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=4)})
    content = hub.content_path("org/model", "model.safetensors")
    kept = await stop_midway(settings, hub, cache_dir)
    assert kept >= SIZE // 4
    hub.reset_counts()
    async with app_client(ranged(settings)) as client:
        # Resumed by the restart itself (the job store), from the parts on disk.
        status = (await client.post("/api/models/status", json=BODY)).json()
        assert status["status"] == "DOWNLOADING"
        status = await wait_for_status(client, BODY, FINAL)
    assert status["status"] == "DOWNLOADED", status
    assert hub.served(content) == SIZE - kept  # only what the record did not have
    assert_the_cache_is_the_librarys(cache_dir, hub)


async def test_a_file_that_changed_on_the_hub_starts_over(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=5)})
    await stop_midway(settings, hub, cache_dir)
    new = repos.commit(
        "org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=6)}
    )
    hub.reset_counts()
    async with app_client(ranged(settings)) as client:
        await client.post("/api/models/download", json=BODY)
        status = await wait_for_status(client, BODY, FINAL)
    assert (status["status"], status["commit"]) == ("DOWNLOADED", new)
    assert hub.served(hub.content_path("org/model", "model.safetensors")) == SIZE
    assert leftovers(cache_dir) == []  # the other version's parts went


async def test_a_users_cancel_removes_the_parts(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=7)})
    hub.add_fault(trickle(MB, path=hub.content_path("org/model", "model.safetensors")))
    async with app_client(ranged(settings)) as client:
        await client.post("/api/models/download", json=BODY)
        await until_on_disk(client, 2 * MB)
        cancelled = await client.request("DELETE", "/api/models", json=BODY)
        assert cancelled.json()["status"] == "cancelled"
        assert leftovers(cache_dir) == []
        status = (await client.post("/api/models/status", json=BODY)).json()
        assert status["status"] in ("PARTIAL", "NOT_FOUND")


async def test_a_cdn_on_another_origin_gets_the_parts_requests_and_never_the_token(
    settings: Settings, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit(
        "org/model",
        {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=8)},
        private=True,
    )
    with FakeHub(repos.root, tokens={TOKEN}, cdn=True) as hub:
        config = settings.model_copy(update={"hf_endpoint": hub.url, "hf_token": SecretStr(TOKEN)})
        async with app_client(ranged(config)) as client:
            await client.post("/api/models/download", json=BODY)
            status = await wait_for_status(client, BODY, FINAL)
        assert status["status"] == "DOWNLOADED", status
        assert hub.count("GET", hub.content_path("org/model", "model.safetensors")) == SIZE // PART
        assert hub.cdn_authorizations  # the parts came from the CDN...
        assert set(hub.cdn_authorizations) == {None}  # ...which never saw the token
        assert_the_cache_is_the_librarys(cache_dir, hub, token=TOKEN)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_the_service_killed_midway_goes_on_from_the_parts_on_disk_after_a_restart(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path, how: signal.Signals
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=9)})
    content = hub.content_path("org/model", "model.safetensors")
    env = {
        "MODELS_RANGED_MIN_BYTES": str(2 * MB),
        "MODELS_RANGED_PART_BYTES": str(PART),
        "MODELS_RANGED_CONNECTIONS": "4",
    }
    hub.add_fault(trickle(MB, path=content))
    with (
        running_service(cache_dir, hub.url, tmp_path / "first.log", **env) as (url, process),
        httpx.Client(base_url=url, timeout=30, verify=tls()) as client,
    ):
        client.post("/api/models/download", json=BODY)
        deadline = time.monotonic() + 60
        while True:
            progress = client.post("/api/models/status", json=BODY).json()
            if ((progress["progress"] or {}).get("downloaded_bytes") or 0) >= SIZE // 2:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(how)
        process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while workers_using(cache_dir):  # the worker dies with the service
        assert time.monotonic() < deadline
        time.sleep(0.05)
    hub.faults.clear()
    assert hub.wait_idle()
    kept = recorded_bytes(cache_dir)
    assert kept >= SIZE // 4
    hub.reset_counts()
    with (
        running_service(cache_dir, hub.url, tmp_path / "second.log", **env) as (url, _),
        httpx.Client(base_url=url, timeout=30, verify=tls()) as client,
    ):
        client.post("/api/models/download", json=BODY)
        deadline = time.monotonic() + 60
        while True:
            status = client.post("/api/models/status", json=BODY).json()
            if status["status"] in FINAL:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert status["status"] == "DOWNLOADED", status
    assert hub.served(content) == SIZE - kept
    assert_the_cache_is_the_librarys(cache_dir, hub)


async def test_a_link_planted_in_place_of_the_partial_file_is_never_written_through(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    commit = repos.commit(
        "org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=10)}
    )
    etag = repos.repo("org/model").commits[commit]["model.safetensors"].sha256
    outside = tmp_path / "outside.txt"
    outside.write_text("not the cache's")
    blobs = cache_dir / FOLDER / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{etag}.ranged.incomplete").symlink_to(outside)
    # With a record that says half of it is there, so that it is kept for a next attempt.
    locks = cache_dir / ".locks" / FOLDER
    locks.mkdir(parents=True)
    half = [PART] * (SIZE // PART // 2) + [0] * (SIZE // PART // 2)
    record = {"path": "model.safetensors", "etag": etag, "size": SIZE, "part_bytes": PART}
    (locks / f"{etag}.ranged.json").write_text(json.dumps({**record, "written": half}))
    async with app_client(ranged(settings)) as client:
        await client.post("/api/models/download", json=BODY)
        status = await wait_for_status(client, BODY, FINAL)
    assert status["status"] == "DOWNLOADED", status
    assert outside.read_text() == "not the cache's"
    assert hub.served(hub.content_path("org/model", "model.safetensors")) == SIZE  # all of it
    assert_the_cache_is_the_librarys(cache_dir, hub)


XORBS_OF_1_MIB = 16  # chunks of 64 KiB a xorb: the 8 MB file spans 8 xorbs


@pytest.fixture
def all_xorbs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_xet writes a file in order, each part once every part before it has come. It asks for
    the xorbs in no set order, at most its concurrency at a time: with fewer slots than xorbs, a
    slow one may hold a slot that an earlier one waits for. With all 8 asked at once, the fast
    first half is written at once, whatever the order (the workers get this environment)."""
    monkeypatch.setenv("HF_XET_FIXED_DOWNLOAD_CONCURRENCY", "8")


def xorbs_from(hub: FakeHub, first: int) -> str:
    """The requests for the file's xorbs number ``first`` to 7."""
    return hub.content_path("org/model", "model.safetensors").replace("*", f"[{first}-7]")


async def until_recorded(cache_dir: Path, nbytes: int) -> int:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        with contextlib.suppress(ValueError, OSError):
            if (kept := recorded_bytes(cache_dir)) >= nbytes:
                return kept
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.usefixtures("all_xorbs_at_once")
async def test_a_xet_transfer_stopped_midway_goes_on_by_ranges_from_what_hf_xet_wrote(
    settings: Settings, repos: RepoBuilder, cache_dir: Path
) -> None:
    """hf_xet starts every transfer from byte 0, and the library deletes its temporary file when
    one fails. The worker keeps what hf_xet wrote (a second name for its file, and a record of
    the prefix it hashed): the restart fetches only the rest, by ranges."""
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=12)})
    with FakeHub(repos.root, xet=True, xorb_chunks=XORBS_OF_1_MIB) as hub:
        config = ranged(settings.model_copy(update={"hf_endpoint": hub.url}))
        xorbs = hub.content_path("org/model", "model.safetensors")
        resolve = "/org/model/resolve/*/model.safetensors"
        hub.add_fault(trickle(MB // 8, path=xorbs_from(hub, 4)))  # the second half crawls
        async with app_client(config) as client:
            await client.post("/api/models/download", json=BODY)
            kept = await until_recorded(cache_dir, SIZE // 2)
        hub.faults.clear()
        assert hub.wait_idle()
        assert recorded_bytes(cache_dir) == kept == SIZE // 2  # what hf_xet wrote, in order
        assert hub.served(resolve) == 0  # so far all through Xet
        hub.reset_counts()
        async with app_client(config) as client:
            status = await wait_for_status(client, BODY, FINAL)  # resumed by the restart
        assert status["status"] == "DOWNLOADED", status
        assert hub.served(resolve) == SIZE - kept  # only what was not kept
        assert hub.served(xorbs) == 0
        assert_the_cache_is_the_librarys(cache_dir, hub)


@pytest.mark.usefixtures("all_xorbs_at_once")
async def test_a_failed_xet_transfer_is_kept_and_the_retry_goes_on_by_ranges(
    settings: Settings, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.safetensors": Generated(SIZE, seed=13)})
    with FakeHub(repos.root, xet=True, xorb_chunks=XORBS_OF_1_MIB) as hub:
        config = ranged(settings.model_copy(update={"hf_endpoint": hub.url}))
        xorbs = hub.content_path("org/model", "model.safetensors")
        resolve = "/org/model/resolve/*/model.safetensors"
        # The first half comes; every request for the rest fails, hf_xet's retries included.
        hub.add_fault(http_error(500, path=xorbs_from(hub, 4)))
        async with app_client(config) as client:
            await client.post("/api/models/download", json=BODY)
            status = await wait_for_status(client, BODY, FINAL)
        assert status["status"] == "DOWNLOADED", status
        assert hub.served(xorbs) == SIZE // 2 + 4 * 128  # hf_xet got the first half only...
        # ...and the retry fetched by ranges only what it had not written in order: the kept
        # prefix is at most that half (hf_xet writes the pieces it got in parallel; a busy
        # machine can stop it with the last of them fetched but not yet written), more than
        # nothing, and no byte of the file came twice.
        kept = min(start for start, _ in hub.ranges_asked(resolve))
        assert 0 < kept <= SIZE // 2, kept
        assert hub.served(resolve) == SIZE - kept
        assert_the_cache_is_the_librarys(cache_dir, hub)
