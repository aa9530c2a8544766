"""Copies from a fleet's peers (issue 18), on one machine: the real manager, adapter and worker
copying from another node's blob server, checked against the Hub's ETags, with the Hub as the
fallback. A second fake hub stands in for a peer where a fault is needed (it speaks the same
``resolve`` protocol, and answers only the fleet's secret); ``PeerServer`` itself is tested over a
real downloaded cache."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from api.models.backend import Peer
from api.models.hub.adapter import HubCacheBackend
from api.models.hub.cache import ModelCache
from api.models.hub.peers import PeerServer
from api.models.manager import ModelManager, compose
from api.models.types import DownloadEvent, Model, ModelStatus, ModelStatusResponse
from api.settings import Settings
from conftest import TOKEN
from fakehub import (
    FakeHub,
    Fault,
    FaultKind,
    Generated,
    RepoBuilder,
    corrupt,
    drop_after,
    http_error,
)
from tests.helpers import MB, ranged

SECRET = "fleet-secret-0123456789"
SIZE = 8 * MB
MODEL = Model(hf_repo="org/model")


@pytest.fixture
def commit(repos: RepoBuilder) -> str:
    return repos.commit(
        "org/model",
        {"config.json": "{}", "w.bin": Generated(SIZE, seed=91)},
        private=True,  # the Hub's token is needed: a peer must never be sent it
    )


def node(settings: Settings, tmp_path: Path, name: str) -> Settings:
    """Another node's settings: its own cache and state folders, the Hub's token, the tests'
    small ranges (``tests.helpers.ranged``)."""
    return ranged(
        settings,
        cache_dir=tmp_path / name / "cache",
        state_dir=tmp_path / name / "state",
        hf_token=SecretStr(TOKEN),
    )


@pytest.fixture
async def manager_of() -> AsyncIterator[list[ModelManager]]:
    started: list[ModelManager] = []
    yield started
    for manager in started:
        await manager.shutdown()


async def download(
    managers: list[ModelManager], settings: Settings, peers: tuple[Peer, ...] = ()
) -> ModelStatusResponse:
    """Download the model with a manager of ``settings``, copying from ``peers`` first; its
    final status, with the figures of its last event as its progress."""
    manager = compose(settings, HubCacheBackend(settings))
    managers.append(manager)
    events: list[DownloadEvent] = []
    manager.events.add_listener(events.append)
    await manager.start()
    await manager.add_model(MODEL, None, peers)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (status := await manager.get_model_status(MODEL)).status is ModelStatus.DOWNLOADING:
        assert loop.time() < deadline, status
        await asyncio.sleep(0.05)
    status.progress = next((e.progress for e in reversed(events) if e.progress), None)
    return status


@pytest.fixture
async def seeded(
    settings: Settings, tmp_path: Path, hub: FakeHub, commit: str, manager_of: list[ModelManager]
) -> Settings:
    """A first node with the model, fetched from the Hub."""
    first = node(settings, tmp_path, "first")
    assert (await download(manager_of, first)).status is ModelStatus.DOWNLOADED
    hub.reset_counts()
    return first


def copies(hub: FakeHub) -> int:
    return hub.served("*/resolve/*")


async def test_a_node_copies_from_its_peer_and_the_hub_sends_no_content(
    settings: Settings,
    tmp_path: Path,
    hub: FakeHub,
    seeded: Settings,
    manager_of: list[ModelManager],
) -> None:
    server = PeerServer(ModelCache(seeded.cache_dir), SECRET, "127.0.0.1")
    await server.start()
    try:
        status = await download(
            manager_of, node(settings, tmp_path, "second"), (Peer(server.url, SECRET),)
        )
    finally:
        await server.stop()
    assert status.status is ModelStatus.DOWNLOADED, status
    assert copies(hub) == 0  # file lists and metadata only
    assert status.progress is not None
    assert status.progress.from_peers_bytes == status.progress.transferred_bytes


@pytest.mark.parametrize(
    ("fault", "from_hub"),
    [
        # Three parts, then the peer is gone (every later request fails).
        (http_error(503, path="*/w.bin", requests=set(range(4, 100))), "the rest"),
        (drop_after(MB // 2, path="*/w.bin", requests={5}), "the rest"),
        (corrupt(path="*/w.bin"), "all"),
        (http_error(404, path="*/w.bin"), "all"),
    ],
    ids=["gone-mid-copy", "cut-mid-part", "corrupt", "not-there"],
)
async def test_a_peer_that_fails_hands_over_to_the_hub(
    settings: Settings,
    tmp_path: Path,
    hub: FakeHub,
    repos: RepoBuilder,
    commit: str,
    manager_of: list[ModelManager],
    fault: Fault,
    from_hub: str,
) -> None:
    # The peer is a second fake hub over the same repos, answering the fleet's secret only: a
    # copy that succeeds through it proves that the secret, not the Hub's token, was sent.
    with FakeHub(repos.root, tokens={SECRET}) as peer:
        peer.add_fault(fault)
        status = await download(
            manager_of, node(settings, tmp_path, "second"), (Peer(peer.url, SECRET),)
        )
        from_peer = peer.served("*/resolve/*")
    assert status.status is ModelStatus.DOWNLOADED, status
    assert status.progress is not None
    content = SIZE + 2
    if from_hub == "the rest":
        # The peer's parts stayed; the Hub sent only what they missed.
        assert 0 < copies(hub) < SIZE
        assert copies(hub) + (status.progress.from_peers_bytes or 0) == content
    else:
        # w.bin, whole, and config.json: the large file is asked first (in the order its source
        # fetches), and a peer that failed once is not asked again.
        assert copies(hub) == content
        assert from_peer == (SIZE if fault.kind is FaultKind.CORRUPT else 0)


async def test_a_peer_that_does_not_answer_costs_one_try(
    settings: Settings, tmp_path: Path, hub: FakeHub, commit: str, manager_of: list[ModelManager]
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    status = await download(
        manager_of, node(settings, tmp_path, "second"), (Peer(f"http://127.0.0.1:{port}", SECRET),)
    )
    assert status.status is ModelStatus.DOWNLOADED, status.error_message
    assert copies(hub) == SIZE + 2


async def test_the_peer_server_serves_its_fleet_only_and_only_complete_blobs(
    seeded: Settings, commit: str, tmp_path: Path
) -> None:
    cache = ModelCache(seeded.cache_dir)
    server = PeerServer(cache, SECRET, "127.0.0.1")
    await server.start()
    base = f"{server.url}/org/model/resolve"
    auth = {"Authorization": f"Bearer {SECRET}"}
    snapshot = seeded.cache_dir / "models--org--model" / "snapshots" / commit
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/{commit}/w.bin")).status_code == 401
            wrong = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.get(f"{base}/{commit}/w.bin", headers=wrong)).status_code == 401
            part = await client.get(
                f"{base}/{commit}/w.bin", headers={**auth, "Range": "bytes=10-19"}
            )
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes 10-19/{SIZE}"
            blob = os.path.basename(os.readlink(snapshot / "w.bin"))
            assert part.headers["etag"] == f'"{blob}"'
            assert part.content == (snapshot / "w.bin").read_bytes()[10:20]
            head = await client.head(
                f"{base}/{commit}/w.bin", headers={**auth, "Range": f"bytes={SIZE - 5}-"}
            )
            assert (head.status_code, head.headers["content-length"]) == (206, "5")
            assert head.content == b""
            beyond = {**auth, "Range": f"bytes={SIZE}-"}
            assert (await client.get(f"{base}/{commit}/w.bin", headers=beyond)).status_code == 416
            # By the ETag the asker names (before the snapshot links it): the blob itself; an
            # ETag that is not one, or that names nothing here, is a 404 (this node fetches
            # nothing: nothing is waited for).
            by_etag = await client.get(
                f"{base}/{commit}/w.bin",
                headers={**auth, "X-Blob-Etag": blob, "Range": "bytes=0-3"},
            )
            assert by_etag.content == (snapshot / "w.bin").read_bytes()[:4]
            for etag in ("../x", "0" * 64):
                answer = await client.get(
                    f"{base}/{commit}/other.bin", headers={**auth, "X-Blob-Etag": etag}
                )
                assert answer.status_code == 404, etag
            # By commit only; nothing outside the snapshot's links to blobs.
            outside = tmp_path / "secret.txt"
            outside.write_text("not for the fleet")
            (snapshot / "planted").symlink_to(outside)
            for path in (
                "main/w.bin",
                f"{commit}/missing.bin",
                f"{commit}/..%2F..%2Fblobs",
                f"{commit}/planted",
                f"{'0' * 40}/w.bin",
            ):
                answer = await client.get(f"{base}/{path}", headers=auth)
                assert answer.status_code == 404, (path, answer.status_code)
            assert (
                await client.get(f"{server.url}/org/..%2Fx/resolve/{commit}/w.bin", headers=auth)
            ).status_code == 404
    finally:
        await server.stop()


async def test_a_node_copies_from_a_peer_still_receiving_and_the_hub_sends_each_byte_once(
    settings: Settings,
    tmp_path: Path,
    hub: FakeHub,
    commit: str,
    manager_of: list[ModelManager],
) -> None:
    """The pipeline of a rollout: the second node starts while the first is still fetching from
    the Hub (its uplink capped), and copies from the first's partial blob as it grows."""
    hub.uplink = 4 * MB  # about two seconds for w.bin
    first = node(settings, tmp_path, "first")
    seed = compose(first, HubCacheBackend(first))
    manager_of.append(seed)
    await seed.start()
    server = PeerServer(
        ModelCache(first.cache_dir),
        SECRET,
        "127.0.0.1",
        fetching=lambda repo: any(s.model.hf_repo == repo for s in seed.active_downloads()),
    )
    await server.start()
    try:
        await seed.add_model(MODEL, None)
        blobs = first.cache_dir / "models--org--model" / "blobs"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not any(blobs.glob("*.ranged.incomplete")):
            assert loop.time() < deadline, "the first node never began w.bin"
            await asyncio.sleep(0.02)
        status = await download(
            manager_of, node(settings, tmp_path, "second"), (Peer(server.url, SECRET),)
        )
        while (await seed.get_model_status(MODEL)).status is ModelStatus.DOWNLOADING:
            assert loop.time() < deadline + 60
            await asyncio.sleep(0.05)
    finally:
        await server.stop()
    assert status.status is ModelStatus.DOWNLOADED, status.error_message
    assert (await seed.get_model_status(MODEL)).status is ModelStatus.DOWNLOADED
    assert status.progress is not None
    assert status.progress.from_peers_bytes == SIZE + 2
    # The first node's copy was the only one the Hub sent.
    assert copies(hub) == SIZE + 2
    assert hub.count("GET", "*/resolve/*/w.bin") >= 1


