"""The cache as it really is: read-only, or holding what a hostile Hub or another tool left. Every
answer is a clear one, never a 500, and the rest of the cache keeps working (issue 12)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.models.hub.guard import path_problem
from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder
from tests.helpers import FINAL, app_client, tmpfs, wait_for_status


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of our own, to remount read-only."""
    with tmpfs(tmp_path / "fs", "64m") as mount_point:
        yield mount_point


async def test_a_read_only_cache_answers_clearly(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, small_fs: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "w.bin": b"w" * 1000})
    cache = small_fs / "cache"
    settings = settings.model_copy(update={"cache_dir": cache, "space_margin_bytes": 0})
    body = {"hf_repo": "org/model"}
    async with app_client(settings) as client:
        await client.post("/api/models/download", json=body)
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    before = sorted(str(p) for p in cache.rglob("*"))
    async with app_client(settings) as client:
        status = await client.post("/api/models/status", json=body)
        assert status.status_code == 200
        assert status.json()["status"] == "DOWNLOADED"
        listed = await client.get("/api/models/list")
        assert listed.status_code == 200
        assert [m["status"] for m in listed.json()["models"]] == ["DOWNLOADED"]
        assert (await client.get("/api/models/space")).status_code == 200
        verified = await client.post("/api/models/verify", json=body)
        assert verified.status_code == 200
        assert verified.json()["verified"] is True
        again = await client.post("/api/models/download", json=body)
        assert again.status_code == 200
        deleted = await client.request("DELETE", "/api/models", json=body)
        assert deleted.status_code == 409, deleted.text
        assert "not writable" in deleted.json()["detail"]
        assert "nothing was deleted" in deleted.json()["detail"]
    assert sorted(str(p) for p in cache.rglob("*")) == before


async def test_a_hostile_file_list_in_the_cache_breaks_no_listing(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    """File lists written by a client that trusted a hostile Hub: a NUL, a 300-byte name, a
    path out of the snapshot. The model with it answers clearly; the others are unaffected."""
    for name in ("org/good", "org/bad"):
        repos.commit(name, {"config.json": "{}"})
        body = {"hf_repo": name}
        await client.post("/api/models/download", json=body)
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    trees = cache_dir / "models--org--bad" / "trees"
    [tree_file] = trees.iterdir()
    tree = json.loads(tree_file.read_text())
    for hostile in ("a\u0000b", "\u00e9" * 150, "../../../../etc/passwd"):
        tree["files"][hostile] = {"size": 1, "blob_id": "a" * 40}
        tree_file.write_text(json.dumps(tree))
        listed = await client.get("/api/models/list")
        assert listed.status_code == 200, listed.text
        by_repo = {m["model"]["hf_repo"]: m["status"] for m in listed.json()["models"]}
        assert by_repo["org/good"] == "DOWNLOADED"
        assert "org/bad" in by_repo
        for body in ({"hf_repo": "org/bad"}, {"hf_repo": "org/good"}):
            assert (await client.post("/api/models/status", json=body)).status_code == 200
            assert (await client.post("/api/models/verify", json=body)).status_code == 200
        del tree["files"][hostile]


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("config.json", True),
        ("original/consolidated.00.pth", True),
        ("a b/\u00e9t\u00e9.txt", True),
        ("", False),
        ("/etc/passwd", False),
        ("../x", False),
        ("a/../../x", False),
        ("a//b", False),
        ("a/./b", False),
        ("a/", False),
        ("a\u0000b", False),
        ("a\nb", False),
        ("a\\b", False),
        ("\u00e9" * 127, True),  # 254 bytes
        ("\u00e9" * 128, False),  # 256 bytes
        ("a/" * 1999 + "a", True),
        ("ab/" * 1400 + "c", False),
        ("x\ud800", False),
    ],
)
def test_the_path_rule(path: str, ok: bool) -> None:
    assert (path_problem(path) is None) == ok, path_problem(path)


async def test_verifications_beyond_the_limit_get_429(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/big", {"w.bin": Generated(128 * 1024 * 1024, seed=1)})
    body = {"hf_repo": "org/big"}
    async with app_client(settings.model_copy(update={"max_concurrent_verifications": 2})) as c:
        await c.post("/api/models/download", json=body)
        assert (await wait_for_status(c, body, FINAL))["status"] == "DOWNLOADED"
        answers = await asyncio.gather(*(c.post("/api/models/verify", json=body) for _ in range(3)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 429], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["Retry-After"] == "5"
        assert "MODELS_MAX_CONCURRENT_VERIFICATIONS" in refused.json()["detail"]
        # The slots are free again once they end.
        assert (await c.post("/api/models/verify", json=body)).json()["verified"] is True
