"""The full flow through HTTP: download -> status -> list -> cancel/delete -> status, against the
fake hub with the real snapshot_download in a worker process."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, http_error, trickle
from tests.helpers import (
    FINAL,
    MB,
    app_client,
    children_of,
    shared_zygote,
    wait_for_status,
    worker_processes,
    zygote_processes,
)


@pytest.fixture
def commit(repos: RepoBuilder) -> str:
    return repos.commit(
        "org/model",
        {
            "config.json": '{"hidden_size": 64}',
            "tokenizer/vocab.txt": "a\nb\nc\n",
            "model.safetensors": Generated(4 * MB, seed=3),
        },
    )


def shared_payloads(cache_dir: Path) -> list[Path]:
    """Blobs in the library's cache-wide store of Xet downloads (``<cache>/blobs/<xx>/<hash>``)."""
    return [p for p in (cache_dir / "blobs").glob("??/*") if len(p.name) == 64]


def file_sizes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.both_paths
async def test_full_flow(
    client: httpx.AsyncClient, hub: FakeHub, commit: str, cache_dir: Path
) -> None:
    body = {"hf_repo": "org/model"}
    assert (await client.post("/api/models/status", json=body)).json()["status"] == "NOT_FOUND"
    started = await client.post("/api/models/download", json=body)
    assert started.status_code == 202
    assert started.json() == {"task_id": "org/model:latest", "status": "DOWNLOADING"}

    done = await wait_for_status(client, body, {"DOWNLOADED", "PARTIAL", "NOT_FOUND"})
    assert done["status"] == "DOWNLOADED"
    assert done["commit"] == commit
    snapshot = cache_dir / "models--org--model" / "snapshots" / commit
    assert (snapshot / "model.safetensors").stat().st_size == 4 * MB
    assert len(shared_payloads(cache_dir)) == (1 if hub.xet else 0)

    listed = (await client.get("/api/models/list")).json()["models"]
    size = 4 * MB + len('{"hidden_size": 64}') + len("a\nb\nc\n")
    assert listed == [
        {
            "model": {"hf_repo": "org/model", "hf_commit": commit},
            "status": "DOWNLOADED",
            "size_bytes": size,
            "unique_bytes": size,  # the model's only revision: all of it its own
            "model_size_bytes": size,
            "refs": ["main"],
            "progress": None,
            "error_message": None,
            # Downloaded without a selection: the default (every file), recorded.
            "selection": [{"files": "all", "allow_patterns": [], "ignore_patterns": []}],
            "in_use_by": None,  # no vLLM server configured
            "pinned": False,
            "last_used_at": listed[0]["last_used_at"],  # its download, just now
        }
    ]
    assert listed[0]["last_used_at"] > 0

    # Already complete: 200, nothing started. For the branch, one metadata request asks where
    # it points now (it has not moved); no file is fetched.
    hub.reset_counts()
    again = await client.post("/api/models/download", json=body)
    assert again.status_code == 200
    assert again.json()["status"] == "DOWNLOADED"
    assert hub.count() == hub.count("GET", "/api/models/org/model/revision/main") == 1
    # A pinned commit never moves: no request to the hub at all.
    hub.reset_counts()
    by_commit = {"hf_repo": "org/model", "hf_commit": commit}
    assert (await client.post("/api/models/download", json=by_commit)).status_code == 200
    pinned = await client.post(
        "/api/models/status", json={"hf_repo": "org/model", "hf_commit": commit.upper()}
    )
    assert pinned.json()["status"] == "DOWNLOADED"
    assert pinned.json()["model"]["hf_commit"] == commit
    assert hub.count() == 0

    deleted = await client.request("DELETE", "/api/models", json=body)
    assert deleted.status_code == 200
    assert deleted.json()["status"] == "deleted"
    assert not (cache_dir / "models--org--model").exists()
    assert shared_payloads(cache_dir) == []  # a Xet blob no other repo links is collected
    assert (await client.post("/api/models/status", json=body)).json()["status"] == "NOT_FOUND"
    missing = await client.request("DELETE", "/api/models", json=body)
    assert missing.status_code == 404
    assert "neither downloading nor in the cache" in missing.json()["detail"]


