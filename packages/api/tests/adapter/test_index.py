"""The index of the cache (issue 29): a list reuses the last walk of each model folder while
nothing under it changed, and is never wrong about a change another process made: the next list
sees it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from api.models.backend import CacheState
from api.models.hub.cache import ModelCache
from api.models.hub.index import RACY_SECONDS, CacheIndex
from fakehub import FakeHub, RepoBuilder
from tests.helpers import make_revision

C = "{:040x}".format


def settled(cache: Path) -> None:
    """Wait until every time in the cache is older than the index's racy margin (what the index
    kept is then kept for good): the event is the clock passing a deadline."""
    newest = max(os.lstat(p).st_ctime for p in [cache, *cache.rglob("*")])
    deadline = time.monotonic() + 30
    while time.time() <= newest + RACY_SECONDS + 0.05:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def states(cache: ModelCache) -> dict[str, tuple[str | None, str, tuple[str, ...]]]:
    return {r.repo_id: (r.commit, r.state.value, r.refs) for r in cache.list_cached()}


@pytest.fixture(params=[True, False], ids=["watched", "stamps"])
def watch(request: pytest.FixtureRequest) -> bool:
    """With the kernel's events (inotify), and without (each folder's stamps compared)."""
    watched: bool = request.param
    return watched


def test_a_list_walks_only_what_changed_and_sees_every_change_of_another_process(
    tmp_path: Path, hub: FakeHub, repos: RepoBuilder, watch: bool
) -> None:
    root = tmp_path / "cache"
    for i in range(4):
        make_revision(root, f"org/m{i}", C(i + 1), {"config.json": b"{}", "w.bin": b"w%d" % i})
    cache = ModelCache(root, watch=watch)
    settled(root)
    assert states(cache) == {f"org/m{i}": (C(i + 1), "complete", ("main",)) for i in range(4)}
    assert cache.index.walks == 4
    states(cache)
    assert cache.index.walks == 4  # nothing changed: no folder walked again

    # Another process: `hf download` of a new model and of a new commit of org/m3 (refs/main
    # rewritten in place), an `rm -rf` of org/m0, a file taken out of org/m1's snapshot.
    new = repos.commit("org/m3", {"config.json": '{"v": 2}'})
    repos.commit("org/new", {"config.json": "{}"})
    for repo in ("org/m3", "org/new"):
        snapshot_download(repo, cache_dir=root, endpoint=hub.url, token=False)
    shutil.rmtree(root / "models--org--m0")
    (root / "models--org--m1" / "snapshots" / C(2) / "w.bin").unlink()
    listed = {(r.repo_id, r.commit): (r.state, r.refs) for r in cache.list_cached()}
    assert listed == {
        ("org/m1", C(2)): (CacheState.PARTIAL, ("main",)),
        ("org/m2", C(3)): (CacheState.COMPLETE, ("main",)),
        ("org/m3", C(4)): (CacheState.COMPLETE, ()),
        ("org/m3", new): (CacheState.COMPLETE, ("main",)),
        ("org/new", repos.repo("org/new").refs["main"]): (CacheState.COMPLETE, ("main",)),
    }
    assert cache.index.walks == 4 + 3  # m1, m3 and new: not m2
    # Walked within the racy margin of its changes, a folder is walked again at the next list.
    cache.list_cached()
    assert cache.index.walks == 4 + 3 + 3
    settled(root)
    cache.list_cached()
    walks = cache.index.walks
    assert cache.list_cached() == cache.list_cached()
    assert cache.index.walks == walks


HOLD = """
import sys, time
from pathlib import Path
from api.models.hub.cache import ModelCache
with ModelCache(Path(sys.argv[1])).hold_revision(sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_download_another_process_holds_is_seen_and_so_is_its_death(
    tmp_path: Path, watch: bool
) -> None:
    """A worker's lock shows in no folder's time: the service's workers touch the model's locks
    folder when they take it, and a BUSY walk is never kept, so a worker killed with -9 (its lock
    let go by the kernel, nothing touched) is seen gone at the next list."""
    root = tmp_path / "cache"
    make_revision(root, "org/m", C(1), {"config.json": b"{}"})
    make_revision(root, "org/other", C(2), {"config.json": b"{}"})
    cache = ModelCache(root, watch=watch)
    with cache.hold_revision("org/m", C(1)):  # its lock file is there, as after any download
        pass
    settled(root)
    assert states(cache)["org/m"] == (C(1), "complete", ("main",))
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), "org/m", C(1)],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            assert states(cache)["org/m"][1] == "busy"
            assert states(cache)["org/m"][1] == "busy"
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    assert states(cache)["org/m"] == (C(1), "complete", ("main",))
    # The other model was walked once in all: its folder did not change.
    walks = cache.index.walks
    settled(root)
    states(cache)
    assert cache.index.walks == walks + 1  # org/m, touched by the holder; org/other kept


