"""The cache on disk: status from the file list, safe delete, orphaned temporary files."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from api.models.backend import CacheState
from api.models.errors import UnsafeCachePath
from api.models.hub.cache import ModelCache
from api.models.hub.deletion import delete, plan_delete
from tests.helpers import make_revision

C1, C2 = "1" * 40, "2" * 40


def test_state_follows_the_file_list(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    assert cache.local_state("org/m", "main").state is CacheState.ABSENT
    folder = make_revision(tmp_path, "org/m", C1, {"a.txt": b"alpha", "d/b.bin": b"beta" * 10})
    assert cache.local_state("org/m", "main").state is CacheState.COMPLETE
    assert cache.local_state("org/m", C1).commit == C1
    assert cache.local_state("org/m", C2).state is CacheState.ABSENT
    # A blob cut short on disk: PARTIAL.
    blob = (folder / "snapshots" / C1 / "d/b.bin").resolve()
    blob.write_bytes(b"beta")
    assert cache.local_state("org/m", "main").state is CacheState.PARTIAL
    # A file of the list missing: PARTIAL.
    blob.unlink()
    assert cache.local_state("org/m", "main").state is CacheState.PARTIAL
    [listed] = cache.list_cached()
    assert (listed.repo_id, listed.commit, listed.state, listed.refs) == (
        "org/m",
        C1,
        CacheState.PARTIAL,
        ("main",),
    )


def test_partial_before_any_file(tmp_path: Path) -> None:
    folder = tmp_path / "models--org--m"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "abc.1234.incomplete").write_bytes(b"x" * 10)
    cache = ModelCache(tmp_path)
    assert cache.local_state("org/m", "main").state is CacheState.PARTIAL
    [listed] = cache.list_cached()
    assert listed.state is CacheState.PARTIAL


def test_delete_revision_keeps_shared_blobs(tmp_path: Path) -> None:
    make_revision(tmp_path, "org/m", C1, {"shared.bin": b"same", "old.txt": b"old"}, ref=None)
    folder = make_revision(tmp_path, "org/m", C2, {"shared.bin": b"same", "new.txt": b"new"})
    cache = ModelCache(tmp_path)
    freed = delete(cache, "org/m", C1)
    assert freed == len(b"old")
    assert cache.local_state("org/m", C2).state is CacheState.COMPLETE
    assert cache.local_state("org/m", C1).state is CacheState.ABSENT
    assert not (folder / "trees" / f"{C1}.json").exists()
    assert delete(cache, "org/m", C1) is None
    # Deleting the branch deletes the commit it points to; the last revision takes the folder.
    tree_bytes = len((folder / "trees" / f"{C2}.json").read_bytes())
    assert delete(cache, "org/m", "main") == len(b"same") + len(b"new") + 40 + tree_bytes
    assert not folder.exists()


def test_planted_link_never_leads_a_delete_outside(tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    folder = make_revision(cache_root, "org/m", C1, {"a.txt": b"alpha"})
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / "snapshots" / C1 / "evil").symlink_to(outside)
    cache = ModelCache(cache_root)
    with pytest.raises(UnsafeCachePath):
        delete(cache, "org/m", C1)
    assert outside.read_text() == "keep me"
    assert (folder / "snapshots" / C1 / "a.txt").exists()  # nothing was deleted
    # The whole model: links are removed, never followed.
    delete(cache, "org/m", None)
    assert outside.read_text() == "keep me"
    assert not folder.exists()


def test_orphans_are_removed_only_when_no_process_holds_the_lock(tmp_path: Path) -> None:
    folder = tmp_path / "models--org--m"
    (folder / "blobs").mkdir(parents=True)
    locks = tmp_path / ".locks" / "models--org--m"
    locks.mkdir(parents=True)
    orphan = folder / "blobs" / "dead.aaaa1111.incomplete"
    live = folder / "blobs" / "live.bbbb2222.incomplete"
    orphan.write_bytes(b"x")
    live.write_bytes(b"y")
    (locks / "dead.lock").touch()
    fd = os.open(locks / "live.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # flock is per open file: a second open in this process contends like another process.
        assert ModelCache(tmp_path).remove_orphans("org/m") == 1
        assert not orphan.exists()
        assert live.exists()
    finally:
        os.close(fd)
    assert ModelCache(tmp_path).remove_orphans("org/m") == 1
    assert not live.exists()


def test_usage_counts_files_once(tmp_path: Path) -> None:
    make_revision(tmp_path, "org/m", C1, {"a.bin": b"a" * 1000})
    used, free = ModelCache(tmp_path).usage()
    tree_bytes = len((tmp_path / "models--org--m" / "trees" / f"{C1}.json").read_bytes())
    assert used == 1000 + 40 + tree_bytes  # the blob, the ref, the file list; not the link
    assert free > 0
    assert ModelCache(tmp_path / "not" / "yet").usage()[0] == 0


def test_metadata_without_content_is_not_found(tmp_path: Path) -> None:
    folder = make_revision(tmp_path, "org/m", C1, {"a.txt": b"alpha"})
    for blob in (folder / "blobs").iterdir():
        blob.unlink()
    for link in (folder / "snapshots" / C1).iterdir():
        link.unlink()
    (folder / "snapshots" / C1).rmdir()
    cache = ModelCache(tmp_path)
    assert cache.local_state("org/m", "main").state is CacheState.ABSENT
    assert cache.list_cached() == []


def test_a_delete_plan_removes_nothing_until_executed(tmp_path: Path) -> None:
    """The plan names what goes and what it frees; only ``execute`` removes anything."""
    make_revision(tmp_path, "org/m", C1, {"shared.bin": b"same", "old.txt": b"old"}, ref=None)
    folder = make_revision(tmp_path, "org/m", C2, {"shared.bin": b"same", "new.txt": b"new"})
    cache = ModelCache(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    plan = plan_delete(cache, "org/m", C1)
    assert plan is not None
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    # Entries are names below the cache's root, never paths: nothing can be followed later.
    assert plan.trees == (("models--org--m", "snapshots", C1),)
    old_blob = (folder / "snapshots" / C1 / "old.txt").resolve()
    assert ("models--org--m", "blobs", old_blob.name) in plan.files
    shared = (folder / "snapshots" / C2 / "shared.bin").resolve()
    assert ("models--org--m", "blobs", shared.name) not in plan.files  # shared
    assert plan.freed_bytes == len(b"old")
    assert plan.execute(cache) == len(b"old")
    assert not old_blob.exists()
    assert (folder / "snapshots" / C2 / "shared.bin").read_bytes() == b"same"
    whole = plan_delete(cache, "org/m", None)
    assert whole is not None
    assert whole.trees == (("models--org--m",),)
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    size = sum(p.stat().st_size for p in files)
    # A delete counts what it removes as it goes (one walk); a prediction measures first.
    assert whole.freed_bytes is None
    assert whole.expected_freed(cache) == size
    assert whole.execute(cache) == size


def test_a_kept_partial_file_goes_once_its_blob_is_complete(tmp_path: Path) -> None:
    """A partial file with its record is kept for a next attempt, unless the blob is there: then
    it is only a second name left by a transfer that completed (the worker died before removing
    it), and it goes with its record."""
    blobs = tmp_path / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    locks = tmp_path / ".locks" / "models--org--m"
    locks.mkdir(parents=True)
    for etag in ("done", "going"):
        (blobs / f"{etag}.ranged.incomplete").write_bytes(b"x")
        (locks / f"{etag}.ranged.json").write_text("{}")
    os.link(blobs / "done.ranged.incomplete", blobs / "done")  # the same file, now the blob
    assert ModelCache(tmp_path).remove_orphans("org/m") == 1
    assert (blobs / "done").read_bytes() == b"x"
    assert not (blobs / "done.ranged.incomplete").exists()
    assert not (locks / "done.ranged.json").exists()
    assert (blobs / "going.ranged.incomplete").exists()  # what a next attempt goes on from
    assert (locks / "going.ranged.json").exists()


def test_tidy_leaves_what_the_library_scans_without_a_warning(tmp_path: Path) -> None:
    """What a download stopped before its first file leaves (a ref naming an empty or absent
    snapshot) goes; a revision with files, and its ref, stay; with nothing left, the folder goes."""
    from huggingface_hub import scan_cache_dir

    folder = make_revision(tmp_path, "org/m", C1, {"a.txt": b"alpha"})  # refs/main -> C1
    (folder / "refs" / "dev").write_text(C2)  # the library's ref of a download stopped early
    (folder / "snapshots" / C2).mkdir()
    assert scan_cache_dir(tmp_path).warnings == []  # an empty revision is legal to the library
    (folder / "refs" / "gone").write_text("c" * 40)  # names no snapshot at all: "corrupted"
    assert scan_cache_dir(tmp_path).warnings
    cache = ModelCache(tmp_path)
    assert cache.tidy("org/m")
    assert sorted(p.name for p in (folder / "refs").iterdir()) == ["main"]
    assert [p.name for p in (folder / "snapshots").iterdir()] == [C1]
    assert scan_cache_dir(tmp_path).warnings == []
    assert not cache.tidy("org/m")  # nothing more to do
    # Nothing of a model left but a ref and empty folders: the folder goes.
    empty = tmp_path / "models--org--e"
    (empty / "refs").mkdir(parents=True)
    (empty / "blobs").mkdir()
    (empty / "refs" / "main").write_text(C2)
    assert scan_cache_dir(tmp_path).warnings  # no snapshots/: "corrupted"
    assert cache.tidy("org/e")
    assert not empty.exists()
    assert scan_cache_dir(tmp_path).warnings == []


def test_tidy_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "main").write_text(C2)
    cache_root = tmp_path / "cache"
    folder = cache_root / "models--org--m"
    folder.mkdir(parents=True)
    (folder / "refs").symlink_to(outside)  # planted: a link where the refs folder belongs
    ModelCache(cache_root).tidy("org/m")
    assert (outside / "main").read_text() == C2  # nothing removed through the link
    assert (folder / "refs").is_symlink()


def test_tidy_removes_only_what_it_saw_empty(tmp_path: Path) -> None:
    """A model folder that holds something tidy does not know (the library's .no_exist/, or a
    file another process just wrote) is not removed with it: only the empty folders go, and the
    library's scan still reads the rest without a warning."""
    from huggingface_hub import scan_cache_dir

    folder = tmp_path / "models--org--e"
    (folder / "refs").mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs" / "main").write_text(C2)
    (folder / ".no_exist" / C2).mkdir(parents=True)
    (folder / ".no_exist" / C2 / "missing.json").write_text("")
    assert ModelCache(tmp_path).tidy("org/e")
    assert (folder / ".no_exist" / C2 / "missing.json").exists()
    assert not (folder / "refs" / "main").exists()
    assert scan_cache_dir(tmp_path).warnings == []