@pytest.mark.both_paths
async def test_progress_conflict_and_cancel(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    # The client reports bytes per 10 MiB chunk: the file spans several chunks.
    repos.commit("org/slow", {"config.json": "{}", "weights.bin": Generated(40 * MB, seed=1)})
    hub.add_fault(trickle(10 * MB, path=hub.content_path("org/slow", "weights.bin")))
    body = {"hf_repo": "org/slow"}
    assert (await client.post("/api/models/download", json=body)).status_code == 202
    conflict = await client.post("/api/models/download", json=body)
    assert conflict.status_code == 409
    assert "already downloading" in conflict.json()["detail"]

    # Byte progress: the total is known from the file list, bytes grow (through Xet the file is
    # written a xorb range at a time, here all at once: the bytes off the network grow).
    progress = None
    for _ in range(200):
        answer = (await client.post("/api/models/status", json=body)).json()
        assert answer["status"] == "DOWNLOADING"
        progress = answer["progress"]
        if (progress["transferred_bytes"] or 0) > 10 * MB:
            break
        await _sleep(0.05)
    assert progress is not None
    assert progress["total_bytes"] == 40 * MB + 2
    assert progress["files_total"] == 2
    assert 0 <= progress["percent"] < 100
    if not hub.xet:
        assert progress["downloaded_bytes"] > 10 * MB
    assert progress["start_time"] > 0
    assert progress["elapsed_seconds"] > 0

    listed = (await client.get("/api/models/list")).json()["models"]
    assert [m["status"] for m in listed if m["model"]["hf_repo"] == "org/slow"] == ["DOWNLOADING"]

    cancelled = await client.request("DELETE", "/api/models", json=body)
    assert cancelled.json() == {"status": "cancelled", "freed_bytes": None}
    assert worker_processes() == []  # the worker is gone when the answer comes
    blobs = cache_dir / "models--org--slow" / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.endswith(".incomplete")]
    sizes_after_cancel = file_sizes(cache_dir)
    after = (await client.post("/api/models/status", json=body)).json()
    assert after["status"] == "PARTIAL"  # config.json is there, the weights are not
    await _sleep(0.5)
    assert file_sizes(cache_dir) == sizes_after_cancel  # nothing writes to the cache any more
    assert shared_payloads(cache_dir) == []

    # The same model can be downloaded again at once, and completes.
    hub.clear_faults()
    assert (await client.post("/api/models/download", json=body)).status_code == 202
    assert (await wait_for_status(client, body, {"DOWNLOADED", "PARTIAL"}))[
        "status"
    ] == "DOWNLOADED"


