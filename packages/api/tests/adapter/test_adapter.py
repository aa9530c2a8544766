"""The adapter tier: ``HubCacheBackend`` driven directly against the fake hub, without the HTTP API
or the manager. What the manager relies on: the plan, the updates a download reports, the cache's
answers afterwards, the one failure type."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.models.backend import CacheState, DownloadRequest, DownloadUpdate
from api.models.errors import DownloadFailed, FailureKind
from api.models.hub.adapter import HubCacheBackend
from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder, drop_after, http_error
from tests.helpers import MB


@pytest.fixture
async def backend(hub: FakeHub, cache_dir: Path) -> HubCacheBackend:
    settings = Settings(
        cache_dir=cache_dir,
        hf_endpoint=hub.url,
        warm_worker=False,
        retry_attempts=2,
        retry_min_backoff_seconds=0.01,
        retry_max_backoff_seconds=0.05,
    )
    return HubCacheBackend(settings)


async def test_plan_download_and_cache(backend: HubCacheBackend, repos: RepoBuilder) -> None:
    commit = repos.commit("org/m", {"config.json": "{}", "w.bin": Generated(3 * MB, seed=1)})
    request = DownloadRequest("org/m", "main")
    plan = await backend.plan(request)
    assert plan.commit == commit
    assert sorted(f.path for f in plan.files) == ["config.json", "w.bin"]
    assert backend.missing_bytes("org/m", plan) == plan.total_bytes
    updates: list[DownloadUpdate] = []
    assert await backend.download(request, plan, updates.append) == commit
    assert updates[0].total_bytes == plan.total_bytes
    assert any(u.verifying for u in updates)
    written = [u.downloaded_bytes for u in updates if u.downloaded_bytes and not u.verifying]
    assert written == sorted(written)
    assert written[-1] == plan.total_bytes
    assert backend.local_state("org/m", "main").state is CacheState.COMPLETE
    assert backend.missing_bytes("org/m", plan) == 0
    report = backend.verify("org/m", "main")
    assert report is not None
    assert (report.files_checked, report.missing, report.mismatched) == (2, (), ())
    [cached] = backend.list_cached()
    assert (cached.commit, cached.state, cached.refs) == (commit, CacheState.COMPLETE, ("main",))
    assert (
        backend.delete("org/m", None) == cached.size_bytes + 0
        or backend.delete("org/m", None) is None
    )
    await backend.aclose()


async def test_failures_are_the_one_failure_type(
    backend: HubCacheBackend, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/m", {"config.json": "{}"})
    with pytest.raises(DownloadFailed) as missing:
        await backend.plan(DownloadRequest("org/absent", "main"))
    assert missing.value.kind is FailureKind.NOT_FOUND
    assert not missing.value.retryable
    assert "(attempt 1, not retried)" in str(missing.value)
    # (On GET: the library itself retries a 5xx on HEAD, for seconds.)
    hub.add_fault(http_error(500, path="*/resolve/*", method="GET"))
    updates: list[DownloadUpdate] = []
    with pytest.raises(DownloadFailed) as failed:
        await backend.download(DownloadRequest("org/m", "main"), None, updates.append)
    assert failed.value.kind is FailureKind.NETWORK
    assert failed.value.attempts == 2
    assert str(failed.value) == "the Hub answered HTTP 500; gave up after 2 attempts"
    assert [u.attempt for u in updates if u.retry_reason] == [2]
    await backend.aclose()


async def test_bytes_fetched_are_a_total_across_attempts(
    backend: HubCacheBackend, hub: FakeHub, repos: RepoBuilder
) -> None:
    """The first attempt fetches 2 MiB of the file, then the connection drops and the resume
    gets a 500: the attempt fails. The second fetches the file whole. ``transferred_bytes`` only
    goes up, and ends at what came in all."""
    repos.commit("org/m", {"w.bin": Generated(4 * MB, seed=2)})
    content = hub.content_path("org/m", "w.bin")
    hub.add_fault(drop_after(2 * MB, path=content, method="GET", requests={1}))
    hub.add_fault(http_error(500, path=content, method="GET", requests={2}))
    updates: list[DownloadUpdate] = []
    request = DownloadRequest("org/m", "main")
    await backend.download(request, None, updates.append)
    totals = [u.transferred_bytes for u in updates if u.transferred_bytes is not None]
    assert totals == sorted(totals)
    # The dropped attempt's bytes count too (as far as it reported them before it failed).
    assert totals[-1] > 4 * MB
    await backend.aclose()
