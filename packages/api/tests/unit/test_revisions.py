"""The revision policies on their own: which cached revisions a vLLM model card names
(``in_use_map``), what a ``/v1/models`` answer may be (``parse_models``), and how update checks are
bounded, timed out and reused (``UpdateChecker``)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from api.fleet.fleet import MIN_UPDATE_SHARE, update_share
from api.models.backend import CachedRevision, CacheState, DownloadFailed, DownloadPlan, FailureKind
from api.models.hub.cache import ModelCache
from api.models.revisions import PLAN_CALLS, WINDOW_SECONDS, HubCalls, UpdateChecker, in_use_map
from api.models.serving import ServedModel, ServedNow, base_url, parse_models
from api.settings import display_url

A, B, C = "a" * 40, "b" * 40, "c" * 40


def revision(repo: str, commit: str, *refs: str) -> CachedRevision:
    return CachedRevision(repo, commit, CacheState.COMPLETE, 1, refs)


def served(*roots: str) -> ServedNow:
    return ServedNow(tuple(ServedModel("http://v", f"m{i}", r) for i, r in enumerate(roots)))


def test_a_repo_id_names_the_revisions_its_refs_name(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    revisions = [revision("org/m", A, "main"), revision("org/m", B), revision("org/m", C, "v1")]
    users = in_use_map(served("org/m"), revisions, cache.revision_at)
    assert set(users) == {("org/m", A), ("org/m", C)}


def test_a_repo_id_with_no_ref_cached_names_each_revision(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    revisions = [revision("org/m", A), revision("org/m", B), revision("org/other", C, "main")]
    users = in_use_map(served("org/m"), revisions, cache.revision_at)
    assert set(users) == {("org/m", A), ("org/m", B)}


def test_a_path_names_the_snapshot_it_is_in_or_links_to(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    snapshot = tmp_path / "cache" / "models--org--m" / "snapshots" / A
    snapshot.mkdir(parents=True)
    (tmp_path / "linked").symlink_to(snapshot)
    revisions = [revision("org/m", A, "main"), revision("org/m", B)]
    for root in (
        str(snapshot),
        f"{snapshot}/",
        f"{snapshot}/model-Q4_K_M.gguf",  # a GGUF file of the snapshot
        f"{tmp_path}/cache/models--org--m/snapshots/{B}/../{A}",
        str(tmp_path / "linked"),
    ):
        assert set(in_use_map(served(root), revisions, cache.revision_at)) == {("org/m", A)}, root
    for root in (
        "/models/llama",  # a folder of its own: nothing of this cache
        f"{tmp_path}/cache/models--org--m/blobs/{A}",
        f"{tmp_path}/cache/models--org--m/snapshots/not-a-commit",
        f"{tmp_path}/cache/models--org--m",
        "org/m/extra",  # not a repo id, not an absolute path
        "llama",
    ):
        assert in_use_map(served(root), revisions, cache.revision_at) == {}, root


@pytest.mark.parametrize(
    "answer",
    [
        None,
        [],
        {"object": "list"},
        {"data": "x"},
        {"data": [1]},
        {"data": [{"root": "org/m"}]},
        {"data": [{"id": ""}]},
        {"data": [{"id": "x" * 5000}]},
        {"data": [{"id": "m", "root": 5}]},
        {"data": [{"id": f"m{i}"} for i in range(1001)]},
    ],
)
def test_an_answer_that_is_not_vllms_model_list_is_refused(answer: object) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        parse_models("http://v", answer)


def test_a_model_card_without_root_is_its_id() -> None:
    cards = parse_models("http://v", {"object": "list", "data": [{"id": "org/m", "root": None}]})
    assert cards == (ServedModel("http://v", "org/m", "org/m"),)


def test_server_urls_are_shown_without_credentials_and_named_without_v1() -> None:
    assert display_url("http://user:secret@host:8001/v1") == "http://host:8001/v1"
    assert base_url(" http://host:8001/v1/ ") == "http://host:8001"
    assert base_url("http://host:8001") == "http://host:8001"


class FakeHub:
    """Where refs point on a pretend Hub, with as many answers at once as the test allows."""

    def __init__(self, moves: dict[str, str]) -> None:
        self.moves = moves
        self.running = 0
        self.most = 0
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived: asyncio.Queue[str] = asyncio.Queue()  # one item per request begun

    async def resolve(self, repo: str, ref: str) -> str:
        self.calls += 1
        self.arrived.put_nowait(repo)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
            if repo == "org/gone":
                raise DownloadFailed(FailureKind.NOT_FOUND, "org/gone not found on the Hub")
            return self.moves.get(repo, A)
        finally:
            self.running -= 1

    async def plan(self, repo: str, ref: str) -> DownloadPlan:
        return DownloadPlan(self.moves.get(repo, A), ())

    async def missing(self, repo: str, plan: DownloadPlan) -> int:
        return 7


def checker(
    hub: FakeHub, concurrency: int = 2, timeout: float = 10, ttl: float = 60
) -> UpdateChecker:
    return UpdateChecker(
        hub.resolve, hub.plan, hub.missing, concurrency, timeout, ttl, HubCalls(100_000)
    )


async def test_checks_run_at_most_the_bound_at_once_and_each_answers() -> None:
    hub = FakeHub({"org/m3": B})
    hub.gate.clear()
    refs = [(f"org/m{i}", "main", A) for i in range(6)] + [("org/gone", "main", A)]
    checks = asyncio.ensure_future(checker(hub).check_all(refs, refresh=False))
    for _ in range(2):
        await asyncio.wait_for(hub.arrived.get(), 10)
    for _ in range(10):
        await asyncio.sleep(0)
    assert hub.running == 2  # the others wait for a slot
    hub.gate.set()
    answers = await checks
    assert hub.most == 2
    assert [c.repo_id for c in answers] == [r[0] for r in refs]
    moved = answers[3]
    assert (moved.hub_commit, moved.update_available, moved.bytes_to_download) == (B, True, 7)
    assert (answers[0].update_available, answers[0].bytes_to_download) == (False, 0)
    gone = answers[-1]
    assert (gone.hub_commit, gone.error) == (None, "org/gone not found on the Hub")


async def test_a_slow_check_times_out_alone_and_answers_are_reused_until_refresh() -> None:
    hub = FakeHub({})
    check = checker(hub, timeout=0.05)
    hub.gate.clear()
    [slow] = await check.check_all([("org/m", "main", A)], refresh=False)
    assert slow.error == "the Hub did not answer within 0.05 s"
    assert slow.hub_commit is None
    hub.gate.set()
    calls = hub.calls
    [again] = await check.check_all([("org/m", "main", A)], refresh=False)
    assert again == slow  # reused within the TTL
    assert hub.calls == calls
    [fresh] = await check.check_all([("org/m", "main", A)], refresh=True)
    assert (fresh.hub_commit, fresh.error) == (A, None)
    [moved_here] = await check.check_all([("org/m", "main", B)], refresh=False)
    assert hub.calls == calls + 2  # the cached ref names another commit now: asked again
    assert moved_here.update_available


async def test_checks_asked_at_once_share_one_request() -> None:
    hub = FakeHub({})
    check = checker(hub)
    hub.gate.clear()
    both = asyncio.gather(
        check.check_all([("org/m", "main", A)], refresh=True),
        check.check_all([("org/m", "main", A)], refresh=True),
    )
    await asyncio.wait_for(hub.arrived.get(), 10)
    for _ in range(10):
        await asyncio.sleep(0)
    hub.gate.set()
    first, second = await both
    assert first == second
    assert hub.calls == 1


class Clock:
    """A clock that only the budget's own waits move."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_the_budget_is_never_exceeded_in_any_minute_and_spreads_the_calls() -> None:
    clock = Clock()
    budget = HubCalls(60, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(200):
        await budget.take(1)
        times.append(clock.now)
    windows = [
        sum(1 for t in times[i:] if t < start + WINDOW_SECONDS) for i, start in enumerate(times)
    ]
    assert 55 <= max(windows) <= 60  # the budget is used, never exceeded
    assert times[14] == times[0]  # a burst of a quarter of the budget
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(times[15:])}
    assert gaps == {round(60 / 45, 6)}  # then the other 45 evenly: never 60 at once
    assert budget.used() <= 60
    await budget.take(3)  # a file list's calls are paid at once
    assert budget.used() <= 60


