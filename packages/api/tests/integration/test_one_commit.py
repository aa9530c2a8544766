"""One commit per revision, and a Hub that cannot turn the service against its host.

A mirror's answers may each be well-formed and still disagree: the revision with one commit, the
file list or the files with another's. A revision is DOWNLOADED only with its own commit's
files; a disagreement fails the download as ``untrusted_answer`` with a message that names both
commits, and nothing of it counts as downloaded. A redirect loop is a 502 (never a 500); a
redirect to the service itself, or with credentials in it, is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub, Generated, Lies, RepoBuilder
from tests.helpers import FINAL, MB, running_service, wait_for_status

REPO = "org/m"
BODY = {"hf_repo": REPO}


def two_commits(repos: RepoBuilder, same_names: bool = True) -> tuple[str, str]:
    """Two commits of one repo (``main`` at the second), each with its own content."""
    one = repos.commit(
        REPO, {"config.json": '{"v": 1}', "w.bin": Generated(2 * MB, seed=1), "a.txt": "a"}
    )
    files: dict[str, Any] = {"config.json": '{"v": 2}', "w.bin": Generated(2 * MB, seed=2)}
    files["a.txt" if same_names else "b.txt"] = "b"
    two = repos.commit(REPO, files)
    return one, two


async def failed(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Start a download and wait for its end; it must not be DOWNLOADED."""
    started = await client.post("/api/models/download", json=body)
    assert started.status_code in (202, 502), started.text
    answer = await wait_for_status(client, body, FINAL)
    assert answer["status"] != "DOWNLOADED", answer
    return answer


async def nothing_downloaded(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/api/models/list")).json()["models"]
    assert [m for m in listed if m["status"] == "DOWNLOADED"] == [], listed


@pytest.mark.both_paths
async def test_files_answered_with_another_commit_are_refused(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    one, two = two_commits(repos)
    hub.lies = Lies(files_from=one)  # the revision and the list are main's; the files one's
    answer = await failed(client, BODY)
    assert "untrusted_answer" in str(answer) or "refused" in answer["error_message"]
    assert one[:12] in answer["error_message"]
    assert two[:12] in answer["error_message"]
    await nothing_downloaded(client)
    hub.lies = Lies()
    await client.post("/api/models/download", json=BODY)
    assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"
    assert (await client.post("/api/models/verify", json=BODY)).json()["verified"] is True


async def test_a_file_list_of_another_commit_is_refused_before_the_first_byte(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    """The list names other files than the revision answer: refused at the plan (POST /plan is a
    502 that says so), with no file requested."""
    one, two = two_commits(repos, same_names=False)
    hub.lies = Lies(tree_from=one)
    plan = await client.post("/api/models/plan", json=BODY)
    assert plan.status_code == 502, plan.text
    assert "disagree" in plan.json()["detail"]
    hub.reset_counts()
    answer = await failed(client, BODY)
    assert two[:12] in answer["error_message"]
    assert hub.count("GET", "*/resolve/*") == 0
    await nothing_downloaded(client)


@pytest.mark.both_paths
async def test_a_file_list_of_another_commit_with_the_same_names_is_refused(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    """The same file names, another commit's content: the files' answers disagree with the list
    (their ETags), and the download fails on the first one, naming it."""
    one, _ = two_commits(repos)
    hub.lies = Lies(tree_from=one)
    answer = await failed(client, BODY)
    assert "disagree" in answer["error_message"], answer
    await nothing_downloaded(client)


async def test_a_commit_answered_as_another_is_refused(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    """Asked for commit A, the Hub says A is B: refused, and A's status says why (before: B was
    downloaded, the log said A's task completed, and A's status said NOT_FOUND in silence)."""
    one, two = two_commits(repos)
    hub.lies = Lies(sha=two)
    body = {"hf_repo": REPO, "hf_commit": one}
    answer = await failed(client, body)
    assert answer["error_message"], answer
    assert one[:12] in answer["error_message"]
    assert two[:12] in answer["error_message"]
    await nothing_downloaded(client)
    assert hub.count("GET", "*/resolve/*") == 0


async def test_a_redirect_loop_is_a_502_not_a_500(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit(REPO, {"config.json": "{}"})
    hub.lies = Lies(api_redirect_loop=True)
    plan = await client.post("/api/models/plan", json=BODY)
    assert plan.status_code == 502, plan.text
    assert "loop" in plan.json()["detail"]
    answer = await failed(client, BODY)
    assert "loop" in answer["error_message"]


async def test_a_redirect_with_credentials_is_refused(
    settings: Settings, repos: RepoBuilder, tmp_path: Path
) -> None:
    """``user:password@`` in a redirect would be sent to the other origin as Basic auth."""
    from fakehub import FakeHub as Hub
    from tests.helpers import app_client

    repos.commit(REPO, {"config.json": "{}", "w.safetensors": Generated(MB, seed=5)})
    with Hub(repos.root, cdn=True) as hub:
        assert hub.cdn_url is not None
        cdn = hub.cdn_url.replace("http://", "http://user:secret@")
        entry = repos.repo(REPO).commits[repos.repo(REPO).resolve("main") or ""]["w.safetensors"]
        hub.lies = Lies(redirect_files_to=f"{cdn}/cdn/{REPO}/{entry.sha256}")
        async with app_client(settings.model_copy(update={"hf_endpoint": hub.url})) as client:
            answer = await failed(client, BODY)
            assert "credentials" in answer["error_message"]
        assert hub.cdn_authorizations == []  # nothing reached the other origin


async def test_a_redirect_to_the_service_itself_is_refused(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """A worker never sends a request to the service it works for, whatever the Hub says (the
    service, as its own process, logs each request it serves)."""
    repos.commit(REPO, {"config.json": "{}", "w.bin": Generated(MB, seed=6)})
    log = tmp_path / "service.log"
    with running_service(cache_dir, hub.url, log) as (url, _):
        for target in ("/api/models/list", "/api/models/events"):
            for name in ("127.0.0.1", "localhost"):
                hub.lies = Lies(redirect_files_to=f"{url.replace('127.0.0.1', name)}{target}")
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    answer = await failed(client, BODY)
                    assert "this service's own address" in answer["error_message"], answer
    served = log.read_text()
    assert "GET /api/models/list" not in served
    assert "GET /api/models/events" not in served


async def test_the_access_log_prints_no_secret_of_a_query_string(
    hub: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    key = "k" * 20 + "secret-write-key"
    log = tmp_path / "service.log"
    with running_service(cache_dir, hub.url, log, MODELS_API_KEY=key) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await client.get("/api/models/list", params={"api_key": key})
            await client.get("/api/models/list", params={"k": key, "limit": "5"})
            await client.get("/api/models/list", params={"token": "hf_abcdefghijkl"})
    served = log.read_text()
    assert 'method=GET path="/api/models/list?' in served  # the access log (logfmt)
    assert key not in served
    assert "hf_abcdefghijkl" not in served
    assert "limit=5" in served
