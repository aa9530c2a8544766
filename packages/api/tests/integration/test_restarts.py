"""Jobs that survive restarts (issue 16): a download running or queued when the service stops
(SIGTERM) or dies (kill -9) goes on by itself when it starts again, in its order, and only once
when two services share the state folder."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, drop_after, latency, trickle
from tests.helpers import (
    FINAL,
    MB,
    ServiceProcess,
    app_client,
    running_service,
    sse,
    tmpfs,
    wait_for_status,
    workers_using,
)

BODY = {"hf_repo": "org/model"}
SIZE = 256 * MB
FAST = {
    "MODELS_RETRY_MIN_BACKOFF_SECONDS": "0.05",
    "MODELS_RETRY_MAX_BACKOFF_SECONDS": "0.2",
    # The library's own path: a file it resumed after a dropped connection is hashed again when
    # it ends, a verification long enough to be stopped in.
    "MODELS_RANGED_MIN_BYTES": "0",
}


@contextlib.contextmanager
def service(
    cache_dir: Path, hub: FakeHub, log: Path, **env: str
) -> Iterator[tuple[str, ServiceProcess]]:
    with running_service(cache_dir, hub.url, log, **{**FAST, **env}) as running:
        yield running


async def stop(process: ServiceProcess, how: signal.Signals, cache_dir: Path) -> None:
    """SIGTERM (a stop) or SIGKILL (a crash), then wait until no worker of it is left."""
    process.send_signal(how)
    await asyncio.to_thread(process.wait, 60)
    deadline = asyncio.get_running_loop().time() + 30
    while workers_using(cache_dir):
        assert asyncio.get_running_loop().time() < deadline, "a worker outlived the service"
        await asyncio.sleep(0.05)


async def status_until(
    client: httpx.AsyncClient, body: dict[str, Any], done: Any, seconds: float = 60
) -> dict[str, Any]:
    """Poll POST /status until ``done(answer)``; fail past the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        answer: dict[str, Any] = (await client.post("/api/models/status", json=body)).json()
        if done(answer):
            return answer
        assert loop.time() < deadline, answer
        await asyncio.sleep(0.02)


