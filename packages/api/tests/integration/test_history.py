"""The history (issue 30): what happened to the cache, kept across restarts, with the name of the
key that asked and never the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder
from tests.helpers import FINAL, MB, app_client, wait_for_status

ALICE = "alice-key-0123456789abcdef"
PLAIN = "plain-key-0123456789abcdef"


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def events(client: httpx.AsyncClient) -> list[tuple[str, str, str | None]]:
    answer = await client.get("/api/models/history", headers=as_(PLAIN))
    assert answer.status_code == 200, answer.text
    assert ALICE not in answer.text
    assert PLAIN not in answer.text
    return [(e["event"], e["model"]["hf_repo"], e["by"]) for e in answer.json()["entries"]]


async def test_downloads_deletes_and_prunes_are_kept_with_who_asked(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    old = repos.commit("org/model", {"w.bin": Generated(MB, seed=20)})
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)
    keyed = settings.model_copy(update={"api_key": SecretStr(f"alice:{ALICE},{PLAIN}")})
    async with app_client(keyed) as client:
        body: dict[str, Any] = {"hf_repo": "org/model", "hf_commit": old}
        answer = await client.post("/api/models/download", json=body, headers=as_(ALICE))
        assert answer.status_code == 202, answer.text
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        repos.commit("org/model", {"w.bin": Generated(MB, seed=21)})
        main = {"hf_repo": "org/model"}
        assert (
            await client.post("/api/models/download", json=main, headers=as_(PLAIN))
        ).status_code == 202
        assert (await wait_for_status(client, main, FINAL))["status"] == "DOWNLOADED"
        gated = {"hf_repo": "org/gated"}
        await client.post("/api/models/download", json=gated, headers=as_(ALICE))
        assert (await wait_for_status(client, gated, FINAL))["status"] == "NOT_FOUND"
        pruned = await client.post("/api/models/prune", json={"dry_run": False}, headers=as_(ALICE))
        assert [r["model"]["hf_commit"] for r in pruned.json()["revisions"]] == [old]
        deleted = await client.request("DELETE", "/api/models", json=main, headers=as_(PLAIN))
        assert deleted.json()["status"] == "deleted"
        expected = [
            ("deleted", "org/model", "key"),
            ("pruned", "org/model", "alice"),
            ("failed", "org/gated", "alice"),
            ("downloaded", "org/model", "key"),
            ("downloaded", "org/model", "alice"),
        ]
        assert await events(client) == expected
        entries = (await client.get("/api/models/history?limit=5", headers=as_(PLAIN))).json()
        first = entries["entries"][-1]
        assert first["model"]["hf_commit"] == old
        assert first["size_bytes"] == MB
        assert first["duration_seconds"] > 0
        assert "gated" in entries["entries"][2]["detail"]
        assert entries["entries"][1]["size_bytes"] > 0  # the bytes the prune freed
        assert (
            await client.get("/api/models/history?limit=0", headers=as_(PLAIN))
        ).status_code == 422
    # Kept across a restart.
    async with app_client(keyed) as client:
        assert await events(client) == expected


async def test_without_keys_nobody_is_named(
    settings: Settings, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    async with app_client(settings) as client:
        body = {"hf_repo": "org/model"}
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        entries = (await client.get("/api/models/history")).json()["entries"]
        assert [(e["event"], e["by"]) for e in entries] == [("downloaded", None)]