def test_with_the_kernels_events_a_list_looks_at_no_folder_that_did_not_change(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    for i in range(50):
        make_revision(root, f"org/m{i}", C(i + 1), {"config.json": b"{}", "w.bin": b"w%d" % i})
    cache = ModelCache(root)
    settled(root)
    before = states(cache)
    assert cache.index.watching  # ext4 or tmpfs here: inotify is trusted
    walks, stamped = cache.index.walks, cache.index.stamped
    assert states(cache) == before
    assert (cache.index.walks, cache.index.stamped) == (walks, stamped)  # not one lstat
    # refs/main rewritten in place (as the library writes it) to a commit cached beside it;
    # a snapshot's file removed; a record's folder touched (a worker takes the model).
    make_revision(root, "org/m7", C(100), {"config.json": b"{}"}, ref=None)
    (root / "models--org--m7" / "refs" / "main").write_text(C(100))
    (root / "models--org--m9" / "snapshots" / C(10) / "w.bin").unlink()
    listed = {(r.repo_id, r.commit): (r.state, r.refs) for r in cache.list_cached()}
    assert listed[("org/m7", C(100))] == (CacheState.COMPLETE, ("main",))
    assert listed[("org/m7", C(8))] == (CacheState.COMPLETE, ())
    assert listed[("org/m9", C(10))][0] is CacheState.PARTIAL
    assert cache.index.walks == walks + 2
    assert cache.index.stamped == stamped


def test_events_the_kernel_could_not_keep_make_every_folder_checked_again(tmp_path: Path) -> None:
    """A full event queue (``IN_Q_OVERFLOW``): what was kept is checked against its stamps, so a
    change whose event was lost is still seen."""
    root = tmp_path / "cache"
    for i in range(5):
        make_revision(root, f"org/m{i}", C(i + 1), {"config.json": b"{}", "w.bin": b"w%d" % i})
    cache = ModelCache(root)
    settled(root)
    states(cache)
    assert cache.index.watching
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    noise = root / "models--org--m0" / "snapshots" / C(1)  # a folder watched
    for i in range(limit // 2 + 100):  # a create and a close each: more than the queue holds
        (noise / f"noise-{i}").touch()
    (root / "models--org--m3" / "snapshots" / C(4) / "w.bin").unlink()
    stamped, walks = cache.index.stamped, cache.index.walks
    listed = {r.repo_id: r.state for r in cache.list_cached()}
    assert listed["org/m3"] is CacheState.PARTIAL
    assert cache.index.stamped == stamped + 5  # every folder kept was checked
    assert cache.index.walks == walks + 2  # m0 and m3 differed: walked again
    stamped, walks = cache.index.stamped, cache.index.walks
    settled(root)
    states(cache)
    states(cache)
    assert cache.index.stamped == stamped  # then events are trusted again
    assert cache.index.walks <= walks + 2  # m0 and m3, walked within the racy margin before


def test_with_the_kernels_events_a_whole_list_is_reused_until_anything_changes(
    tmp_path: Path,
) -> None:
    """No change reported since a list that saw every folder watched: the next list is that list,
    without a loop over the folders. Each change of another process ends it, and is seen."""
    root = tmp_path / "cache"
    for i in range(3):
        make_revision(root, f"org/m{i}", C(i + 1), {"config.json": b"{}"})
    cache = ModelCache(root)
    # A clock a minute ahead: every change is past the racy margin at once (that rule is the
    # stamps', tested above), so the test waits for nothing.
    cache.index = CacheIndex(root, clock=lambda: time.time() + 60)
    first = states(cache)
    assert cache.index.watching
    assert states(cache) == first
    assert cache.index.reused == 1

    def changed(change: Callable[[], object]) -> dict[str, tuple[str | None, str, tuple[str, ...]]]:
        change()
        before = cache.index.reused
        listed = states(cache)
        assert cache.index.reused == before  # walked, not reused
        assert states(cache) == listed
        assert cache.index.reused == before + 1  # and then reused again
        return listed

    # A model folder created (as `hf download` makes it), removed (`rm -rf`), a ref rewritten in
    # place, and a file that is no model's created in the root: each is an event.
    made = changed(lambda: make_revision(root, "org/new", C(9), {"config.json": b"{}"}))
    assert made["org/new"] == (C(9), "complete", ("main",))
    gone = changed(lambda: shutil.rmtree(root / "models--org--m0"))
    assert "org/m0" not in gone
    moved = changed(lambda: (root / "models--org--m1" / "refs" / "main").write_text(C(8)))
    assert moved["org/m1"] == (C(2), "complete", ())
    assert changed(lambda: (root / "notes.txt").write_text("not a model")) == moved
    # A per-model list learns of a change first: the whole list is not reused past it either.
    make_revision(root, "org/m2", C(7), {"config.json": b"{}"}, ref=None)
    assert {r.commit for r in cache.list_cached("org/m2")} == {C(3), C(7)}
    listed = {
        (r.commit, r.state.value, r.refs) for r in cache.list_cached() if r.repo_id == "org/m2"
    }
    assert listed == {(C(3), "complete", ("main",)), (C(7), "complete", ())}


def test_without_the_kernels_events_no_list_is_reused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    make_revision(root, "org/m", C(1), {"config.json": b"{}"})
    cache = ModelCache(root, watch=False)
    cache.index = CacheIndex(root, clock=lambda: time.time() + 60, watch=False)
    states(cache)
    walks = cache.index.walks
    assert states(cache) == states(cache)
    assert (cache.index.reused, cache.index.walks) == (0, walks)  # stamps compared, not reused
