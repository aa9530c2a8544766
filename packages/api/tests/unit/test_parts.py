"""The manager's parts, each alone: built with what it takes (``compose`` wires the same), with no
manager around it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api.models.backend import CachedRevision, CacheState
from api.models.budget import Budget, Uses
from api.models.downloads import Downloads
from api.models.errors import DownloadConflict, ModelNotFound
from api.models.events import EventBus
from api.models.failures import Failures
from api.models.history import History
from api.models.housekeeping import Housekeeping
from api.models.inuse import InUse
from api.models.serving import VllmServers
from api.models.store import JobStore
from api.models.threads import Keeper, Threads
from api.models.types import DeleteStatus, Model, ModelStatus
from api.models.views import Views
from api.settings import Settings
from tests.unit.test_model_manager import COMMIT, FakeBackend


async def test_failures_are_found_under_every_name_and_go_with_what_is_removed(
    tmp_path: Path,
) -> None:
    failures = Failures(Keeper(JobStore(tmp_path / "state")))  # not open: nothing is written
    failures.remember({"org/a:latest": "gated", f"org/a:{COMMIT}": "gated", "org/b:latest": "x"})
    assert failures.get("org/a:latest") == "gated"
    assert failures.of("org/a", COMMIT) == "gated"  # asked by its commit
    assert failures.of("org/a", None) is None
    # The revision removed, and no other left: every name of the model forgets it.
    failures.forget_removed(
        "org/a", {COMMIT}, [CachedRevision("org/a", COMMIT, CacheState.PARTIAL, 1)]
    )
    assert failures.get("org/a:latest") is None
    assert failures.of("org/a", COMMIT) is None
    assert failures.get("org/b:latest") == "x"


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeBackend, Downloads, Views, Housekeeping]:
    settings = Settings(cache_dir=tmp_path / "cache", max_concurrent_downloads=2)
    backend = FakeBackend()
    threads = Threads(1, 10)
    keeper = Keeper(JobStore(settings.state_path))
    failures = Failures(keeper)
    uses = Uses(keeper)
    in_use = InUse(VllmServers([], None, 1.0), backend, threads, 1.0, uses)
    events = EventBus()
    budget = Budget(None, backend, threads, uses, in_use, events)
    downloads = Downloads(settings, backend, threads, keeper, failures, events, uses, budget)
    views = Views(backend, threads, downloads, failures, in_use, 5.0, uses, 60)
    history = History(keeper)
    housekeeping = Housekeeping(backend, threads, downloads, failures, in_use, 1, 5, uses, history)
    return backend, downloads, views, housekeeping


async def test_downloads_alone_know_a_revision_under_each_of_its_names(
    parts: tuple[FakeBackend, Downloads, Views, Housekeeping],
) -> None:
    backend, downloads, views, _ = parts
    started = await downloads.add(Model(hf_repo="org/a"))
    assert started.status is ModelStatus.DOWNLOADING
    for name in ("main", COMMIT):  # the branch, and the commit it resolved to
        assert downloads.running_as(Model(hf_repo="org/a", hf_commit=name)) == "org/a:latest"
        with pytest.raises(DownloadConflict):
            await downloads.add(Model(hf_repo="org/a", hf_commit=name))
    assert downloads.counts() == (1, 0)
    # The views read what runs from the downloads part, not from a manager.
    status = await views.status(Model(hf_repo="org/a", hf_commit=COMMIT))
    assert status.status is ModelStatus.DOWNLOADING
    assert [item.model.hf_repo for item in await views.listing()] == ["org/a"]
    backend.gates["org/a@main"].set_result(COMMIT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while downloads.counts() != (0, 0):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert (await views.status(Model(hf_repo="org/a"))).status is ModelStatus.DOWNLOADED


async def test_housekeeping_alone_cancels_a_running_download_and_deletes_a_cached_one(
    parts: tuple[FakeBackend, Downloads, Views, Housekeeping],
) -> None:
    backend, downloads, _, housekeeping = parts
    await downloads.add(Model(hf_repo="org/a"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while "org/a@main" not in backend.gates:  # its worker runs
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    cancelled = await housekeeping.delete(Model(hf_repo="org/a"))
    assert cancelled.status is DeleteStatus.CANCELLED
    assert backend.cancelled == ["org/a@main"]
    backend.states[("org/b", "main")] = CacheState.COMPLETE
    deleted = await housekeeping.delete(Model(hf_repo="org/b"))
    assert (deleted.status, deleted.freed_bytes) == (DeleteStatus.DELETED, 123)
    with pytest.raises(ModelNotFound):
        await housekeeping.delete(Model(hf_repo="org/b"))
