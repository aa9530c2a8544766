"""The fake hub against the real huggingface_hub client: protocol, errors, and each fault's effect."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from conftest import TOKEN
from fakehub import (
    FakeHub,
    Generated,
    RepoBuilder,
    corrupt,
    drop_after,
    git_blob_sha1,
    http_error,
    latency,
    rate_limited,
    short_body,
    stall,
    trickle,
)
from fakehub.repos import lfs_pointer

MB = 1024 * 1024


@pytest.fixture
def model(repos: RepoBuilder) -> str:
    return repos.commit(
        "org/model",
        {
            "config.json": '{"a": 1}',
            "sub/dir/notes.txt": "nested",
            "model.safetensors": Generated(3 * MB, seed=7),
        },
    )


def test_snapshot_download_and_checksums(hub: FakeHub, model: str, cache_dir: Path) -> None:
    path = Path(snapshot_download("org/model", endpoint=hub.url, cache_dir=cache_dir, token=False))
    assert path.name == model
    assert (path / "config.json").read_text() == '{"a": 1}'
    assert (path / "sub/dir/notes.txt").read_text() == "nested"
    assert (path / "model.safetensors").stat().st_size == 3 * MB
    result = HfApi(endpoint=hub.url).verify_repo_checksums("org/model", cache_dir=cache_dir)
    assert result.checked_count == 3
    assert result.mismatches == []
    assert result.missing_paths == []
    # LFS files are stored under their sha256, regular files under their git blob id.
    blobs = {p.name for p in (cache_dir / "models--org--model" / "blobs").iterdir()}
    content = (path / "model.safetensors").read_bytes()
    assert hashlib.sha256(content).hexdigest() in blobs
    assert hub.count("GET", "*/resolve/*") == 3


def test_generated_content_is_named_as_git_and_lfs_name_it(repos: RepoBuilder) -> None:
    """A generated file in LFS is named by its pointer's blob id (its own is not computed); one in
    git itself by the blob id git gives its bytes."""
    generated = Generated(MB + 5, seed=3)
    sha = repos.commit(
        "org/named", {"in-git.bin": generated, "in-lfs.bin": generated}, lfs={"in-lfs.bin"}
    )
    repo = repos.repo("org/named")
    entries = repo.commits[sha]
    content = repo.object_path(entries["in-git.bin"]).read_bytes()
    assert len(content) == MB + 5
    git = subprocess.run(
        ["git", "hash-object", "--stdin"], input=content, capture_output=True, check=True
    )
    assert entries["in-git.bin"].blob_id == git.stdout.decode().strip()
    assert not entries["in-git.bin"].lfs
    pointer = lfs_pointer(hashlib.sha256(content).hexdigest(), len(content))
    assert entries["in-lfs.bin"].lfs
    assert entries["in-lfs.bin"].blob_id == git_blob_sha1(pointer)


def test_tree_is_paginated_like_the_hub(repos: RepoBuilder, cache_dir: Path) -> None:
    repos.commit("org/many", {f"f/{i:03d}.txt": str(i) for i in range(120)})
    with FakeHub(repos.root, page_size=50) as hub:
        files = list(HfApi(endpoint=hub.url).list_repo_tree("org/many", recursive=True))
        assert len([f for f in files if f.path.startswith("f/") and "." in f.path]) == 120
        assert hub.count("GET", "/api/models/org/many/tree/*") == 3
        snapshot_download("org/many", endpoint=hub.url, cache_dir=cache_dir, token=False)


def test_moving_branch_and_pinned_commit(repos: RepoBuilder, hub: FakeHub, cache_dir: Path) -> None:
    first = repos.commit("org/moving", {"v.txt": "one"})
    second = repos.commit("org/moving", {"v.txt": "two"})
    assert first != second
    latest = snapshot_download("org/moving", endpoint=hub.url, cache_dir=cache_dir, token=False)
    pinned = snapshot_download(
        "org/moving", revision=first, endpoint=hub.url, cache_dir=cache_dir, token=False
    )
    assert Path(latest, "v.txt").read_text() == "two"
    assert Path(pinned, "v.txt").read_text() == "one"
    refs = cache_dir / "models--org--moving" / "refs" / "main"
    assert refs.read_text() == second


def test_range_requests(hub: FakeHub, model: str) -> None:
    url = f"{hub.url}/org/model/resolve/main/config.json"
    whole = httpx.get(url)
    assert whole.headers["X-Repo-Commit"] == model
    part = httpx.get(url, headers={"Range": "bytes=2-4"})
    assert part.status_code == 206
    assert part.content == whole.content[2:5]
    assert part.headers["Content-Range"] == f"bytes 2-4/{len(whole.content)}"
    suffix = httpx.get(url, headers={"Range": "bytes=-3"})
    assert suffix.content == whole.content[-3:]
    head = httpx.head(f"{hub.url}/org/model/resolve/main/model.safetensors")
    assert head.headers["X-Linked-Size"] == str(3 * MB)
    assert head.headers["X-Linked-Etag"].strip('"') == head.headers["ETag"].strip('"')


def test_errors_as_the_hub_sends_them(
    repos: RepoBuilder, hub: FakeHub, model: str, cache_dir: Path
) -> None:
    kwargs: dict[str, Any] = {"endpoint": hub.url, "cache_dir": cache_dir}
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", token=False, **kwargs)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/model", revision="nope", token=False, **kwargs)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "absent.txt", token=False, **kwargs)
    repos.commit("org/private", {"a.txt": "secret"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/private", token=False, **kwargs)
    snapshot_download("org/private", token=TOKEN, **kwargs)
    repos.commit("org/gated", {"a.txt": "terms"}, gated=True)
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", token=False, **kwargs)
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", token="hf_other", **kwargs)
    assert (
        httpx.head(f"{hub.url}/org/gated/resolve/main/a.txt").headers["X-Error-Code"] == "GatedRepo"
    )
    snapshot_download("org/gated", token=TOKEN, **kwargs)


def test_dropped_connection_is_resumed_by_the_client(
    hub: FakeHub, model: str, cache_dir: Path
) -> None:
    hub.add_fault(drop_after(MB, path="*/model.safetensors", times=1))
    path = hf_hub_download(
        "org/model", "model.safetensors", endpoint=hub.url, cache_dir=cache_dir, token=False
    )
    assert Path(path).stat().st_size == 3 * MB
    assert hub.count("GET", "*/model.safetensors") == 2  # the cut one, then a Range resume


def test_short_body_is_resumed_by_the_client(hub: FakeHub, model: str, cache_dir: Path) -> None:
    hub.add_fault(short_body(100, path="*/model.safetensors", times=1))
    path = hf_hub_download(
        "org/model", "model.safetensors", endpoint=hub.url, cache_dir=cache_dir, token=False
    )
    assert Path(path).stat().st_size == 3 * MB
    assert hub.count("GET", "*/model.safetensors") == 2


def test_server_error_on_file_is_raised_at_once(hub: FakeHub, model: str, cache_dir: Path) -> None:
    hub.add_fault(http_error(503, path="*/model.safetensors", method="GET"))
    with pytest.raises(HfHubHTTPError) as info:
        hf_hub_download(
            "org/model", "model.safetensors", endpoint=hub.url, cache_dir=cache_dir, token=False
        )
    assert info.value.response.status_code == 503
    assert hub.count("GET", "*/model.safetensors") == 1  # the library does not retry a 5xx


def test_rate_limit_with_retry_after_is_retried(hub: FakeHub, model: str, cache_dir: Path) -> None:
    fault = hub.add_fault(rate_limited(0.1, path="*/config.json", method="GET", times=1))
    hf_hub_download("org/model", "config.json", endpoint=hub.url, cache_dir=cache_dir, token=False)
    assert fault.applied == 1
    assert hub.count("GET", "*/config.json") == 2
    response = httpx.get(f"{hub.url}/api/models/org/model")
    assert response.status_code == 200
    with hub.fault(rate_limited(7, path="/api/*")):
        limited = httpx.get(f"{hub.url}/api/models/org/model")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")


def test_corruption_is_stored_as_good_by_the_client(
    hub: FakeHub, model: str, cache_dir: Path
) -> None:
    hub.add_fault(corrupt(path="*/model.safetensors"))
    snapshot_download("org/model", endpoint=hub.url, cache_dir=cache_dir, token=False)
    result = HfApi(endpoint=hub.url).verify_repo_checksums("org/model", cache_dir=cache_dir)
    assert [m["path"] for m in result.mismatches] == ["model.safetensors"]


def test_nth_request_faults(hub: FakeHub, model: str) -> None:
    hub.add_fault(http_error(500, path="*/config.json", requests={2}))
    url = f"{hub.url}/org/model/resolve/main/config.json"
    assert [httpx.get(url).status_code for _ in range(3)] == [200, 500, 200]
    assert hub.count("GET", "*/config.json") == 3


def test_stall_and_trickle_and_latency(hub: FakeHub, model: str) -> None:
    url = f"{hub.url}/org/model/resolve/main/model.safetensors"
    with hub.fault(stall(5, path="*/model.safetensors")), pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=httpx.Timeout(5, read=0.3))
    expected = httpx.get(url, headers={"Range": "bytes=0-29999"}).content
    trickled = hub.add_fault(trickle(200_000, path="*/model.safetensors"))
    assert httpx.get(url, headers={"Range": "bytes=0-29999"}).content == expected
    assert trickled.applied == 1
    hub.clear_faults()
    with hub.fault(latency(0.3, path="*/config.json")), pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{hub.url}/org/model/resolve/main/config.json", timeout=0.1)


def test_standalone_server(repos: RepoBuilder, cache_dir: Path) -> None:
    repos.commit("demo/tiny-model", {"config.json": "{}"})
    process = subprocess.Popen(
        [sys.executable, "-m", "fakehub", "--repos", str(repos.root), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = ""
        while "serving" not in line:
            line = process.stdout.readline()
            assert line, "the server exited before serving"
        url = line.rsplit(" ", 1)[1].strip()
        path = snapshot_download("demo/tiny-model", endpoint=url, cache_dir=cache_dir, token=False)
        assert (Path(path) / "config.json").exists()
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
