"""Choosing the files: through the real client against the fake hub, only the selected files
arrive, the selection is recorded and survives a restart, status answers for what was asked,
widening fetches only the difference, and the plan writes nothing and agrees with what a
download then fetches, to the byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import scan_cache_dir
from pydantic import SecretStr

from api.settings import Settings
from conftest import TOKEN
from fakehub import FakeHub, RepoBuilder
from fakehub.samples import TEXT_FILES, gguf_layout, llama_layout
from tests.helpers import FINAL, MB, app_client, assert_status_and_list_agree, wait_for_status

VLLM_FILES = TEXT_FILES | {
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}


def snapshot_files(cache_dir: Path, repo_id: str, commit: str) -> set[str]:
    snapshot = cache_dir / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir()}


def every_path(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


async def download(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    started = await client.post("/api/models/download", json=body)
    assert started.status_code in (200, 202), started.text
    return await wait_for_status(client, body, FINAL)


@pytest.mark.both_paths
async def test_only_the_selected_files_arrive_and_status_answers_for_what_was_asked(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    commit = repos.commit("org/llama", llama_layout(MB, seed=1))
    body = {"hf_repo": "org/llama", "files": "vllm"}
    plan = (await client.post("/api/models/plan", json=body)).json()
    answer = await download(client, body)
    assert answer["status"] == "DOWNLOADED", answer
    assert snapshot_files(cache_dir, "org/llama", commit) == VLLM_FILES
    # Only the selected files crossed the wire: the safetensors shards, not the .bin copy or
    # original/ (on the Xet path the content comes as xorb ranges, with a 128-byte header each).
    assert plan["missing_bytes"] == plan["selected_bytes"]
    if hub.xet:
        assert 0 <= hub.served() - plan["selected_bytes"] <= 2 * 128
    else:
        assert hub.served() == plan["selected_bytes"]
    # Status without a selection answers for the recorded one; for another, as it is asked.
    plain = (await client.post("/api/models/status", json={"hf_repo": "org/llama"})).json()
    assert plain["status"] == "DOWNLOADED"
    assert plain["selection"] == [{"files": "vllm", "allow_patterns": [], "ignore_patterns": []}]
    everything = {"hf_repo": "org/llama", "files": "all"}
    wider = (await client.post("/api/models/status", json=everything)).json()
    assert wider["status"] == "PARTIAL"
    assert wider["error_message"].startswith("5 of the 16 files selected are not in the cache:")
    # Ignore patterns alone narrow the default: the answer names the selection as applied.
    ignoring = {"hf_repo": "org/llama", "ignore_patterns": ["original/*"]}
    applied = (await client.post("/api/models/status", json=ignoring)).json()["selection"]
    assert applied == [{"files": "all", "allow_patterns": [], "ignore_patterns": ["original/*"]}]
    narrower = {"hf_repo": "org/llama", "allow_patterns": ["*.safetensors"]}
    assert (await client.post("/api/models/status", json=narrower)).json()["status"] == "DOWNLOADED"
    # list: the selection and the bytes on disk; verify: the selected files.
    [item] = (await client.get("/api/models/list")).json()["models"]
    assert item["status"] == "DOWNLOADED"
    assert item["selection"] == plain["selection"]
    assert item["size_bytes"] == plan["selected_bytes"]
    report = (await client.post("/api/models/verify", json={"hf_repo": "org/llama"})).json()
    assert report["verified"] is True
    assert report["files_checked"] == len(VLLM_FILES)
    await assert_status_and_list_agree(client)
    # A download of what is already there starts nothing.
    again = await client.post("/api/models/download", json={"hf_repo": "org/llama"})
    assert again.status_code == 200
    assert again.json()["status"] == "DOWNLOADED"


async def test_widening_fetches_only_the_difference_and_the_plan_agrees_to_the_byte(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    commit = repos.commit("org/llama", llama_layout(MB, seed=2))
    await download(client, {"hf_repo": "org/llama", "files": "vllm"})
    hub.reset_counts()
    everything = {"hf_repo": "org/llama", "files": "all"}
    before = every_path(cache_dir)
    plan = (await client.post("/api/models/plan", json=everything)).json()
    assert every_path(cache_dir) == before  # the plan wrote nothing
    assert plan["commit"] == commit
    assert plan["fits"] is True
    assert plan["selected_files"] == len(plan["files"]) == len(llama_layout(1))
    missing = sum(f["size"] for f in plan["files"] if f["path"] not in VLLM_FILES)
    assert plan["missing_bytes"] == missing < plan["selected_bytes"]
    answer = await download(client, everything)
    assert answer["status"] == "DOWNLOADED", answer
    assert hub.served() == plan["missing_bytes"]
    assert hub.count("GET", "*/resolve/*/model-00001-of-00002.safetensors") == 0
    assert snapshot_files(cache_dir, "org/llama", commit) == set(llama_layout(1))
    # The record now says "all": a status without a selection answers for every file.
    plain = (await client.post("/api/models/status", json={"hf_repo": "org/llama"})).json()
    assert plain["status"] == "DOWNLOADED"
    assert plain["selection"][0]["files"] == "all"


async def test_the_recorded_selection_survives_a_restart_and_the_cache_stays_the_librarys(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/gguf", gguf_layout(MB, seed=3))
    body = {"hf_repo": "org/gguf", "allow_patterns": ["*Q8_0*.gguf", "*.json"]}
    async with app_client(settings) as client:
        assert (await download(client, body))["status"] == "DOWNLOADED"
    async with app_client(settings) as client:
        plain = (await client.post("/api/models/status", json={"hf_repo": "org/gguf"})).json()
        assert plain["status"] == "DOWNLOADED", plain
        assert plain["selection"] == [
            {"files": None, "allow_patterns": ["*Q8_0*.gguf", "*.json"], "ignore_patterns": []}
        ]
        [item] = (await client.get("/api/models/list")).json()["models"]
        assert item["status"] == "DOWNLOADED"
    # The library's own view of the cache: the revision, and no warning about our record.
    info = scan_cache_dir(cache_dir)
    assert info.warnings == []
    [repo] = info.repos
    assert {f.file_name for r in repo.revisions for f in r.files} == {
        "model-Q8_0.gguf",
        "config.json",
    }


async def test_a_selection_that_cannot_be_downloaded_is_refused_with_what_to_do(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/gguf", gguf_layout(MB, seed=4))
    vllm = await client.post("/api/models/download", json={"hf_repo": "org/gguf", "files": "vllm"})
    assert vllm.status_code == 422
    assert "allow_patterns" in vllm.json()["detail"]
    assert "gguf" in vllm.json()["detail"]
    nothing = {"hf_repo": "org/gguf", "allow_patterns": ["*.safetensors"]}
    refused = await client.post("/api/models/download", json=nothing)
    assert refused.status_code == 422
    assert "matches no file" in refused.json()["detail"]
    too_many = {"hf_repo": "org/gguf", "allow_patterns": ["*.gguf"] * 65}
    limited = await client.post("/api/models/download", json=too_many)
    assert limited.status_code == 422
    assert "allow_patterns" in limited.text
    assert "at most 64" in limited.text
    assert not (cache_dir / "models--org--gguf").exists()  # nothing written
    # The plan answers (200) and says the same; it offers the quantizations to choose from.
    plan = await client.post("/api/models/plan", json={"hf_repo": "org/gguf", "files": "vllm"})
    assert plan.status_code == 200
    assert plan.json()["note"] == vllm.json()["detail"]
    choices = {w["quantization"]: w for w in plan.json()["weights"]}
    assert set(choices) == {"Q4_K_M", "Q8_0", "F16", "Q2_K"}
    assert choices["Q2_K"]["size_bytes"] == 2 * MB
    assert len(choices["Q2_K"]["files"]) == 2
    pick = {"hf_repo": "org/gguf", "files": "vllm", "allow_patterns": [choices["Q2_K"]["pattern"]]}
    picked = (await client.post("/api/models/plan", json=pick)).json()
    assert picked["note"] is None
    assert picked["selected_bytes"] == 2 * MB + sum(
        f["size"] for f in picked["files"] if not f["path"].endswith(".gguf")
    )


async def test_plan_says_missing_private_and_gated_in_plain_words(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/private", {"config.json": "{}"}, private=True)
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)
    async with app_client(settings) as client:
        missing = await client.post("/api/models/plan", json={"hf_repo": "org/missing"})
        assert missing.status_code == 404
        assert "not found" in missing.json()["detail"]
        private = await client.post("/api/models/plan", json={"hf_repo": "org/private"})
        assert private.status_code in (401, 404), private.text
        gated = await client.post("/api/models/plan", json={"hf_repo": "org/gated"})
        assert gated.status_code in (401, 403)
        assert "gated" in gated.json()["detail"]
        branch = {"hf_repo": "org/gated", "hf_commit": "no-such-branch"}
        assert (await client.post("/api/models/plan", json=branch)).status_code == 404
    with_token = settings.model_copy(update={"hf_token": SecretStr(TOKEN)})
    async with app_client(with_token) as client:
        for repo_id in ("org/private", "org/gated"):
            answer = await client.post("/api/models/plan", json={"hf_repo": repo_id})
            assert answer.status_code == 200, answer.text
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


async def test_the_default_selection_is_a_setting(
    settings: Settings, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    commit = repos.commit("org/llama", llama_layout(MB, seed=5))
    vllm_default = settings.model_copy(update={"default_files": "vllm"})
    async with app_client(vllm_default) as client:
        answer = await download(client, {"hf_repo": "org/llama"})
        assert answer["status"] == "DOWNLOADED"
        assert snapshot_files(cache_dir, "org/llama", commit) == VLLM_FILES
    # Recorded with the revision: the service's default changing does not change its meaning.
    async with app_client(settings) as client:
        plain = (await client.post("/api/models/status", json={"hf_repo": "org/llama"})).json()
        assert plain["status"] == "DOWNLOADED"
        assert plain["selection"][0]["files"] == "vllm"
