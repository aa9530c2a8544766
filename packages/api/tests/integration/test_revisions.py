"""Revisions (issue 15): which cached branches moved on the Hub and what an update would fetch
(``GET /updates``), removing the revisions no ref names (``POST /prune``), and never deleting what
a vLLM server serves (``MODELS_VLLM_URLS``: a stand-in answering ``/v1/models`` as vLLM does)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api.models.serving import VllmServers
from api.settings import Settings
from fakehub import FakeHub, FakeVllm, Generated, RepoBuilder, http_error, rate_limited, trickle
from fakehub.repos import FileContent
from tests.helpers import FINAL, MB, app_client, free_port, make_revision, wait_for_status

BODY = {"hf_repo": "org/model"}
FOLDER = "models--org--model"


def files(seed: int, size: int = 2 * MB) -> dict[str, FileContent]:
    """A revision: its own weights, and a file every revision shares (one blob in the cache)."""
    return {
        "config.json": f'{{"seed": {seed}}}',
        "shared.safetensors": Generated(MB, seed=1),
        "model.safetensors": Generated(size, seed=seed),
    }


def tree(cache_dir: Path) -> dict[str, int]:
    """Every file and link of the cache with its size: what "nothing changed" compares."""
    found = {}
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            path = Path(folder) / name
            found[str(path.relative_to(cache_dir))] = path.lstat().st_size
    return found


async def downloaded(client: httpx.AsyncClient, body: dict[str, Any] = BODY) -> dict[str, Any]:
    answer = await client.post("/api/models/download", json=body)
    assert answer.status_code in (200, 202), answer.text
    status = await wait_for_status(client, body, FINAL)
    assert status["status"] == "DOWNLOADED", status
    return status


async def updates(client: httpx.AsyncClient, refresh: bool = False) -> list[dict[str, Any]]:
    answer = await client.get("/api/models/updates", params={"refresh": "true"} if refresh else {})
    assert answer.status_code == 200, answer.text
    models: list[dict[str, Any]] = answer.json()["models"]
    return models


# -- updates ----------------------------------------------------------------------------------


async def test_updates_name_the_moved_branch_and_the_bytes_an_update_fetches(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old = repos.commit("org/model", files(1))
    await downloaded(client)
    [entry] = await updates(client)
    assert entry["model"] == {"hf_repo": "org/model", "hf_commit": None}
    assert (entry["ref"], entry["cached_commit"], entry["hub_commit"]) == ("main", old, old)
    assert (entry["update_available"], entry["bytes_to_download"], entry["error"]) == (
        False,
        0,
        None,
    )
    new = repos.commit("org/model", files(2, size=3 * MB))
    asked = hub.count("GET", "/api/models/*")
    # Within the TTL the answer is reused: no request to the Hub.
    assert (await updates(client))[0]["hub_commit"] == old
    assert hub.count("GET", "/api/models/*") == asked
    [entry] = await updates(client, refresh=True)
    assert (entry["hub_commit"], entry["update_available"]) == (new, True)
    # The new weights and the new config; the shared file is in the cache already.
    assert entry["bytes_to_download"] == 3 * MB + len('{"seed": 2}')
    # The entry's model is what POST /download takes to update.
    await client.post("/api/models/download", json=entry["model"])
    status = await wait_for_status(client, BODY, FINAL)
    assert (status["status"], status["commit"]) == ("DOWNLOADED", new)
    [entry] = await updates(client)  # the ref names another commit now: checked again
    assert (entry["cached_commit"], entry["update_available"]) == (new, False)


async def test_update_bytes_count_only_the_files_the_revision_was_downloaded_with(
    client: httpx.AsyncClient, repos: RepoBuilder
) -> None:
    base = {**files(3), "pytorch_model.bin": Generated(MB, seed=30)}
    repos.commit("org/model", base)
    await downloaded(client, {**BODY, "files": "vllm"})
    repos.commit("org/model", {**base, "pytorch_model.bin": Generated(4 * MB, seed=31)})
    [entry] = await updates(client, refresh=True)
    # Only the unselected .bin changed: nothing for this model to fetch.
    assert (entry["update_available"], entry["bytes_to_download"]) == (True, 0)


async def test_a_repo_the_hub_cannot_answer_for_carries_its_error_and_the_others_are_answered(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/model", files(4))
    repos.commit("org/gone", {"config.json": "{}"})
    repos.commit("org/slow", {"config.json": "{}"})
    await downloaded(client)
    await downloaded(client, {"hf_repo": "org/gone"})
    await downloaded(client, {"hf_repo": "org/slow"})
    new = repos.commit("org/model", files(5))
    shutil.rmtree(repos.root / "org" / "gone")  # deleted from the Hub
    hub.add_fault(http_error(503, path="/api/models/org/slow*"))
    checked = {e["model"]["hf_repo"]: e for e in await updates(client, refresh=True)}
    assert set(checked) == {"org/model", "org/gone", "org/slow"}
    assert (checked["org/model"]["hub_commit"], checked["org/model"]["error"]) == (new, None)
    for repo in ("org/gone", "org/slow"):
        assert checked[repo]["hub_commit"] is None
        assert checked[repo]["update_available"] is False
        assert checked[repo]["bytes_to_download"] is None
    assert "not found on the Hub" in checked["org/gone"]["error"]
    assert "HTTP 503" in checked["org/slow"]["error"]


def cached_models(repos: RepoBuilder, cache_dir: Path, count: int) -> list[str]:
    """``count`` repos on the Hub, each cached at the commit its main names there."""
    names = [f"org/m{i}" for i in range(count)]
    for name in names:
        commit = repos.commit(name, {"config.json": f'{{"name": "{name}"}}'})
        make_revision(cache_dir, name, commit, {"config.json": f'{{"name": "{name}"}}'.encode()})
    return names


async def updates_answer(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    answer = await client.get("/api/models/updates", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_checks_keep_to_the_budget_of_hub_calls_and_answer_the_rest_pending(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    cached_models(repos, cache_dir, 7)
    # 20 calls a minute: a burst of 5, then one each 4 s.
    async with app_client(settings.model_copy(update={"update_calls_per_minute": 20})) as client:
        hub.reset_counts()
        first = await updates_answer(client, wait="0.5")
        assert len(first["models"]) == 7
        answered = [e for e in first["models"] if not e["pending"]]
        pending = [e for e in first["models"] if e["pending"]]
        assert len(answered) == 5, first  # the burst, and not one call more
        assert all(e["checked_at"] is not None and e["error"] is None for e in answered)
        assert all(e["checked_at"] is None and e["hub_commit"] is None for e in pending)
        assert first["budget"]["calls_per_minute"] == 20
        assert first["budget"]["calls_last_minute"] == 5
        assert first["budget"]["pending"] == 2
        assert hub.count("GET", "/api/models/*") == 5
        # The rest run on after the answer, one each 4 s; asking again waits for them.
        second = await updates_answer(client, wait="30")
        assert not any(e["pending"] for e in second["models"]), second
        assert all(e["update_available"] is False for e in second["models"])
        assert hub.count("GET", "/api/models/*") == 7
        # Answered recently: asked again, nothing goes to the Hub.
        third = await updates_answer(client, wait="0")
        assert [e["checked_at"] for e in third["models"]] == [
            e["checked_at"] for e in second["models"]
        ]
        assert hub.count("GET", "/api/models/*") == 7


async def test_a_429_from_the_hub_pauses_every_check_until_its_retry_after(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    cached_models(repos, cache_dir, 6)
    async with app_client(settings) as client:
        hub.reset_counts()
        hub.add_fault(rate_limited(retry_after=3, path="/api/models/org/m0/*", times=1))
        first = await updates_answer(client, wait="1")
        asked = hub.count("GET", "/api/models/*")
        # The others may have been asked before the 429 came back; org/m0 is not asked again.
        assert hub.count("GET", "/api/models/org/m0/*") == 1
        paused = first["budget"]["paused_until"]
        assert paused is not None, first["budget"]
        assert paused > time.time() + 1, first["budget"]
        m0 = next(e for e in first["models"] if e["model"]["hf_repo"] == "org/m0")
        assert m0["pending"]
        assert m0["error"] is None  # not a failure: asked again after the pause
        # Paused: even a refresh makes no call before the Retry-After.
        again = await updates_answer(client, refresh="true", wait="0.5")
        assert hub.count("GET", "/api/models/*") == asked
        assert time.time() < paused  # (the observation was within the pause)
        assert any(e["pending"] for e in again["models"])
        # Then the checks go on, the 429's repo included.
        done = await updates_answer(client, wait="30")
        assert not any(e["pending"] for e in done["models"]), done
        assert all(e["error"] is None and e["hub_commit"] for e in done["models"])
        assert done["budget"]["paused_until"] is None
        assert time.time() >= paused


# -- prune ------------------------------------------------------------------------------------


@pytest.mark.both_paths
async def test_prune_removes_what_no_ref_names_and_keeps_the_blobs_a_kept_revision_uses(
    client: httpx.AsyncClient, repos: RepoBuilder, cache_dir: Path
) -> None:
    old = repos.commit("org/model", files(6))
    await downloaded(client)
    new = repos.commit("org/model", files(7, size=3 * MB))
    await downloaded(client)  # the branch moved: the update
    before = tree(cache_dir)
    preview = await client.post("/api/models/prune", json={"dry_run": True})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    expected = [{"model": {"hf_repo": "org/model", "hf_commit": old}, "size_bytes": 2 * MB + 11}]
    assert body["revisions"] == expected
    assert (body["dry_run"], body["freed_bytes"], body["kept"]) == (True, 2 * MB + 11, [])
    assert tree(cache_dir) == before  # a dry run changes nothing
    done = (await client.post("/api/models/prune", json={"dry_run": False})).json()
    assert (done["revisions"], done["freed_bytes"]) == (expected, 2 * MB + 11)
    after = tree(cache_dir)
    assert sum(before.values()) - sum(after.values()) >= done["freed_bytes"]
    assert not (cache_dir / FOLDER / "snapshots" / old).exists()
    listed = (await client.get("/api/models/list")).json()["models"]
    assert [(m["model"]["hf_commit"], m["status"]) for m in listed] == [(new, "DOWNLOADED")]
    # The shared file is still there for the kept revision, and its content is right.
    verified = (await client.post("/api/models/verify", json=BODY)).json()
    assert (verified["verified"], verified["files_checked"]) == (True, 3)
    again = (await client.post("/api/models/prune", json={"dry_run": False})).json()
    assert (again["revisions"], again["freed_bytes"]) == ([], 0)


async def test_prune_takes_partial_leftovers_only_when_asked_and_one_repo_when_named(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", files(8))
    await downloaded(client)
    repos.commit("org/broken", {"config.json": "{}", "w.bin": Generated(MB, seed=80)})
    hub.add_fault(http_error(404, path="*/resolve/*/w.bin"))
    await client.post("/api/models/download", json={"hf_repo": "org/broken"})
    failed = await wait_for_status(client, {"hf_repo": "org/broken"}, FINAL)
    assert failed["status"] == "PARTIAL"
    pinned = repos.commit("org/other", {"config.json": "{}"})
    await downloaded(client, {"hf_repo": "org/other", "hf_commit": pinned})
    plain = (await client.post("/api/models/prune", json={"dry_run": True})).json()
    # The pinned download has no ref (as `hf cache prune` sees it); the failed one is PARTIAL.
    assert [r["model"] for r in plain["revisions"]] == [
        {"hf_repo": "org/other", "hf_commit": pinned}
    ]
    scoped = await client.post(
        "/api/models/prune", json={"dry_run": False, "hf_repo": "org/broken"}
    )
    assert scoped.json()["revisions"] == []
    with_partial = await client.post(
        "/api/models/prune",
        json={"dry_run": False, "hf_repo": "org/broken", "include_partial": True},
    )
    assert [r["model"]["hf_repo"] for r in with_partial.json()["revisions"]] == ["org/broken"]
    assert not (cache_dir / "models--org--broken").exists()
    assert (cache_dir / "models--org--other").exists()
    status = (await client.post("/api/models/status", json={"hf_repo": "org/broken"})).json()
    assert (status["status"], status["error_message"]) == ("NOT_FOUND", None)


async def test_prune_keeps_a_revision_that_downloads(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    pinned = repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(4 * MB, seed=9)})
    hub.add_fault(trickle(2 * MB, path=hub.content_path("org/model", "w.bin")))
    body = {**BODY, "hf_commit": pinned}
    await client.post("/api/models/download", json=body)
    # Until its first bytes are on disk (the revision is in the cache, and no ref names it).
    deadline = asyncio.get_running_loop().time() + 60
    while ((await client.post("/api/models/status", json=body)).json()["progress"] or {}).get(
        "downloaded_bytes"
    ) in (None, 0):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    answer = (await client.post("/api/models/prune", json={"dry_run": False})).json()
    assert answer["revisions"] == []
    assert answer["kept"] == [
        {"model": {"hf_repo": "org/model", "hf_commit": pinned}, "reason": "it is downloading"}
    ]
    status = await wait_for_status(client, body, FINAL)
    assert status["status"] == "DOWNLOADED"


async def test_prune_needs_dry_run_said(client: httpx.AsyncClient) -> None:
    answer = await client.post("/api/models/prune", json={})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "dry_run"]
    bad = await client.post("/api/models/prune", json={"dry_run": True, "hf_repo": "../x"})
    assert bad.status_code == 422
    # A number or a string is no answer to "only look?": refused, nothing removed.
    for loose in ({"dry_run": 0}, {"dry_run": "false"}, {"dry_run": True, "include_partial": 0.0}):
        assert (await client.post("/api/models/prune", json=loose)).status_code == 422, loose


# -- in use by vLLM ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(
    settings: Settings, *urls: str, key: str | None = None, ttl: float = 5.0
) -> AsyncIterator[httpx.AsyncClient]:
    """The service with ``MODELS_VLLM_URLS`` (and its key)."""
    configured = settings.model_copy(
        update={
            "vllm_urls": list(urls),
            "vllm_api_key": SecretStr(key) if key is not None else None,
            "vllm_timeout_seconds": 2.0,
            "vllm_check_ttl_seconds": ttl,
        }
    )
    async with app_client(configured) as client:
        yield client


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    with FakeVllm() as server:
        yield server


async def test_a_model_served_by_repo_id_is_not_deleted_unless_forced(
    settings: Settings, repos: RepoBuilder, vllm: FakeVllm, cache_dir: Path
) -> None:
    commit = repos.commit("org/model", files(10))
    vllm.models = [("org/model", "org/model")]
    async with service(settings, vllm.url) as client:
        await downloaded(client)
        listed = (await client.get("/api/models/list")).json()["models"]
        assert listed[0]["in_use_by"] == [{"server": vllm.url, "model": "org/model"}]
        status = (await client.post("/api/models/status", json=BODY)).json()
        assert status["in_use_by"] == [{"server": vllm.url, "model": "org/model"}]
        for body in (BODY, {**BODY, "hf_commit": commit}, {**BODY, "hf_commit": "main"}):
            refused = await client.request("DELETE", "/api/models", json=body)
            assert refused.status_code == 409, refused.text
            assert vllm.url in refused.json()["detail"]
            assert "force=true" in refused.json()["detail"]
        assert (cache_dir / FOLDER / "snapshots" / commit).is_dir()
        forced = await client.request("DELETE", "/api/models?force=true", json=BODY)
        assert forced.json()["status"] == "deleted"
        assert not (cache_dir / FOLDER).exists()


async def test_a_revision_served_by_its_snapshot_path_is_kept_by_prune_and_delete(
    settings: Settings, repos: RepoBuilder, vllm: FakeVllm, cache_dir: Path
) -> None:
    old = repos.commit("org/model", files(11))
    async with service(settings, f"{vllm.url}/v1/") as client:
        await downloaded(client)
        # vLLM started on the snapshot folder (what `--model <path>` shows as root).
        vllm.models = [("llama", str(cache_dir / FOLDER / "snapshots" / old))]
        new = repos.commit("org/model", files(12))
        await downloaded(client)  # updated: the old revision is no ref's now, but it is served
        answer = (await client.post("/api/models/prune", json={"dry_run": False})).json()
        assert answer["revisions"] == []
        assert answer["kept"] == [
            {
                "model": {"hf_repo": "org/model", "hf_commit": old},
                "reason": f"in use by the vLLM server at {vllm.url} (as 'llama')",
            }
        ]
        refused = await client.request("DELETE", "/api/models", json={**BODY, "hf_commit": old})
        assert refused.status_code == 409
        assert "served as 'llama'" in refused.json()["detail"]
        # What it does not serve goes: the new revision.
        listed = {
            m["model"]["hf_commit"]: m
            for m in (await client.get("/api/models/list")).json()["models"]
        }
        assert listed[old]["in_use_by"] == [{"server": vllm.url, "model": "llama"}]
        assert listed[new]["in_use_by"] == []
        gone = await client.request("DELETE", "/api/models", json={**BODY, "hf_commit": new})
        assert gone.json()["status"] == "deleted"
        # A server that stopped serving it: prune takes it.
        vllm.models = []
        answer = (await client.post("/api/models/prune", json={"dry_run": False})).json()
        assert [r["model"]["hf_commit"] for r in answer["revisions"]] == [old]


async def test_an_unreachable_vllm_server_refuses_deletes_until_forced(
    settings: Settings, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/model", files(13))
    closed = f"http://127.0.0.1:{free_port()}"
    async with service(settings, closed) as client:
        await downloaded(client)
        listed = (await client.get("/api/models/list")).json()["models"]
        assert listed[0]["in_use_by"] == []  # nothing known to serve it; the list still answers
        refused = await client.request("DELETE", "/api/models", json=BODY)
        assert refused.status_code == 409
        detail = refused.json()["detail"]
        assert closed in detail
        assert "did not answer" in detail
        assert "force=true" in detail
        preview = await client.post("/api/models/prune", json={"dry_run": True})
        assert preview.status_code == 200
        assert closed in preview.json()["note"]
        assert (await client.post("/api/models/prune", json={"dry_run": False})).status_code == 409
        forced = await client.request("DELETE", "/api/models?force=true", json=BODY)
        assert forced.json()["status"] == "deleted"


async def test_the_vllm_api_key_is_sent_and_a_wrong_one_is_said(
    settings: Settings, repos: RepoBuilder
) -> None:
    repos.commit("org/model", files(14))
    with FakeVllm([("org/model", "org/model")], api_key="sk-right") as vllm:
        async with service(settings, vllm.url, key="sk-right") as client:
            await downloaded(client)
            refused = await client.request("DELETE", "/api/models", json=BODY)
            assert "in use by the vLLM server" in refused.json()["detail"]
        async with service(settings, vllm.url, key="sk-wrong") as client:
            refused = await client.request("DELETE", "/api/models", json=BODY)
            assert refused.status_code == 409
            detail = refused.json()["detail"]
            assert "MODELS_VLLM_API_KEY" in detail
            assert "sk-" not in detail


async def test_a_slow_vllm_server_is_asked_once_for_many_statuses_and_not_waited_for(
    settings: Settings, repos: RepoBuilder, vllm: FakeVllm
) -> None:
    repos.commit("org/model", files(15))
    vllm.models = [("org/model", "org/model")]
    async with service(settings, vllm.url, ttl=0.0) as client:
        await downloaded(client)
        first = (await client.post("/api/models/status", json=BODY)).json()
        assert first["in_use_by"] == [{"server": vllm.url, "model": "org/model"}]
        vllm.delay = 1.5  # far slower than a status waits for it, faster than the timeout (2 s)
        asked = vllm.requests
        statuses = await asyncio.gather(
            *(client.post("/api/models/status", json=BODY) for _ in range(5))
        )
        # The answers are the last known ones, and one request was made for all of them.
        assert all(s.json()["in_use_by"] == first["in_use_by"] for s in statuses)
        assert vllm.requests - asked <= 1


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ((200, b"<html>a proxy page</html>"), "its answer is not vLLM's /v1/models"),
        ((200, b'{"data": [{"id": 5}]}'), "its answer is not vLLM's /v1/models"),
        ((200, b'{"data": []}' + b" " * (2 * 1024 * 1024)), "its answer is larger than"),
        ((500, b"{}"), "it answered HTTP 500"),
        ((302, b""), "it answered HTTP 302"),  # not followed: a redirect could lead anywhere
    ],
)
async def test_a_vllm_server_gone_wrong_counts_as_one_that_did_not_answer(
    vllm: FakeVllm, raw: tuple[int, bytes], words: str
) -> None:
    vllm.raw = raw
    servers = VllmServers([vllm.url], None, timeout=5)
    try:
        now = await servers.now()
    finally:
        await servers.aclose()
    assert now.served == ()
    [(server, why)] = now.unreachable
    assert server == vllm.url
    assert why.startswith(words), why


async def test_a_vllm_server_slower_than_the_timeout_is_given_up(vllm: FakeVllm) -> None:
    vllm.delay = 2.0
    servers = VllmServers([vllm.url], None, timeout=0.2)
    try:
        now = await servers.now()
    finally:
        await servers.aclose()
    assert now.unreachable == ((vllm.url, "no answer within 0.2 s"),)