@pytest.mark.both_paths
async def test_concurrency_limit_answers_429(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    for name in ("a", "b"):
        repos.commit(f"org/{name}", {"w.bin": Generated(4 * MB, seed=2)})
    hub.add_fault(trickle(MB, path=hub.content_path("org/a", "w.bin")))
    # Workers of the tests before this one (in this process) that are still ending are not this
    # test's: only its own are counted.
    others = set(worker_processes())
    async with app_client(settings.model_copy(update={"max_concurrent_downloads": 1})) as client:
        assert (
            await client.post("/api/models/download", json={"hf_repo": "org/a"})
        ).status_code == 202
        busy = await client.post("/api/models/download", json={"hf_repo": "org/b"})
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "5"
        assert "download slots are busy" in busy.json()["detail"]
        for _ in range(200):  # the worker starts in the background after the 202
            if set(worker_processes()) - others:
                break
            await _sleep(0.05)
        assert len(set(worker_processes()) - others) == 1
    # Leaving the lifespan stopped the running download and its worker.
    assert set(worker_processes()) - others == set()
    assert not any(p.name.endswith(".incomplete") for p in Path(settings.cache_dir).rglob("*"))


async def test_not_found_gated_and_bad_revision_fail_without_retry(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)
    repos.commit("org/real", {"config.json": "{}"})
    # (body, words in the error, the request that fails, how often one attempt makes it)
    cases = [
        (
            {"hf_repo": "org/missing"},
            "not found on the Hub",
            "/api/models/org/missing/revision/*",
            1,
        ),
        ({"hf_repo": "org/gated"}, "accept its terms", "/org/gated/resolve/*", 1),
        (
            {"hf_repo": "org/real", "hf_commit": "no-such-branch"},
            "not found in org/real",
            "/api/models/org/real/revision/*",
            1,
        ),
    ]
    # What the Hub says does not exist (a typo in the repo or the branch) is refused at once
    # with the Hub's words (404), nothing started; what exists but fails (gated) starts, and
    # its status says why.
    for body, words, *_ in cases:
        started = await client.post("/api/models/download", json=body)
        if body["hf_repo"] == "org/gated":
            assert started.status_code == 202
        else:
            assert started.status_code == 404, started.text
            assert words in started.json()["detail"]
            assert hub.url not in started.json()["detail"]
    for body, words, failing_request, once in cases:
        if body["hf_repo"] != "org/gated":
            status = (await client.post("/api/models/status", json=body)).json()
            assert (status["status"], status["error_message"]) == ("NOT_FOUND", None)
            assert hub.count(None, failing_request) == once
            continue
        answer = await wait_for_status(client, body, {"NOT_FOUND", "PARTIAL", "DOWNLOADED"})
        assert answer["status"] == "NOT_FOUND"  # no byte of content arrived
        assert words in answer["error_message"]
        assert "(attempt 1, not retried)" in answer["error_message"]
        assert hub.url not in answer["error_message"]
        assert hub.count(None, failing_request) == once


async def test_server_errors_are_retried_then_complete(
    client: httpx.AsyncClient, hub: FakeHub, commit: str
) -> None:
    fault = hub.add_fault(http_error(503, path="*/model.safetensors", method="GET", times=2))
    body = {"hf_repo": "org/model"}
    await client.post("/api/models/download", json=body)
    answer = await wait_for_status(client, body, {"DOWNLOADED", "NOT_FOUND", "PARTIAL"})
    assert answer["status"] == "DOWNLOADED"
    assert fault.applied == 2
    assert hub.count("GET", "*/model.safetensors") == 3


async def test_persistent_server_error_gives_up_after_the_attempts(
    client: httpx.AsyncClient, hub: FakeHub, commit: str
) -> None:
    hub.add_fault(http_error(500, path="*/model.safetensors", method="GET"))
    body = {"hf_repo": "org/model"}
    await client.post("/api/models/download", json=body)
    answer = await wait_for_status(client, body, {"DOWNLOADED", "NOT_FOUND", "PARTIAL"})
    assert answer["status"] == "PARTIAL"
    assert answer["error_message"] == "the Hub answered HTTP 500; gave up after 5 attempts"
    assert hub.count("GET", "*/model.safetensors") == 5


async def test_space(client: httpx.AsyncClient, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True)
    (cache_dir / "x.bin").write_bytes(b"x" * 1000)

    def free() -> int:
        stat = os.statvfs(cache_dir)
        return stat.f_bavail * stat.f_frsize

    before = free()
    space = (await client.get("/api/models/space")).json()
    after = free()
    assert space["cache_size_bytes"] == 1000
    # The free space of the cache's filesystem; other tests write to it meanwhile.
    slack = 256 * 1024 * 1024
    assert min(before, after) - slack <= space["available_bytes"] <= max(before, after) + slack
    assert space["cache_path"] == str(cache_dir)


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/health")).json() == {"status": "ok", "version": "0.1.0"}
    schema = (await client.get("/openapi.json")).json()
    download = schema["paths"]["/api/models/download"]["post"]
    assert {"200", "202", "409", "422", "429"} <= set(download["responses"])
    assert "Retry-After" in download["responses"]["429"]["headers"]
    delete = schema["paths"]["/api/models"]["delete"]
    assert {"200", "404", "409", "422"} <= set(delete["responses"])
    for path in schema["paths"].values():
        for operation in path.values():
            assert operation.get("description"), operation["operationId"]


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.mark.both_paths
async def test_models_put_in_the_cache_by_another_tool(
    client: httpx.AsyncClient, hub: FakeHub, commit: str, cache_dir: Path
) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download("org/model", endpoint=hub.url, cache_dir=cache_dir, token=False)
    hub.reset_counts()
    body = {"hf_repo": "org/model"}
    assert (await client.post("/api/models/status", json=body)).json()["status"] == "DOWNLOADED"
    assert (await client.post("/api/models/verify", json=body)).json()["verified"] is True
    # A blob cut short on disk (through Xet, the blob in the shared store): no longer complete.
    blob = (cache_dir / "models--org--model" / "snapshots" / commit / "model.safetensors").resolve()
    assert blob.is_relative_to(cache_dir / ("blobs" if hub.xet else "models--org--model"))
    content = blob.read_bytes()
    os.truncate(blob, MB)
    assert (await client.post("/api/models/status", json=body)).json()["status"] == "PARTIAL"
    listed = (await client.get("/api/models/list")).json()["models"]
    assert [m["status"] for m in listed] == ["PARTIAL"]
    blob.write_bytes(content)
    # A revision put in the cache file by file (transformers, hf_hub_download, an older client)
    # has no file list: whether every file is here is not known offline, so it is PARTIAL and
    # says why; what is there still verifies; a download completes it, fetching no content.
    shutil.rmtree(cache_dir / "models--org--model" / "trees")
    status = (await client.post("/api/models/status", json=body)).json()
    assert status["status"] == "PARTIAL"
    assert "no file list" in status["error_message"]
    assert (await client.post("/api/models/verify", json=body)).json()["verified"] is True
    assert hub.count() == 0
    await client.post("/api/models/download", json=body)
    assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    assert hub.count("GET", "*/resolve/*") == 0
    assert hub.count("GET", "/cas/*") == 0


async def test_workers_are_forked_from_a_zygote_that_ends_with_the_service(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    """With warm_worker the service's own zygote starts with it; each download's worker is its
    child, gone when the download ends; a zygote that died is replaced by the next download; the
    service stops it when it stops."""
    for name in ("a", "b", "c"):
        repos.commit(f"org/{name}", {"config.json": name})

    def own_zygotes() -> list[int]:  # not the one the other tests of this process share
        return [pid for pid in zygote_processes() if pid != shared_zygote().pid]

    app = create_app(settings.model_copy(update={"warm_worker": True}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as client,
    ):
        [zygote] = own_zygotes()  # started with the service, before any download
        for name in ("a", "b"):
            body = {"hf_repo": f"org/{name}"}
            await client.post("/api/models/download", json=body)
            assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        assert own_zygotes() == [zygote]  # the same zygote forked both
        assert not [p for p in worker_processes() if p in children_of(zygote)]
        os.kill(zygote, signal.SIGKILL)
        body = {"hf_repo": "org/c"}
        await client.post("/api/models/download", json=body)
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        [replacement] = own_zygotes()
        assert replacement != zygote
    assert own_zygotes() == []
