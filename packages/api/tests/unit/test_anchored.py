"""Anchored file operations (``api.models.anchored``): what they do with links, and that nothing
else in the service removes, renames, creates or writes in the cache or the state folder.

Two guards: a static rule on the source (no module function that removes, renames or writes by
path, outside ``anchored.py``), and a run of every operation of the cache and the store under a
CPython audit hook, which sees each removal, rename, ``mkdir`` and writing ``open`` whatever the
call site, and fails on any that names a path in the cache or the state folder instead of a name
relative to an open folder."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from huggingface_hub.utils._shared_blobs import publish_blob_to_shared_store

import api
from api.models.anchored import Folder, KeepsChanging, LinkInTheWay, held, resolve_link, walk_files
from api.models.backend import FileSelection, FilesPreset, RemoteFile
from api.models.errors import UnsafeCachePath
from api.models.hub._compat import shared_blob_target
from api.models.hub.cache import ModelCache, _shared_hash
from api.models.hub.deletion import delete, execute, plan_delete, plan_prune
from api.models.hub.ranged import Prefix, Ranges, Record
from api.models.store import JobStore
from api.models.types import Model
from tests.helpers import anchored, make_revision, parse_python

C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40


# -- the operations ---------------------------------------------------------------------------


def victim(tmp_path: Path) -> Path:
    """A folder outside the cache, with something to lose."""
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "keep.txt").write_text("keep")
    (outside / "keep.txt").write_text("keep")
    return outside


def contents(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


class Swapper(threading.Thread):
    """Swaps folders for links to a victim and back, as fast as it can, while armed (``during``):
    each cycle renames the real folder away, puts a link in its place, then puts the folder
    back. Disarmed, it finishes its cycle first: the test's own set-up never writes through a
    link."""

    def __init__(self, pairs: Callable[[], list[tuple[Path, Path]]]) -> None:
        super().__init__(daemon=True)
        self.pairs = pairs
        self.swaps = 0
        self._armed = threading.Event()
        self._stopped = threading.Event()
        self._cycle = threading.Lock()

    def run(self) -> None:
        while not self._stopped.is_set():
            if not self._armed.wait(0.01):
                continue
            with self._cycle:
                if not self._armed.is_set():
                    continue
                for real, other in self.pairs():
                    moved = real.with_name(real.name + ".moved")
                    with contextlib.suppress(OSError):
                        os.rename(real, moved)
                        try:
                            real.symlink_to(other)
                            self.swaps += 1
                            time.sleep(0)  # let the operation meet the link
                            os.unlink(real)
                        finally:
                            os.rename(moved, real)

    @contextlib.contextmanager
    def during(self) -> Iterator[None]:
        self._armed.set()
        try:
            yield
        finally:
            self._armed.clear()
            with self._cycle:
                pass  # the cycle under way has put everything back

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def test_a_folder_is_never_entered_through_a_link(tmp_path: Path) -> None:
    outside = victim(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside)
    (root / "file").write_text("x")
    with anchored(root) as folder:
        with pytest.raises(LinkInTheWay) as found:
            folder.sub("linked")
        assert found.value.where == "linked"
        assert found.value.found == "a link"
        with pytest.raises(LinkInTheWay, match="file is a file"):
            folder.sub("file")
        with pytest.raises(LinkInTheWay):
            folder.walk("linked", "deep")
        with pytest.raises(LinkInTheWay):
            folder.open("linked")  # a link where a file is expected
        assert folder.sub("absent") is None
        with pytest.raises(ValueError, match="single path component"):
            folder.sub("../outside")
        mended = folder.sub("linked", create=True, mend=True)  # the cache's own folders only
        assert mended is not None
        mended.close()
    assert (root / "linked").is_dir()
    assert not (root / "linked").is_symlink()
    assert contents(outside) == {"deep/keep.txt": b"keep", "keep.txt": b"keep"}


def test_remove_takes_links_never_what_they_point_to(tmp_path: Path) -> None:
    outside = victim(tmp_path)
    tree = tmp_path / "root" / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file").write_bytes(b"12345")
    (tree / "a" / "link-to-folder").symlink_to(outside)
    (tree / "a" / "link-to-file").symlink_to(outside / "keep.txt")
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    with anchored(tmp_path / "root") as root:
        assert root.remove("tree") == 5  # bytes of regular files only
        assert root.remove("tree") == 0  # gone already: nothing to do
    assert not tree.exists()
    assert contents(outside) == {"deep/keep.txt": b"keep", "keep.txt": b"keep"}


def test_remove_survives_a_folder_swapped_for_a_link_under_it(tmp_path: Path) -> None:
    """A thread swaps a subfolder for a link to a victim folder and back while folders are
    removed: nothing of the victim is touched, and every removal either completes or says that
    the tree kept changing."""
    outside = victim(tmp_path)
    before = contents(outside)
    root_path = tmp_path / "root"
    root_path.mkdir()
    current: list[Path] = []
    swapper = Swapper(lambda: [(p / "sub", outside) for p in current])
    swapper.start()
    outcomes: dict[str, int] = {"removed": 0, "changing": 0}
    try:
        with anchored(root_path) as root:
            for n in range(300):
                tree = root_path / f"tree{n}"
                (tree / "sub" / "inner").mkdir(parents=True)
                for i in range(5):
                    (tree / "sub" / "inner" / f"f{i}").write_bytes(b"x")
                current[:] = [tree]
                with swapper.during():
                    try:
                        root.remove(tree.name)
                        outcomes["removed"] += 1
                    except KeepsChanging:
                        outcomes["changing"] += 1
                current.clear()
                root.remove(tree.name)
    finally:
        swapper.stop()
    assert swapper.swaps > 0
    assert contents(outside) == before
    assert outcomes["removed"] > 0


def test_write_atomic_replaces_a_link_never_writes_through_it(tmp_path: Path) -> None:
    outside = victim(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "record").symlink_to(outside / "keep.txt")
    with anchored(root) as folder:
        folder.write_atomic("record", b"new")
        assert folder.read("record", 10) == b"new"
        with pytest.raises(ValueError, match="larger than 2 bytes"):
            folder.read("record", 2)
    assert (outside / "keep.txt").read_text() == "keep"
    assert not (root / "record").is_symlink()
    assert [p.name for p in root.iterdir()] == ["record"]  # no temporary file left


def test_links_are_read_by_their_text() -> None:
    at = ("models--o--m", "snapshots", C1, "sub")
    assert resolve_link(at, "../../../blobs/abc") == ("models--o--m", "blobs", "abc")
    assert resolve_link(("models--o--m", "blobs"), "../../blobs/ab/abc") == ("blobs", "ab", "abc")
    assert resolve_link(("models--o--m", "blobs"), "../../../etc/passwd") is None
    assert resolve_link(("a",), "/etc/passwd", "/cache") is None
    assert resolve_link(("a",), "/cache/blobs/x", "/cache") == ("blobs", "x")
    assert resolve_link(("a",), "/cache-other/x", "/cache") is None


def test_walk_files_lists_links_without_entering_them(tmp_path: Path) -> None:
    outside = victim(tmp_path)
    (tmp_path / "root" / "d").mkdir(parents=True)
    (tmp_path / "root" / "d" / "f").write_text("x")
    (tmp_path / "root" / "d" / "l").symlink_to(outside)
    with anchored(tmp_path / "root") as root:
        found = sorted(rel for rel, _ in walk_files(root))
    assert found == ["d/f", "d/l"]


def test_our_reading_of_the_librarys_shared_links_agrees_with_the_library(tmp_path: Path) -> None:
    """The shared store's links are read by their text, as the library's own
    ``_shared_blob_target`` reads them: both name the same blob for a link the library made."""
    cache = tmp_path / "cache"
    data = os.urandom(4096)
    etag = hashlib.sha256(data).hexdigest()
    xet = hashlib.sha256(b"xet" + data).hexdigest()
    blobs = cache / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / etag).write_bytes(data)
    assert publish_blob_to_shared_store(
        blob_path=str(blobs / etag), xet_hash=xet, cache_dir=cache, expected_size=len(data)
    )
    library = shared_blob_target(blobs / etag, cache)
    assert library is not None
    assert library.name == xet
    with anchored(blobs) as folder:
        assert _shared_hash(folder, etag, "models--org--m", str(cache)) == xet


# -- nothing else writes by path: the static rule ------------------------------------------------

SOURCE = Path(api.__file__).parent
# Module functions that remove, rename, create or change files by path.
_BY_PATH = {
    "os": {
        "unlink",
        "remove",
        "rename",
        "replace",
        "rmdir",
        "removedirs",
        "mkdir",
        "makedirs",
        "link",
        "symlink",
        "chmod",
        "chown",
        "truncate",
        "renames",
    },
    "shutil": {"rmtree", "move", "copy", "copy2", "copyfile", "copytree"},
}
_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}
# What remains, each for its reason. Nothing here touches the cache or the state folder.
_ALLOWED: dict[str, str] = {}


def _writing_mode(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) >= 2 else None
    for keyword in call.keywords:
        if keyword.arg == "mode":
            mode = keyword.value
    return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")


def _violations() -> list[str]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "anchored.py":
            continue
        text = path.read_text()
        for node in ast.walk(parse_python(text)):
            if not isinstance(node, ast.Call):
                continue
            func, hit = node.func, None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                module = func.value.id
                if func.attr in _BY_PATH.get(module, set()):
                    hit = f"{module}.{func.attr}"
                elif module == "os" and func.attr == "open":
                    flags = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                    if flags & _WRITE_FLAGS:
                        hit = "os.open for writing"
            if isinstance(func, ast.Attribute) and func.attr in (
                "write_text",
                "write_bytes",
                "touch",
                "symlink_to",
                "hardlink_to",
                "mkdir",
                "rmdir",
            ):
                hit = f".{func.attr}"
            if isinstance(func, ast.Name) and func.id == "open" and _writing_mode(node):
                hit = "open for writing"
            if isinstance(func, ast.Attribute) and func.attr == "open" and _writing_mode(node):
                hit = ".open for writing"
            where = f"{path.relative_to(SOURCE)}:{node.lineno}"
            if hit is not None and where not in _ALLOWED:
                found.append(f"{where}: {hit}: {ast.get_source_segment(text, node)}")
    return found


def test_nothing_but_the_anchored_module_writes_by_path() -> None:
    """Every removal, rename, creation and write of the service goes through
    ``api.models.anchored``. (Calls of a ``Folder``'s own methods are relative to its
    descriptor; the audited run below checks those at run time.)"""
    assert _violations() == []


# -- nothing else writes by path: the audited run -------------------------------------------------

_MUTATING = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.link", "os.symlink", "os.chmod"}
_OPEN_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_RECORDING: list[list[tuple[str, str]]] = []
_HOOKED = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if not _RECORDING:
        return
    paths: list[object] = []
    if event in _MUTATING:
        # (path, ..., dir_fd) or (src, dst, src_dir_fd, dst_dir_fd): a dir_fd of -1 means by path.
        if event == "os.rename":
            paths = [args[0]] if args[2] == -1 else []
            paths += [args[1]] if args[3] == -1 else []
        elif args[-1] in (-1, None):
            paths = [args[0]]
    elif event == "open" and len(args) == 3:
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and mode is None and flags & _OPEN_WRITE
        )
        paths = [path] if writing else []
    elif event == "shutil.rmtree":
        paths = [args[0]] if args[1] is None else []
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.isabs(os.fsdecode(path)):
            _RECORDING[-1].append((event, os.fsdecode(path)))


@contextlib.contextmanager
def audited() -> Iterator[list[tuple[str, str]]]:
    """Every removal, rename, ``mkdir``, link, ``chmod`` and writing ``open`` by an absolute path
    while the block runs (in this thread or another)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    events: list[tuple[str, str]] = []
    _RECORDING.append(events)
    try:
        yield events
    finally:
        _RECORDING.remove(events)