def phase(answer: dict[str, Any]) -> str | None:
    return (answer.get("progress") or {}).get("phase")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_stopped_in_each_phase_it_goes_on_by_itself(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path, how: signal.Signals
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.bin": Generated(SIZE, seed=16)})
    content = hub.content_path("org/model", "model.bin")
    log = tmp_path / "resolving.log"

    # Resolving: the Hub is slow to say what the revision is (past the 1 s POST waits for it,
    # the download starts without the file list and its worker asks again).
    hub.add_fault(latency(8, path="*/api/models/org/model/revision/*", times=2))
    with service(cache_dir, hub, log, MODELS_PLAN_TIMEOUT_SECONDS="1") as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            assert (await client.post("/api/models/download", json=BODY)).status_code == 202
            answer = (await client.post("/api/models/status", json=BODY)).json()
            assert (answer["status"], phase(answer)) == ("DOWNLOADING", "resolving"), answer
        await stop(process, how, cache_dir)
    hub.clear_faults()

    # Downloading: bytes arriving, slowly.
    hub.add_fault(trickle(32 * MB, path=content))
    with service(cache_dir, hub, tmp_path / "downloading.log") as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await status_until(
                client,
                BODY,
                lambda a: (
                    phase(a) == "downloading" and (a["progress"]["downloaded_bytes"] or 0) > 8 * MB
                ),
            )
        await stop(process, how, cache_dir)
    hub.clear_faults()

    # Verifying: a connection dropped once, so the whole file is hashed again at the end; stopped
    # the moment the stream says it verifies.
    hub.add_fault(drop_after(64 * MB, path=content, method="GET", times=1))
    with service(cache_dir, hub, tmp_path / "verifying.log") as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            async for event, _ in sse(client, "/api/models/events?hf_repo=org/model"):
                assert event not in ("completed", "failed"), "the verification ended first"
                if event == "verifying":
                    await stop(process, how, cache_dir)
                    break
    hub.clear_faults()

    with service(cache_dir, hub, tmp_path / "last.log") as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            answer = (await client.post("/api/models/status", json=BODY)).json()
            assert answer["status"] == "DOWNLOADING", answer  # resumed: nobody asked again
            answer = await wait_for_status(client, BODY, FINAL, seconds=120)
            assert answer["status"] == "DOWNLOADED", answer
            report = (await client.post("/api/models/verify", json=BODY)).json()
            assert report["verified"] is True, report
            assert (await client.get("/api/models/downloads")).json()["downloads"] == []
    # Ended: a next start has nothing to resume.
    assert stored(cache_dir) == []
    for name in ("downloading", "verifying", "last"):
        assert "event=resumed count=1" in (tmp_path / f"{name}.log").read_text(), name


def stored(cache_dir: Path) -> list[tuple[str, str | None]]:
    """The downloads the state folder keeps, in their order."""
    with contextlib.closing(sqlite3.connect(cache_dir.parent / "model-service/jobs.sqlite3")) as db:
        return list(db.execute("SELECT hf_repo, hf_commit FROM downloads ORDER BY seq"))


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_a_queue_of_three_survives_a_restart_in_order(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path, how: signal.Signals
) -> None:
    names = [f"org/q{i}" for i in range(4)]
    for i, name in enumerate(names):
        repos.commit(name, {"w.bin": Generated(4 * MB, seed=30 + i)})
    hub.add_fault(trickle(MB // 2, path="*/resolve/*"))
    log = tmp_path / "service.log"
    slots = {"MODELS_MAX_CONCURRENT_DOWNLOADS": "1", "MODELS_MAX_QUEUED_DOWNLOADS": "3"}
    with service(cache_dir, hub, log, **slots) as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for name in names:
                response = await client.post("/api/models/download", json={"hf_repo": name})
                assert response.status_code == 202, response.text
        await stop(process, how, cache_dir)
    assert [repo for repo, _ in stored(cache_dir)] == names

    with service(cache_dir, hub, log, **slots) as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            downloads = (await client.get("/api/models/downloads")).json()["downloads"]
            assert [d["model"]["hf_repo"] for d in downloads] == names
            assert [d["progress"]["queue_position"] for d in downloads] == [None, 1, 2, 3]
            # The running one shows its totals and its selection again, from its plan.
            running = await status_until(
                client, {"hf_repo": names[0]}, lambda a: a["progress"]["total_bytes"]
            )
            assert running["selection"] == [
                {"files": "all", "allow_patterns": [], "ignore_patterns": []}
            ], running
            hub.clear_faults()
            for name in names:
                answer = await wait_for_status(client, {"hf_repo": name}, FINAL)
                assert answer["status"] == "DOWNLOADED", answer
    started = [line for line in log.read_text().splitlines() if "event=started" in line]
    after_restart = started[-4:]
    assert [line.split("repo=")[1].split()[0] for line in after_restart] == names
    assert stored(cache_dir) == []


async def test_two_services_sharing_the_state_resume_a_download_once(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "model.bin": Generated(12 * MB, seed=17)})
    content = hub.content_path("org/model", "model.bin")
    # Parts of 1 MiB on 2 connections (ranged), each at 256 KiB/s while the trickle lasts: the
    # download stays running for as long as the test looks (a busy machine starts the services
    # slowly), and goes fast once the trickle ends.
    hub.add_fault(trickle(256 * 1024, path=content))
    parts = {
        "MODELS_RANGED_MIN_BYTES": str(4 * MB),
        "MODELS_RANGED_PART_BYTES": str(MB),
        "MODELS_RANGED_CONNECTIONS": "2",
    }
    with service(cache_dir, hub, tmp_path / "first.log", **parts) as (base, process):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            assert (await client.post("/api/models/download", json=BODY)).status_code == 202
            await status_until(
                client, BODY, lambda a: (a["progress"] or {}).get("transferred_bytes")
            )
        await stop(process, signal.SIGKILL, cache_dir)
    # Two services start at once on the same cache and state folder: one of them resumes it.
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with (
        service(cache_dir, hub, logs[0], **parts) as (a, _),
        service(cache_dir, hub, logs[1], **parts) as (b, _),
    ):
        async with (
            httpx.AsyncClient(base_url=a, timeout=30) as first,
            httpx.AsyncClient(base_url=b, timeout=30) as second,
        ):
            owners = [
                client
                for client in (first, second)
                for _ in (await client.get("/api/models/downloads")).json()["downloads"]
            ]
            assert len(owners) == 1, owners
            other = second if owners[0] is first else first
            assert (await other.get("/api/models/downloads")).json()["downloads"] == []
            hub.clear_faults()
            answer = await wait_for_status(owners[0], BODY, FINAL)
            assert answer["status"] == "DOWNLOADED", answer
            assert (await other.post("/api/models/status", json=BODY)).json()["status"] == (
                "DOWNLOADED"
            )
    started = [log.read_text().count("event=started") for log in logs]
    assert sorted(started) == [0, 1], started  # only one of them ever ran it
    assert stored(cache_dir) == []


# -- in one process (the lifespan's stop is the SIGTERM's) -----------------------------------


@contextlib.asynccontextmanager
async def restarted(settings: Settings, **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings.model_copy(update=changes)) as client:
        yield client


async def test_cancelled_and_deleted_downloads_are_not_resumed(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    for name in ("org/a", "org/b", "org/c"):
        repos.commit(name, {"w.bin": Generated(8 * MB, seed=len(name) + ord(name[-1]))})
    hub.add_fault(trickle(MB, path="*/resolve/*"))
    async with restarted(settings) as client:
        for name in ("org/a", "org/b", "org/c"):
            await client.post("/api/models/download", json={"hf_repo": name})
        await client.request("DELETE", "/api/models", json={"hf_repo": "org/a"})  # a cancel
    assert [repo for repo, _ in stored(cache_dir)] == ["org/b", "org/c"]
    async with restarted(settings, resume_on_start=False) as client:
        # Not resumed, and forgotten: a later start with resuming on does not bring them back.
        assert (await client.get("/api/models/downloads")).json()["downloads"] == []
    assert stored(cache_dir) == []
    async with restarted(settings) as client:
        assert (await client.get("/api/models/downloads")).json()["downloads"] == []


async def test_the_last_error_survives_a_restart(settings: Settings, repos: RepoBuilder) -> None:
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)  # no token here: it fails
    body = {"hf_repo": "org/gated"}
    async with restarted(settings) as client:
        await client.post("/api/models/download", json=body)
        failed = await wait_for_status(client, body, FINAL)
    assert failed["error_message"]
    async with restarted(settings) as client:
        answer = (await client.post("/api/models/status", json=body)).json()
        assert answer["error_message"] == failed["error_message"]


@pytest.mark.parametrize("damage", ["garbage", "newer", "hostile-rows"])
async def test_a_state_file_it_cannot_trust_is_moved_aside_or_cleaned(
    settings: Settings,
    hub: FakeHub,
    repos: RepoBuilder,
    cache_dir: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    folder = cache_dir.parent / "model-service"
    async with restarted(settings):
        pass  # the store exists
    database = folder / "jobs.sqlite3"
    if damage == "garbage":
        database.write_bytes(b"this is not a database" * 100)
    else:
        with contextlib.closing(sqlite3.connect(database)) as db:
            if damage == "newer":
                db.execute("PRAGMA user_version = 99")
            else:
                rows = [
                    ("k1", "../../etc", None, None),  # not a repo id
                    ("k2", "org/model", "main", '{"files": "nonsense"}'),  # not a selection
                    ("../x", "org/model", None, None),  # not a key it writes
                    ("k3", "org/model", None, None),  # fine
                ]
                db.executemany(
                    "INSERT INTO downloads (key, hf_repo, hf_commit, selection, accepted_at)"
                    " VALUES (?, ?, ?, ?, 0)",
                    rows,
                )
            db.commit()
    async with restarted(settings) as client:
        downloads = (await client.get("/api/models/downloads")).json()["downloads"]
        if damage == "hostile-rows":
            assert [d["model"]["hf_repo"] for d in downloads] == ["org/model"]  # k3 only
            assert caplog.text.count("event=state_row_dropped") == 3
        else:
            assert downloads == []
            assert "event=state_moved_aside" in caplog.text
            assert [p.name.split("-")[0] for p in folder.glob("jobs.sqlite3.*")] == [
                "jobs.sqlite3.foreign" if damage == "garbage" else "jobs.sqlite3.newer"
            ]
        # And it keeps new work as before.
        if damage != "hostile-rows":
            assert (await client.post("/api/models/download", json=BODY)).status_code == 202
        assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    assert not (cache_dir.parent / "etc").exists()
    assert not list(folder.glob("claims/*x*"))


async def test_an_unusable_state_folder_only_costs_the_resume(
    settings: Settings, repos: RepoBuilder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    async with restarted(settings, state_dir=blocked) as client:
        assert "event=state_unavailable" in caplog.text
        assert (await client.post("/api/models/download", json=BODY)).status_code == 202
        assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    assert blocked.read_text() == "a file where the folder should be"


async def test_a_state_disk_that_fills_up_costs_only_the_resume(
    settings: Settings, repos: RepoBuilder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    with tmpfs(tmp_path / "state", "256k") as state:
        async with restarted(settings, state_dir=state) as client:
            # The disk of the state folder fills up (the database is there already).
            with contextlib.suppress(OSError):
                (state / "filler").write_bytes(b"x" * 1024 * 1024)
            answer = await client.post("/api/models/download", json=BODY)
            assert answer.status_code == 202, answer.text
            assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
        assert "event=state_write_failed" in caplog.text
