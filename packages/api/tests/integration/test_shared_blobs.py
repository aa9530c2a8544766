"""The Xet path's shared blob store (issue 4, point 7 on the Xet path).

huggingface_hub 2.x keeps each Xet-downloaded blob once per cache, in ``<cache>/blobs/<xx>/<hash>``,
and makes the repo's ``blobs/<etag>`` a link to it. Deleting must follow those links only where the
library made them, never remove a blob another repo or revision still links, and collect a blob
nobody links any more.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from fakehub import FakeHub, Generated, RepoBuilder, xet
from tests.helpers import FINAL, MB, wait_for_status

WEIGHTS = Generated(3 * MB, seed=31)

pytestmark = pytest.mark.parametrize("hub", ["xet"], indirect=True)


def payloads(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "blobs").glob("??/*") if len(p.name) == 64)


async def download(client: httpx.AsyncClient, body: dict[str, str]) -> dict[str, object]:
    assert (await client.post("/api/models/download", json=body)).status_code == 202
    answer = await wait_for_status(client, body, FINAL)
    assert answer["status"] == "DOWNLOADED", answer
    return answer


async def verified(client: httpx.AsyncClient, body: dict[str, str]) -> bool:
    report = (await client.post("/api/models/verify", json=body)).json()
    return bool(report["verified"]) and not report["missing"]


async def test_two_repos_share_a_blob_and_deleting_one_keeps_the_other(
    client: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, cache_dir: Path
) -> None:
    repos.commit("org/a", {"config.json": '{"a": 1}', "model.safetensors": WEIGHTS})
    repos.commit("org/b", {"config.json": '{"b": 2}', "model.safetensors": WEIGHTS})
    a, b = {"hf_repo": "org/a"}, {"hf_repo": "org/b"}
    await download(client, a)
    await download(client, b)
    # The second repo linked the first one's blob: one copy, fetched once.
    assert len(payloads(cache_dir)) == 1
    assert hub.count("GET", hub.content_path("org/a", "model.safetensors")) == 1
    assert hub.count("GET", hub.content_path("org/b", "model.safetensors")) == 0
    listed = {
        m["model"]["hf_repo"]: m for m in (await client.get("/api/models/list")).json()["models"]
    }
    assert {name: m["status"] for name, m in listed.items()} == {
        "org/a": "DOWNLOADED",
        "org/b": "DOWNLOADED",
    }
    assert listed["org/b"]["size_bytes"] == 3 * MB + len('{"b": 2}')

    deleted = (await client.request("DELETE", "/api/models", json=a)).json()
    assert deleted["status"] == "deleted"
    assert deleted["freed_bytes"] < MB  # the shared blob stays: org/b links it
    assert len(payloads(cache_dir)) == 1
    assert (await client.post("/api/models/status", json=b)).json()["status"] == "DOWNLOADED"
    assert await verified(client, b)

    deleted = (await client.request("DELETE", "/api/models", json=b)).json()
    assert deleted["freed_bytes"] >= 3 * MB  # the last link went: the blob is collected
    assert payloads(cache_dir) == []


async def test_deleting_a_revision_keeps_the_blob_another_revision_links(
    client: httpx.AsyncClient, repos: RepoBuilder, cache_dir: Path
) -> None:
    first = repos.commit("org/m", {"config.json": '{"v": 1}', "model.safetensors": WEIGHTS})
    second = repos.commit(
        "org/m",
        {
            "config.json": '{"v": 2}',
            "model.safetensors": WEIGHTS,
            "extra.safetensors": Generated(MB, seed=32),
        },
    )
    old, new = {"hf_repo": "org/m", "hf_commit": first}, {"hf_repo": "org/m", "hf_commit": second}
    await download(client, old)
    await download(client, new)
    assert len(payloads(cache_dir)) == 2
    deleted = (await client.request("DELETE", "/api/models", json=old)).json()
    assert deleted["status"] == "deleted"
    assert deleted["freed_bytes"] == len('{"v": 1}')  # the weights are the new revision's too
    assert len(payloads(cache_dir)) == 2
    assert (await client.post("/api/models/status", json=new)).json()["status"] == "DOWNLOADED"
    assert (await client.post("/api/models/status", json=old)).json()["status"] == "NOT_FOUND"
    assert await verified(client, new)


async def test_a_planted_link_in_blobs_never_leads_a_delete_outside(
    client: httpx.AsyncClient, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """A blob link that looks like the library's but leads elsewhere is refused, and nothing is
    deleted; a link into the shared store that the library's manifest does not list is not taken
    for a reference either."""
    first = repos.commit("org/m", {"model.safetensors": WEIGHTS})
    second = repos.commit("org/m", {"model.safetensors": WEIGHTS, "b.txt": "b"})
    old = {"hf_repo": "org/m", "hf_commit": first}
    await download(client, old)
    await download(client, {"hf_repo": "org/m", "hf_commit": second})
    entry = repos.repo("org/m").commits[first]["model.safetensors"]
    blob = cache_dir / "models--org--m" / "blobs" / entry.sha256
    assert blob.is_symlink()
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"keep me")
    blob.unlink()
    blob.symlink_to(precious)
    refused = await client.request("DELETE", "/api/models", json=old)
    assert refused.status_code == 409
    assert precious.read_bytes() == b"keep me"
    assert (cache_dir / "models--org--m" / "snapshots" / first).is_dir()
    # A link shaped like the store's, to a hash the store does not hold, is refused too.
    fake_hash = xet.file_hash("0" * 64)
    blob.unlink()
    blob.symlink_to(os.path.relpath(cache_dir / "blobs" / fake_hash[:2] / fake_hash, blob.parent))
    assert (await client.request("DELETE", "/api/models", json=old)).status_code == 409
    assert precious.read_bytes() == b"keep me"


async def test_a_corrupt_shared_blob_is_not_linked_again(
    client: httpx.AsyncClient, repos: RepoBuilder, cache_dir: Path
) -> None:
    """A blob in the shared store changed on disk: verify finds it in every repo linking it; a new
    download of one of them fetches the content again instead of relinking the bad blob."""
    repos.commit("org/a", {"model.safetensors": WEIGHTS})
    a = {"hf_repo": "org/a"}
    await download(client, a)
    (payload,) = payloads(cache_dir)
    data = bytearray(payload.read_bytes())
    data[12345] ^= 0x01
    payload.write_bytes(bytes(data))
    assert not await verified(client, a)
    repos.commit("org/b", {"model.safetensors": WEIGHTS})
    b = {"hf_repo": "org/b"}
    await download(client, b)  # links the bad blob, finds the mismatch, fetches it again
    assert await verified(client, b)
