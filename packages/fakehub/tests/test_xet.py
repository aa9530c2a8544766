"""The fake hub's Xet path against the real client (huggingface_hub's ``xet_get`` and hf_xet).

Also pins the library facts the service relies on for Xet-stored files: the HEAD is skipped when the
tree listing is cached, the blob lands in the cache-wide shared store with a link in the repo's
``blobs/``, and hf_xet does not check content against any hash (so the service must).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, snapshot_download

from fakehub import FakeHub, Generated, RepoBuilder, corrupt, drop_after, http_error, xet

MB = 1024 * 1024
BIG = 65 * MB + 12_345  # two xorbs, the last chunk short


@pytest.fixture
def xet_hub(repos: RepoBuilder) -> Iterator[FakeHub]:
    with FakeHub(repos.root, xet=True) as server:
        yield server


@pytest.fixture
def model(repos: RepoBuilder) -> str:
    return repos.commit(
        "org/model",
        {
            "config.json": "{}",
            "model.safetensors": Generated(BIG, seed=11),
            "tiny.bin": Generated(1000, seed=12),
        },
    )


def _download(hub: FakeHub, cache_dir: Path) -> Path:
    return Path(snapshot_download("org/model", endpoint=hub.url, cache_dir=cache_dir, token=False))


def test_files_come_through_xet_into_the_shared_store(
    xet_hub: FakeHub, repos: RepoBuilder, model: str, cache_dir: Path
) -> None:
    snapshot = _download(xet_hub, cache_dir)
    entries = repos.repo("org/model").commits[model]
    for name in ("model.safetensors", "tiny.bin"):
        content = (snapshot / name).read_bytes()
        assert hashlib.sha256(content).hexdigest() == entries[name].sha256
    # LFS files travel as xorb ranges, never through /resolve; the regular file as before.
    assert xet_hub.count("GET", "*/resolve/*/model.safetensors") == 0
    assert xet_hub.count("HEAD", "*/resolve/*/model.safetensors") == 0  # the cached tree has it
    assert xet_hub.count("GET", xet_hub.content_path("org/model", "model.safetensors")) == 2
    assert xet_hub.count("GET", "*/resolve/*/config.json") == 1
    assert xet_hub.count("GET", "/cas/v2/reconstructions/*") >= 1  # 404: falls back to v1
    assert xet_hub.count("GET", "/cas/v1/reconstructions/*") == 2
    # The library keeps Xet blobs once per cache: the repo's blob is a link into <cache>/blobs.
    weights = entries["model.safetensors"]
    repo_blob = cache_dir / "models--org--model" / "blobs" / weights.sha256
    assert repo_blob.is_symlink()
    xet_hash = xet.file_hash(weights.sha256)
    assert repo_blob.resolve() == (cache_dir / "blobs" / xet_hash[:2] / xet_hash).resolve()
    result = HfApi(endpoint=xet_hub.url).verify_repo_checksums("org/model", cache_dir=cache_dir)
    assert result.mismatches == []


def test_without_xet_the_same_repo_is_served_over_plain_http(
    hub: FakeHub, model: str, cache_dir: Path
) -> None:
    snapshot = _download(hub, cache_dir)
    assert (snapshot / "model.safetensors").stat().st_size == BIG
    assert hub.count("GET", hub.content_path("org/model", "model.safetensors")) == 1
    assert hub.count(None, "/cas/*") == 0
    assert not (cache_dir / "blobs").exists()


def test_cas_protocol(xet_hub: FakeHub, repos: RepoBuilder, model: str) -> None:
    entry = repos.repo("org/model").commits[model]["model.safetensors"]
    head = httpx.head(f"{xet_hub.url}/org/model/resolve/main/model.safetensors")
    assert head.headers["X-Xet-Hash"] == xet.file_hash(entry.sha256)
    token_url = head.links["xet-auth"]["url"]
    assert token_url == f"{xet_hub.url}/api/models/org/model/xet-read-token/{model}"
    granted = httpx.get(token_url).headers
    cas, token = granted["X-Xet-Cas-Url"], granted["X-Xet-Access-Token"]
    assert int(granted["X-Xet-Token-Expiration"]) > 0
    file_url = f"{cas}/v1/reconstructions/{xet.file_hash(entry.sha256)}"
    assert httpx.get(file_url).status_code == 401
    assert httpx.get(file_url, headers={"Authorization": "Bearer xet_forged"}).status_code == 401
    assert httpx.get(file_url.replace("/v1/", "/v2/")).status_code == 404
    auth = {"Authorization": f"Bearer {token}"}
    # A range that starts inside a chunk: whole chunks are fetched, the offset says what to skip.
    first, last = 3 * xet.CHUNK_SIZE + 10, 65 * MB + 100
    plan = httpx.get(file_url, headers={**auth, "Range": f"bytes={first}-{last}"}).json()
    assert plan["offset_into_first_range"] == 10
    assert [t["range"] for t in plan["terms"]] == [
        {"start": 3, "end": 1024},
        {"start": 0, "end": 17},
    ]
    rebuilt = bytearray()
    for term in plan["terms"]:
        (fetch,) = plan["fetch_info"][term["hash"]]
        assert httpx.get(fetch["url"]).status_code == 403  # a xorb is read by ranges only
        span = fetch["url_range"]
        data = httpx.get(fetch["url"], headers={"Range": f"bytes={span['start']}-{span['end']}"})
        assert data.status_code == 206
        rebuilt += _decode_chunks(data.content, term["unpacked_length"])
    content = (repos.root / "org/model/objects" / entry.sha256).read_bytes()
    skip = plan["offset_into_first_range"]
    assert rebuilt[skip : skip + last - first + 1] == content[first : last + 1]
    over = httpx.get(file_url, headers={**auth, "Range": f"bytes={BIG}-{BIG + 5}"})
    assert over.status_code == 416


def _decode_chunks(data: bytes, unpacked_length: int) -> bytes:
    """Chunks as spec/xorb.md lays them out: an 8-byte header, then the (here uncompressed) data."""
    out, position = bytearray(), 0
    view = memoryview(data)
    while position < len(data):
        header = data[position : position + xet.HEADER_SIZE]
        assert header[0] == 0
        assert header[4] == xet.SCHEME_NONE
        size = int.from_bytes(header[1:4], "little")
        assert size == int.from_bytes(header[5:8], "little")
        out += view[position + xet.HEADER_SIZE : position + xet.HEADER_SIZE + size]
        position += xet.HEADER_SIZE + size
    assert len(out) == unpacked_length
    return bytes(out)


def test_a_dropped_xorb_range_is_retried_by_hf_xet(
    xet_hub: FakeHub, model: str, cache_dir: Path
) -> None:
    weights = xet_hub.content_path("org/model", "model.safetensors")
    fault = xet_hub.add_fault(drop_after(MB, path=weights, times=1))
    snapshot = _download(xet_hub, cache_dir)
    assert fault.applied == 1
    assert (snapshot / "model.safetensors").stat().st_size == BIG
    assert xet_hub.count("GET", weights) == 3


def test_hf_xet_stores_corrupted_content_as_good(
    xet_hub: FakeHub, repos: RepoBuilder, model: str, cache_dir: Path
) -> None:
    """No hash check on the Xet path either (the chunk hashes are not verified on download): the
    blob even goes to the shared store, where other repos would reuse it."""
    xet_hub.add_fault(corrupt(path=xet_hub.content_path("org/model", "tiny.bin")))
    snapshot = _download(xet_hub, cache_dir)
    good = repos.repo("org/model").commits[model]["tiny.bin"].sha256
    assert hashlib.sha256((snapshot / "tiny.bin").read_bytes()).hexdigest() != good
    assert os.path.islink(cache_dir / "models--org--model" / "blobs" / good)


def test_cas_errors_reach_the_caller_as_runtime_errors(
    xet_hub: FakeHub, model: str, cache_dir: Path
) -> None:
    """hf_xet raises a bare RuntimeError whose text carries the HTTP status: the service
    classifies Xet failures from it."""
    xet_hub.add_fault(http_error(404, path="/cas/*/reconstructions/*"))
    with pytest.raises(RuntimeError, match=r"HTTP status client error \(404 Not Found\)"):
        _download(xet_hub, cache_dir)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 5),  # inside the first header
        (3, xet.HEADER_SIZE + 10),  # across a header into the data
        (xet.HEADER_SIZE + xet.CHUNK_SIZE - 4, xet.HEADER_SIZE + xet.CHUNK_SIZE + 20),  # a seam
        (70_000, 70_000 + 3 * xet.CHUNK_SIZE),
        (0, None),  # the whole second xorb, its last chunk short
    ],
)
def test_a_xorb_sent_from_the_file_is_the_xorb_read(
    repos: RepoBuilder, model: str, start: int, end: int | None
) -> None:
    """The hub sends a xorb as headers and ``sendfile`` spans of the content file when no fault
    touches it, and reads it whole otherwise: both give the same bytes."""
    entry = repos.repo("org/model").commits[model]["model.safetensors"]
    content_path = repos.root / "org/model/objects" / entry.sha256
    content = content_path.read_bytes()
    with xet.XorbReader(content_path, BIG, 1) as reader:
        stop = reader.size if end is None else end
        sent = b"".join(
            span if isinstance(span, bytes) else content[span[0] : span[0] + span[1]]
            for span in reader.spans(start, stop)
        )
        reader.seek(start)
        assert sent == reader.read(stop - start)
        assert len(sent) == stop - start


def test_a_xorb_range_that_ends_in_a_chunk_header(xet_hub: FakeHub, model: str) -> None:
    """The header bytes of a range that ends inside one are sent, not held back for data that
    does not follow."""
    url = f"{xet_hub.url}{xet_hub.content_path('org/model', 'model.safetensors')[:-1]}0"
    got = httpx.get(url, headers={"Range": "bytes=0-3"}, timeout=10)
    assert got.status_code == 206
    assert got.content == xet.chunk_header(xet.CHUNK_SIZE)[:4]
