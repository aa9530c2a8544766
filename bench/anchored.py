"""The cost of anchored file operations (issue 27): delete and prune of a 300-file model and of a
model with 1000 revisions, and the listing of 10,000 cached models (its file lists, records and
locks are read through descriptors too), by the code before the change (paths) and after it
(descriptors), in the same run, on the same machine.

"Before" is the commit that preceded the change (``BENCH_BEFORE``, default ``ccb00b3``), checked
out as a git worktree under ``bench/.data`` and imported in processes of its own; "after" is this
tree. Each figure is the median of ``RUNS`` fresh caches (built and synced outside the timing,
the page cache warm), so both sides do the same work on the same files.

    python bench/anchored.py [RUNS]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data"
BEFORE = os.environ.get("BENCH_BEFORE", "ccb00b3")
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 5
C = "{:040x}".format


def write_revision(cache: Path, repo: str, commit: str, files: dict[str, bytes]) -> None:
    """A revision as huggingface_hub 2.x lays it out: blobs, snapshot links, a file list."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    tree = {}
    for rel, data in files.items():
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        blob = folder / "blobs" / etag
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[rel] = {"size": len(data), "blob_id": etag}
    (folder / "trees").mkdir(exist_ok=True)
    (folder / "trees" / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": tree})
    )
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def build(kind: str, cache: Path) -> None:
    if kind == "models" and (cache / f".built-{LISTED}").exists():
        return  # listing changes nothing: built once, kept in bench/.data
    shutil.rmtree(cache, ignore_errors=True)
    if kind == "models":
        for i in range(LISTED):
            files = {"config.json": b'{"i": %d}' % i, "w.bin": b"w" * 64}
            write_revision(cache, f"bench/m{i:05d}", C(i + 1), files)
        (cache / f".built-{LISTED}").touch()
    elif kind == "300-file":
        files = {f"shard/{i:03d}.bin": os.urandom(4096) for i in range(300)}
        write_revision(cache, "bench/many", C(1), files)
    else:
        shared = {"a.bin": b"a" * 4096, "b.bin": b"b" * 4096}
        for n in range(1, 1001):
            write_revision(cache, "bench/revs", C(n), {**shared, "config.json": b'{"n": %d}' % n})


LISTED = 10_000


def operate(operation: str, cache: Path) -> float:
    """One operation on a fresh cache, timed; in the process whose ``api`` is the side measured."""
    from api.models.hub import deletion
    from api.models.hub.cache import ModelCache

    model = ModelCache(cache)
    started = time.perf_counter()
    if operation == f"list {LISTED:,} models":
        assert len(model.list_cached()) == LISTED
    elif operation == "delete model (300 files)":
        assert deletion.delete(model, "bench/many", None)
    elif operation == "delete model (1000 revisions)":
        assert deletion.delete(model, "bench/revs", None)
    elif operation == "delete one revision of 1000":
        assert deletion.delete(model, "bench/revs", C(500)) is not None
    else:
        plan = deletion.plan_prune(model, "bench/revs", frozenset(C(n) for n in range(1, 1000)))
        assert plan is not None
        if operation == "prune 999 of 1000, dry run":
            try:
                plan.expected_freed(model)
            except TypeError:
                plan.expected_freed()  # type: ignore[call-arg]  # before
        else:
            try:
                deletion.execute(model, plan)
            except TypeError:
                deletion.execute(plan)  # type: ignore[call-arg, arg-type]  # before
    return time.perf_counter() - started


OPERATIONS = {
    f"list {LISTED:,} models": "models",
    "delete model (300 files)": "300-file",
    "delete model (1000 revisions)": "1000-revision",
    "delete one revision of 1000": "1000-revision",
    "prune 999 of 1000, dry run": "1000-revision",
    "prune 999 of 1000": "1000-revision",
}


def before_tree() -> Path:
    tree = DATA / f"before-{BEFORE}"
    if not (tree / "packages" / "api" / "src").exists():
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(
            ["git", "worktree", "add", "--force", "--detach", str(tree), BEFORE],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return tree / "packages" / "api" / "src"


def measure(source: Path, operation: str) -> float:
    """Median of RUNS fresh caches, in a process importing ``api`` from ``source``."""
    kind = OPERATIONS[operation]
    cache = DATA / ("anchored-models" if kind == "models" else "anchored-cache")
    times = []
    for _ in range(RUNS):
        build(kind, cache)
        os.sync()  # the cache just written is on disk: no writeback in the timing
        out = subprocess.run(
            [sys.executable, __file__, "--one", operation, str(cache)],
            env={**os.environ, "PYTHONPATH": str(source)},
            check=True,
            capture_output=True,
            text=True,
        )
        times.append(float(out.stdout.strip()))
    if kind != "models":
        shutil.rmtree(cache, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(operate(sys.argv[2], Path(sys.argv[3])))
        return
    old, new = before_tree(), ROOT / "packages" / "api" / "src"
    print(f"anchored file operations: medians of {RUNS} fresh caches, before ({BEFORE}) and after")
    print(f"{'operation':34} {'before':>9} {'after':>9} {'after/before':>13}")
    for operation in OPERATIONS:
        first, second = measure(old, operation), measure(new, operation)
        print(
            f"{operation:34} {first * 1000:7.1f}ms {second * 1000:7.1f}ms {second / first:12.2f}x"
        )


if __name__ == "__main__":
    main()