async def test_the_parts_spread_over_the_peers_of_a_tier_then_the_next_tier(
    settings: Settings,
    tmp_path: Path,
    hub: FakeHub,
    repos: RepoBuilder,
    commit: str,
    manager_of: list[ModelManager],
) -> None:
    # Two peers of the first tier serve a part each in turn; a third, of the second tier, is not
    # asked while they serve.
    status, served = await three_peers(manager_of, node(settings, tmp_path, "second"), repos)
    assert status.status is ModelStatus.DOWNLOADED, status.error_message
    assert served == [SIZE // 2, SIZE // 2, 0]  # eight parts of 1 MiB, in turn
    assert copies(hub) == 0
    # The first tier fails (one of its peers does not have the file): the next tier completes
    # it (from what the first wrote, if anything); the Hub sends nothing.
    status, served = await three_peers(
        manager_of, node(settings, tmp_path, "third"), repos, http_error(404, path="*/w.bin")
    )
    assert status.status is ModelStatus.DOWNLOADED, status.error_message
    assert served[1] == 0
    assert served[2] > 0
    assert copies(hub) == 0


async def three_peers(
    managers: list[ModelManager],
    settings: Settings,
    repos: RepoBuilder,
    second_fails: Fault | None = None,
) -> tuple[ModelStatusResponse, list[int]]:
    """A download from two peers of the first tier and one of the second (fake hubs answering
    the fleet's secret); what each peer served of w.bin."""
    with (
        FakeHub(repos.root, tokens={SECRET}) as one,
        FakeHub(repos.root, tokens={SECRET}) as two,
        FakeHub(repos.root, tokens={SECRET}) as spare,
    ):
        if second_fails is not None:
            two.add_fault(second_fails)
        peers = (Peer(one.url, SECRET), Peer(two.url, SECRET), Peer(spare.url, SECRET, tier=1))
        status = await download(managers, settings, peers)
        return status, [p.served("*/resolve/*/w.bin") for p in (one, two, spare)]


async def test_a_kept_alive_connection_the_peer_closed_is_opened_again_not_a_failure(
    settings: Settings,
    tmp_path: Path,
    hub: FakeHub,
    repos: RepoBuilder,
    commit: str,
    manager_of: list[ModelManager],
) -> None:
    # A peer closes every connection once it has answered, without saying so (a keep-alive that
    # timed out while the connection was idle): each next part's request finds it closed. With
    # one try per part from a peer, that must not count as the peer failing.
    with FakeHub(repos.root, tokens={SECRET}) as peer:
        peer.drop_idle = True
        status = await download(
            manager_of, node(settings, tmp_path, "second"), (Peer(peer.url, SECRET),)
        )
        from_peer = peer.served("*/resolve/*")
    assert status.status is ModelStatus.DOWNLOADED, status.error_message
    assert copies(hub) == 0
    assert from_peer == SIZE + 2
