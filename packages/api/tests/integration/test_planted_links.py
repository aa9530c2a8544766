"""A link planted in any folder or file of the cache's layout (or of the state folder) never leads
the service outside the cache: every endpoint that reads, verifies, prunes or deletes answers
without a 5xx, and the folder the link names is untouched.

A user who can write a shared cache can put links anywhere in it; the service may run as
another user, or as root. Each place of the layout is tried in turn."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from fakehub import RepoBuilder
from tests.helpers import FINAL, app_client, wait_for_status

REPO = "org/model"
FOLDER = "models--org--model"

# Each place of the layout (relative to the cache; ``{r}`` is the first revision's commit): it is
# replaced by a link to the same place in the victim's copy of the cache, where a removal or a
# write through the link would find the very names it expects.
PLACES: dict[str, str] = {
    "model folder's refs": f"{FOLDER}/refs",
    "model folder's trees": f"{FOLDER}/trees",
    "model folder's blobs": f"{FOLDER}/blobs",
    "model folder's snapshots": f"{FOLDER}/snapshots",
    "a snapshot folder": f"{FOLDER}/snapshots/{{r}}",
    "a file list": f"{FOLDER}/trees/{{r}}.json",
    "a branch": f"{FOLDER}/refs/main",
    "a blob": f"{FOLDER}/blobs/{{blob}}",
    "a snapshot's file": f"{FOLDER}/snapshots/{{r}}/config.json",
    "the cache's .locks": ".locks",
    "the model's .locks": f".locks/{FOLDER}",
    "the journal": f".locks/{FOLDER}/{{r}}.unverified",
    "the selection record": f".locks/{FOLDER}/{{r}}.selection.json",
    "the whole model folder": FOLDER,
}


def plant(cache: Path, victim: Path, place: str, commit: str) -> None:
    """The entry at ``place`` (made when absent) replaced by a link to the victim's."""
    blob = next(p.name for p in (cache / FOLDER / "blobs").iterdir() if p.stat().st_size > 100)
    rel = PLACES[place].format(r=commit, blob=blob)
    path = cache / rel
    if path.exists() or path.is_symlink():
        path.rename(path.with_name(path.name + ".real"))
    (victim / rel).parent.mkdir(parents=True, exist_ok=True)
    if not (victim / rel).exists():
        (victim / rel).write_text("keep")
    path.symlink_to(victim / rel)


def victim_copy(cache: Path, tmp_path: Path) -> Path:
    """Another user's copy of the cache: the same model, the same layout and names."""
    victim = tmp_path / "victim"
    shutil.copytree(cache, victim, symlinks=True)
    return victim


def snapshot_of_tree(folder: Path) -> dict[str, tuple[bool, bytes]]:
    return {
        str(p.relative_to(folder)): (
            p.is_symlink(),
            os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"",
        )
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("place", list(PLACES))
async def test_a_link_planted_anywhere_leads_nothing_outside(
    settings: Settings, repos: RepoBuilder, cache_dir: Path, tmp_path: Path, place: str
) -> None:
    first = repos.commit(REPO, {"config.json": '{"v": 1}', "w.bin": b"w" * 4096})
    second = repos.commit(REPO, {"config.json": '{"v": 2}', "w.bin": b"w" * 4096})
    async with app_client(settings) as client:
        for commit in (first, second):
            body = {"hf_repo": REPO, "hf_commit": commit}
            await client.post("/api/models/download", json=body)
            assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
        await client.post("/api/models/download", json={"hf_repo": REPO})
        assert (await wait_for_status(client, {"hf_repo": REPO}, FINAL))["status"] == "DOWNLOADED"
        victim = victim_copy(cache_dir, tmp_path)
        plant(cache_dir, victim, place, first)
        before = snapshot_of_tree(victim)
        one = {"hf_repo": REPO, "hf_commit": first}
        answers: list[httpx.Response] = [
            await client.post("/api/models/status", json=one),
            await client.post("/api/models/status", json={"hf_repo": REPO}),
            await client.get("/api/models/list"),
            await client.get("/api/models/space"),
            await client.post("/api/models/verify", json=one),
            await client.post("/api/models/verify", json={"hf_repo": REPO}),
            await client.post("/api/models/prune", json={"dry_run": True}),
            await client.request("DELETE", "/api/models", json=one),
            await client.post("/api/models/prune", json={"dry_run": False}),
            await client.request("DELETE", "/api/models", json={"hf_repo": REPO}),
            await client.get("/api/models/list"),
        ]
        for answer in answers:
            assert answer.status_code < 500, (answer.request.url, answer.text)
            if answer.status_code == 409:
                assert "link" in answer.json()["detail"] or "busy" in answer.json()["detail"]
        # And the service still downloads: a new model, as if nothing had happened.
        repos.commit("org/other", {"config.json": "{}"})
        other = {"hf_repo": "org/other"}
        assert (await client.post("/api/models/download", json=other)).status_code == 202
        assert (await wait_for_status(client, other, FINAL))["status"] == "DOWNLOADED"
    assert snapshot_of_tree(victim) == before


async def test_a_link_planted_in_the_state_folder_leads_nothing_outside(
    settings: Settings, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """The state folder's database and claims, each made a link: moved aside, never written
    through; the service starts, downloads, and its store works."""
    repos.commit(REPO, {"config.json": "{}"})
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "victim.txt").write_text("keep")
    before = snapshot_of_tree(victim)
    state = cache_dir.parent / "model-service"
    state.mkdir(parents=True)
    (state / "jobs.sqlite3").symlink_to(victim / "victim.txt")
    (state / "claims").symlink_to(victim / "deep")
    async with app_client(settings) as client:
        body = {"hf_repo": REPO}
        assert (await client.post("/api/models/download", json=body)).status_code == 202
        assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
    assert snapshot_of_tree(victim) == before
    assert (state / "jobs.sqlite3").is_file()
    assert not (state / "jobs.sqlite3").is_symlink()
    assert sorted(p.name.split(".")[0] for p in state.iterdir() if "link-" in p.name) == [
        "claims",
        "jobs",
    ]
    assert os.stat(state).st_mode & 0o022 == 0