def test_a_whole_model_leaves_the_librarys_sight_in_one_step(tmp_path: Path) -> None:
    """A whole model is moved under .locks (which scan_cache_dir skips) before it is removed, so
    that a crash mid-removal never leaves half a model; the next start finishes the removal. A
    .locks that is a link is not followed."""
    from api.models.hub.deletion import REMOVING, finish_removals

    folder = make_revision(tmp_path, "org/m", C1, {"w.bin": b"weights"})
    cache = ModelCache(tmp_path)
    # What a crash after the move left: a folder set aside, whole.
    aside = tmp_path / ".locks" / REMOVING / "models--org--x.0123456789abcdef"
    (aside / "blobs").mkdir(parents=True)
    (aside / "blobs" / "b").write_bytes(b"x")
    assert finish_removals(cache) == 1
    assert list((tmp_path / ".locks" / REMOVING).iterdir()) == []
    tree_bytes = len((folder / "trees" / f"{C1}.json").read_bytes())
    assert delete(cache, "org/m", None) == len(b"weights") + 40 + tree_bytes  # 40: refs/main
    assert not folder.exists()
    assert list((tmp_path / ".locks" / REMOVING).iterdir()) == []
    # A planted .locks link: nothing moves through it, nothing is removed outside.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / ".locks" / REMOVING).rmdir()
    (tmp_path / ".locks").rmdir()
    (tmp_path / ".locks").symlink_to(outside)
    folder = make_revision(tmp_path, "org/n", C2, {"w.bin": b"w"})
    with pytest.raises(UnsafeCachePath):  # refused, as before: nothing removed, nothing moved
        delete(cache, "org/n", None)
    assert (folder / "snapshots" / C2 / "w.bin").read_bytes() == b"w"
    assert list(outside.iterdir()) == []
    assert finish_removals(cache) == 0
