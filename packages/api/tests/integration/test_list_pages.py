"""Pages, filters and sorts of GET /list (issue 29): the spec's answer when nothing is asked; with
a cursor, pages that neither skip nor repeat an entry while the cache changes between them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx

from api.settings import Settings
from tests.helpers import app_client, make_revision

C = "{:040x}".format


def names(models: list[dict[str, Any]]) -> list[str]:
    return [m["model"]["hf_repo"] for m in models]


async def pages(client: httpx.AsyncClient, query: str) -> tuple[list[dict[str, Any]], int]:
    """Every page of the query, one after the other, and the number of pages."""
    got: list[dict[str, Any]] = []
    cursor = None
    count = 0
    while True:
        url = f"/api/models/list?{query}" + (f"&cursor={cursor}" if cursor else "")
        answer = await client.get(url)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        got += body["models"]
        count += 1
        cursor = body.get("next_cursor")
        if cursor is None:
            return got, count


async def test_pages_filters_and_sorts(settings: Settings, cache_dir: Path) -> None:
    sizes = {"org/Alpha": 50, "org/beta": 10, "other/gamma": 40, "org/delta": 30, "x/alphabet": 20}
    for i, (repo, size) in enumerate(sizes.items()):
        make_revision(cache_dir, repo, C(i + 1), {"w.bin": b"w" * size})
    async with app_client(settings) as client:
        plain = (await client.get("/api/models/list")).json()
        assert set(plain) == {"models"}  # the spec's answer: no paging field
        assert len(plain["models"]) == 5

        by_name, count = await pages(client, "limit=2")
        assert names(by_name) == sorted(sizes)
        assert count == 3
        first = (await client.get("/api/models/list?limit=2")).json()
        assert first["total"] == 5
        assert len(first["models"]) == 2
        by_size, _ = await pages(client, "limit=2&sort=size")
        assert names(by_size) == sorted(sizes, key=lambda r: -sizes[r])
        # A substring of the repo id, whatever its case.
        found = (await client.get("/api/models/list?q=ALPHA")).json()
        assert names(found["models"]) == ["org/Alpha", "x/alphabet"]
        assert found["total"] == 2
        assert "next_cursor" not in found
        only = (await client.get("/api/models/list?status=PARTIAL&status=DOWNLOADING")).json()
        assert only == {"models": [], "total": 0}

        # Used (downloaded or verified here) first, latest first; never used after, by name.
        for repo in ("org/delta", "org/beta"):
            assert (await client.post("/api/models/verify", json={"hf_repo": repo})).json()[
                "verified"
            ]
        used, _ = await pages(client, "limit=3&sort=last_used")
        assert names(used) == ["org/beta", "org/delta", "org/Alpha", "other/gamma", "x/alphabet"]

        for wrong, why in (
            ("cursor=nonsense", "not one this service gave"),
            (f"sort=size&cursor={first['next_cursor']}", "not of the sort asked (size)"),
            ("limit=0", "limit"),
            ("sort=colour", "sort"),
        ):
            answer = await client.get(f"/api/models/list?{wrong}")
            assert answer.status_code == 422, (wrong, answer.text)
            assert why in answer.text


async def test_pages_neither_skip_nor_repeat_while_the_cache_changes(
    settings: Settings, cache_dir: Path
) -> None:
    for i in range(9):
        make_revision(cache_dir, f"org/m{i}", C(i + 1), {"w.bin": b"w%d" % i})
    async with app_client(settings) as client:
        first = (await client.get("/api/models/list?limit=3")).json()
        assert names(first["models"]) == ["org/m0", "org/m1", "org/m2"]
        # Between two pages: a model of the first page and one of the next go, two come.
        shutil.rmtree(cache_dir / "models--org--m1")
        shutil.rmtree(cache_dir / "models--org--m4")
        make_revision(cache_dir, "org/m0b", C(20), {"w.bin": b"new"})  # before the cursor
        make_revision(cache_dir, "org/m5b", C(21), {"w.bin": b"new"})  # after it
        rest: list[dict[str, Any]] = []
        cursor = first["next_cursor"]
        while cursor:
            body = (await client.get(f"/api/models/list?limit=3&cursor={cursor}")).json()
            rest += body["models"]
            cursor = body.get("next_cursor")
        # Every entry after the last one given, once, in order: none skipped, none twice.
        assert names(rest) == ["org/m3", "org/m5", "org/m5b", "org/m6", "org/m7", "org/m8"]