def shared_revision(cache: Path, repo: str, commit: str, data: bytes) -> None:
    """A revision whose one file is in the library's shared store (as the library puts it)."""
    etag = hashlib.sha256(data).hexdigest()
    folder = cache / ("models--" + repo.replace("/", "--"))
    make_revision(cache, repo, commit, {"small.json": b"{}"})
    (folder / "blobs" / etag).write_bytes(data)
    assert publish_blob_to_shared_store(
        blob_path=str(folder / "blobs" / etag),
        xet_hash=hashlib.sha256(b"xet" + data).hexdigest(),
        cache_dir=cache,
        expected_size=len(data),
    )
    (folder / "snapshots" / commit / "w.bin").symlink_to(f"../../blobs/{etag}")


def test_every_cache_and_store_operation_acts_through_descriptors(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache"
    make_revision(cache_path, "org/a", C1, {"a.txt": b"alpha", "d/b.bin": b"beta" * 10})
    make_revision(cache_path, "org/a", C2, {"a.txt": b"alpha2"}, ref="dev")
    make_revision(cache_path, "org/b", C1, {"x.txt": b"x"})
    shared_revision(cache_path, "org/c", C1, os.urandom(2048))
    shared_revision(cache_path, "org/c", C2, os.urandom(2048))
    blobs = cache_path / "models--org--a" / "blobs"
    (blobs / ("f" * 64 + ".a1b2c3.incomplete")).write_bytes(b"orphan")
    (blobs / "tmp.incomplete").write_bytes(b"partial")  # the library's, for Prefix.keep
    cache = ModelCache(cache_path)
    with audited() as events:
        cache.write_ref("org/a", "feature/x", C1)
        cache.records.mark_unverified("org/a", C1, "checking", ["a.txt"])
        cache.records.record_selection("org/a", C1, FileSelection(FilesPreset.VLLM))
        cache.records.clear_unverified("org/a", C1)
        with cache.hold_revision("org/a", C2):
            assert cache.revision_busy("org/a", C2)  # held: busy for any other open of the lock
        # The orphan planted above, and the library's temporary file of Prefix.keep below.
        with anchored(blobs) as blob_folder, anchored(tmp_path) as locks:
            entry = RemoteFile("w.bin", 10, "e" * 64)
            Record("w.bin", "e" * 64, 10, 1024 * 1024, [0]).save(locks)
            kept = Prefix.keep(blob_folder, "tmp.incomplete", entry, locks, Ranges())
            assert kept is not None
            kept.drop()
        assert cache.remove_orphans("org/a") == 2
        cache.discard_ranged("org/a")
        report = cache.verify("org/a", C1)
        assert report is not None
        fd = cache.open_content("org/c", C1, "w.bin", blob_only=True)
        assert fd is not None
        os.close(fd)
        cache.discard_file("org/a", C1, "d/b.bin")
        plan = plan_prune(cache, "org/c", frozenset({C1}))
        assert plan is not None
        assert plan.expected_freed(cache) >= 0
        assert delete(cache, "org/a", C2) is not None
        assert delete(cache, "org/c", None) is not None
        assert delete(cache, "org/b", None) is not None
        state = JobStore(tmp_path / "state")
        state.open()
        state.add("k1", Model(hf_repo="org/a"), None)
        state.set_errors({"org/a:latest": "gone"})
        state.remove("k1")
        state.close()
    # Setting up above wrote by path, as a test may; the service's operations did not, once. The
    # roots themselves are made by their configured path (``Folder.anchor``): that is all.
    roots = {str(cache_path), str(tmp_path / "state")}
    assert [e for e in events if e[1] not in roots] == []
    assert {e for e in events if e[1] in roots} <= {("os.mkdir", r) for r in roots}


def test_the_audit_sees_what_it_must(tmp_path: Path) -> None:
    """The audited run would fail on a write by path: the hook records one."""
    with audited() as events:
        (tmp_path / "by-path").write_text("x")
        (tmp_path / "by-path").unlink()
        with anchored(tmp_path) as folder:
            folder.write_atomic("anchored", b"x")
            folder.unlink("anchored")
    assert [e for e, _ in events] == ["open", "os.remove"]


# -- a revision delete while its folders are swapped for links ----------------------------------


@pytest.mark.parametrize(
    "swapped", ["snapshots", "blobs", "snapshot", "trees", "refs", ".locks", "model's .locks"]
)
def test_deletes_prunes_and_verifications_never_follow_a_folder_swapped_for_a_link(
    tmp_path: Path, swapped: str
) -> None:
    """While revision deletes, whole-model deletes, prunes and verifications run, a thread swaps
    a folder of the cache for a link to a victim's copy of it (the same files: another user's
    copy of the model) and back, 160 tries per folder kind: the victim is never touched, and
    every operation completes or answers with the link it refused (a 409, never a crash)."""
    outside = tmp_path / "victim"
    files = {f"f{i}.txt": b"victim %d" % i for i in range(20)}
    make_revision(outside, "org/m", C1, files)
    (outside / ".locks" / "models--org--m").mkdir(parents=True)
    for name in (f"{C1}.unverified", f"{C1}.selection.json", f"{C1}.download.lock"):
        (outside / ".locks" / "models--org--m" / name).write_text("keep")
    before = contents(outside)
    cache_path = tmp_path / "cache"
    cache = ModelCache(cache_path)
    folder, victim_folder = cache_path / "models--org--m", outside / "models--org--m"
    pair = {
        "snapshot": (folder / "snapshots" / C1, victim_folder / "snapshots" / C1),
        ".locks": (cache_path / ".locks", outside / ".locks"),
        "model's .locks": (
            cache_path / ".locks" / "models--org--m",
            outside / ".locks" / "models--org--m",
        ),
    }.get(swapped, (folder / swapped, victim_folder / swapped))
    swapper = Swapper(lambda: [pair])
    swapper.start()
    answers: dict[str, int] = {}
    operations: list[Callable[[], object]] = [
        lambda: delete(cache, "org/m", C1),
        lambda: delete(cache, "org/m", None),
        lambda: _prune(cache),
        lambda: cache.verify("org/m", C1),
    ]
    try:
        for _ in range(40):
            for operation in operations:
                # The same files as the victim's: a removal by path through a swapped folder
                # would hit a file of the same name.
                make_revision(cache_path, "org/m", C1, files)
                make_revision(cache_path, "org/m", C2, {"other.txt": b"other"}, ref=None)
                (cache_path / ".locks" / "models--org--m").mkdir(parents=True, exist_ok=True)
                with swapper.during():
                    try:
                        operation()
                        kind = "done"
                    except UnsafeCachePath:
                        kind = "refused"
                answers[kind] = answers.get(kind, 0) + 1
                _clear(cache_path)
    finally:
        swapper.stop()
    assert swapper.swaps > 0
    assert contents(outside) == before
    assert answers.get("done", 0) > 0, answers


def _prune(cache: ModelCache) -> None:
    plan = plan_prune(cache, "org/m", frozenset({C1}))
    if plan is not None:
        execute(cache, plan)


def _clear(cache_path: Path) -> None:
    with anchored(cache_path) as root:
        root.remove("models--org--m")
        with held(root.sub(".locks")) as locks:
            if locks is not None:
                locks.clear()


def test_a_plan_of_a_revision_refuses_a_link_in_place_of_its_folder(tmp_path: Path) -> None:
    make_revision(tmp_path, "org/m", C1, {"a.txt": b"a"})
    make_revision(tmp_path, "org/m", C2, {"b.txt": b"b"})
    snapshot = tmp_path / "models--org--m" / "snapshots" / C1
    for child in snapshot.iterdir():
        child.unlink()
    snapshot.rmdir()
    snapshot.symlink_to(tmp_path / "models--org--m" / "snapshots" / C2)
    with pytest.raises(UnsafeCachePath) as refused:
        plan_delete(ModelCache(tmp_path), "org/m", C1)
    assert refused.value.where == f"models--org--m/snapshots/{C1}"
    assert "nothing was deleted" in str(refused.value)


def test_folder_closes(tmp_path: Path) -> None:
    folder = Folder.anchor(tmp_path)
    assert folder is not None
    fd = folder.fd
    folder.close()
    folder.close()  # twice is fine
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
