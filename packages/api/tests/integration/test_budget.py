"""A cache that keeps itself within its budget (issue 31): least recently used revisions go to make
room for a download, never one a vLLM server serves, one pinned, or one of a model downloading;
shared blobs stay while a revision links them; when nothing that may go frees enough, the download
is refused (507) and nothing is removed; dry runs remove nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import httpx

from api.models.hub.cache import ModelCache
from api.settings import Settings
from fakehub import FakeHub, FakeVllm, Generated, RepoBuilder, trickle
from tests.helpers import FINAL, MB, app_client, running_service, sse, wait_for_status


def files_of(cache_dir: Path) -> dict[str, int]:
    """Every file of the cache (links too), by path: what a removal would change."""
    found = {}
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            path = Path(folder, name)
            found[str(path.relative_to(cache_dir))] = path.lstat().st_size
    return found


async def download(client: httpx.AsyncClient, repo: str) -> dict[str, Any]:
    body = {"hf_repo": repo}
    answer = await client.post("/api/models/download", json=body)
    assert answer.status_code == 202, answer.text
    return await wait_for_status(client, body, FINAL)


async def status_of(client: httpx.AsyncClient, repo: str) -> dict[str, Any]:
    answer: dict[str, Any] = (
        await client.post("/api/models/status", json={"hf_repo": repo})
    ).json()
    return answer


def scan_is_clean(cache_dir: Path) -> None:
    """The library reads the cache without a warning (what hf cache ls reports)."""
    from huggingface_hub import scan_cache_dir

    assert scan_cache_dir(cache_dir).warnings == []


async def test_the_least_recently_used_goes_never_what_is_served_or_pinned(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    for i, name in enumerate("abcdef"):
        repos.commit(f"org/{name}", {"w.bin": Generated(2 * MB, seed=90 + i)})
    with FakeVllm([("served-a", "org/a")]) as vllm:
        # Filled without a budget, in the order a, b, c, d (their uses: downloaded, in order).
        async with app_client(settings) as client:
            for name in "abcd":
                assert (await download(client, f"org/{name}"))["status"] == "DOWNLOADED"
            pinned = await client.put("/api/models/pin", json={"hf_repo": "org/b"})
            assert pinned.status_code == 200, pinned.text
            assert pinned.json()["pinned"] is True
            assert len(pinned.json()["commits"]) == 1
            usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
        # A budget half a file above what the cache holds: the fifth download must free room,
        # and the pins and uses outlived the restart (the job store).
        budgeted = settings.model_copy(
            update={"cache_budget_bytes": usage + MB, "vllm_urls": [vllm.url]}
        )
        async with app_client(budgeted) as client:
            assert (await status_of(client, "org/b"))["pinned"] is True
            view = (await client.get("/api/models/budget")).json()
            kept = {k["model"]["hf_repo"]: k["reason"] for k in view["kept"]}
            assert kept["org/b"] == "pinned"
            assert "served by the vLLM server" in kept["org/a"]
            assert [c["model"]["hf_repo"] for c in view["candidates"]] == ["org/c", "org/d"]
            assert all(c["last_used_how"] == "downloaded" for c in view["candidates"])
            # The plan says what a download would evict; nothing is removed by asking.
            before = files_of(cache_dir)
            plan = (await client.post("/api/models/plan", json={"hf_repo": "org/e"})).json()
            assert plan["fits"] is True
            assert [e["model"]["hf_repo"] for e in plan["evicts"]] == ["org/c"]
            assert files_of(cache_dir) == before

            assert (await download(client, "org/e"))["status"] == "DOWNLOADED"
            assert (await status_of(client, "org/c"))["status"] == "NOT_FOUND"
            for name in "abd":
                assert (await status_of(client, f"org/{name}"))["status"] == "DOWNLOADED", name
            after = (await client.get("/api/models/budget")).json()
            assert after["usage_bytes"] <= usage + MB
            metrics = (await client.get("/metrics")).text
            assert "models_evicted_revisions_total 1.0" in metrics

            # vLLM stops serving org/a: it may go now, but it was seen served (a use) after d
            # was downloaded, so d is the least recently used and goes first.
            vllm.models = []
            assert (await download(client, "org/f"))["status"] == "DOWNLOADED"
            assert (await status_of(client, "org/d"))["status"] == "NOT_FOUND"
            for name in "abef":
                assert (await status_of(client, f"org/{name}"))["status"] == "DOWNLOADED", name
    scan_is_clean(cache_dir)


async def test_nothing_that_may_go_frees_enough_507_and_nothing_removed(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    for i, name in enumerate("abc"):
        repos.commit(f"org/{name}", {"w.bin": Generated(2 * MB, seed=80 + i)})
    with FakeVllm([("served-b", "org/b")]) as vllm:
        async with app_client(settings) as client:
            for name in "ab":
                assert (await download(client, f"org/{name}"))["status"] == "DOWNLOADED"
            assert (
                await client.put("/api/models/pin", json={"hf_repo": "org/a"})
            ).status_code == 200
            usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
        budgeted = settings.model_copy(
            update={"cache_budget_bytes": usage + MB, "vllm_urls": [vllm.url]}
        )
        async with app_client(budgeted) as client:
            before = files_of(cache_dir)
            plan = (await client.post("/api/models/plan", json={"hf_repo": "org/c"})).json()
            assert plan["fits"] is False
            refused = await client.post("/api/models/download", json={"hf_repo": "org/c"})
            assert refused.status_code == 507, refused.text
            words = refused.json()["detail"]
            assert "MODELS_CACHE_BUDGET_BYTES" in words
            assert "org/a@" in words
            assert "(pinned)" in words
            assert "served by the vLLM server" in words
            assert files_of(cache_dir) == before  # nothing removed
            # The pin goes: a may go now, and the download makes room with it.
            unpinned = await client.request("DELETE", "/api/models/pin", json={"hf_repo": "org/a"})
            assert unpinned.status_code == 200
            assert unpinned.json()["pinned"] is False
            again = await client.request("DELETE", "/api/models/pin", json={"hf_repo": "org/a"})
            assert again.status_code == 404
            assert (await download(client, "org/c"))["status"] == "DOWNLOADED"
            assert (await status_of(client, "org/a"))["status"] == "NOT_FOUND"
            assert (await status_of(client, "org/b"))["status"] == "DOWNLOADED"
    scan_is_clean(cache_dir)


async def test_two_downloads_at_once_never_exceed_the_budget_together(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    for i, name in enumerate(["old1", "old2", "new1", "new2"]):
        repos.commit(f"org/{name}", {"w.bin": Generated(2 * MB, seed=70 + i)})
    async with app_client(settings) as client:
        for name in ["old1", "old2"]:
            assert (await download(client, f"org/{name}"))["status"] == "DOWNLOADED"
        usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
    # Room for one more model, not two: each admission alone would fit.
    budget = usage + 3 * MB
    async with app_client(settings.model_copy(update={"cache_budget_bytes": budget})) as client:
        answers = await asyncio.gather(
            *(
                client.post("/api/models/download", json={"hf_repo": f"org/{name}"})
                for name in ["new1", "new2"]
            )
        )
        assert [a.status_code for a in answers] == [202, 202]
        for name in ["new1", "new2"]:
            body = {"hf_repo": f"org/{name}"}
            assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        assert (await client.get("/api/models/budget")).json()["usage_bytes"] <= budget
        assert (await status_of(client, "org/old1"))["status"] == "NOT_FOUND"  # the older
    scan_is_clean(cache_dir)


async def test_evict_on_request_keeps_shared_blobs_and_its_dry_run_removes_nothing(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    shared = Generated(2 * MB, seed=60)
    old = repos.commit("org/m", {"config.json": '{"v": 1}', "w.bin": shared})
    async with app_client(settings) as client:
        body = {"hf_repo": "org/m", "hf_commit": old}
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        new = repos.commit("org/m", {"config.json": '{"v": 2}', "w.bin": shared})
        assert (await download(client, "org/m"))["status"] == "DOWNLOADED"
        # No budget: a target is needed.
        assert (await client.post("/api/models/evict", json={})).status_code == 422
        # A yes or a text is not a number of bytes (false had been read as 0: evict everything).
        for wrong in (False, True, "5", 1.5):
            answer = await client.post("/api/models/evict", json={"target_bytes": wrong})
            assert answer.status_code == 422, (wrong, answer.text)
        usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
        before = files_of(cache_dir)
        dry = await client.post("/api/models/evict?dry_run=true", json={"target_bytes": usage - 1})
        assert dry.status_code == 200, dry.text
        assert dry.json()["dry_run"] is True
        [first] = dry.json()["evicted"]
        assert first["model"]["hf_commit"] == old  # the one used least recently
        # What it alone holds: its config, not the weights the newer revision links too.
        assert 0 < first["size_bytes"] < MB
        assert files_of(cache_dir) == before
        done = (await client.post("/api/models/evict", json={"target_bytes": usage - 1})).json()
        assert [e["model"]["hf_commit"] for e in done["evicted"]] == [old]
        assert done["usage_bytes"] < usage
        listed = (await client.get("/api/models/list")).json()["models"]
        assert [m["model"]["hf_commit"] for m in listed] == [new]
        verified = await client.post("/api/models/verify", json={"hf_repo": "org/m"})
        assert verified.json()["verified"] is True  # the shared weights stayed
    assert ModelCache(cache_dir).refs("org/m") == {"main": new}
    scan_is_clean(cache_dir)


async def test_a_pin_keeps_a_revision_from_prune(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old = repos.commit("org/p", {"w.bin": Generated(MB, seed=50)})
    async with app_client(settings) as client:
        body = {"hf_repo": "org/p", "hf_commit": old}
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        repos.commit("org/p", {"w.bin": Generated(MB, seed=51)})
        assert (await download(client, "org/p"))["status"] == "DOWNLOADED"
        pinned = await client.put("/api/models/pin", json=body)
        assert pinned.json()["commits"] == [old]
        # A pin by branch shows in the status of its commit asked by id, too.
        assert (await client.put("/api/models/pin", json={"hf_repo": "org/p"})).status_code == 200
        new = (await status_of(client, "org/p"))["commit"]
        by_id = {"hf_repo": "org/p", "hf_commit": new}
        assert (await client.post("/api/models/status", json=by_id)).json()["pinned"] is True
        await client.request("DELETE", "/api/models/pin", json={"hf_repo": "org/p"})
        assert (await client.post("/api/models/status", json=by_id)).json()["pinned"] is False
        listed = (await client.get("/api/models/list")).json()["models"]
        assert {m["model"]["hf_commit"]: m["pinned"] for m in listed}[old] is True
        pruned = (await client.post("/api/models/prune", json={"dry_run": False})).json()
        assert pruned["revisions"] == []
        assert [k["model"]["hf_commit"] for k in pruned["kept"]] == [old]
        assert "pinned" in pruned["kept"][0]["reason"]
        await client.request("DELETE", "/api/models/pin", json=body)
        pruned = (await client.post("/api/models/prune", json={"dry_run": False})).json()
        assert [r["model"]["hf_commit"] for r in pruned["revisions"]] == [old]


async def test_kill_9_during_an_eviction_leaves_a_clean_cache_and_the_budget_holds(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """The service dies (kill -9) the moment its first eviction is told, the second one perhaps
    half done: after a restart the library reads the cache without a warning, each revision is
    whole or gone, the cache is within its budget, and the download that asked for room can be
    started again and fits."""
    for i, name in enumerate("abc"):
        repos.commit(f"org/{name}", {"w.bin": Generated(2 * MB, seed=40 + i)})
    repos.commit("org/big", {"w.bin": Generated(5 * MB, seed=44)})
    with running_service(cache_dir, hub.url, tmp_path / "fill.log") as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for name in "abc":
                assert (await download(client, f"org/{name}"))["status"] == "DOWNLOADED"
            usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
    budget = usage + MB  # org/big needs two of the three to go
    env = {"MODELS_CACHE_BUDGET_BYTES": str(budget)}
    with running_service(cache_dir, hub.url, tmp_path / "evicting.log", **env) as (url, process):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            connected = asyncio.Event()

            async def first_eviction() -> None:
                async for event, _ in sse(client, "/api/models/events", connected=connected):
                    if event == "evicted":
                        process.send_signal(signal.SIGKILL)
                        return

            watcher = asyncio.create_task(first_eviction())
            await connected.wait()
            with contextlib.suppress(httpx.TransportError):  # it dies during the request
                await client.post("/api/models/download", json={"hf_repo": "org/big"})
            await asyncio.wait_for(watcher, 60)
        await asyncio.to_thread(process.wait, 60)
    scan_is_clean(cache_dir)
    with running_service(cache_dir, hub.url, tmp_path / "after.log", **env) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            states = [(await status_of(client, f"org/{name}"))["status"] for name in "abc"]
            assert set(states) <= {"DOWNLOADED", "NOT_FOUND"}, states  # whole, or gone
            assert "NOT_FOUND" in states  # the first eviction was done when it died
            assert (await client.get("/api/models/budget")).json()["usage_bytes"] <= budget
            # The restart resumes org/big when its job was stored before the kill (409: it runs
            # already); else it is asked for again.
            answer = await client.post("/api/models/download", json={"hf_repo": "org/big"})
            assert answer.status_code in (202, 409), answer.text
            done = await wait_for_status(client, {"hf_repo": "org/big"}, FINAL)
            assert done["status"] == "DOWNLOADED", done
            assert (await client.get("/api/models/budget")).json()["usage_bytes"] <= budget
    scan_is_clean(cache_dir)


async def test_what_a_running_download_may_need_is_kept(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    """Every revision of a model that downloads is kept (its older revision too: the new one may
    not complete), and what the running download still needs counts against the budget."""
    old = repos.commit("org/s", {"w.bin": Generated(2 * MB, seed=30)})
    repos.commit("org/a", {"w.bin": Generated(2 * MB, seed=31)})
    repos.commit("org/n", {"w.bin": Generated(2 * MB, seed=32)})
    pinned_old = {"hf_repo": "org/s", "hf_commit": old}
    async with app_client(settings) as client:
        assert (await client.post("/api/models/download", json=pinned_old)).status_code == 202
        assert (await wait_for_status(client, pinned_old, FINAL))["status"] == "DOWNLOADED"
        assert (await download(client, "org/a"))["status"] == "DOWNLOADED"
        usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
    repos.commit("org/s", {"w.bin": Generated(2 * MB, seed=33)})
    hub.add_fault(trickle(MB // 8, path="*/org/s/resolve/*"))  # 16 s at least: it runs
    budget = usage + 3 * MB  # room for one more model, not for two
    async with app_client(settings.model_copy(update={"cache_budget_bytes": budget})) as client:
        running = await client.post("/api/models/download", json={"hf_repo": "org/s"})
        assert running.status_code == 202, running.text
        view = (await client.get("/api/models/budget")).json()
        assert view["reserved_bytes"] > 0
        kept = {k["model"]["hf_commit"]: k["reason"] for k in view["kept"]}
        assert kept[old] == "its model is downloading"
        assert "org/s" not in [c["model"]["hf_repo"] for c in view["candidates"]]
        # org/s@old is the least recently used, but its model downloads: org/a goes instead.
        assert (await download(client, "org/n"))["status"] == "DOWNLOADED"
        assert (await status_of(client, "org/a"))["status"] == "NOT_FOUND"
        assert (await client.post("/api/models/status", json=pinned_old)).json()[
            "status"
        ] == "DOWNLOADED"
        cancelled = await client.request("DELETE", "/api/models", json={"hf_repo": "org/s"})
        assert cancelled.json()["status"] == "cancelled"
    scan_is_clean(cache_dir)
