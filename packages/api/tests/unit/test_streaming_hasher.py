"""The worker's streaming hasher: blobs hashed while written, results tied to the inode."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from api.models.backend import RemoteFile
from api.models.hub.worker import StreamingHasher
from tests.helpers import MB, anchored


def write_like_the_library(blobs: Path, etag: str, data: bytes, pause: float = 0.06) -> Path:
    """Write ``<etag>.<random>.incomplete`` in pieces, then rename it to the blob."""
    temporary = blobs / f"{etag}.1a2b3c4d.incomplete"
    with temporary.open("wb") as out:
        for start in range(0, len(data), MB):
            out.write(data[start : start + MB])
            out.flush()
            time.sleep(pause)
    os.replace(temporary, blobs / etag)
    return blobs / etag


def test_hashes_while_written_and_ties_the_result_to_the_inode(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    good = os.urandom(3 * MB + 5)
    good_etag = hashlib.sha256(good).hexdigest()
    bad = os.urandom(2 * MB)
    bad_etag = hashlib.sha256(b"what the hub promised").hexdigest()
    small = b'{"a": 1}'
    small_etag = hashlib.sha1(b"blob %d\0" % len(small) + small).hexdigest()
    hasher = StreamingHasher(
        anchored(blobs),
        (
            RemoteFile("model.bin", len(good), good_etag),
            RemoteFile("other.bin", len(bad), bad_etag),
            RemoteFile("config.json", len(small), small_etag),
        ),
    )
    hasher.start()
    good_path = write_like_the_library(blobs, good_etag, good)
    bad_path = write_like_the_library(blobs, bad_etag, bad)
    small_path = write_like_the_library(blobs, small_etag, small, pause=0.3)
    hasher.stop()
    assert hasher.results[good_etag] == (good_path.stat().st_ino, True)
    assert hasher.results[bad_etag] == (bad_path.stat().st_ino, False)
    # A small file is not followed (a directory scan per step costs more than hashing it from
    # disk afterwards): verification reads it.
    assert small_path.exists()
    assert small_etag not in hasher.results


def test_with_only_small_files_it_does_not_scan(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    small = b"x" * 1000
    etag = hashlib.sha256(small).hexdigest()
    hasher = StreamingHasher(anchored(blobs), (RemoteFile("a.json", len(small), etag),))
    hasher.start()
    hasher.join(timeout=5)
    assert not hasher.is_alive()  # ended at once: nothing to follow
    write_like_the_library(blobs, etag, small, pause=0)
    hasher.stop()
    assert hasher.results == {}


def test_a_file_the_library_gives_up_on_has_no_result(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = os.urandom(MB)
    etag = hashlib.sha256(data).hexdigest()
    hasher = StreamingHasher(anchored(blobs), (RemoteFile("w.bin", len(data), etag),))
    hasher.start()
    temporary = blobs / f"{etag}.deadbeef.incomplete"
    temporary.write_bytes(data[: MB // 2])
    time.sleep(0.1)
    temporary.unlink()  # the library removes its temporary file when a download fails
    time.sleep(0.1)
    hasher.stop()
    assert etag not in hasher.results
