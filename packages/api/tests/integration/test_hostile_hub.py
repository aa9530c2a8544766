"""A hostile Hub (or mirror at HF_ENDPOINT): nothing it says reaches a path unchecked (issue 12).

Each lie is one a mirror can tell: a file path, a commit id or an ETag that leads outside the cache,
a listing that never ends, an answer that never comes. Each download fails at once with a plain
message, and nothing outside the cache is created, changed or deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub, Generated, Lies, RepoBuilder, latency
from tests.helpers import FINAL, app_client, wait_for_status

BODY = {"hf_repo": "org/model"}


@pytest.fixture
def commit(repos: RepoBuilder) -> str:
    return repos.commit(
        "org/model",
        {"config.json": "{}", "model.safetensors": Generated(11 * 1024 * 1024, seed=3)},
    )


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder beside the cache, and one beside the test's own folder, with a file each: what a
    path with enough ``..`` reaches."""
    for folder in (tmp_path / "victim", tmp_path.parent / "victim"):
        folder.mkdir(exist_ok=True)
        (folder / "target.txt").write_text("keep me")
    return tmp_path / "victim"


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` with its size and content hash."""
    state = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                state[str(path)] = (
                    path.stat().st_size,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
    return state


def outside_cache(tmp_path: Path) -> dict[str, tuple[int, str]]:
    """Files of the test's folder and of the folder beside it, less the cache, the hub's own,
    and the service's state folder (whose files are only the service's own: checked here)."""
    own = tmp_path / "model-service"
    state = {
        k: v
        for k, v in tree_state(tmp_path).items()
        if not k.startswith(
            (str(tmp_path / "cache"), str(tmp_path / "repos"), str(tmp_path / "hf-home"), str(own))
        )
    }
    for path in own.rglob("*") if own.exists() else ():
        relative = path.relative_to(own)
        assert relative.parts[0] in (
            "claims",
            "jobs.sqlite3",
            "jobs.sqlite3-wal",
            "jobs.sqlite3-shm",
        )
        assert path.is_dir() or relative.parts[0] != "claims" or path.suffix == ".lock", path
    state.update(tree_state(tmp_path.parent / "victim"))
    return state


def pwned(tmp_path: Path) -> list[str]:
    """Anything the lies named, wherever it landed."""
    return [
        str(p)
        for root in (tmp_path, tmp_path.parent / "victim")
        for p in root.rglob("*")
        if "pwned" in p.name
    ]


def no_such_name(tmp_path: Path) -> None:
    assert pwned(tmp_path) == []


LIES: dict[str, Lies] = {
    "tree-traversal": Lies(
        tree_entries=[
            {"type": "file", "oid": "a" * 40, "size": 7, "path": "../../../../victim/target.txt"}
        ]
    ),
    "tree-absolute": Lies(
        tree_entries=[{"type": "file", "oid": "a" * 40, "size": 7, "path": "/abs/path-pwned"}]
    ),
    "tree-nul": Lies(
        tree_entries=[{"type": "file", "oid": "a" * 40, "size": 7, "path": "a\x00pwned"}]
    ),
    "tree-long-name": Lies(
        tree_entries=[{"type": "file", "oid": "a" * 40, "size": 7, "path": "é" * 150}]
    ),
    "tree-bad-oid": Lies(
        tree_entries=[{"type": "file", "oid": "../../pwned", "size": 7, "path": "x.json"}]
    ),
    "tree-bad-lfs-oid": Lies(
        tree_entries=[
            {
                "type": "file",
                "oid": "a" * 40,
                "size": 7,
                "path": "w.bin",
                "lfs": {"oid": "../../../victim/pwned", "size": 7, "pointerSize": 1},
            }
        ]
    ),
    "sha-traversal-3": Lies(sha="../../../victim/sha-pwned"),
    "sha-traversal-4": Lies(sha="../../../../victim/sha-pwned"),
    "etag-traversal": Lies(headers={"ETag": '"../../../victim/etag-pwned"'}),
    "linked-etag-traversal": Lies(headers={"X-Linked-Etag": '"../../../victim/etag-pwned"'}),
    "repo-commit-traversal": Lies(headers={"X-Repo-Commit": "../../../victim/commit-pwned"}),
}


@pytest.mark.both_paths
@pytest.mark.parametrize("lie", list(LIES))
async def test_a_lying_hub_fails_the_download_and_touches_nothing_outside(
    client: httpx.AsyncClient, hub: FakeHub, commit: str, victim: Path, tmp_path: Path, lie: str
) -> None:
    before = outside_cache(tmp_path)
    hub.lies = LIES[lie]
    answer = await client.post("/api/models/download", json=BODY)
    assert answer.status_code == 202, answer.text
    final = await wait_for_status(client, BODY, FINAL)
    assert final["status"] != "DOWNLOADED"
    message = final["error_message"]
    assert "refused" in message
    assert "not retried" in message
    assert outside_cache(tmp_path) == before
    no_such_name(tmp_path)
    assert (victim / "target.txt").read_text() == "keep me"
    # The cache holds nothing that looks downloaded, and every endpoint still answers.
    listed = (await client.get("/api/models/list")).json()["models"]
    assert all(item["status"] != "DOWNLOADED" for item in listed)
    assert (await client.get("/api/models/space")).status_code == 200
    # The Hub mends its ways: the same model downloads.
    hub.lies = Lies()
    await client.post("/api/models/download", json=BODY)
    assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    assert (await client.post("/api/models/verify", json=BODY)).json()["verified"] is True


@pytest.mark.parametrize("kind", ["endless", "looping"])
async def test_a_tree_listing_that_never_ends_is_cut_short(
    hub: FakeHub, commit: str, cache_dir: Path, kind: str
) -> None:
    hub.page_size = 50
    hub.lies = Lies(endless_tree=kind == "endless", looping_tree=kind == "looping")
    settings = Settings(cache_dir=cache_dir, hf_endpoint=hub.url, max_repo_files=2000)
    async with app_client(settings) as client:
        answer = await client.post("/api/models/download", json=BODY)
        assert answer.status_code == 202, answer.text
        message = (await wait_for_status(client, BODY, FINAL))["error_message"]
    assert "refused" in message
    pages = hub.count("GET", "/api/models/org/model/tree/*")
    # At most the cap's worth of pages (2000 files / 50 a page), in each of the two processes
    # that list (the service for the plan, the worker for the library), and no retry.
    assert pages <= 2 * (2000 // 50 + 1), pages


async def test_a_hub_that_never_answers_holds_no_one_up(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    """Three downloads stuck on a silent Hub: status, list and space still answer at once, the
    downloads end by the Hub timeouts, and the service stops promptly."""
    for n in range(3):
        repos.commit(f"org/model{n}", {"config.json": "{}"})
    hub.add_fault(latency(3600, path="/api/*"))
    settings = Settings(
        cache_dir=cache_dir,
        hf_endpoint=hub.url,
        hub_read_timeout_seconds=1,
        plan_timeout_seconds=0.5,
        retry_attempts=2,
        retry_min_backoff_seconds=0.05,
        retry_max_backoff_seconds=0.1,
        warm_worker=False,
    )
    loop = asyncio.get_running_loop()
    app_context = app_client(settings)
    client = await app_context.__aenter__()
    try:
        bodies: list[dict[str, Any]] = [{"hf_repo": f"org/model{n}"} for n in range(3)]
        for body in bodies:
            assert (await client.post("/api/models/download", json=body)).status_code == 202
        for _ in range(5):
            for path in ("/api/models/list", "/api/models/space"):
                started = loop.time()
                async with asyncio.timeout(5):
                    assert (await client.get(path)).status_code == 200
                assert loop.time() - started < 5
            async with asyncio.timeout(5):
                assert (await client.post("/api/models/status", json=bodies[0])).status_code == 200
        finals = [await wait_for_status(client, body, FINAL, seconds=60) for body in bodies]
        assert all(f["status"] == "NOT_FOUND" for f in finals), finals
        assert all("timed out" in f["error_message"] for f in finals), finals
        # A cancel of a download stuck on the silent Hub returns at once too.
        assert (await client.post("/api/models/download", json=bodies[0])).status_code == 202
        async with asyncio.timeout(5):
            assert (await client.request("DELETE", "/api/models", json=bodies[0])).json() == {
                "status": "cancelled",
                "freed_bytes": None,
            }
    finally:
        started = loop.time()
        await app_context.__aexit__(None, None, None)
        assert loop.time() - started < 5
