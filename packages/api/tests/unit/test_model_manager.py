"""ModelManager with a fake backend: state, policy, and what each method answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from api.models.backend import (
    CachedRevision,
    CacheState,
    DownloadFailed,
    DownloadPlan,
    DownloadRequest,
    DownloadUpdate,
    FailureKind,
    FileSelection,
    LocalState,
    Pruned,
    RateShare,
    RemoteFile,
    VerifyReport,
)
from api.models.errors import (
    DownloadConflict,
    HubAnswer,
    InsufficientStorage,
    ModelNotFound,
    TooManyDownloads,
)
from api.models.manager import ModelManager, compose
from api.models.paging import ListQuery
from api.models.types import (
    DeleteStatus,
    DownloadPhase,
    ListSort,
    Model,
    ModelRequest,
    ModelStatus,
)
from api.settings import Settings

COMMIT = "a" * 40


class FakeBackend:
    """A HubBackend whose downloads finish when the test says so."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], CacheState] = {}
        self.gates: dict[str, asyncio.Future[str]] = {}
        self.updates: dict[str, Callable[[DownloadUpdate], None]] = {}
        self.rates: dict[str, RateShare] = {}
        self.cancelled: list[str] = []
        self.deleted: list[tuple[str, str | None]] = []
        self.cached: list[CachedRevision] = []
        self.plans: dict[str, DownloadPlan | DownloadFailed] = {}
        self.free = 10**12
        self.plans_given: list[DownloadPlan | None] = []
        self.pruned: list[tuple[str, frozenset[str] | None, bool]] = []
        self.discarded: list[str] = []
        self.tidied: list[str] = []

    @property
    def cache_path(self) -> str:
        return "/fake/cache"

    async def resolve(self, repo_id: str, revision: str) -> str:
        return revision if len(revision) == 40 else COMMIT

    async def plan(self, request: DownloadRequest) -> DownloadPlan:
        # `main` (and any branch) points at COMMIT; a commit id is itself.
        commit = request.revision if len(request.revision) == 40 else COMMIT
        plan = self.plans.get(request.repo_id, DownloadPlan(commit, (RemoteFile("a", 10, "e"),)))
        if isinstance(plan, DownloadFailed):
            raise plan
        return plan

    def missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        return plan.total_bytes

    def verify(self, repo_id: str, revision: str) -> VerifyReport | None:
        if (repo_id, revision) not in self.states:
            return None
        return VerifyReport(COMMIT, 2, (), ("bad.bin",))

    async def download(
        self,
        request: DownloadRequest,
        plan: DownloadPlan | None,
        on_update: Callable[[DownloadUpdate], None],
        rate: RateShare | None = None,
    ) -> str:
        self.plans_given.append(plan)
        key = f"{request.repo_id}@{request.revision}"
        if rate is not None:
            self.rates[key] = rate
        gate = self.gates.setdefault(key, asyncio.get_running_loop().create_future())
        self.updates[key] = on_update
        try:
            commit = await gate
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        # As a real download leaves it: the revision complete under its name and its commit.
        self.states[(request.repo_id, request.revision)] = CacheState.COMPLETE
        self.states[(request.repo_id, commit)] = CacheState.COMPLETE
        return commit

    async def start(self) -> None:
        pass

    def local_state(
        self, repo_id: str, revision: str, selection: FileSelection | None = None
    ) -> LocalState:
        return LocalState(self.states.get((repo_id, revision), CacheState.ABSENT))

    def list_cached(self, repo_id: str | None = None) -> list[CachedRevision]:
        return [r for r in self.cached if repo_id is None or r.repo_id == repo_id]

    def revision_at(self, path: str) -> tuple[str, str] | None:
        return None

    def prune(self, repo_id: str, commits: frozenset[str] | None, dry_run: bool) -> Pruned:
        self.pruned.append((repo_id, commits, dry_run))
        return Pruned(repo_id, tuple((c, 1) for c in sorted(commits or [None], key=str)), 1)

    def delete(self, repo_id: str, revision: str | None) -> int | None:
        self.deleted.append((repo_id, revision))
        keys = [
            k for k in self.states if k[0] == repo_id and (revision is None or k[1] == revision)
        ]
        for key in keys:
            del self.states[key]
        return 123 if keys else None

    def cache_usage(self) -> tuple[int, int]:
        return 10, self.free

    def last_access(self, repo_id: str, commit: str) -> float | None:
        return None

    def remove_all_orphans(self) -> int:
        return 0

    def discard_partial(self, repo_id: str) -> int:
        self.discarded.append(repo_id)
        return 0

    def tidy(self, repo_id: str) -> bool:
        self.tidied.append(repo_id)
        return False

    def free_bytes(self) -> int:
        return self.free

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def manager(backend: FakeBackend, tmp_path: Path) -> ModelManager:
    return compose(Settings(cache_dir=tmp_path / "cache", max_concurrent_downloads=2), backend)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def status_becomes(
    manager: ModelManager, model: Model, status: ModelStatus, seconds: float = 10
) -> None:
    """Wait (with a deadline) for the model's status: a download's end checks the cache on a
    thread before it says DOWNLOADED."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (await manager.get_model_status(model)).status is not status:
        assert loop.time() < deadline, f"{model.task_id} never became {status.value}"
        await asyncio.sleep(0.005)


async def test_download_lifecycle(manager: ModelManager, backend: FakeBackend) -> None:
    model = Model(hf_repo="org/a")
    started = await manager.add_model(model)
    assert (started.task_id, started.status) == ("org/a:latest", ModelStatus.DOWNLOADING)
    await settle()
    status = await manager.get_model_status(model)
    assert status.status is ModelStatus.DOWNLOADING
    assert status.progress is not None
    assert status.progress.phase is DownloadPhase.RESOLVING
    backend.updates["org/a@main"](
        DownloadUpdate(commit=COMMIT, total_bytes=1000, files_total=4, downloaded_bytes=250)
    )
    progress = (await manager.get_model_status(model)).progress
    assert progress is not None
    assert (progress.total_bytes, progress.downloaded_bytes, progress.percent) == (1000, 250, 25.0)
    assert progress.phase is DownloadPhase.DOWNLOADING
    backend.gates["org/a@main"].set_result(COMMIT)
    await status_becomes(manager, model, ModelStatus.DOWNLOADED)
    again = await manager.add_model(model)
    assert again.status is ModelStatus.DOWNLOADED
    assert "org/a@main" in backend.gates
    assert len(backend.gates) == 1


async def test_conflict_and_limit(manager: ModelManager) -> None:
    await manager.add_model(Model(hf_repo="org/a"))
    with pytest.raises(DownloadConflict):
        await manager.add_model(Model(hf_repo="org/a"))
    # The same revision by other names: the branch, the commit it points to.
    for alias in ("main", COMMIT):
        with pytest.raises(DownloadConflict) as conflict:
            await manager.add_model(Model(hf_repo="org/a", hf_commit=alias))
        assert conflict.value.task_id == "org/a:latest"
    await manager.add_model(Model(hf_repo="org/a", hf_commit="b" * 40))  # another revision
    with pytest.raises(TooManyDownloads) as info:
        await manager.add_model(Model(hf_repo="org/b"))
    assert info.value.retry_after == 5
    await manager.shutdown()


async def test_failure_is_reported_in_status(manager: ModelManager, backend: FakeBackend) -> None:
    model = Model(hf_repo="org/gated")
    await manager.add_model(model)
    await settle()
    backend.gates["org/gated@main"].set_exception(
        DownloadFailed(FailureKind.GATED, "org/gated is gated: accept its terms", 1)
    )
    await status_becomes(manager, model, ModelStatus.NOT_FOUND)  # its end tidies on a thread
    status = await manager.get_model_status(model)
    assert status.status is ModelStatus.NOT_FOUND
    assert status.error_message == "org/gated is gated: accept its terms"
    assert manager.counts() == (0, 0)  # nothing running, nothing queued


async def test_cancel_and_delete(manager: ModelManager, backend: FakeBackend) -> None:
    model = Model(hf_repo="org/a")
    await manager.add_model(model)
    await settle()
    assert (await manager.delete_model(model)).status is DeleteStatus.CANCELLED
    assert backend.cancelled == ["org/a@main"]
    assert manager.counts() == (0, 0)  # nothing running, nothing queued
    with pytest.raises(ModelNotFound):
        await manager.delete_model(model)
    backend.states[("org/a", "main")] = CacheState.COMPLETE
    deleted = await manager.delete_model(model)
    assert (deleted.status, deleted.freed_bytes) == (DeleteStatus.DELETED, 123)
    assert backend.deleted[-1] == ("org/a", None)


async def test_delete_whole_model_refused_while_a_revision_downloads(manager: ModelManager) -> None:
    await manager.add_model(Model(hf_repo="org/a", hf_commit=COMMIT))
    with pytest.raises(DownloadConflict):
        await manager.delete_model(Model(hf_repo="org/a"))
    await manager.shutdown()


async def test_timeout_fails_the_download(backend: FakeBackend, tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", download_timeout_seconds=0.05)
    manager = compose(settings, backend)
    model = Model(hf_repo="org/slow")
    await manager.add_model(model)
    async with asyncio.timeout(30):  # the 0.05 s timeout fires; a busy machine takes longer
        while True:
            status = await manager.get_model_status(model)
            if status.status is not ModelStatus.DOWNLOADING:
                break
            await asyncio.sleep(0.01)
    assert status.status is ModelStatus.NOT_FOUND
    assert status.error_message is not None
    assert "timeout" in status.error_message
    assert backend.cancelled == ["org/slow@main"]


async def test_list_merges_cache_and_downloads(manager: ModelManager, backend: FakeBackend) -> None:
    backend.cached = [
        CachedRevision("org/done", COMMIT, CacheState.COMPLETE, 100, ("main",)),
        CachedRevision("org/half", "b" * 40, CacheState.PARTIAL, 50),
        CachedRevision("org/running", "c" * 40, CacheState.PARTIAL, 70),
    ]
    await manager.add_model(Model(hf_repo="org/running"))
    await manager.add_model(Model(hf_repo="org/new"))
    await settle()
    backend.updates["org/running@main"](DownloadUpdate(commit="c" * 40, total_bytes=200))
    items = {(i.model.hf_repo, i.status) for i in await manager.list_models()}
    assert items == {
        ("org/done", ModelStatus.DOWNLOADED),
        ("org/half", ModelStatus.PARTIAL),
        ("org/running", ModelStatus.DOWNLOADING),
        ("org/new", ModelStatus.DOWNLOADING),
    }
    await manager.shutdown()
    assert sorted(backend.cancelled) == ["org/new@main", "org/running@main"]


async def test_the_list_reuses_an_entry_only_while_nothing_it_shows_changed(
    manager: ModelManager, backend: FakeBackend
) -> None:
    """The list keeps the entries it built for revisions the cache's index returns again (the
    very objects): a pin, an error remembered, a revision changed on disk, or a download running
    is in the next list all the same."""
    done = CachedRevision("org/done", COMMIT, CacheState.COMPLETE, 100, ("main",))
    half = CachedRevision("org/half", "b" * 40, CacheState.PARTIAL, 50)
    backend.cached = [done, half]
    first = {i.model.hf_repo: i for i in await manager.list_models()}
    again = {i.model.hf_repo: i for i in await manager.list_models()}
    assert again["org/done"] is first["org/done"]  # nothing changed: not built again
    await manager.pin(ModelRequest(hf_repo="org/done"))
    pinned = {i.model.hf_repo: i for i in await manager.list_models()}
    assert pinned["org/done"].pinned is True
    assert first["org/done"].pinned is False  # an answer given is never changed after
    manager.parts.failures.remember({f"org/half:{'b' * 40}": "the Hub refused"})
    failed = {i.model.hf_repo: i for i in await manager.list_models()}
    assert failed["org/half"].error_message == "the Hub refused"
    # The index found the folder changed: another object, built again.
    backend.cached = [done, CachedRevision("org/half", "b" * 40, CacheState.COMPLETE, 80)]
    completed = {i.model.hf_repo: i for i in await manager.list_models()}
    assert (completed["org/half"].status, completed["org/half"].size_bytes) == (
        ModelStatus.DOWNLOADED,
        80,
    )
    assert completed["org/done"] is failed["org/done"]
    # The same revisions again: the same entries; one gone, or a download started: not the last
    # answer.
    assert [i.model.hf_repo for i in await manager.list_models()] == ["org/done", "org/half"]
    backend.cached = [done]
    assert [i.model.hf_repo for i in await manager.list_models()] == ["org/done"]
    await manager.add_model(Model(hf_repo="org/new"))
    listed = {i.model.hf_repo: i.status for i in await manager.list_models()}
    assert listed == {"org/done": ModelStatus.DOWNLOADED, "org/new": ModelStatus.DOWNLOADING}
    await manager.shutdown()


async def test_disk_space(manager: ModelManager) -> None:
    space = await manager.get_disk_space()
    assert (space.cache_size_bytes, space.available_bytes) == (10, 10**12)
    assert space.cache_path == "/fake/cache"


async def test_space_check_refuses_what_cannot_fit(
    manager: ModelManager, backend: FakeBackend
) -> None:
    margin = manager.settings.space_margin_bytes
    backend.plans["org/big"] = DownloadPlan(COMMIT, (RemoteFile("w", 5000, "e"),))
    backend.free = margin + 4999
    with pytest.raises(InsufficientStorage) as info:
        await manager.add_model(Model(hf_repo="org/big"))
    assert (info.value.needed, info.value.available) == (5000, 4999)
    assert manager.counts() == (0, 0)  # nothing running, nothing queued
    backend.free = margin + 5000
    await manager.add_model(Model(hf_repo="org/big"))
    await settle()
    assert backend.plans_given == [backend.plans["org/big"]]  # the plan is not fetched twice
    # What the running download still needs is reserved: a second one must fit beside it.
    backend.updates["org/big@main"](DownloadUpdate(total_bytes=5000, downloaded_bytes=0))
    backend.plans["org/other"] = DownloadPlan(COMMIT, (RemoteFile("x", 1, "f"),))
    with pytest.raises(InsufficientStorage):
        await manager.add_model(Model(hf_repo="org/other"))
    await manager.shutdown()


async def test_unmendable_plan_failure_is_reported_at_once(
    manager: ModelManager, backend: FakeBackend
) -> None:
    backend.plans["org/gone"] = DownloadFailed(FailureKind.NOT_FOUND, "org/gone not found")
    backend.plans["org/gated"] = DownloadFailed(FailureKind.GATED, "org/gated is gated")
    backend.plans["org/flaky"] = DownloadFailed(FailureKind.NETWORK, "timed out", retryable=True)
    # A repo the Hub does not have (a typo): refused at once, nothing started or remembered.
    with pytest.raises(HubAnswer) as refused:
        await manager.add_model(Model(hf_repo="org/gone"))
    assert refused.value.kind is FailureKind.NOT_FOUND
    assert manager.counts() == (0, 0)
    status = await manager.get_model_status(Model(hf_repo="org/gone"))
    assert (status.status, status.error_message) == (ModelStatus.NOT_FOUND, None)
    # Any other failure no retry mends is the download's: started, and its status says why.
    await manager.add_model(Model(hf_repo="org/gated"))
    await settle()
    status = await manager.get_model_status(Model(hf_repo="org/gated"))
    assert status.error_message == "org/gated is gated"
    assert backend.plans_given == []  # no download was tried
    await manager.add_model(Model(hf_repo="org/flaky"))
    await settle()
    assert backend.plans_given == [None]  # the download fetches the list itself, with retries
    await manager.shutdown()


async def test_verify(manager: ModelManager, backend: FakeBackend) -> None:
    with pytest.raises(ModelNotFound):
        await manager.verify_model(Model(hf_repo="org/a"))
    backend.states[("org/a", "main")] = CacheState.COMPLETE
    report = await manager.verify_model(Model(hf_repo="org/a"))
    assert (report.verified, report.files_checked, report.mismatched) == (False, 2, ["bad.bin"])
    await manager.add_model(Model(hf_repo="org/b"))
    with pytest.raises(DownloadConflict):
        await manager.verify_model(Model(hf_repo="org/b"))
    await manager.shutdown()


async def test_the_bandwidth_cap_is_shared_between_the_downloads_that_fetch(
    backend: FakeBackend, tmp_path: Path
) -> None:
    settings = Settings(
        cache_dir=tmp_path / "cache", max_concurrent_downloads=3, max_download_bytes_per_second=9000
    )
    manager = compose(settings, backend)
    for name in ("org/a", "org/b", "org/c"):
        await manager.add_model(Model(hf_repo=name))
    await settle()  # the tasks reach the backend
    rates = backend.rates
    assert [r.value for r in rates.values()] == [3000, 3000, 3000]
    # One verifies (it fetches nothing): the two others share the cap.
    backend.updates["org/c@main"](DownloadUpdate(downloaded_bytes=1, verifying=True))
    assert [rates[k].value for k in ("org/a@main", "org/b@main")] == [4500, 4500]
    # One ends: its share goes to the others.
    backend.gates["org/a@main"].set_result(COMMIT)
    await asyncio.sleep(0.01)
    assert rates["org/b@main"].value == 9000
    # Changed at run time, to each running download at once; then lifted.
    answer = manager.set_bandwidth(100_000)
    assert rates["org/b@main"].value == 100_000
    assert answer.max_bytes_per_second == 100_000
    assert {d.task_id for d in answer.downloads} == {"org/b:latest", "org/c:latest"}
    manager.set_bandwidth(None)
    assert rates["org/b@main"].value is None
    status = await manager.get_model_status(Model(hf_repo="org/b"))
    assert status.progress is not None
    assert status.progress.bandwidth_limit_bytes_per_second is None
    await manager.shutdown()


async def test_a_page_is_kept_only_while_its_entries_are_the_very_same(
    manager: ModelManager, backend: FakeBackend
) -> None:
    """The page asks the same pages again (its first page, a sort, a search): each is kept while
    the list is made of the very same entries, and made again once anything it shows changed."""
    backend.cached = [
        CachedRevision(f"org/m{i}", f"{i + 1:040x}", CacheState.COMPLETE, 100 - i, ("main",))
        for i in range(5)
    ]
    by_size = ListQuery(limit=2, sort=ListSort.SIZE)
    first = await manager.listing(by_size)
    assert [m.model.hf_repo for m in first.models] == ["org/m0", "org/m1"]
    assert await manager.listing(by_size) is first  # the same entries: the same page
    searched = await manager.listing(ListQuery(q="m3"))
    assert [m.model.hf_repo for m in searched.models] == ["org/m3"]
    # A pin shows in the next page; a revision gone is gone from it.
    await manager.pin(ModelRequest(hf_repo="org/m1"))
    pinned = await manager.listing(by_size)
    assert pinned is not first
    assert [m.pinned for m in pinned.models] == [False, True]
    backend.cached = backend.cached[1:]
    assert [m.model.hf_repo for m in (await manager.listing(by_size)).models] == [
        "org/m1",
        "org/m2",
    ]
    # The spec's list is the caller's to change: the kept answer is not.
    mine = await manager.list_models()
    mine.clear()
    assert len(await manager.list_models()) == 4
    await manager.shutdown()