async def test_a_pause_stops_every_call_until_it_ends() -> None:
    clock = Clock()
    budget = HubCalls(60, clock=clock, sleep=clock.sleep)
    await budget.take(1)
    budget.pause(30)
    assert budget.paused_until() is not None
    start = clock.now
    await budget.take(1)
    assert clock.now - start >= 30
    assert budget.paused_until() is None
    budget.pause(10**9)  # a Retry-After beyond reason is read as an hour
    start = clock.now
    await budget.take(1)
    assert clock.now - start == 3600


def test_a_budget_too_small_for_one_check_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot pay for one check"):
        HubCalls(3)
    with pytest.raises(ValueError, match="cannot pay for one check"):
        HubCalls(60).set_per_minute(2)


async def test_a_budget_lowered_midway_holds_in_every_minute_that_ends_after_the_change() -> None:
    """A fleet gives each node its share when GET /updates asks: the calls made before count
    against the new budget, so no minute whose last call is after the change holds more."""
    clock = Clock()
    budget = HubCalls(60, clock=clock, sleep=clock.sleep)
    times = []
    for i in range(150):
        if i == 40:
            budget.set_per_minute(12)
            changed = clock.now
        await budget.take(1)
        times.append(clock.now)
    after = [t for t in times if t > changed]
    for last in after:  # a call a float's rounding from the window's edge is outside it
        assert sum(1 for t in times if last - WINDOW_SECONDS + 1e-6 < t <= last) <= 12, last
    assert budget.used() <= 12
    budget.set_per_minute(60)  # raised again: the calls go faster at once
    start = clock.now
    for _ in range(30):
        await budget.take(1)
    assert clock.now - start < 60


def test_a_fleet_shares_the_budget_evenly_and_never_below_one_check() -> None:
    assert [update_share(60, n) for n in (1, 2, 3, 8, 15)] == [60, 30, 20, 7, 4]
    assert all(update_share(60, n) * n <= 60 for n in range(1, 16))
    assert update_share(60, 16) == MIN_UPDATE_SHARE == PLAN_CALLS + 1  # 64: too small a budget
    assert update_share(60, 0) == 60
